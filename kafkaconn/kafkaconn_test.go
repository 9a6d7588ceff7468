package kafkaconn

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/testenv"
)

func TestOptsValidation(t *testing.T) {
	if _, err := (Config{}).Opts(); !errors.Is(err, ErrConfig) {
		t.Fatalf("no brokers: err = %v, want ErrConfig", err)
	}
	if _, err := (Config{Brokers: []string{"x:1"}, SASLMechanism: "GSSAPI"}).Opts(); !errors.Is(err, ErrConfig) {
		t.Fatalf("unknown mechanism: err = %v, want ErrConfig", err)
	}
	if _, err := (Config{Brokers: []string{"x:1"}, TLS: true, CAFile: "/nonexistent"}).Opts(); !errors.Is(err, ErrConfig) {
		t.Fatalf("missing CA file: err = %v, want ErrConfig", err)
	}
	s := Config{Brokers: []string{"b:9092"}, SASLMechanism: "PLAIN", SASLUser: "u", SASLPassword: "hunter2"}.String()
	if strings.Contains(s, "hunter2") {
		t.Fatalf("String() leaks the password: %s", s)
	}
}

// TestTLSAndSASL runs a kfake cluster that requires TLS and SCRAM and checks
// that a client built from Config produces through it, and that a client
// that does not trust the cluster's CA cannot.
func TestTLSAndSASL(t *testing.T) {
	dir := t.TempDir()
	caFile, serverCert := selfSigned(t, dir)
	cluster, err := kfake.NewCluster(
		kfake.NumBrokers(1),
		kfake.TLS(&tls.Config{Certificates: []tls.Certificate{serverCert}, MinVersion: tls.VersionTLS12}),
		kfake.EnableSASL(),
		kfake.Superuser("SCRAM-SHA-512", "changefeed", "s3cret"),
		kfake.SeedTopics(1, "t"),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Close)

	produce := func(c Config, timeout time.Duration) error {
		opts, err := c.Opts()
		if err != nil {
			return err
		}
		cl, err := kgo.NewClient(opts...)
		if err != nil {
			return err
		}
		defer cl.Close()
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		return cl.ProduceSync(ctx, &kgo.Record{Topic: "t", Value: []byte("v")}).FirstErr()
	}
	good := Config{Brokers: cluster.ListenAddrs(), TLS: true, CAFile: caFile,
		SASLMechanism: "SCRAM-SHA-512", SASLUser: "changefeed", SASLPassword: "s3cret"}
	if err := produce(good, 10*time.Second); err != nil {
		t.Fatalf("TLS + SCRAM produce: %v", err)
	}
	untrusted := good
	untrusted.CAFile = ""
	if err := produce(untrusted, 2*time.Second); err == nil {
		t.Fatal("a client that does not trust the CA produced")
	}
	wrongPass := good
	wrongPass.SASLPassword = "nope"
	if err := produce(wrongPass, 2*time.Second); err == nil {
		t.Fatal("a wrong SASL password produced")
	}
}

// selfSigned writes a CA certificate for 127.0.0.1 and returns its path and
// the matching server certificate.
func selfSigned(t *testing.T, dir string) (string, tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "changefeed test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(path, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, cert
}

// TestPlainSASLNeedsTLSOrOptIn: SASL PLAIN without TLS would send the
// password in clear text; it is refused unless allowed explicitly, and then
// works against a PLAIN broker.
func TestPlainSASLNeedsTLSOrOptIn(t *testing.T) {
	k := testenv.Kafka(t, testenv.WithSASL("PLAIN", "changefeed", "plain-secret"))
	c := Config{Brokers: k.Brokers(), SASLMechanism: "PLAIN", SASLUser: "changefeed", SASLPassword: "plain-secret"}
	_, err := c.Opts()
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "clear text") || strings.Contains(err.Error(), "plain-secret") {
		t.Fatalf("PLAIN without TLS: err = %v, want ErrConfig about clear text", err)
	}
	scram := c
	scram.SASLMechanism = "SCRAM-SHA-256"
	if _, err := scram.Opts(); err != nil {
		t.Fatalf("SCRAM without TLS needs no opt-in: %v", err)
	}
	c.AllowPlaintextSASL = true
	opts, err := c.Opts()
	if err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(append(opts, kgo.AllowAutoTopicCreation())...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, &kgo.Record{Topic: "t", Value: []byte("v")}).FirstErr(); err != nil {
		t.Fatalf("PLAIN without TLS, allowed: %v", err)
	}
}
