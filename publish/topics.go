package publish

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// defaultBatchMaxBytes is franz-go's default batch cap, used for a topic
// whose max.message.bytes is not known.
const defaultBatchMaxBytes = 1_000_012

// EnsureTopics makes the topics (and Options.OversizedTopic) ready to
// receive stubs and watches them from then on. It describes them first and
// creates only those missing, so existing topics need no CREATE ACL; created
// topics get Options.Partitions, ReplicationFactor and MinInsyncReplicas.
// Then it reads every topic's settings: a topic that cannot hold acks=all
// durability is refused with ErrTopicSettings (see AllowUnsafeTopics), a
// missing ACL with ErrDenied naming the operation. Both are permanent (do
// not retry); other errors (an unreachable broker, a topic created but not
// yet visible) are worth retrying.
func (p *Producer) EnsureTopics(ctx context.Context, topics ...string) error {
	if len(topics) == 0 {
		return nil
	}
	topics = slices.Clone(topics)
	if p.opts.OversizedTopic != "" {
		topics = append(topics, p.opts.OversizedTopic)
	}
	slices.Sort(topics)
	topics = slices.Compact(topics)

	found, missing, err := p.describeTopics(ctx, topics)
	if err != nil {
		return err
	}
	if len(missing) > 0 {
		if err := p.createTopics(ctx, missing); err != nil {
			return err
		}
		created, still, err := p.describeTopics(ctx, missing)
		if err != nil {
			return err
		}
		if len(still) > 0 {
			return fmt.Errorf("topics %v created but not yet visible in metadata", still)
		}
		for t, info := range created {
			found[t] = info
		}
	}
	if err := p.checkTopics(ctx, topics, found); err != nil {
		return err
	}
	p.health.watch(found)
	return nil
}

// topicInfo is what metadata says of an existing topic.
type topicInfo struct {
	replicas int      // the lowest replica count of its partitions
	id       [16]byte // zero from brokers older than Kafka 2.8
}

// describeTopics returns what metadata says of each existing topic and the
// names of the missing ones. It asks a broker directly (not the
// client's metadata cache) and never lets the broker auto-create a topic.
func (p *Producer) describeTopics(ctx context.Context, topics []string) (map[string]topicInfo, []string, error) {
	req := kmsg.NewPtrMetadataRequest()
	for _, t := range topics {
		rt := kmsg.NewMetadataRequestTopic()
		rt.Topic = kmsg.StringPtr(t)
		req.Topics = append(req.Topics, rt)
	}
	resp, err := req.RequestWith(ctx, p.cl)
	if err != nil {
		return nil, nil, fmt.Errorf("describe topics: %w", err)
	}
	found := map[string]topicInfo{}
	var missing []string
	for _, t := range resp.Topics {
		if t.Topic == nil {
			continue
		}
		name := *t.Topic
		switch err := kerr.ErrorForCode(t.ErrorCode); {
		case err == nil:
			rf := 0
			for i, part := range t.Partitions {
				if i == 0 || len(part.Replicas) < rf {
					rf = len(part.Replicas)
				}
			}
			found[name] = topicInfo{replicas: rf, id: t.TopicID}
		case errors.Is(err, kerr.UnknownTopicOrPartition):
			missing = append(missing, name)
		case errors.Is(err, kerr.TopicAuthorizationFailed):
			return nil, nil, fmt.Errorf("%w: DESCRIBE on topic %s: grant the producer's principal DESCRIBE and WRITE on it", ErrDenied, name)
		default:
			return nil, nil, fmt.Errorf("describe topic %s: %w", name, err)
		}
	}
	return found, missing, nil
}

func (p *Producer) createTopics(ctx context.Context, topics []string) error {
	var configs map[string]*string
	if p.opts.MinInsyncReplicas > 0 {
		configs = map[string]*string{"min.insync.replicas": kadm.StringPtr(strconv.Itoa(p.opts.MinInsyncReplicas))}
	}
	resp, err := p.adm.CreateTopics(ctx, p.opts.Partitions, p.opts.ReplicationFactor, configs, topics...)
	if err != nil {
		return fmt.Errorf("create topics: %w", err)
	}
	for _, r := range resp.Sorted() {
		switch {
		case r.Err == nil:
			p.log.Info("created topic", "topic", r.Topic, "partitions", r.NumPartitions, "replication_factor", r.ReplicationFactor, "min_insync_replicas", p.opts.MinInsyncReplicas)
		case errors.Is(r.Err, kerr.TopicAlreadyExists):
			// Created by someone else since we looked: checked below.
		case errors.Is(r.Err, kerr.TopicAuthorizationFailed), errors.Is(r.Err, kerr.ClusterAuthorizationFailed):
			return fmt.Errorf("%w: CREATE on topic %s: grant the producer's principal CREATE, or create the topic beforehand (replication factor %d, min.insync.replicas %d)",
				ErrDenied, r.Topic, p.opts.ReplicationFactor, p.opts.MinInsyncReplicas)
		case errors.Is(r.Err, kerr.InvalidReplicationFactor), errors.Is(r.Err, kerr.InvalidConfig),
			errors.Is(r.Err, kerr.PolicyViolation), errors.Is(r.Err, kerr.InvalidPartitions):
			return fmt.Errorf("%w: create topic %s with %d partitions, replication factor %d, min.insync.replicas %d: %w %s "+
				"(a cluster with fewer brokers needs a lower replication factor and min.insync.replicas)",
				ErrTopicSettings, r.Topic, p.opts.Partitions, p.opts.ReplicationFactor, p.opts.MinInsyncReplicas, r.Err, r.ErrMessage)
		default:
			return fmt.Errorf("create topic %s: %w", r.Topic, r.Err)
		}
	}
	return nil
}

// checkTopics reads each topic's min.insync.replicas and max.message.bytes,
// refuses settings that cannot hold acks=all and remembers the message
// limit for batching and for oversized stubs.
func (p *Producer) checkTopics(ctx context.Context, topics []string, found map[string]topicInfo) error {
	rcs, err := p.adm.DescribeTopicConfigs(ctx, topics...)
	if err != nil {
		var denied bool
		for _, e := range []error{kerr.TopicAuthorizationFailed, kerr.ClusterAuthorizationFailed} {
			denied = denied || errors.Is(err, e)
		}
		if !denied {
			return fmt.Errorf("describe topic configs: %w", err)
		}
	}
	for _, t := range topics {
		rc, rerr := rcs.On(t, nil)
		if rerr == nil {
			rerr = rc.Err
		}
		if err != nil || rerr != nil {
			if errors.Is(rerr, kerr.TopicAuthorizationFailed) || errors.Is(err, kerr.TopicAuthorizationFailed) || errors.Is(err, kerr.ClusterAuthorizationFailed) {
				if p.opts.MinInsyncReplicas < 0 {
					continue // nothing to verify
				}
				if p.opts.AllowUnsafeTopics {
					p.log.Error("cannot read topic settings (DESCRIBE_CONFIGS denied): durability NOT verified, as allowed", "topic", t)
					continue
				}
				return fmt.Errorf("%w: DESCRIBE_CONFIGS on topic %s (needed to verify min.insync.replicas): grant it, or accept unverified topics explicitly", ErrDenied, t)
			}
			return fmt.Errorf("describe config of topic %s: %w", t, rerr)
		}
		values := map[string]string{}
		for _, c := range rc.Configs {
			values[c.Key] = c.MaybeValue()
		}
		if n, err := strconv.Atoi(values["max.message.bytes"]); err == nil && n > 0 {
			p.limits.Store(t, int32(min(n, 1<<30)))
		}
		raw, reported := values["min.insync.replicas"]
		if !reported {
			p.log.Warn("the broker reports no min.insync.replicas for the topic: durability not verified", "topic", t)
			continue
		}
		minISR, perr := strconv.Atoi(raw)
		if perr != nil {
			return fmt.Errorf("topic %s: min.insync.replicas %q: %w", t, raw, perr)
		}
		rf := found[t].replicas
		if rf < minISR {
			return fmt.Errorf("%w: topic %s has %d replica(s) but min.insync.replicas=%d: no acks=all write can succeed; lower min.insync.replicas or add replicas",
				ErrTopicSettings, t, rf, minISR)
		}
		if p.opts.MinInsyncReplicas > 0 && minISR < p.opts.MinInsyncReplicas {
			msg := fmt.Sprintf("topic %s has min.insync.replicas=%d (replication factor %d), below the required %d: acks=all may acknowledge a record that only %d broker(s) hold",
				t, minISR, rf, p.opts.MinInsyncReplicas, minISR)
			if !p.opts.AllowUnsafeTopics {
				return fmt.Errorf("%w: %s; raise it (kafka-configs --alter --add-config min.insync.replicas=%d), or lower the requirement for a smaller cluster, or accept it explicitly",
					ErrTopicSettings, msg, p.opts.MinInsyncReplicas)
			}
			p.log.Error("UNSAFE TOPIC accepted as allowed: "+msg, "topic", t)
		}
		if p.opts.MinInsyncReplicas > 0 && values["unclean.leader.election.enable"] == "true" {
			msg := fmt.Sprintf("topic %s has unclean.leader.election.enable=true: a replica that missed acknowledged records may become leader and drop them", t)
			if !p.opts.AllowUnsafeTopics {
				return fmt.Errorf("%w: %s; set it to false, or accept it explicitly", ErrTopicSettings, msg)
			}
			p.log.Error("UNSAFE TOPIC accepted as allowed: "+msg, "topic", t)
		}
		if p.opts.ReplicationFactor > 0 && rf < int(p.opts.ReplicationFactor) {
			p.log.Warn("topic has fewer replicas than configured", "topic", t, "replication_factor", rf, "configured", p.opts.ReplicationFactor)
		}
	}
	return nil
}

// batchMaxBytes is the client's per-topic batch cap: the topic's
// max.message.bytes once EnsureTopics has read it. A single record above it
// fails before it is sent (kerr.MessageTooLarge), and no batch of smaller
// records can exceed what the broker accepts.
func (p *Producer) batchMaxBytes(topic string) int32 {
	if v, ok := p.limits.Load(topic); ok {
		return max(v.(int32), 512)
	}
	return defaultBatchMaxBytes
}
