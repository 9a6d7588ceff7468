package cdc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/publish"
	"github.com/changefeed/changefeed/stub"
)

// Producer is what the publisher needs from Kafka; *publish.Producer
// implements it. PublishRecord must call done exactly once per record: nil
// once the record is acknowledged by all in-sync replicas.
type Producer interface {
	EnsureTopics(ctx context.Context, topics ...string) error
	PublishRecord(ctx context.Context, r *kgo.Record, done func(error))
	Flush(ctx context.Context) error
	Ping(ctx context.Context) error
}

// Config holds the publisher's settings. Zero durations and sizes take the
// defaults named on each field.
type Config struct {
	// PostgresURL is a libpq URL or keyword/value string. It may carry a
	// password: it is never logged unmasked.
	PostgresURL string
	// Slot and Publication names (^[a-z0-9_]{1,63}$). Default "changefeed".
	Slot        string
	Publication string
	// Routing maps tables to stubs. Nil routes no table (only published-
	// from-anywhere messages).
	Routing *Routing
	// ControlTopic receives table-level events (TRUNCATE). Default
	// DefaultControlTopic.
	ControlTopic string
	// AllowNewSlot accepts one possible gap, the one it names: create a
	// fresh slot although a checkpoint says one existed, take a slot whose
	// position is ahead of the checkpoint, or discard a checkpoint of
	// another cluster or WAL history. Consumers must be backfilled. Set
	// while no gap needs accepting, it is refused (ErrConfig).
	AllowNewSlot GapAcceptance
	// Migrate applies migrations (the changefeed schema) at start.
	Migrate bool
	// StatusInterval is how often the acknowledged position is checkpointed
	// and confirmed. Default 1s.
	StatusInterval time.Duration
	// KeepaliveInterval is the longest time between two standby status
	// updates, whether or not anything advanced. Default 10s.
	KeepaliveInterval time.Duration
	// HeartbeatInterval, when positive, emits a non-transactional
	// 'changefeed_heartbeat' message on that interval, so that a database
	// whose published tables are quiet still sees its slot advance.
	HeartbeatInterval time.Duration
	// LagInterval is how often lag in bytes is sampled. Default 10s.
	LagInterval time.Duration
	// SlotWaitTimeout bounds the wait while another process streams the
	// slot: 0 waits forever, negative does not wait (ErrSlotBusy at once).
	SlotWaitTimeout time.Duration
	// MaxInFlight bounds the stubs produced and not yet acknowledged; when
	// reached, decoding pauses (status updates continue). Default 10000.
	MaxInFlight int
	// ShutdownTimeout bounds the final flush on shutdown. Default 30s.
	ShutdownTimeout time.Duration
	// ReconnectMin and ReconnectMax bound the backoff between attempts to
	// reach PostgreSQL or Kafka. Defaults 500ms and 30s.
	ReconnectMin, ReconnectMax time.Duration
	// PrintStubs, when set, receives every acknowledged stub as one JSON
	// line {"topic":…,"partition":…,"offset":…,"value":{…}} (for demos).
	PrintStubs io.Writer
}

func (c *Config) setDefaults() {
	if c.Slot == "" {
		c.Slot = "changefeed"
	}
	if c.Publication == "" {
		c.Publication = "changefeed"
	}
	if c.Routing == nil {
		c.Routing = &Routing{TypeTopics: DefaultTypeTopics(), DefaultTopic: TopicMeta}
	}
	if c.Routing.DefaultTopic == "" {
		c.Routing.DefaultTopic = TopicMeta
	}
	if c.Routing.TypeTopics == nil {
		c.Routing.TypeTopics = DefaultTypeTopics()
	}
	if c.ControlTopic == "" {
		c.ControlTopic = DefaultControlTopic
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.StatusInterval, time.Second)
	def(&c.KeepaliveInterval, 10*time.Second)
	def(&c.LagInterval, 10*time.Second)
	def(&c.ShutdownTimeout, 30*time.Second)
	def(&c.ReconnectMin, 500*time.Millisecond)
	def(&c.ReconnectMax, 30*time.Second)
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = 10000
	}
}

// Deps are the publisher's collaborators.
type Deps struct {
	Producer Producer
	Logger   *slog.Logger
	// Registerer receives the publisher's metrics; nil registers nothing.
	Registerer prometheus.Registerer
}

// State is where the publisher is in its life.
type State int32

const (
	StateStarting State = iota
	StateWaitingForSlot
	StateStreaming
	StateReconnecting
	StateStopped
)

func (s State) String() string {
	return [...]string{"starting", "waiting for slot", "streaming", "reconnecting", "stopped"}[s]
}

// Publisher streams the slot into Kafka. Create it with New and call Run
// once.
type Publisher struct {
	cfg     Config
	log     *slog.Logger
	prod    Producer
	m       *metrics
	dbCfg   *pgx.ConnConfig
	replCfg *pgconn.Config
	topics  map[string]bool // topics a published-from-anywhere stub may name

	topicsReady bool
	// cluster is the server's identity, read at the start of each session.
	cluster cluster
	// gapAccepted: AllowNewSlot was used by this process; later sessions
	// (reconnects) neither need nor refuse it.
	gapAccepted bool

	state     atomic.Int32
	confirmed atomic.Uint64

	// inFlight counts stubs produced and not yet acknowledged; emit waits
	// while it exceeds MaxInFlight, and an ack wakes a waiter through wake.
	inFlight atomic.Int64
	waiting  atomic.Bool
	wake     chan struct{}
	pool     sync.Pool
	printMu  sync.Mutex
	// refusedLog rate-limits the per-stub refusal line.
	refusedLog logLimiter
	// prodCtx outlives Run's context: records must not be cancelled before
	// the final flush.
	prodCtx context.Context
}

// New validates cfg and prepares a publisher. It does not connect.
func New(cfg Config, deps Deps) (*Publisher, error) {
	cfg.setDefaults()
	if err := ValidateName("slot", cfg.Slot); err != nil {
		return nil, err
	}
	if err := ValidateName("publication", cfg.Publication); err != nil {
		return nil, err
	}
	if !topicPattern.MatchString(cfg.ControlTopic) {
		return nil, fmt.Errorf("%w: control topic %q is not a valid Kafka topic name", ErrConfig, cfg.ControlTopic)
	}
	if a := cfg.AllowNewSlot; !a.IsZero() && a.Slot != cfg.Slot {
		return nil, fmt.Errorf("%w: --allow-new-slot=%s names slot %q, but the publisher streams slot %q", ErrConfig, a, a.Slot, cfg.Slot)
	}
	if cfg.PostgresURL == "" {
		return nil, fmt.Errorf("%w: no PostgreSQL URL", ErrConfig)
	}
	if deps.Producer == nil {
		return nil, fmt.Errorf("%w: no producer", ErrConfig)
	}
	dbCfg, err := pgx.ParseConfig(cfg.PostgresURL)
	if err != nil {
		return nil, errInvalidURL(cfg.PostgresURL)
	}
	replCfg, err := pgconn.ParseConfig(cfg.PostgresURL)
	if err != nil {
		return nil, errInvalidURL(cfg.PostgresURL)
	}
	replCfg.RuntimeParams["replication"] = "database"
	replCfg.RuntimeParams["application_name"] = "changefeed-cdc-publisher"
	dbCfg.RuntimeParams["application_name"] = "changefeed-cdc-publisher"
	log := deps.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Publisher{
		cfg: cfg, log: log, prod: deps.Producer, dbCfg: dbCfg, replCfg: replCfg,
		topics:  map[string]bool{},
		wake:    make(chan struct{}, 1),
		prodCtx: context.Background(),

		refusedLog: logLimiter{every: 10 * time.Second},
	}
	for _, t := range cfg.Routing.Topics() {
		p.topics[t] = true
	}
	p.pool.New = func() any {
		o := &outRecord{p: p}
		o.done = o.finish
		return o
	}
	p.m, err = newMetrics(deps.Registerer, func() float64 { return float64(p.inFlight.Load()) })
	if err != nil {
		return nil, err
	}
	return p, nil
}

// State returns the publisher's current state.
func (p *Publisher) State() State { return State(p.state.Load()) }

// Confirmed returns the LSN last confirmed to the slot by this process (0
// before the first confirmation). The durable copy is
// changefeed.cdc_checkpoint; the slot's is pg_replication_slots.confirmed_flush_lsn.
func (p *Publisher) Confirmed() stub.LSN { return stub.LSN(p.confirmed.Load()) }

// Ready reports whether the publisher streams and Kafka answers.
func (p *Publisher) Ready(ctx context.Context) error {
	if s := p.State(); s != StateStreaming {
		return fmt.Errorf("cdc publisher is %s", s)
	}
	return p.prod.Ping(ctx)
}

// Run streams until ctx is done (then it flushes, confirms what Kafka
// acknowledged and returns nil) or a failure that a restart would not cure
// (returned; see the Err* sentinels). Lost PostgreSQL connections are
// retried with backoff; Kafka outages stall it without returning.
func (p *Publisher) Run(ctx context.Context) error {
	defer p.state.Store(int32(StateStopped))
	p.log.Info("cdc publisher starting", "postgres", MaskURL(p.cfg.PostgresURL), "slot", p.cfg.Slot,
		"publication", p.cfg.Publication, "tables", len(p.cfg.Routing.Tables))

	migrated := !p.cfg.Migrate
	delay := p.cfg.ReconnectMin
	for attempt := 0; ; attempt++ {
		if !migrated {
			if err := migrations.Up(ctx, p.cfg.PostgresURL, p.log); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				if !isTransient(err) {
					return err
				}
				p.log.Warn("cannot apply migrations; retrying", "err", err, "in", delay)
				if !sleep(ctx, delay) {
					return nil
				}
				delay = min(2*delay, p.cfg.ReconnectMax)
				continue
			}
			migrated = true
		}
		streamed, err := p.session(ctx)
		if ctx.Err() != nil {
			return ignoreCanceled(ctx, err)
		}
		if !isTransient(err) {
			return err
		}
		p.state.Store(int32(StateReconnecting))
		p.m.streaming.Set(0)
		p.m.reconnects.Inc()
		if streamed {
			delay = p.cfg.ReconnectMin
		}
		p.log.Warn("PostgreSQL connection lost; reconnecting", "err", err, "in", delay)
		if !sleep(ctx, delay) {
			return nil
		}
		delay = min(2*delay, p.cfg.ReconnectMax)
	}
}

// session connects, checks, prepares the slot and streams until an error or
// ctx is done. streamed reports whether the stream started.
func (p *Publisher) session(ctx context.Context) (streamed bool, err error) {
	p.state.Store(int32(StateStarting))
	db, err := pgx.ConnectConfig(ctx, p.dbCfg)
	if err != nil {
		return false, fmt.Errorf("connect to PostgreSQL: %w", err)
	}
	defer db.Close(context.Background())

	if err := p.checkVersion(ctx, db); err != nil {
		return false, err
	}
	if err := p.checkServer(ctx, db); err != nil {
		return false, err
	}
	if err := p.ensurePublication(ctx, db); err != nil {
		return false, err
	}
	if err := p.checkColumnLists(ctx, db); err != nil {
		return false, err
	}
	if err := p.durableCheckpoints(ctx, db); err != nil {
		return false, err
	}
	for {
		// The replication connection first: IDENTIFY_SYSTEM names the
		// cluster and timeline the checkpoint must belong to.
		repl, err := pgconn.ConnectConfig(ctx, p.replCfg)
		if err != nil {
			return false, fmt.Errorf("open replication connection: %w", err)
		}
		if p.cluster, err = identifySystem(ctx, repl); err != nil {
			repl.Close(context.Background())
			return false, err
		}
		start, err := p.prepareSlot(ctx, db)
		if err != nil {
			repl.Close(context.Background())
			return false, err
		}
		if !p.topicsReady {
			// After the PostgreSQL checks, so that their errors show at once
			// even while Kafka is unreachable.
			topics := append(p.cfg.Routing.Topics(), p.cfg.ControlTopic)
			if err := p.retry(ctx, "create Kafka topics", func() error {
				actx, cancel := context.WithTimeout(ctx, 15*time.Second)
				defer cancel()
				return p.prod.EnsureTopics(actx, topics...)
			}, func(err error) bool { return !publish.Permanent(err) }); err != nil {
				repl.Close(context.Background())
				return false, err
			}
			p.topicsReady = true
		}
		err = p.startReplication(ctx, repl, start)
		if isSlotActive(err) {
			// Another process took the slot between the check and the start.
			repl.Close(context.Background())
			continue
		}
		if err != nil {
			repl.Close(context.Background())
			return false, err
		}
		s := newStream(p, db, repl, start)
		err = s.run(ctx)
		repl.Close(context.Background())
		if err != nil && ctx.Err() == nil && isTransient(err) {
			// Let this session's stubs resolve before the next one replays
			// from the slot: a stub Kafka refused for good stops the
			// publisher instead of hiding behind the reconnect.
			p.log.Warn("replication connection lost; waiting for Kafka to acknowledge this session's stubs", "err", err, "in_flight", p.inFlight.Load())
			if ferr := p.prod.Flush(ctx); ferr != nil && ctx.Err() == nil {
				p.log.Warn("flush before reconnect failed", "err", ferr)
			}
			if terr := s.tr.Err(); terr != nil {
				return true, fmt.Errorf("%w: %w", ErrProduce, terr)
			}
		}
		return true, err
	}
}

// durableCheckpoints makes this session's commits (the checkpoint writes)
// durable before they return, whatever the server's synchronous_commit:
// with it off, a server crash can lose the last checkpoint while the slot
// kept the position it was confirmed to, and the next start would see the
// slot ahead of the checkpoint, a false gap.
func (p *Publisher) durableCheckpoints(ctx context.Context, db *pgx.Conn) error {
	var sc string
	if err := db.QueryRow(ctx, "SELECT current_setting('synchronous_commit')").Scan(&sc); err != nil {
		return fmt.Errorf("read synchronous_commit: %w", err)
	}
	if sc != "off" {
		return nil
	}
	if _, err := db.Exec(ctx, "SET synchronous_commit = local"); err != nil {
		return fmt.Errorf("set synchronous_commit: %w", err)
	}
	p.log.Info("synchronous_commit is off on this server: the publisher's checkpoint writes use synchronous_commit = local, so that a crash cannot lose a checkpoint the slot was confirmed to")
	return nil
}

// retry runs f with backoff until it succeeds, ctx is done, or retryable
// says no.
func (p *Publisher) retry(ctx context.Context, what string, f func() error, retryable func(error) bool) error {
	delay := p.cfg.ReconnectMin
	for {
		err := f()
		if err == nil || !retryable(err) || ctx.Err() != nil {
			return err
		}
		p.log.Warn("cannot "+what+"; retrying", "err", err, "in", delay)
		if !sleep(ctx, delay) {
			return ctx.Err()
		}
		delay = min(2*delay, p.cfg.ReconnectMax)
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// ignoreCanceled turns the error of an interrupted operation into nil once
// ctx is done: stopping is not a failure.
func ignoreCanceled(ctx context.Context, err error) error {
	if ctx.Err() != nil && (err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || isTransient(err)) {
		return nil
	}
	return err
}

// isTransient reports whether err is a connection problem that a reconnect
// may cure, as opposed to a failure a restart would repeat.
func isTransient(err error) bool {
	if err == nil {
		return false
	}
	for _, s := range []error{ErrConfig, ErrPrecondition, ErrPossibleGap, ErrSlotBusy, ErrProduce, ErrSchema} {
		if errors.Is(err, s) {
			return false
		}
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code[:2] {
		case "08", "57", "53", "58":
			return true
		}
		return false
	}
	var netErr net.Error
	return errors.As(err, &netErr) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, pgconn.ErrConnClosed) ||
		pgconn.SafeToRetry(err) || pgconn.Timeout(err) ||
		errors.Is(err, errStreamEnded)
}

func isSlotActive(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "55006"
}
