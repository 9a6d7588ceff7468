package couchsource

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	kivik "github.com/go-kivik/kivik/v4"
	"github.com/go-kivik/kivik/v4/couchdb"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/changefeed/changefeed/stub"
)

// Publisher produces stubs to Kafka (package publish implements it).
type Publisher interface {
	// Publish produces s to topic; done is called once, with nil when
	// Kafka acknowledged the record.
	Publish(ctx context.Context, topic string, s *stub.Stub, done func(error))
	Flush(ctx context.Context) error
	Ping(ctx context.Context) error
}

// Errors a caller acts on.
var (
	// ErrAuth: CouchDB refused the credentials (401) or the access (403).
	// The follower stops; retrying cannot help.
	ErrAuth = errors.New("couchdb refused the credentials or the access")
	// ErrDatabaseMissing: the database does not exist (404). The follower
	// retries with backoff and reports not ready meanwhile.
	ErrDatabaseMissing = errors.New("database does not exist")
	// ErrBadRequest: CouchDB rejected the feed request itself (400 with
	// since=0), for example an invalid selector. The follower stops.
	ErrBadRequest = errors.New("couchdb rejected the feed request")
	// ErrPublish: Kafka failed a stub for good. The follower stops without
	// checkpointing past it; a restart replays from the checkpoint.
	ErrPublish = errors.New("publishing a stub failed")
)

// Follower follows the _changes feeds of one or more databases of one
// CouchDB server and publishes a stub per change.
type Follower struct {
	cfg    Config
	log    *slog.Logger
	pub    Publisher
	store  Store
	client *kivik.Client
	m      *metrics
	keep   map[string]bool
	// selector is the JSON body of filter=_selector requests, nil if none.
	selector []byte

	printMu sync.Mutex

	dbs     []*dbFollower
	kafkaOK atomic.Bool
	running atomic.Bool
	fatal   atomic.Pointer[error]
}

// New checks the configuration and prepares the client; it does not
// connect (Run does, and retries).
func New(cfg Config, pub Publisher, store Store, log *slog.Logger, reg prometheus.Registerer) (*Follower, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	base, user, password, err := splitCouchURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	hc := &http.Client{Transport: &transport{base: newHTTPTransport(cfg.ReadTimeout)}}
	opts := []kivik.Option{couchdb.OptionHTTPClient(hc), couchdb.OptionNoRequestCompression()}
	if user != "" {
		opts = append(opts, couchdb.BasicAuth(user, password))
	}
	client, err := kivik.New("couch", base, opts...)
	if err != nil {
		return nil, fmt.Errorf("couchdb client: %w", err)
	}
	f := &Follower{cfg: cfg, log: log, pub: pub, store: store, client: client, m: m, keep: cfg.Routing.fields()}
	if cfg.Routing.Selector != nil {
		if f.selector, err = json.Marshal(map[string]any{"selector": cfg.Routing.Selector}); err != nil {
			return nil, fmt.Errorf("%w: selector: %w", ErrConfig, err)
		}
	}
	for _, name := range cfg.Databases {
		f.dbs = append(f.dbs, newDBFollower(f, name))
	}
	return f, nil
}

// Run follows every database until ctx is cancelled or a fatal error
// (ErrAuth, ErrBadRequest, ErrPublish) occurs. Then it stops reading, waits
// up to ShutdownTimeout for Kafka to acknowledge the stubs in flight, and
// writes each database's final checkpoint. It returns nil after a clean
// shutdown.
func (f *Follower) Run(ctx context.Context) error {
	if !f.running.CompareAndSwap(false, true) {
		return errors.New("couch follower: Run called twice")
	}
	defer f.running.Store(false)
	readCtx, stopReading := context.WithCancel(ctx)
	defer stopReading()
	// Publishing outlives reading: a stub produced just before shutdown
	// must still be acknowledged. pubCtx ends only when the grace period
	// does.
	pubCtx, stopPublishing := context.WithCancel(context.WithoutCancel(ctx))
	defer stopPublishing()

	go f.pingKafka(readCtx)
	var wg sync.WaitGroup
	for _, d := range f.dbs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.run(readCtx, pubCtx); err != nil {
				f.fail(err)
				stopReading()
			}
		}()
	}
	<-readCtx.Done()
	f.log.Info("couch follower stopping: flushing in-flight stubs and writing checkpoints")
	grace := time.AfterFunc(f.cfg.ShutdownTimeout, stopPublishing)
	defer grace.Stop()
	wg.Wait()
	if err := f.pub.Flush(pubCtx); err != nil {
		f.log.Warn("flush at shutdown did not complete: unacknowledged stubs stay after the checkpoint and are replayed at the next start", "err", err)
	}
	for _, d := range f.dbs {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		if err := d.checkpoint(cctx); err != nil {
			f.log.Error("final checkpoint failed", "db", d.name, "err", err)
		}
		cancel()
	}
	if p := f.fatal.Load(); p != nil {
		return *p
	}
	f.log.Info("couch follower stopped")
	return nil
}

func (f *Follower) fail(err error) {
	f.fatal.CompareAndSwap(nil, &err)
}

// pingKafka keeps kafkaOK current for readiness.
func (f *Follower) pingKafka(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		err := f.pub.Ping(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if was := f.kafkaOK.Swap(err == nil); was != (err == nil) {
			if err != nil {
				f.log.Warn("kafka unreachable: not ready, checkpoints hold until it acknowledges again", "err", err)
			} else {
				f.log.Info("kafka reachable")
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Ready returns nil when every database's feed is connected, Kafka answers
// and checkpoints are being written; otherwise the reasons.
func (f *Follower) Ready() error {
	var why []string
	if !f.running.Load() {
		why = append(why, "not running")
	}
	if !f.kafkaOK.Load() {
		why = append(why, "kafka unreachable")
	}
	for _, d := range f.dbs {
		if s := d.status(); s != "" {
			why = append(why, d.name+": "+s)
		}
	}
	if len(why) > 0 {
		return errors.New(strings.Join(why, "; "))
	}
	return nil
}

// Healthy returns an error once the follower has failed for good.
func (f *Follower) Healthy() error {
	if p := f.fatal.Load(); p != nil {
		return *p
	}
	return nil
}

// printStub writes one acknowledged stub as a JSON line.
func (f *Follower) printStub(topic string, s *stub.Stub) {
	b, err := json.Marshal(struct {
		Topic string     `json:"topic"`
		Stub  *stub.Stub `json:"stub"`
	}{topic, s})
	if err != nil {
		return
	}
	f.printMu.Lock()
	defer f.printMu.Unlock()
	_, _ = f.cfg.PrintStubs.Write(append(b, '\n'))
}
