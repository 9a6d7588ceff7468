package pillows

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/changefeed/changefeed/kafkaconn"
)

// ErrCheckpointGone means a pillow's committed offset is no longer in the
// log: retention deleted records it never processed. Those changes are lost
// to the pillow, so it stops instead of skipping them; a reindex is needed.
var ErrCheckpointGone = errors.New("committed offset is no longer in the log")

// CheckpointGoneError names the pillow and partition of ErrCheckpointGone.
type CheckpointGoneError struct {
	Pillow, Group, Topic string
	Partition            int32
	Err                  error
}

func (e *CheckpointGoneError) Error() string {
	return fmt.Sprintf("pillow %s: topic %s partition %d: the offset of consumer group %s is no longer in the log (retention deleted records it had not processed: %v); a reindex of pillow %s is needed",
		e.Pillow, e.Topic, e.Partition, e.Group, e.Err, e.Pillow)
}

func (e *CheckpointGoneError) Unwrap() error { return ErrCheckpointGone }

// Options configure the runtime shared by the pillows of one process.
type Options struct {
	Kafka kafkaconn.Config
	// Errors is the errors table; required.
	Errors *ErrorLog
	// DeadLetters receives dead documents' stubs; nil logs them only.
	DeadLetters DeadLetters
	Log         *slog.Logger
	Metrics     *Metrics
	// CommitInterval is how often marked offsets are committed besides on
	// revoke and shutdown. A longer interval means fewer commits and more
	// work redone after a crash. Default 5s.
	CommitInterval time.Duration
	// ShutdownTimeout bounds finishing the batches in hand on shutdown;
	// past it they are abandoned (not committed). Default 30s.
	ShutdownTimeout time.Duration
	// TransientMin and TransientMax bound the backoff of a partition
	// paused on a transient failure. Defaults 250ms and 30s.
	TransientMin, TransientMax time.Duration
	// KafkaOpts are appended to the consumer's options (session timeout,
	// rack, …).
	KafkaOpts []kgo.Opt
}

// Runner runs pillows.
type Runner struct {
	o     Options
	mu    sync.Mutex
	ready map[string]*atomic.Bool
}

// NewRunner checks the options and fills in defaults.
func NewRunner(o Options) (*Runner, error) {
	if o.Errors == nil {
		return nil, errors.New("pillows: Options.Errors is required")
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Metrics == nil {
		m, err := NewMetrics(nil)
		if err != nil {
			return nil, err
		}
		o.Metrics = m
	}
	if o.CommitInterval <= 0 {
		o.CommitInterval = 5 * time.Second
	}
	if o.ShutdownTimeout <= 0 {
		o.ShutdownTimeout = 30 * time.Second
	}
	if o.TransientMin <= 0 {
		o.TransientMin = 250 * time.Millisecond
	}
	if o.TransientMax <= 0 {
		o.TransientMax = 30 * time.Second
	}
	return &Runner{o: o, ready: map[string]*atomic.Bool{}}, nil
}

// Ready returns nil when every pillow started by Run is consuming and the
// errors table answers.
func (r *Runner) Ready(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.ready) == 0 {
		return errors.New("no pillow running")
	}
	for name, ok := range r.ready {
		if !ok.Load() {
			return fmt.Errorf("pillow %s is not consuming", name)
		}
	}
	if err := r.o.Errors.Ping(ctx); err != nil {
		return fmt.Errorf("errors table: %w", err)
	}
	return nil
}

// Run validates and bootstraps the pillows, then consumes until ctx is
// canceled (it then finishes the batches in hand, commits and returns nil)
// or a pillow hits a condition it must not continue past (it then stops
// every pillow the same way and returns that error, e.g. a
// *CheckpointGoneError).
func (r *Runner) Run(ctx context.Context, ps ...*Pillow) error {
	if len(ps) == 0 {
		return errors.New("pillows: nothing to run")
	}
	names := map[string]bool{}
	for _, p := range ps {
		if err := p.Validate(); err != nil {
			return err
		}
		if names[p.Name] {
			return fmt.Errorf("%w: pillow %s: name: defined twice", ErrDefinition, p.Name)
		}
		names[p.Name] = true
	}
	for _, p := range ps {
		for _, pr := range p.Processors {
			if b, ok := pr.(Bootstrapper); ok {
				if err := b.Bootstrap(ctx); err != nil {
					return fmt.Errorf("pillow %s: processor %s: bootstrap: %w", p.Name, pr.Name(), err)
				}
			}
		}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	errs := make([]error, len(ps))
	for i, p := range ps {
		r.o.Metrics.init(p)
		ready := &atomic.Bool{}
		r.mu.Lock()
		r.ready[p.Name] = ready
		r.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			pr := &pillowRun{r: r, p: p, log: r.o.Log.With("pillow", p.Name), ready: ready, workers: map[tp]*worker{}}
			pr.eng = &engine{p: p, m: r.o.Metrics, errs: r.o.Errors, onPanic: func(where string, pe *PanicError) {
				pr.log.Error("recovered panic", "where", where, "panic", fmt.Sprint(pe.Value), "stack", pe.Stack)
			}}
			// Old failures to clear on success? Assume so unless the
			// table says otherwise (saves a DELETE per batch).
			any, err := r.o.Errors.any(ctx, p.Name)
			if err != nil || any {
				pr.eng.mayHaveErrors.set()
			}
			if err := pr.run(ctx); err != nil {
				errs[i] = err
				cancel(err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

type tp struct {
	topic string
	part  int32
}

type pillowRun struct {
	r     *Runner
	p     *Pillow
	eng   *engine
	log   *slog.Logger
	ready *atomic.Bool
	cl    *kgo.Client

	// abortCtx is canceled when batches in hand must be abandoned
	// (shutdown timeout passed).
	abortCtx context.Context

	mu      sync.Mutex
	workers map[tp]*worker
}

func (pr *pillowRun) kafkaOpts() ([]kgo.Opt, error) {
	o := pr.r.o
	conn := o.Kafka
	if conn.ClientID == "" {
		conn.ClientID = "changefeed-pillow-" + pr.p.Name
	}
	opts, err := conn.Opts()
	if err != nil {
		return nil, err
	}
	opts = append(opts,
		kgo.ConsumerGroup(pr.p.Group),
		kgo.ConsumeTopics(pr.p.Topics...),
		kgo.Balancers(kgo.CooperativeStickyBalancer()),
		// Offsets are committed only when marked, and a record is marked
		// only after its batch was written (see doc.go).
		kgo.AutoCommitMarks(),
		kgo.AutoCommitInterval(o.CommitInterval),
		kgo.AutoCommitCallback(pr.onAutoCommit),
		// Rebalance callbacks run only between polls, so the workers map
		// is never changed while a poll is being dispatched.
		kgo.BlockRebalanceOnPoll(),
		kgo.OnPartitionsAssigned(pr.assigned),
		kgo.OnPartitionsRevoked(pr.revoked),
		kgo.OnPartitionsLost(pr.lost),
		// A new group starts at the beginning. A committed offset that is
		// out of range is an error, never silently reset (doc.go).
		kgo.ConsumeStartOffset(kgo.NewOffset().AtStart()),
		kgo.ConsumeResetOffset(kgo.NoResetOffset().AtStart()),
		// A partition resumed after back-pressure or a transient pause
		// is fetched again only when the broker's current long poll
		// returns: keep that wait short (franz-go's default is 5s).
		kgo.FetchMaxWait(500*time.Millisecond),
		kgo.WithLogger(kgoLogger{pr.log}),
	)
	return append(opts, o.KafkaOpts...), nil
}

func (pr *pillowRun) run(ctx context.Context) error {
	opts, err := pr.kafkaOpts()
	if err != nil {
		return fmt.Errorf("pillow %s: %w", pr.p.Name, err)
	}
	abortCtx, abort := context.WithCancel(context.Background())
	defer abort()
	pr.abortCtx = abortCtx
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return fmt.Errorf("pillow %s: kafka client: %w", pr.p.Name, err)
	}
	pr.cl = cl

	retryCtx, stopRetry := context.WithCancel(ctx)
	retryDone := make(chan struct{})
	go func() {
		defer close(retryDone)
		pr.retryLoop(retryCtx)
	}()

	pr.log.Info("pillow starting", "group", pr.p.Group, "topics", pr.p.Topics, "processors", len(pr.p.Processors))
	fatal := pr.poll(ctx)
	pr.ready.Store(false)
	stopRetry()

	// Finish the batches in hand, then commit what they marked. Past the
	// shutdown timeout the rest is abandoned, not committed.
	pr.stopWorkers(nil, false, pr.r.o.ShutdownTimeout)
	abort()
	cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
	if err := cl.CommitMarkedOffsets(cctx); err != nil {
		pr.r.o.Metrics.commitErrors.WithLabelValues(pr.p.Name).Inc()
		pr.log.Error("final commit failed; the last batches will be processed again", "err", err)
	}
	ccancel()
	cl.Close()
	select {
	case <-retryDone:
	case <-time.After(pr.r.o.ShutdownTimeout):
		// Its context is canceled; only a processor ignoring that holds it.
		pr.log.Warn("retry loop did not stop in time; leaving it")
	}
	pr.log.Info("pillow stopped")
	return fatal
}

// poll dispatches fetched records to the partition workers until ctx is
// done or a fatal error occurs.
func (pr *pillowRun) poll(ctx context.Context) error {
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := pr.cl.Ping(pctx)
	cancel()
	if err == nil {
		pr.ready.Store(true)
	} else if ctx.Err() == nil {
		pr.log.Warn("kafka not reachable yet", "err", err)
	}
	for {
		fetches := pr.cl.PollRecords(ctx, 10000)
		if ctx.Err() != nil || fetches.IsClientClosed() {
			pr.cl.AllowRebalance()
			return nil
		}
		pr.ready.Store(true)
		var fatal error
		fetches.EachError(func(topic string, part int32, err error) {
			var dl *kgo.ErrDataLoss
			switch {
			case errors.Is(err, context.Canceled):
			case errors.Is(err, kerr.OffsetOutOfRange), errors.As(err, &dl):
				if fatal == nil {
					fatal = &CheckpointGoneError{Pillow: pr.p.Name, Group: pr.p.Group, Topic: topic, Partition: part, Err: err}
				}
			default:
				pr.log.Warn("fetch error", "topic", topic, "partition", part, "err", err)
			}
		})
		if fatal != nil {
			pr.r.o.Metrics.fatal.WithLabelValues(pr.p.Name).Inc()
			pr.log.Error("stopping: reindex needed", "err", fatal)
			pr.cl.AllowRebalance()
			return fatal
		}
		pr.mu.Lock()
		fetches.EachPartition(func(p kgo.FetchTopicPartition) {
			if len(p.Records) == 0 {
				return
			}
			w := pr.workers[tp{p.Topic, p.Partition}]
			if w == nil {
				// Not ours (revoked between fetch and poll): dropped,
				// the owner reads it from the committed offset.
				pr.log.Debug("dropping records of a partition not assigned", "topic", p.Topic, "partition", p.Partition, "records", len(p.Records))
				return
			}
			w.enqueue(p.Records, p.HighWatermark)
		})
		pr.mu.Unlock()
		pr.cl.AllowRebalance()
	}
}

func (pr *pillowRun) assigned(_ context.Context, cl *kgo.Client, assigned map[string][]int32) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	for topic, parts := range assigned {
		for _, part := range parts {
			k := tp{topic, part}
			if pr.workers[k] != nil {
				continue
			}
			w := newWorker(pr, topic, part)
			pr.workers[k] = w
			go w.run()
		}
	}
	pr.log.Info("partitions assigned", "assigned", assigned)
}

// revoked: finish the batches in hand of the revoked partitions, then
// commit what they marked while still owning them. A batch not finished
// within Timeouts.Revoke (a sink that hangs) is abandoned: its worker is
// disowned and canceled before the commit, so nothing is committed for it
// and the next owner processes it again; the rebalance is not held up.
func (pr *pillowRun) revoked(ctx context.Context, cl *kgo.Client, revoked map[string][]int32) {
	pr.stopWorkers(revoked, false, pr.p.Timeouts.Revoke)
	if err := cl.CommitMarkedOffsets(ctx); err != nil {
		pr.r.o.Metrics.commitErrors.WithLabelValues(pr.p.Name).Inc()
		pr.log.Error("commit on revoke failed; the new owner will process the last batches again", "err", err)
	}
	pr.log.Info("partitions revoked", "revoked", revoked)
}

// lost: the partitions may already belong to another member. Stop at once
// and commit nothing for them; marks made after this point are refused.
func (pr *pillowRun) lost(_ context.Context, _ *kgo.Client, lost map[string][]int32) {
	pr.stopWorkers(lost, true, pr.p.Timeouts.Revoke)
	pr.log.Warn("partitions lost; nothing committed for them", "lost", lost)
}

// stopWorkers stops the workers of parts (all when nil) and waits for
// them, at most within. With lost, ownership is dropped first and work in
// hand aborted. A worker not done within is abandoned (see
// worker.abandon): it can mark nothing any more, and it leaves the map so
// that a later assignment of its partition starts a new one. Workers stay
// in the map until they are done or abandoned, so a revoke that runs
// concurrently with a shutdown still waits for them before it commits.
func (pr *pillowRun) stopWorkers(parts map[string][]int32, lost bool, within time.Duration) {
	pr.mu.Lock()
	var ws []*worker
	if parts == nil {
		for _, w := range pr.workers {
			ws = append(ws, w)
		}
	} else {
		for topic, ps := range parts {
			for _, p := range ps {
				if w := pr.workers[tp{topic, p}]; w != nil {
					ws = append(ws, w)
				}
			}
		}
	}
	pr.mu.Unlock()
	for _, w := range ws {
		if lost {
			w.disown()
			w.cancel()
		}
		w.stop()
	}
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	expired := false
	for _, w := range ws {
		if !expired {
			select {
			case <-w.done:
			case <-deadline.C:
				expired = true
			}
		}
		if expired {
			select {
			case <-w.done:
			default:
				w.abandon()
				pr.r.o.Metrics.abandoned.WithLabelValues(pr.p.Name).Inc()
				pr.log.Warn("batch in hand not finished in time: abandoned, nothing committed for it; the partition's next owner processes it again",
					"topic", w.topic, "partition", w.part, "within", within)
			}
		}
		w.disown()
		pr.mu.Lock()
		k := tp{w.topic, w.part}
		if pr.workers[k] == w {
			delete(pr.workers, k)
		}
		pr.mu.Unlock()
		lbl := []string{pr.p.Name, w.topic, strconv.Itoa(int(w.part))}
		pr.r.o.Metrics.lagRecords.DeleteLabelValues(lbl...)
		pr.r.o.Metrics.lagSeconds.DeleteLabelValues(lbl...)
	}
}

func (pr *pillowRun) onAutoCommit(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, resp *kmsg.OffsetCommitResponse, err error) {
	if err == nil && resp != nil {
		for _, t := range resp.Topics {
			for _, p := range t.Partitions {
				if perr := kerr.ErrorForCode(p.ErrorCode); perr != nil {
					err = fmt.Errorf("topic %s partition %d: %w", t.Topic, p.Partition, perr)
				}
			}
		}
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		pr.r.o.Metrics.commitErrors.WithLabelValues(pr.p.Name).Inc()
		pr.log.Error("offset commit failed; progress is not checkpointed until a commit succeeds", "err", err)
	}
}

// kgoLogger sends franz-go's logs to slog at warn and above.
type kgoLogger struct{ l *slog.Logger }

func (k kgoLogger) Level() kgo.LogLevel { return kgo.LogLevelWarn }
func (k kgoLogger) Log(level kgo.LogLevel, msg string, kv ...any) {
	lv := slog.LevelWarn
	if level == kgo.LogLevelError {
		lv = slog.LevelError
	}
	k.l.Log(context.Background(), lv, "kafka: "+msg, kv...)
}
