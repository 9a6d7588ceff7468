package cmdutil

import (
	"errors"

	"github.com/changefeed/changefeed/kafkaconn"
)

// KafkaFlags are the Kafka connection flags of a command, bound to a
// kafkaconn.Config. Finish completes the Config after parsing.
type KafkaFlags struct {
	ef       *EnvFlags
	cfg      *kafkaconn.Config
	brokers  string
	embedded *bool
}

// BindKafka registers the connection flags every command has: --kafka-brokers,
// --kafka-sasl-mechanism, --kafka-sasl-user, --kafka-tls,
// --kafka-tls-ca-file, --kafka-tls-cert-file, --kafka-tls-key-file and
// --kafka-tls-insecure-skip-verify. The SASL password is a secret and has no
// flag: Finish reads it from $CHANGEFEED_KAFKA_SASL_PASSWORD.
func BindKafka(ef *EnvFlags, cfg *kafkaconn.Config) *KafkaFlags {
	k := &KafkaFlags{ef: ef, cfg: cfg}
	ef.String(&k.brokers, "kafka-brokers", "CHANGEFEED_KAFKA_BROKERS", "", "comma-separated Kafka seed brokers host:port")
	ef.String(&cfg.SASLMechanism, "kafka-sasl-mechanism", "CHANGEFEED_KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; password from $CHANGEFEED_KAFKA_SASL_PASSWORD")
	ef.String(&cfg.SASLUser, "kafka-sasl-user", "CHANGEFEED_KAFKA_SASL_USER", "", "SASL user")
	ef.Bool(&cfg.TLS, "kafka-tls", "CHANGEFEED_KAFKA_TLS", false, "connect to Kafka with TLS")
	ef.String(&cfg.CAFile, "kafka-tls-ca-file", "CHANGEFEED_KAFKA_TLS_CA_FILE", "", "PEM CA bundle added to the system pool")
	ef.String(&cfg.CertFile, "kafka-tls-cert-file", "CHANGEFEED_KAFKA_TLS_CERT_FILE", "", "client certificate (mutual TLS)")
	ef.String(&cfg.KeyFile, "kafka-tls-key-file", "CHANGEFEED_KAFKA_TLS_KEY_FILE", "", "client key (mutual TLS)")
	ef.Bool(&cfg.InsecureSkipVerify, "kafka-tls-insecure-skip-verify", "CHANGEFEED_KAFKA_TLS_INSECURE_SKIP_VERIFY", false, "do not verify the brokers' certificates (test clusters only)")
	return k
}

// BindClientID registers --kafka-client-id with the given default.
func (k *KafkaFlags) BindClientID(def string) {
	k.ef.String(&k.cfg.ClientID, "kafka-client-id", "CHANGEFEED_KAFKA_CLIENT_ID", def, "Kafka client id")
}

// BindTopics registers --kafka-partitions (default 3) and
// --kafka-replication-factor (default -1) of the topics that creator (as in
// "the publisher") creates.
func (k *KafkaFlags) BindTopics(partitions, replication *int, creator string) {
	k.ef.Int(partitions, "kafka-partitions", "CHANGEFEED_KAFKA_PARTITIONS", 3, "partitions of topics "+creator+" creates")
	k.ef.Int(replication, "kafka-replication-factor", "CHANGEFEED_KAFKA_REPLICATION_FACTOR", -1, "replication factor of created topics (-1: broker default)")
}

// BindEmbedded registers --embedded-kafka, an in-process kfake cluster used
// instead of brokers, and makes Finish require one or the other.
func (k *KafkaFlags) BindEmbedded(p *bool) {
	k.embedded = p
	k.ef.Bool(p, "embedded-kafka", "CHANGEFEED_EMBEDDED_KAFKA", false, "run an in-memory Kafka (kfake) in the process instead of --kafka-brokers: demos only")
}

// Finish completes the Config after parsing: it reads the SASL password from
// the environment and splits --kafka-brokers into Brokers. With
// BindEmbedded, no brokers and no --embedded-kafka is an error; otherwise
// Finish leaves checking for brokers to the caller and returns nil.
func (k *KafkaFlags) Finish() error {
	k.cfg.SASLPassword = k.ef.Getenv("CHANGEFEED_KAFKA_SASL_PASSWORD")
	k.cfg.Brokers = SplitList(k.brokers)
	if k.embedded != nil && len(k.cfg.Brokers) == 0 && !*k.embedded {
		return errors.New("no Kafka brokers: set $CHANGEFEED_KAFKA_BROKERS, --kafka-brokers or --embedded-kafka")
	}
	return nil
}
