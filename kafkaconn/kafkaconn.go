// Package kafkaconn turns connection settings (brokers, TLS, SASL) into
// franz-go client options shared by producers and consumers. It works the same
// against Apache Kafka, Redpanda, MSK and kfake: nothing here is broker-specific.
package kafkaconn

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

// Config is how to reach the cluster.
type Config struct {
	// Brokers are seed addresses, host:port.
	Brokers []string
	// ClientID names this client in broker logs and quotas.
	ClientID string

	// TLS enables TLS. CAFile adds a CA bundle to the system pool; CertFile
	// and KeyFile enable client certificates (mutual TLS).
	TLS                bool
	CAFile             string
	CertFile, KeyFile  string
	InsecureSkipVerify bool

	// SASLMechanism is "", "PLAIN", "SCRAM-SHA-256" or "SCRAM-SHA-512".
	// The password is a secret: it is never logged or printed by String.
	SASLMechanism string
	SASLUser      string
	SASLPassword  string
	// AllowPlaintextSASL permits SASL PLAIN without TLS, which sends the
	// password in clear text over the network. Off by default: Opts
	// refuses that combination unless this is set (a trusted network, a
	// test cluster). SCRAM never sends the password and needs no opt-in.
	AllowPlaintextSASL bool
}

// ErrConfig marks invalid settings.
var ErrConfig = errors.New("kafka config")

// String describes the settings without secrets.
func (c Config) String() string {
	s := fmt.Sprintf("brokers=%s tls=%t", strings.Join(c.Brokers, ","), c.TLS)
	if c.SASLMechanism != "" {
		s += fmt.Sprintf(" sasl=%s user=%s", c.SASLMechanism, c.SASLUser)
	}
	return s
}

// Opts returns the client options for the settings.
func (c Config) Opts() ([]kgo.Opt, error) {
	if len(c.Brokers) == 0 {
		return nil, fmt.Errorf("%w: no brokers", ErrConfig)
	}
	opts := []kgo.Opt{kgo.SeedBrokers(c.Brokers...)}
	if c.ClientID != "" {
		opts = append(opts, kgo.ClientID(c.ClientID))
	}
	if c.TLS {
		tc, err := c.tlsConfig()
		if err != nil {
			return nil, err
		}
		opts = append(opts, kgo.DialTLSConfig(tc))
	}
	switch strings.ToUpper(c.SASLMechanism) {
	case "":
	case "PLAIN":
		if !c.TLS && !c.AllowPlaintextSASL {
			return nil, fmt.Errorf("%w: SASL PLAIN without TLS sends the password in clear text: enable TLS, use SCRAM, or allow it explicitly ($CHANGEFEED_KAFKA_SASL_ALLOW_PLAINTEXT=true)", ErrConfig)
		}
		opts = append(opts, kgo.SASL(plain.Auth{User: c.SASLUser, Pass: c.SASLPassword}.AsMechanism()))
	case "SCRAM-SHA-256":
		opts = append(opts, kgo.SASL(scram.Auth{User: c.SASLUser, Pass: c.SASLPassword}.AsSha256Mechanism()))
	case "SCRAM-SHA-512":
		opts = append(opts, kgo.SASL(scram.Auth{User: c.SASLUser, Pass: c.SASLPassword}.AsSha512Mechanism()))
	default:
		return nil, fmt.Errorf("%w: sasl mechanism %q: want PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", ErrConfig, c.SASLMechanism)
	}
	return opts, nil
}

func (c Config) tlsConfig() (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: c.InsecureSkipVerify} //nolint:gosec // opt-in for test clusters
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("%w: read CA file: %w", ErrConfig, err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%w: CA file %s holds no PEM certificate", ErrConfig, c.CAFile)
		}
		tc.RootCAs = pool
	}
	if c.CertFile != "" || c.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("%w: load client certificate: %w", ErrConfig, err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}
