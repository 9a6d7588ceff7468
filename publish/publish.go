// Package publish produces stubs to Kafka for every source (the WAL publisher
// and the Couch follower) with one set of producer guarantees:
//
//   - idempotent producer with acks=all: a retried batch is written once per
//     partition and in order, and an acknowledged record is on every in-sync
//     replica;
//   - key = document id, so one document's stubs stay in one partition in the
//     order they were published;
//   - unbounded retries: a broker outage stalls publishing (and so the
//     sources' checkpoints) instead of dropping records; the buffer is bounded,
//     so a long outage applies back-pressure to the source, not memory growth.
//
// Publish reports each record's fate through a callback; the caller decides
// what to checkpoint from those callbacks (see package ack). Nothing in this
// package checkpoints anything.
package publish

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/stub"
)

// Options tune the producer. The zero value is usable.
type Options struct {
	// Partitions for topics this producer creates. Default 3. More
	// partitions let more pillow workers share a topic; one document's
	// stubs stay in one partition whatever the count.
	Partitions int32
	// ReplicationFactor for created topics; -1 (default) uses the broker's
	// default.replication.factor. Use 3 on a production cluster.
	ReplicationFactor int16
	// MaxBufferedRecords bounds the records waiting for an ack; when full,
	// Publish blocks, which is what bounds memory through an outage.
	// Default 10000.
	MaxBufferedRecords int
	// Linger lets partitions wait for more records before sending, trading
	// latency for larger batches. Default 5ms.
	Linger time.Duration
	// Component labels metrics ("cdc", "couch").
	Component string
}

// Producer publishes stubs.
type Producer struct {
	cl      *kgo.Client
	adm     *kadm.Client
	opts    Options
	log     *slog.Logger
	metrics *metrics
}

type metrics struct {
	published *prometheus.CounterVec
	errors    *prometheus.CounterVec
}

// New connects a producer. Connection problems are not reported here (the
// client dials lazily); see Ping.
func New(conn kafkaconn.Config, opts Options, log *slog.Logger, reg prometheus.Registerer) (*Producer, error) {
	if opts.Partitions <= 0 {
		opts.Partitions = 3
	}
	if opts.ReplicationFactor == 0 {
		opts.ReplicationFactor = -1
	}
	if opts.MaxBufferedRecords <= 0 {
		opts.MaxBufferedRecords = 10000
	}
	if opts.Linger <= 0 {
		opts.Linger = 5 * time.Millisecond
	}
	kopts, err := conn.Opts()
	if err != nil {
		return nil, err
	}
	kopts = append(kopts,
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.MaxBufferedRecords(opts.MaxBufferedRecords),
		kgo.ProducerLinger(opts.Linger),
		kgo.ProducerBatchCompression(kgo.NoCompression()),
		// Topics are created explicitly by EnsureTopics; a broker that
		// auto-creates with other settings must not decide our layout.
		kgo.UnknownTopicRetries(-1),
	)
	cl, err := kgo.NewClient(kopts...)
	if err != nil {
		return nil, fmt.Errorf("kafka client: %w", err)
	}
	m := &metrics{
		published: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_stubs_published_total", Help: "Stubs acknowledged by Kafka, per topic.",
			ConstLabels: prometheus.Labels{"component": opts.Component},
		}, []string{"topic"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_produce_errors_total", Help: "Records that failed for good, per topic.",
			ConstLabels: prometheus.Labels{"component": opts.Component},
		}, []string{"topic"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.published, m.errors} {
			if err := reg.Register(c); err != nil {
				cl.Close()
				return nil, fmt.Errorf("register metrics: %w", err)
			}
		}
	}
	return &Producer{cl: cl, adm: kadm.NewClient(cl), opts: opts, log: log, metrics: m}, nil
}

// EnsureTopics creates the topics that do not exist yet, with the configured
// partitions and replication. Existing topics are left as they are.
func (p *Producer) EnsureTopics(ctx context.Context, topics ...string) error {
	if len(topics) == 0 {
		return nil
	}
	resp, err := p.adm.CreateTopics(ctx, p.opts.Partitions, p.opts.ReplicationFactor, nil, topics...)
	if err != nil {
		return fmt.Errorf("create topics: %w", err)
	}
	for _, r := range resp.Sorted() {
		if r.Err != nil && !errors.Is(r.Err, kerr.TopicAlreadyExists) {
			return fmt.Errorf("create topic %s: %w", r.Topic, r.Err)
		}
	}
	return nil
}

// Publish encodes s and produces it to topic, keyed by document id. done is
// called exactly once, from a producer goroutine, with nil once Kafka has
// acknowledged the record on all in-sync replicas, or with the error that
// failed it for good. Publish blocks while the buffer is full; ctx bounds
// that wait (done then receives the context's error).
func (p *Producer) Publish(ctx context.Context, topic string, s *stub.Stub, done func(error)) {
	value, err := s.Marshal()
	if err != nil {
		done(fmt.Errorf("encode stub %s: %w", s.DocumentID, err))
		return
	}
	p.PublishRecord(ctx, &kgo.Record{Topic: topic, Key: s.Key(), Value: value}, done)
}

// PublishRecord produces a prepared record with the same guarantees as Publish.
func (p *Producer) PublishRecord(ctx context.Context, r *kgo.Record, done func(error)) {
	p.cl.Produce(ctx, r, func(r *kgo.Record, err error) {
		if err != nil {
			p.metrics.errors.WithLabelValues(r.Topic).Inc()
		} else {
			p.metrics.published.WithLabelValues(r.Topic).Inc()
		}
		done(err)
	})
}

// Flush waits until every buffered record is acknowledged or failed.
func (p *Producer) Flush(ctx context.Context) error {
	if err := p.cl.Flush(ctx); err != nil {
		return fmt.Errorf("flush producer: %w", err)
	}
	return nil
}

// Ping checks that a broker answers a metadata request; readiness uses it.
func (p *Producer) Ping(ctx context.Context) error {
	if err := p.cl.Ping(ctx); err != nil {
		return fmt.Errorf("kafka ping: %w", err)
	}
	return nil
}

// Buffered returns the number of records produced but not yet acknowledged.
func (p *Producer) Buffered() int64 { return p.cl.BufferedProduceRecords() }

// Close releases the client. Call Flush first to keep buffered records.
func (p *Producer) Close() { p.cl.Close() }
