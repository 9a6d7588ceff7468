// Package publish produces stubs to Kafka for every source (the WAL publisher
// and the Couch follower) with one set of producer guarantees:
//
//   - idempotent producer with acks=all: a retried batch is written once per
//     partition and in order, and an acknowledged record is on every in-sync
//     replica;
//   - topics it creates get the configured replication factor and
//     min.insync.replicas (default 3 and 2), and an existing topic whose
//     min.insync.replicas is below the configured one, or that allows unclean
//     leader election, is refused (acks=all on such a topic may acknowledge a
//     record that a broker failure then loses);
//   - key = document id, so one document's stubs stay in one partition in the
//     order they were published;
//   - unbounded retries: a broker outage stalls publishing (and so the
//     sources' checkpoints) instead of dropping records; the buffer is bounded,
//     so a long outage applies back-pressure to the source, not memory growth.
//
// What retrying cannot cure ends the producer instead of stalling it for
// ever: a SASL or TLS refusal or a deleted topic that lasts longer than
// Options.FailAfter, and data loss detected by the idempotent producer. The
// producer then reports not ready at once, fails for good after the bound
// (Err, Failed, StopOnFailure), and the binaries exit with the cause.
//
// A stub larger than its topic's max.message.bytes (which only a huge id or
// domain produces) can never be written; it is recorded to
// Options.OversizedTopic (id prefix and hash, version, size), counted and
// logged as an error, and then reported as delivered so that the source moves
// past it instead of crash-looping on it.
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
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/stub"
)

// Errors a caller acts on. Each is permanent (see Permanent): retrying the
// same call with the same settings fails the same way.
var (
	// ErrDenied: the broker's ACLs refuse an operation the producer needs;
	// the message names the operation and the resource.
	ErrDenied = errors.New("kafka denied the operation")
	// ErrTopicSettings: an existing topic cannot hold the configured
	// durability (min.insync.replicas, replication factor), or the broker
	// refused to create a topic with the configured settings.
	ErrTopicSettings = errors.New("kafka topic settings")
	// ErrAuth: SASL or TLS failed for longer than Options.FailAfter.
	ErrAuth = errors.New("kafka refused the connection (SASL or TLS)")
	// ErrTopicDeleted: a topic the producer ensured has been missing for
	// longer than Options.FailAfter.
	ErrTopicDeleted = errors.New("kafka topic deleted")
	// ErrDataLoss: the idempotent producer saw that the broker lost
	// records it had acknowledged.
	ErrDataLoss = errors.New("kafka lost acknowledged records")
)

// Permanent reports whether err is one that retrying cannot cure.
func Permanent(err error) bool {
	for _, s := range []error{ErrDenied, ErrTopicSettings, ErrAuth, ErrTopicDeleted, ErrDataLoss, kafkaconn.ErrConfig} {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// Options tune the producer. The zero value is usable and asks for a
// three-broker cluster's durability; a single-broker cluster needs
// ReplicationFactor 1 and MinInsyncReplicas 1.
type Options struct {
	// Partitions for topics this producer creates. Default 3. More
	// partitions let more pillow workers share a topic; one document's
	// stubs stay in one partition whatever the count.
	Partitions int32
	// ReplicationFactor for created topics. Default 3; -1 uses the
	// broker's default.replication.factor. An existing topic with fewer
	// replicas is logged as a warning.
	ReplicationFactor int16
	// MinInsyncReplicas is set as min.insync.replicas on created topics
	// and required of existing ones (refused if lower, see
	// AllowUnsafeTopics). Default 2: with acks=all, an acknowledged record
	// is then on at least two brokers. -1 sets and checks nothing.
	MinInsyncReplicas int
	// AllowUnsafeTopics turns the refusal of an existing topic whose
	// min.insync.replicas is below MinInsyncReplicas, or that allows
	// unclean leader election, or whose settings cannot be read for lack
	// of the DESCRIBE_CONFIGS ACL, into an error-level log line at every
	// start. A topic whose replication
	// factor is below its own min.insync.replicas is always refused:
	// every write to it would fail.
	AllowUnsafeTopics bool
	// OversizedTopic receives a small record for each stub too large for
	// its topic, after which the stub counts as delivered. Empty: such a
	// stub fails like any other record (the caller stops).
	OversizedTopic string
	// FailAfter bounds how long a SASL/TLS refusal or a deleted topic may
	// last before the producer fails for good. Readiness fails at once.
	// Default 1m.
	FailAfter time.Duration
	// CheckInterval is how often the producer checks that the brokers
	// accept it and its topics exist. Default 5s.
	CheckInterval time.Duration
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

func (o *Options) setDefaults() {
	if o.Partitions <= 0 {
		o.Partitions = 3
	}
	if o.ReplicationFactor == 0 {
		o.ReplicationFactor = 3
	}
	if o.MinInsyncReplicas == 0 {
		o.MinInsyncReplicas = 2
	}
	if o.FailAfter <= 0 {
		o.FailAfter = time.Minute
	}
	if o.CheckInterval <= 0 {
		o.CheckInterval = 5 * time.Second
	}
	if o.MaxBufferedRecords <= 0 {
		o.MaxBufferedRecords = 10000
	}
	if o.Linger <= 0 {
		o.Linger = 5 * time.Millisecond
	}
}

// Producer publishes stubs.
type Producer struct {
	cl      *kgo.Client
	adm     *kadm.Client
	opts    Options
	log     *slog.Logger
	metrics *metrics

	// limits holds each ensured topic's max.message.bytes (int32), read
	// by the client once per partition to cap its batches, so that a batch
	// of small records never exceeds what the broker accepts.
	limits sync.Map

	health health

	// diverting counts oversized records being recorded; Flush waits for
	// them.
	diverting pending

	stopCheck context.CancelFunc
	checkDone chan struct{}
}

type metrics struct {
	published *prometheus.CounterVec
	errors    *prometheus.CounterVec
	oversized *prometheus.CounterVec
	dataLoss  prometheus.Counter
	problems  *prometheus.GaugeVec
}

// New connects a producer and starts its background check. Connection
// problems are not reported here (the client dials lazily); see Ping.
func New(conn kafkaconn.Config, opts Options, log *slog.Logger, reg prometheus.Registerer) (*Producer, error) {
	opts.setDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	kopts, err := conn.Opts()
	if err != nil {
		return nil, err
	}
	p := &Producer{opts: opts, log: log}
	p.health.init()
	kopts = append(kopts,
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.MaxBufferedRecords(opts.MaxBufferedRecords),
		kgo.ProducerLinger(opts.Linger),
		kgo.ProducerBatchCompression(kgo.NoCompression()),
		kgo.ProducerBatchMaxBytesFn(p.batchMaxBytes),
		// Topics are created explicitly by EnsureTopics; a broker that
		// auto-creates with other settings must not decide our layout. A
		// topic that disappears is detected by the background check,
		// which fails readiness and then the producer (ErrTopicDeleted).
		kgo.UnknownTopicRetries(-1),
		kgo.ProducerOnDataLossDetected(p.dataLossDetected),
		kgo.WithHooks(saslHook{p}),
		kafkaconn.Logger(log),
	)
	labels := prometheus.Labels{"component": opts.Component}
	p.metrics = &metrics{
		published: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_stubs_published_total", Help: "Stubs acknowledged by Kafka, per topic.",
			ConstLabels: labels,
		}, []string{"topic"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_produce_errors_total", Help: "Records that failed for good, per topic.",
			ConstLabels: labels,
		}, []string{"topic"}),
		oversized: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_stubs_oversized_total", Help: "Stubs larger than their topic's max.message.bytes, recorded to the oversized topic and skipped, per topic.",
			ConstLabels: labels,
		}, []string{"topic"}),
		dataLoss: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "changefeed_kafka_data_loss_total", Help: "Partitions on which the producer detected that Kafka lost acknowledged records.",
			ConstLabels: labels,
		}),
		problems: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "changefeed_kafka_problem", Help: "1 while a Kafka problem that retrying may not cure lasts (kind: auth, topic).",
			ConstLabels: labels,
		}, []string{"kind"}),
	}
	p.cl, err = kgo.NewClient(kopts...)
	if err != nil {
		return nil, fmt.Errorf("kafka client: %w", err)
	}
	p.adm = kadm.NewClient(p.cl)
	if reg != nil {
		for _, c := range []prometheus.Collector{p.metrics.published, p.metrics.errors, p.metrics.oversized, p.metrics.dataLoss, p.metrics.problems} {
			if err := reg.Register(c); err != nil {
				p.cl.Close()
				return nil, fmt.Errorf("register metrics: %w", err)
			}
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.stopCheck, p.checkDone = cancel, make(chan struct{})
	go p.checkLoop(ctx)
	return p, nil
}

// Publish encodes s and produces it to topic, keyed by document id. done is
// called exactly once, from a producer goroutine, with nil once Kafka has
// acknowledged the record on all in-sync replicas (or, for a stub too large
// for its topic, once it is recorded to Options.OversizedTopic), or with the
// error that failed it for good. Publish blocks while the buffer is full; ctx
// bounds that wait (done then receives the context's error).
func (p *Producer) Publish(ctx context.Context, topic string, s *stub.Stub, done func(error)) {
	value, err := s.Marshal()
	if err != nil {
		done(fmt.Errorf("encode stub %s: %w", s.DocumentID, err))
		return
	}
	p.PublishRecord(ctx, &kgo.Record{Topic: topic, Key: s.Key(), Value: value}, done)
}

// PublishRecord produces a prepared record with the same guarantees as
// Publish. The record belongs to the producer until done is called.
func (p *Producer) PublishRecord(ctx context.Context, r *kgo.Record, done func(error)) {
	p.cl.Produce(ctx, r, func(r *kgo.Record, err error) {
		if err != nil && p.oversized(r, err) {
			p.diverting.add()
			// Producing from inside a promise can block on a full
			// buffer that only this goroutine would drain.
			go p.divert(ctx, r, err, done)
			return
		}
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
	select {
	case <-p.diverting.idle():
	case <-ctx.Done():
		return fmt.Errorf("flush producer: %w", ctx.Err())
	}
	if err := p.cl.Flush(ctx); err != nil {
		return fmt.Errorf("flush producer: %w", err)
	}
	return nil
}

// Ping reports why the producer cannot deliver now: it failed for good, a
// SASL/TLS refusal or a deleted topic lasts, or no broker answers a metadata
// request. Readiness uses it.
func (p *Producer) Ping(ctx context.Context) error {
	if err := p.Err(); err != nil {
		return err
	}
	if err := p.health.current(); err != nil {
		return err
	}
	if err := p.cl.Ping(ctx); err != nil {
		return fmt.Errorf("kafka ping: %w", err)
	}
	return nil
}

// Buffered returns the number of records produced but not yet acknowledged.
func (p *Producer) Buffered() int64 { return p.cl.BufferedProduceRecords() }

// Close stops the background check and releases the client. Call Flush
// first to keep buffered records.
func (p *Producer) Close() {
	p.stopCheck()
	<-p.checkDone
	p.cl.Close()
}

// pending counts work in progress and says when there is none. Unlike a
// sync.WaitGroup, work may start while someone waits.
type pending struct {
	mu     sync.Mutex
	n      int
	isIdle chan struct{} // closed while n == 0
}

func (w *pending) add() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n == 0 {
		w.isIdle = make(chan struct{})
	}
	w.n++
}

func (w *pending) done() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.n--
	if w.n == 0 {
		close(w.isIdle)
	}
}

// idle returns a channel closed once no work is in progress.
func (w *pending) idle() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n == 0 {
		c := make(chan struct{})
		close(c)
		return c
	}
	return w.isIdle
}
