package publish

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/stub"
)

// TestTopicsCreatedWithDurability: created topics carry the configured
// min.insync.replicas as a topic config, and the defaults (replication 3)
// are refused for good by a one-broker cluster instead of retried.
func TestTopicsCreatedWithDurability(t *testing.T) {
	k := testenv.Kafka(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, _ := newProducer(t, kafkaconn.Config{Brokers: k.Brokers()}, Options{Partitions: 2, ReplicationFactor: 1, MinInsyncReplicas: 1})
	if err := p.EnsureTopics(ctx, "durable"); err != nil {
		t.Fatal(err)
	}
	adm := kadm.NewClient(kgoClient(t, k.Brokers()))
	rcs, err := adm.DescribeTopicConfigs(ctx, "durable")
	if err != nil {
		t.Fatal(err)
	}
	rc, err := rcs.On("durable", nil)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, c := range rc.Configs {
		if c.Key == "min.insync.replicas" {
			found = c.MaybeValue() == "1" && c.Source == kmsg.ConfigSourceDynamicTopicConfig
			if !found {
				t.Fatalf("min.insync.replicas = %q from %v, want 1 set on the topic", c.MaybeValue(), c.Source)
			}
		}
	}
	if !found {
		t.Fatal("created topic has no min.insync.replicas")
	}

	def, _ := newProducer(t, kafkaconn.Config{Brokers: k.Brokers()}, Options{})
	err = def.EnsureTopics(ctx, "three-replicas")
	if !errors.Is(err, ErrTopicSettings) || !Permanent(err) || !strings.Contains(err.Error(), "replication factor 3") {
		t.Fatalf("default options on one broker: err = %v, want permanent ErrTopicSettings naming replication factor 3", err)
	}
}

// TestExistingTopicMustHoldAcksAll: an existing topic whose
// min.insync.replicas is below the requirement is refused, or accepted with
// an error line when allowed; one whose replicas cannot meet its own
// min.insync.replicas is refused always.
func TestExistingTopicMustHoldAcksAll(t *testing.T) {
	k := testenv.Kafka(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	adm := kadm.NewClient(kgoClient(t, k.Brokers()))
	if _, err := adm.CreateTopic(ctx, 1, 1, nil, "weak"); err != nil {
		t.Fatal(err)
	}
	if _, err := adm.CreateTopic(ctx, 1, 1, map[string]*string{"min.insync.replicas": kadm.StringPtr("2")}, "impossible"); err != nil {
		t.Fatal(err)
	}
	conn := kafkaconn.Config{Brokers: k.Brokers()}
	strict, _ := newProducer(t, conn, Options{ReplicationFactor: 1, MinInsyncReplicas: 2})
	err := strict.EnsureTopics(ctx, "weak")
	if !errors.Is(err, ErrTopicSettings) || !Permanent(err) || !strings.Contains(err.Error(), "weak has min.insync.replicas=1") {
		t.Fatalf("weak topic: err = %v, want ErrTopicSettings naming it", err)
	}
	lax, logs := newProducer(t, conn, Options{ReplicationFactor: 1, MinInsyncReplicas: 2, AllowUnsafeTopics: true})
	if err := lax.EnsureTopics(ctx, "weak"); err != nil {
		t.Fatalf("weak topic, allowed: %v", err)
	}
	if n := logs.count(`"level":"ERROR"`, "UNSAFE TOPIC", "weak"); n != 1 {
		t.Fatalf("%d error lines about the unsafe topic, want 1:\n%s", n, logs)
	}
	if _, err := adm.CreateTopic(ctx, 1, 1, map[string]*string{"unclean.leader.election.enable": kadm.StringPtr("true")}, "unclean"); err != nil {
		t.Fatal(err)
	}
	safe, _ := newProducer(t, conn, oneBroker)
	if err := safe.EnsureTopics(ctx, "unclean"); !errors.Is(err, ErrTopicSettings) || !strings.Contains(err.Error(), "unclean.leader.election.enable=true") {
		t.Fatalf("unclean leader election: err = %v, want ErrTopicSettings naming it", err)
	}
	err = lax.EnsureTopics(ctx, "impossible")
	if !errors.Is(err, ErrTopicSettings) || !strings.Contains(err.Error(), "no acks=all write can succeed") {
		t.Fatalf("topic with 1 replica and min.insync.replicas=2: err = %v", err)
	}
}

// TestEnsureTopicsWithoutCreateACL: a principal with DESCRIBE and WRITE but
// no CREATE can start on existing topics and publish; a missing topic fails
// at once, naming the CREATE permission, instead of being retried.
func TestEnsureTopicsWithoutCreateACL(t *testing.T) {
	allow := func(res kmsg.ACLResourceType, name string, op kmsg.ACLOperation) kfake.ACL {
		return kfake.ACL{Resource: res, Name: name, Pattern: kmsg.ACLResourcePatternTypeLiteral, Operation: op, Allow: true}
	}
	topic := kmsg.ACLResourceTypeTopic
	cluster, err := kfake.NewCluster(
		kfake.NumBrokers(1),
		kfake.EnableSASL(),
		kfake.EnableACLs(),
		kfake.Superuser("SCRAM-SHA-256", "admin", "admin-secret"),
		kfake.User("SCRAM-SHA-256", "writer", "writer-secret",
			allow(topic, "stubs", kmsg.ACLOperationDescribe),
			allow(topic, "stubs", kmsg.ACLOperationWrite),
			allow(topic, "stubs", kmsg.ACLOperationDescribeConfigs),
			allow(topic, "other", kmsg.ACLOperationDescribe),
			allow(topic, "noconfigs", kmsg.ACLOperationDescribe),
			allow(topic, "noconfigs", kmsg.ACLOperationWrite),
			allow(kmsg.ACLResourceTypeCluster, "kafka-cluster", kmsg.ACLOperationIdempotentWrite),
		),
		kfake.SeedTopics(1, "stubs", "noconfigs"),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, _ := newProducer(t, kafkaconn.Config{Brokers: cluster.ListenAddrs(), SASLMechanism: "SCRAM-SHA-256", SASLUser: "writer", SASLPassword: "writer-secret"}, oneBroker)
	if err := p.EnsureTopics(ctx, "stubs"); err != nil {
		t.Fatalf("existing topic without CREATE: %v", err)
	}
	done := make(chan error, 1)
	p.Publish(ctx, "stubs", &stub.Stub{DocumentID: "d", DataSourceType: stub.SourceSQL, DataSourceName: "t", DocumentType: "X", LSN: 1}, func(err error) { done <- err })
	if err := <-done; err != nil {
		t.Fatalf("publish: %v", err)
	}
	start := time.Now()
	err = p.EnsureTopics(ctx, "other")
	if !errors.Is(err, ErrDenied) || !Permanent(err) || !strings.Contains(err.Error(), "CREATE on topic other") {
		t.Fatalf("missing topic without CREATE: err = %v, want ErrDenied naming CREATE", err)
	}
	err = p.EnsureTopics(ctx, "secret")
	if !errors.Is(err, ErrDenied) || !strings.Contains(err.Error(), "DESCRIBE on topic secret") {
		t.Fatalf("topic without DESCRIBE: err = %v, want ErrDenied naming DESCRIBE", err)
	}
	err = p.EnsureTopics(ctx, "noconfigs")
	if !errors.Is(err, ErrDenied) || !strings.Contains(err.Error(), "DESCRIBE_CONFIGS on topic noconfigs") {
		t.Fatalf("topic without DESCRIBE_CONFIGS: err = %v, want ErrDenied naming DESCRIBE_CONFIGS", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("denials took %s: they must not be retried", d)
	}
}
