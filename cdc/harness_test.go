package cdc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/publish"
	"github.com/changefeed/changefeed/stub"
)

const waitFor = 30 * time.Second

// testDB is one database of a shared PostgreSQL server, with a slot and
// publication of its own name.
type testDB struct {
	name string
	url  string
}

// newDB creates a database named after the test on pg.
func newDB(t *testing.T, pg *testenv.PG, schema string) *testDB {
	t.Helper()
	name := strings.ToLower(strings.NewReplacer("/", "_", "-", "_").Replace(t.Name()))
	if len(name) > 60 {
		name = name[len(name)-60:]
	}
	pg.Exec(t, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
	pg.Exec(t, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
	u, err := url.Parse(pg.URL())
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	db := &testDB{name: name, url: u.String()}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, pg.URL())
		if err != nil {
			return
		}
		defer c.Close(ctx)
		_, _ = c.Exec(ctx, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", name)
		_, _ = c.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
	})
	if schema != "" {
		db.exec(t, schema)
	}
	return db
}

func (d *testDB) conn(t *testing.T) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, d.url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func (d *testDB) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, d.url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("exec %q: %v", sql, err)
	}
}

func (d *testDB) lsn(t *testing.T, sql string, args ...any) stub.LSN {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, d.url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var s *string
	if err := c.QueryRow(ctx, sql, args...).Scan(&s); err != nil {
		t.Fatalf("query %q: %v", sql, err)
	}
	if s == nil {
		return 0
	}
	l, err := stub.ParseLSN(*s)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func (d *testDB) slotLSN(t *testing.T) stub.LSN {
	return d.lsn(t, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", d.name)
}

func (d *testDB) checkpoint(t *testing.T) stub.LSN {
	return d.lsn(t, "SELECT confirmed_lsn::text FROM changefeed.cdc_checkpoint WHERE slot_name = $1", d.name)
}

// syncBuffer collects logs; they are printed when the test fails.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// running is a publisher running in-process.
type running struct {
	p      *Publisher
	reg    *prometheus.Registry
	logs   *syncBuffer
	cancel context.CancelFunc
	done   chan error
	err    error
	once   sync.Once
}

// start runs a publisher on db with cfg (URL, slot and publication filled
// in) against brokers. It is stopped at cleanup.
func start(t *testing.T, db *testDB, kafka kafkaconn.Config, cfg Config) *running {
	t.Helper()
	if cfg.PostgresURL == "" {
		cfg.PostgresURL = db.url
		cfg.Migrate = true
	}
	if cfg.Slot == "" {
		cfg.Slot = db.name
	}
	if cfg.Publication == "" {
		cfg.Publication = db.name
	}
	if cfg.StatusInterval == 0 {
		cfg.StatusInterval = 100 * time.Millisecond
	}
	if cfg.LagInterval == 0 {
		cfg.LagInterval = time.Second
	}
	cfg.ReconnectMin = 100 * time.Millisecond
	if cfg.SlotWaitTimeout == 0 {
		cfg.SlotWaitTimeout = 20 * time.Second
	}
	logs := &syncBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	reg := prometheus.NewRegistry()
	prod, err := publish.New(kafka, publish.Options{Partitions: 3, ReplicationFactor: 1, MinInsyncReplicas: 1, OversizedTopic: oversizedTopic, Component: "cdc", Linger: time.Millisecond}, log, reg)
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(cfg, Deps{Producer: prod, Logger: log, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{p: p, reg: reg, logs: logs, cancel: cancel, done: make(chan error, 1)}
	go func() {
		r.done <- p.Run(ctx)
		prod.Close()
	}()
	t.Cleanup(func() {
		r.stop(t)
		if t.Failed() {
			t.Logf("publisher logs:\n%s", logs.String())
		}
	})
	return r
}

// stop cancels the publisher and returns Run's error.
func (r *running) stop(t *testing.T) error {
	t.Helper()
	r.once.Do(func() {
		r.cancel()
		select {
		case r.err = <-r.done:
		case <-time.After(waitFor):
			t.Errorf("publisher did not stop within %s", waitFor)
		}
	})
	return r.err
}

// exited waits for Run to return on its own.
func (r *running) exited(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.once.Do(func() { r.err = err })
		return err
	case <-time.After(waitFor):
		t.Fatalf("publisher still running after %s", waitFor)
		return nil
	}
}

func (r *running) waitStreaming(t *testing.T) {
	t.Helper()
	eventually(t, "publisher streaming", func() error {
		select {
		case err := <-r.done:
			r.once.Do(func() { r.err = err })
			t.Fatalf("publisher exited: %v", err)
		default:
		}
		if s := r.p.State(); s != StateStreaming {
			return fmt.Errorf("state %s", s)
		}
		return nil
	})
}

func (r *running) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := r.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var total float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				if !hasLabel(m, labels[i], labels[i+1]) {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				total += m.Counter.GetValue()
			case m.Gauge != nil:
				total += m.Gauge.GetValue()
			}
		}
	}
	return total
}

func hasLabel(m *dto.Metric, k, v string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == k && l.GetValue() == v {
			return true
		}
	}
	return false
}

// eventually polls check until it succeeds or waitFor passes.
func eventually(t *testing.T, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, waitFor, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// consumer reads topics from the start in the background.
type consumer struct {
	mu   sync.Mutex
	recs []*kgo.Record
}

func consume(t *testing.T, kafka kafkaconn.Config, topics ...string) *consumer {
	t.Helper()
	opts, err := kafka.Opts()
	if err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(append(opts,
		kgo.ConsumeTopics(topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.MetadataMinAge(100*time.Millisecond),
		kgo.FetchMaxWait(200*time.Millisecond),
	)...)
	if err != nil {
		t.Fatal(err)
	}
	c := &consumer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			fs := cl.PollFetches(ctx)
			fs.EachRecord(func(r *kgo.Record) {
				c.mu.Lock()
				c.recs = append(c.recs, r)
				c.mu.Unlock()
			})
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		cl.Close()
	})
	return c
}

func (c *consumer) records() []*kgo.Record {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*kgo.Record(nil), c.recs...)
}

// stubs decodes the records of topic (all topics when empty).
func (c *consumer) stubs(t *testing.T, topic string) []*stub.Stub {
	t.Helper()
	var out []*stub.Stub
	for _, r := range c.records() {
		if topic != "" && r.Topic != topic {
			continue
		}
		s, err := stub.Unmarshal(r.Value)
		if err != nil {
			t.Fatalf("record on %s is not a stub: %v: %s", r.Topic, err, r.Value)
		}
		if string(r.Key) != s.DocumentID {
			t.Fatalf("record key %q != document_id %q", r.Key, s.DocumentID)
		}
		out = append(out, s)
	}
	return out
}

// waitStubs waits until at least n stubs are on topic and returns them.
func (c *consumer) waitStubs(t *testing.T, topic string, n int) []*stub.Stub {
	t.Helper()
	var got []*stub.Stub
	eventually(t, fmt.Sprintf("%d stubs on %s", n, topic), func() error {
		got = c.stubs(t, topic)
		if len(got) < n {
			return fmt.Errorf("%d stubs", len(got))
		}
		return nil
	})
	return got
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }

func migrateAs(url string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return migrations.Up(ctx, url, nil)
}
