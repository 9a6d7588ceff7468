package publish

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/stub"
)

// fast makes problems show and end the producer within seconds.
func fast(o Options) Options {
	o.CheckInterval, o.FailAfter = 100*time.Millisecond, 2*time.Second
	return o
}

// waitFailed waits for the producer to fail for good and returns why.
func waitFailed(t *testing.T, p *Producer, within time.Duration) error {
	t.Helper()
	select {
	case <-p.Failed():
		return p.Err()
	case <-time.After(within):
		t.Fatalf("producer did not fail within %s", within)
		return nil
	}
}

// pingErr returns Ping's error with a short deadline.
func pingErr(p *Producer) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	return p.Ping(ctx)
}

// TestSASLRefusalFailsReadinessThenProducer: a wrong SASL password is logged
// once, fails readiness, and ends the producer (and a context derived with
// StopOnFailure) after FailAfter with ErrAuth naming SASL.
func TestSASLRefusalFailsReadinessThenProducer(t *testing.T) {
	k := testenv.Kafka(t, testenv.WithSASL("SCRAM-SHA-256", "changefeed", "right-secret"))
	p, logs := newProducer(t, kafkaconn.Config{Brokers: k.Brokers(), SASLMechanism: "SCRAM-SHA-256",
		SASLUser: "changefeed", SASLPassword: "wrong-secret"}, fast(oneBroker))
	runCtx, stop := p.StopOnFailure(context.Background())
	defer stop()
	start := time.Now()
	testenv.Eventually(t, 10*time.Second, func() string {
		if err := pingErr(p); err == nil || !strings.Contains(err.Error(), "SASL") {
			return "ping: " + errString(err)
		}
		return ""
	})
	err := waitFailed(t, p, 15*time.Second)
	took := time.Since(start)
	if !errors.Is(err, ErrAuth) || !Permanent(err) || !strings.Contains(err.Error(), "SASL") {
		t.Fatalf("Err = %v, want ErrAuth naming SASL", err)
	}
	<-runCtx.Done()
	if !errors.Is(context.Cause(runCtx), ErrAuth) {
		t.Fatalf("StopOnFailure cause = %v", context.Cause(runCtx))
	}
	if n := logs.count("retrying cannot cure", "SASL"); n != 1 {
		t.Fatalf("%d log lines for the SASL cause, want 1:\n%s", n, logs)
	}
	if n := logs.count("franz-go", "sasl"); n > 2 {
		t.Fatalf("franz-go's SASL line logged %d times, want it held back:\n%s", n, logs)
	}
	if strings.Contains(logs.String(), "wrong-secret") {
		t.Fatal("the password is in the log")
	}
	t.Logf("SASL refusal ended the producer after %s (FailAfter 2s)", took.Round(time.Millisecond))
}

// TestTLSRefusalFailsProducer: a broker whose certificate the client does
// not trust ends the producer with ErrAuth naming TLS.
func TestTLSRefusalFailsProducer(t *testing.T) {
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.TLS(&tls.Config{Certificates: []tls.Certificate{selfSigned(t)}, MinVersion: tls.VersionTLS12}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Close)
	p, logs := newProducer(t, kafkaconn.Config{Brokers: cluster.ListenAddrs(), TLS: true}, fast(oneBroker))
	err = waitFailed(t, p, 15*time.Second)
	if !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "TLS") {
		t.Fatalf("Err = %v, want ErrAuth naming TLS", err)
	}
	if n := logs.count("retrying cannot cure", "TLS"); n != 1 {
		t.Fatalf("%d log lines for the TLS cause, want 1:\n%s", n, logs)
	}
}

// TestDeletedTopicFailsReadinessThenProducer: a topic deleted under a
// running producer is logged once, fails readiness at once, is not
// recreated behind the operator's back, and ends the producer with
// ErrTopicDeleted after FailAfter.
func TestDeletedTopicFailsReadinessThenProducer(t *testing.T) {
	k := testenv.Kafka(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, logs := newProducer(t, kafkaconn.Config{Brokers: k.Brokers()}, fast(oneBroker))
	if err := p.EnsureTopics(ctx, "doomed", "kept"); err != nil {
		t.Fatal(err)
	}
	if err := pingErr(p); err != nil {
		t.Fatalf("ping before the deletion: %v", err)
	}
	adm := kadm.NewClient(kgoClient(t, k.Brokers()))
	if _, err := adm.DeleteTopic(ctx, "doomed"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, func() string {
		if err := pingErr(p); !errors.Is(err, ErrTopicDeleted) || !strings.Contains(err.Error(), "doomed") {
			return "ping: " + errString(err)
		}
		return ""
	})
	err := waitFailed(t, p, 10*time.Second)
	if !errors.Is(err, ErrTopicDeleted) || !strings.Contains(err.Error(), "doomed") || strings.Contains(err.Error(), "kept") {
		t.Fatalf("Err = %v, want ErrTopicDeleted naming doomed only", err)
	}
	if n := logs.count("retrying cannot cure", "topic deleted: doomed"); n != 1 {
		t.Fatalf("%d log lines for the deleted topic, want 1:\n%s", n, logs)
	}
	td, err := adm.ListTopics(ctx, "doomed")
	if err != nil {
		t.Fatal(err)
	}
	if td["doomed"].Err == nil {
		t.Fatal("the deleted topic was recreated")
	}
}

// TestRecreatedTopicFailsReadiness: a topic deleted and created again under
// the same name (a new topic ID) is reported like a deleted one.
func TestRecreatedTopicFailsReadiness(t *testing.T) {
	k := testenv.Kafka(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, _ := newProducer(t, kafkaconn.Config{Brokers: k.Brokers()}, fast(oneBroker))
	if err := p.EnsureTopics(ctx, "reborn"); err != nil {
		t.Fatal(err)
	}
	adm := kadm.NewClient(kgoClient(t, k.Brokers()))
	if _, err := adm.DeleteTopic(ctx, "reborn"); err != nil {
		t.Fatal(err)
	}
	if _, err := adm.CreateTopic(ctx, 1, 1, nil, "reborn"); err != nil {
		t.Fatal(err)
	}
	err := waitFailed(t, p, 10*time.Second)
	if !errors.Is(err, ErrTopicDeleted) || !strings.Contains(err.Error(), "reborn") {
		t.Fatalf("Err = %v, want ErrTopicDeleted naming the recreated topic", err)
	}
}

// TestDataLossIsFatal: a broker answering that it no longer knows records
// it acknowledged (OUT_OF_ORDER_SEQUENCE_NUMBER at or before our last acked
// offset) ends the producer with ErrDataLoss and counts it.
func TestDataLossIsFatal(t *testing.T) {
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "stubs"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, logs := newProducer(t, kafkaconn.Config{Brokers: cluster.ListenAddrs()}, fast(oneBroker))
	if err := p.EnsureTopics(ctx, "stubs"); err != nil {
		t.Fatal(err)
	}
	publish := func(id string) error {
		done := make(chan error, 1)
		p.Publish(ctx, "stubs", &stub.Stub{DocumentID: id, DataSourceType: stub.SourceSQL, DataSourceName: "t", DocumentType: "X", LSN: 1}, func(err error) { done <- err })
		return <-done
	}
	if err := publish("first"); err != nil {
		t.Fatal(err)
	}
	var lied atomic.Bool
	cluster.ControlKey(int16(kmsg.Produce), func(kr kmsg.Request) (kmsg.Response, error, bool) {
		if lied.Swap(true) {
			return nil, nil, false
		}
		req := kr.(*kmsg.ProduceRequest)
		resp := req.ResponseKind().(*kmsg.ProduceResponse)
		for _, rt := range req.Topics {
			st := kmsg.NewProduceResponseTopic()
			st.Topic, st.TopicID = rt.Topic, rt.TopicID
			for _, rp := range rt.Partitions {
				sp := kmsg.NewProduceResponseTopicPartition()
				sp.Partition, sp.ErrorCode, sp.LogStartOffset = rp.Partition, kerr.OutOfOrderSequenceNumber.Code, 0
				st.Partitions = append(st.Partitions, sp)
			}
			resp.Topics = append(resp.Topics, st)
		}
		return resp, nil, true
	})
	_ = publish("second") // retried under a new producer id after the loss
	err = waitFailed(t, p, 10*time.Second)
	if !errors.Is(err, ErrDataLoss) || !strings.Contains(err.Error(), "stubs partition 0") {
		t.Fatalf("Err = %v, want ErrDataLoss naming the partition", err)
	}
	if !errors.Is(pingErr(p), ErrDataLoss) {
		t.Fatal("ready after data loss")
	}
	if n := logs.count(`"level":"ERROR"`, "failed for good", "lost acknowledged records"); n != 1 {
		t.Fatalf("%d error lines about the loss, want 1:\n%s", n, logs)
	}
}

// TestFranzGoLogsThroughSlog: franz-go's own warnings (here: no broker to
// dial) reach the logger, at WARN and above, once per message per window.
func TestFranzGoLogsThroughSlog(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now
	p, logs := newProducer(t, kafkaconn.Config{Brokers: []string{addr}}, oneBroker)
	for range 3 {
		_ = pingErr(p)
	}
	if n := logs.count(`"component":"franz-go"`, "unable to open connection to broker"); n != 1 {
		t.Fatalf("%d franz-go lines about the dial failure, want exactly 1:\n%s", n, logs)
	}
	if n := logs.count(`"component":"franz-go"`, `"level":"DEBUG"`) + logs.count(`"component":"franz-go"`, `"level":"INFO"`); n != 0 {
		t.Fatalf("%d franz-go lines below WARN", n)
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

// selfSigned returns a certificate for 127.0.0.1 that no client trusts.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "untrusted"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
