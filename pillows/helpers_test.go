package pillows_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	neturl "net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/docstore"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/pillows"
	"github.com/changefeed/changefeed/publish"
	"github.com/changefeed/changefeed/sink/pgsink"
	"github.com/changefeed/changefeed/stub"
)

const (
	topic      = "changes"
	partitions = 3
)

// env is one test's servers: PostgreSQL (source table, errors table,
// reporting table) in a container and an in-process kfake cluster.
type env struct {
	t       *testing.T
	ctx     context.Context
	url     string
	pool    *pgxpool.Pool
	cluster *kfake.Cluster
	brokers []string
	prod    *kgo.Client
	log     *slog.Logger
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	url := os.Getenv("CHANGEFEED_TEST_POSTGRES_URL")
	if url == "" {
		url = testenv.Postgres(t).URL()
	} else {
		// Development shortcut: a fresh schema per test on a given server.
		url = freshDB(t, ctx, url)
	}
	if err := migrations.Up(ctx, url, nil); err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(partitions, topic), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	prod, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.DefaultProduceTopic(topic))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(prod.Close)
	e := &env{t: t, ctx: ctx, url: url, pool: pool, cluster: c, brokers: c.ListenAddrs(), prod: prod,
		log: slog.New(slog.NewJSONHandler(testWriter{t}, &slog.HandlerOptions{Level: testLogLevel()}))}
	e.exec(`CREATE TABLE src (id text PRIMARY KEY, doc_type text NOT NULL, domain text NOT NULL, name text, n int)`)
	return e
}

var dbSeq atomic.Int64

func freshDB(t *testing.T, ctx context.Context, base string) string {
	pool, err := pgxpool.New(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	name := fmt.Sprintf("pt_%d_%d", os.Getpid(), dbSeq.Add(1))
	if _, err := pool.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatal(err)
	}
	u, err := neturl.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

func (e *env) exec(sql string, args ...any) {
	e.t.Helper()
	if _, err := e.pool.Exec(e.ctx, sql, args...); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
}

// change is one version of a document in the source.
type change struct {
	id      string
	lsn     uint64
	deleted bool
	name    string
}

// apply writes the final state of each document to src.
func (e *env) apply(final map[string]change) {
	e.t.Helper()
	for _, c := range final {
		if c.deleted {
			e.exec(`DELETE FROM src WHERE id = $1`, c.id)
			continue
		}
		e.exec(`INSERT INTO src (id, doc_type, domain, name, n) VALUES ($1, 'case', 'demo', $2, $3)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, n = excluded.n`, c.id, c.name, int(c.lsn))
	}
}

func mkStub(c change) *stub.Stub {
	return &stub.Stub{
		DocumentID: c.id, DataSourceType: stub.SourceSQL, DataSourceName: "src",
		DocumentType: "case", Domain: "demo", IsDeletion: c.deleted,
		PublishTimestamp: time.Now(), LSN: stub.LSN(c.lsn), TxOrdinal: 1,
	}
}

// produce publishes stubs in the given order, keyed by document id.
func (e *env) produce(cs ...change) {
	e.t.Helper()
	recs := make([]*kgo.Record, len(cs))
	for i, c := range cs {
		b, err := json.Marshal(mkStub(c))
		if err != nil {
			e.t.Fatal(err)
		}
		recs[i] = &kgo.Record{Key: []byte(c.id), Value: b}
	}
	if err := e.prod.ProduceSync(e.ctx, recs...).FirstErr(); err != nil {
		e.t.Fatal(err)
	}
}

// repSink is the reporting-table sink (sink/pgsink, table rep with columns
// name and n) behind switches that make it fail.
type repSink struct {
	inner  *pgsink.Sink
	name   string
	down   atomic.Bool
	poison sync.Map // id → true: fails with an error
	panics sync.Map // id → true: panics
	writes atomic.Int64
}

func (e *env) repSink(name string) *repSink {
	e.t.Helper()
	s, err := pgsink.New(e.pool, pgsink.Config{Table: "rep", Columns: []pgsink.Column{
		{Name: "name", Type: "text"}, {Name: "n", Type: "integer"},
	}}, e.log)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := s.Bootstrap(e.ctx); err != nil {
		e.t.Fatal(err)
	}
	return &repSink{inner: s, name: name}
}

func (s *repSink) Name() string { return s.name }

func (s *repSink) Process(ctx context.Context, docs []*doc.Document) error {
	if s.down.Load() {
		return fmt.Errorf("%w: reporting database down", doc.ErrTransient)
	}
	errs := doc.Errors{}
	var ok []*doc.Document
	for _, d := range docs {
		if _, bad := s.panics.Load(d.ID); bad {
			panic("processor bug on " + d.ID)
		}
		if _, bad := s.poison.Load(d.ID); bad {
			errs[d.ID] = errors.New("poison document " + d.ID)
			continue
		}
		ok = append(ok, d)
	}
	if err := s.inner.Write(ctx, ok); err != nil {
		var de doc.Errors
		if !errors.As(err, &de) {
			return err
		}
		for id, derr := range de {
			errs[id] = derr
		}
	}
	s.writes.Add(int64(len(ok)))
	if len(errs) > 0 {
		return errs
	}
	return nil
}

func (e *env) store() pillows.Store {
	st, err := docstore.NewPostgres(e.pool, []docstore.PostgresTable{{Source: "src", Table: "src", IDColumn: "id", TypeColumn: "doc_type", DomainColumn: "domain"}})
	if err != nil {
		e.t.Fatal(err)
	}
	return st
}

func (e *env) pillow(name string, procs ...pillows.Processor) *pillows.Pillow {
	return &pillows.Pillow{
		Name:       name,
		Topics:     []string{topic},
		Processors: procs,
		Stores:     map[pillows.StoreKey]pillows.Store{{Type: stub.SourceSQL, Name: "src"}: e.store()},
		Batch:      pillows.Batching{MaxStubs: 50, MaxWait: 20 * time.Millisecond},
		Retry:      pillows.Retry{MaxAttempts: 3, BackoffUnit: 300 * time.Millisecond, Interval: 100 * time.Millisecond},
	}
}

func (e *env) runner(opts ...func(*pillows.Options)) *pillows.Runner {
	e.t.Helper()
	o := pillows.Options{
		Kafka:          kafkaconn.Config{Brokers: e.brokers},
		Errors:         pillows.NewErrorLog(e.pool),
		Log:            e.log,
		CommitInterval: 200 * time.Millisecond,
		TransientMin:   50 * time.Millisecond,
		TransientMax:   500 * time.Millisecond,
		KafkaOpts:      []kgo.Opt{kgo.FetchMaxWait(200 * time.Millisecond)},
	}
	for _, f := range opts {
		f(&o)
	}
	r, err := pillows.NewRunner(o)
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

func (e *env) deadLetters() pillows.DeadLetters {
	p, err := publish.New(kafkaconn.Config{Brokers: e.brokers}, publish.Options{Partitions: 1, ReplicationFactor: 1, MinInsyncReplicas: 1}, e.log, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(p.Close)
	return pillows.ProducerDeadLetters(p)
}

// running is a Runner started by start.
type running struct {
	cancel   context.CancelFunc
	finished chan struct{}
	err      error
}

// stop cancels the run and returns Run's error.
func (r *running) stop() error {
	r.cancel()
	select {
	case <-r.finished:
		return r.err
	case <-time.After(time.Minute):
		return errors.New("runner did not stop within a minute")
	}
}

// start runs r in the background until the test ends or stop is called.
func (e *env) start(r *pillows.Runner, ps ...*pillows.Pillow) *running {
	ctx, cancel := context.WithCancel(e.ctx)
	run := &running{cancel: cancel, finished: make(chan struct{})}
	go func() {
		defer close(run.finished)
		run.err = r.Run(ctx, ps...)
	}()
	e.t.Cleanup(func() { _ = run.stop() })
	return run
}

// sinkState is the reporting table as id → name (deleted rows excluded).
func (e *env) sinkState() map[string]string {
	e.t.Helper()
	rows, err := e.pool.Query(e.ctx, `SELECT doc_id, name FROM rep_live`)
	if err != nil {
		e.t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var id string
		var name *string
		if err := rows.Scan(&id, &name); err != nil {
			e.t.Fatal(err)
		}
		out[id] = deref(name)
	}
	return out
}

func (e *env) sourceState() map[string]string {
	e.t.Helper()
	rows, err := e.pool.Query(e.ctx, `SELECT id, name FROM src`)
	if err != nil {
		e.t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var id string
		var name *string
		if err := rows.Scan(&id, &name); err != nil {
			e.t.Fatal(err)
		}
		out[id] = deref(name)
	}
	return out
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func (e *env) sinkEqualsSource(timeout time.Duration) {
	e.t.Helper()
	testenv.Eventually(e.t, timeout, func() string { return testenv.DiffStates(e.sourceState(), e.sinkState()) })
}

// history builds n documents with versions 1..v each; some end deleted.
// It returns every change (in version order per document) and the final
// state per document.
func history(n, v int, deleteEvery int) ([]change, map[string]change) {
	var all []change
	final := map[string]change{}
	lsn := uint64(100)
	for i := range n {
		id := fmt.Sprintf("doc-%03d", i)
		for j := 1; j <= v; j++ {
			lsn++
			c := change{id: id, lsn: lsn, name: fmt.Sprintf("%s-v%d", id, j)}
			if deleteEvery > 0 && i%deleteEvery == 0 && j == v {
				c.deleted = true
			}
			all = append(all, c)
			final[id] = c
		}
	}
	return all, final
}

func (e *env) errorRows(pillow string) []pillows.ErrorRow {
	e.t.Helper()
	rows, err := pillows.NewErrorLog(e.pool).Rows(e.ctx, pillow)
	if err != nil {
		e.t.Fatal(err)
	}
	return rows
}

// metricValue sums the samples of a counter or gauge whose labels include
// the given name/value pairs.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, lp := range m.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue metric
				}
			}
			switch {
			case m.Counter != nil:
				sum += m.GetCounter().GetValue()
			case m.Gauge != nil:
				sum += m.GetGauge().GetValue()
			}
		}
	}
	return sum
}

func testLogLevel() slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(os.Getenv("PILLOW_TEST_LOG"))); err != nil {
		return slog.LevelWarn
	}
	return l
}

// waitMembers waits until group has n members that each own a partition.
func (e *env) waitMembers(group string, n int) {
	e.t.Helper()
	adm := kadm.NewClient(e.prod)
	testenv.Eventually(e.t, 30*time.Second, func() string {
		ds, err := adm.DescribeGroups(e.ctx, group)
		if err != nil {
			return err.Error()
		}
		d := ds[group]
		if d.State != "Stable" || len(d.Members) != n {
			return fmt.Sprintf("group %s: state %s, %d members", group, d.State, len(d.Members))
		}
		for _, m := range d.Members {
			c, ok := m.Assigned.AsConsumer()
			if !ok || len(c.Topics) == 0 {
				return "a member owns no partition yet"
			}
		}
		return ""
	})
}
