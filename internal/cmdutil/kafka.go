package cmdutil

import (
	"errors"
	"time"

	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/publish"
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
// --kafka-sasl-allow-plaintext, --kafka-tls-ca-file, --kafka-tls-cert-file,
// --kafka-tls-key-file and --kafka-tls-insecure-skip-verify. The SASL
// password is a secret and has no flag: Finish reads it from
// $CHANGEFEED_KAFKA_SASL_PASSWORD.
func BindKafka(ef *EnvFlags, cfg *kafkaconn.Config) *KafkaFlags {
	k := &KafkaFlags{ef: ef, cfg: cfg}
	ef.String(&k.brokers, "kafka-brokers", "CHANGEFEED_KAFKA_BROKERS", "", "comma-separated Kafka seed brokers host:port")
	ef.String(&cfg.SASLMechanism, "kafka-sasl-mechanism", "CHANGEFEED_KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; password from $CHANGEFEED_KAFKA_SASL_PASSWORD")
	ef.String(&cfg.SASLUser, "kafka-sasl-user", "CHANGEFEED_KAFKA_SASL_USER", "", "SASL user")
	ef.Bool(&cfg.AllowPlaintextSASL, "kafka-sasl-allow-plaintext", "CHANGEFEED_KAFKA_SASL_ALLOW_PLAINTEXT", false, "allow SASL PLAIN without TLS (the password crosses the network in clear text)")
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

// TopicFlags are a source's settings for the topics it publishes to.
type TopicFlags struct {
	Partitions, ReplicationFactor, MinInsyncReplicas int
	AllowUnsafeTopics                                bool
	OversizedTopic                                   string
	FailAfter                                        time.Duration
}

// BindTopics registers the settings of the topics that creator (as in "the
// publisher") creates and of how its producer treats them:
// --kafka-partitions (3), --kafka-replication-factor (3),
// --kafka-min-insync-replicas (2), --kafka-allow-unsafe-topics,
// --kafka-oversized-topic (changefeed-oversized) and --kafka-fail-after
// (1m). The defaults suit a cluster of three brokers or more.
func (k *KafkaFlags) BindTopics(t *TopicFlags, creator string) {
	k.ef.Int(&t.Partitions, "kafka-partitions", "CHANGEFEED_KAFKA_PARTITIONS", 3, "partitions of topics "+creator+" creates")
	k.ef.Int(&t.ReplicationFactor, "kafka-replication-factor", "CHANGEFEED_KAFKA_REPLICATION_FACTOR", 3, "replication factor of created topics (-1: broker default; 1 for a single broker)")
	k.ef.Int(&t.MinInsyncReplicas, "kafka-min-insync-replicas", "CHANGEFEED_KAFKA_MIN_INSYNC_REPLICAS", 2, "min.insync.replicas set on created topics and required of existing ones (1 for a single broker; -1: neither)")
	k.ef.Bool(&t.AllowUnsafeTopics, "kafka-allow-unsafe-topics", "CHANGEFEED_KAFKA_ALLOW_UNSAFE_TOPICS", false, "start on existing topics whose min.insync.replicas is below the required one (logged as an error)")
	k.ef.String(&t.OversizedTopic, "kafka-oversized-topic", "CHANGEFEED_KAFKA_OVERSIZED_TOPIC", "changefeed-oversized", "topic recording stubs too large for their topic, which are then skipped (empty: stop on them)")
	k.ef.Duration(&t.FailAfter, "kafka-fail-after", "CHANGEFEED_KAFKA_FAIL_AFTER", time.Minute, "how long a SASL/TLS refusal or a deleted topic may last before the process exits")
}

// Options returns the producer options for t. With an embedded (one-broker)
// Kafka, replication and min.insync.replicas are 1.
func (t TopicFlags) Options(component string, embedded bool) publish.Options {
	o := publish.Options{
		Partitions:        int32(t.Partitions),
		ReplicationFactor: int16(t.ReplicationFactor),
		MinInsyncReplicas: t.MinInsyncReplicas,
		AllowUnsafeTopics: t.AllowUnsafeTopics,
		OversizedTopic:    t.OversizedTopic,
		FailAfter:         t.FailAfter,
		Component:         component,
	}
	if embedded {
		o.ReplicationFactor, o.MinInsyncReplicas = 1, 1
	}
	return o
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
