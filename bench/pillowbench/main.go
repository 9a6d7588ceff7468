// Command pillowbench measures the pillow runtime against its floor, in one
// run on one machine:
//
//	(a) floor: a bare loop writing the documents to the reporting table with
//	    batched INSERT … ON CONFLICT (sink/pgsink.Write, batches of -batch);
//	(b) pillow: the stubs of the same documents in Kafka, consumed by a
//	    pillow that fetches each batch from PostgreSQL (docstore.Postgres)
//	    and writes the same kind of table (a fresh one).
//
// It prints docs/s of both, the ratio b ÷ a (target ≥ 0.5), the latency from
// each stub's publish_timestamp to its sink write (p50/p99) measured in a
// second phase where stubs are published at a steady rate below the pillow's
// throughput (so it measures the pipeline, not a backlog), and the process's
// max RSS.
//
//	go run ./bench/pillowbench -postgres-url postgres://… [-brokers host:port] [-docs 50000]
//
// Without -brokers an in-process kfake cluster is used (it then shares the
// CPU with the pillow, which makes (b) pessimistic).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/docstore"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/pillows"
	"github.com/changefeed/changefeed/sink/pgsink"
	"github.com/changefeed/changefeed/stub"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "pillowbench:", err)
		os.Exit(1)
	}
}

type config struct {
	url        string
	brokers    string
	docs       int
	batch      int
	partitions int
	latencyFor time.Duration
}

func run() error {
	var c config
	flag.StringVar(&c.url, "postgres-url", os.Getenv("CHANGEFEED_POSTGRES_URL"), "PostgreSQL for source, errors and reporting tables [$CHANGEFEED_POSTGRES_URL]")
	flag.StringVar(&c.brokers, "brokers", os.Getenv("CHANGEFEED_KAFKA_BROKERS"), "Kafka brokers; empty: in-process kfake")
	flag.IntVar(&c.docs, "docs", 50000, "documents")
	flag.IntVar(&c.batch, "batch", 500, "documents per write (floor) and stubs per batch (pillow)")
	flag.IntVar(&c.partitions, "partitions", 3, "topic partitions")
	flag.DurationVar(&c.latencyFor, "latency-phase", 10*time.Second, "duration of the steady-rate latency phase")
	verbose := flag.Bool("v", false, "print where the pillow's time went (batch sizes, fetch and write latency)")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	flag.Parse()
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	if c.url == "" {
		return fmt.Errorf("-postgres-url or CHANGEFEED_POSTGRES_URL is required")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	if err := migrations.Up(ctx, c.url, nil); err != nil {
		return err
	}
	pool, err := pgxpool.New(ctx, c.url)
	if err != nil {
		return err
	}
	defer pool.Close()

	brokers := strings.Split(c.brokers, ",")
	if c.brokers == "" {
		cl, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.DefaultNumPartitions(c.partitions), kfake.AllowAutoTopicCreation())
		if err != nil {
			return err
		}
		defer cl.Close()
		brokers = cl.ListenAddrs()
	}
	run := time.Now().UnixNano()
	topic := fmt.Sprintf("pillowbench-%d", run)
	latTopic := topic + "-lat"

	// Source documents.
	if err := setupSource(ctx, pool, c.docs); err != nil {
		return err
	}
	fmt.Printf("pillowbench: %d documents, batch %d, %d partitions, kafka %s\n", c.docs, c.batch, c.partitions, map[bool]string{true: "in-process kfake", false: c.brokers}[c.brokers == ""])

	// (a) floor.
	floorRate, err := floor(ctx, pool, c, log)
	if err != nil {
		return fmt.Errorf("floor: %w", err)
	}
	fmt.Printf("(a) floor  bare INSERT … ON CONFLICT loop: %8.0f docs/s\n", floorRate)

	// (b) pillow.
	prod, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ProducerLinger(2*time.Millisecond))
	if err != nil {
		return err
	}
	defer prod.Close()
	adm := kadm.NewClient(prod)
	if _, err := adm.CreateTopics(ctx, int32(c.partitions), -1, nil, topic, latTopic); err != nil {
		return err
	}
	ids := make([]string, c.docs)
	for i := range ids {
		ids[i] = docID(i)
	}
	if err := produce(ctx, prod, topic, ids, nil); err != nil {
		return err
	}
	sink, err := pgsink.New(pool, pgsink.Config{Table: "bench_rep_pillow", Columns: columns()}, log)
	if err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, `DROP TABLE IF EXISTS bench_rep_pillow CASCADE`); err != nil {
		return err
	}
	meter := &meteredSink{inner: sink}
	store, err := docstore.NewPostgres(pool, []docstore.PostgresTable{{Source: "bench", Table: "bench_src", IDColumn: "id", TypeColumn: "doc_type", DomainColumn: "domain"}})
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	metrics, err := pillows.NewMetrics(reg)
	if err != nil {
		return err
	}
	runner, err := pillows.NewRunner(pillows.Options{
		Kafka: kafkaconn.Config{Brokers: brokers}, Errors: pillows.NewErrorLog(pool), Log: log, Metrics: metrics,
	})
	if err != nil {
		return err
	}
	mk := func(name, topic string) *pillows.Pillow {
		return &pillows.Pillow{
			Name: name, Topics: []string{topic}, Processors: []pillows.Processor{meter},
			Stores: map[pillows.StoreKey]pillows.Store{{Type: stub.SourceSQL, Name: "bench"}: timedStore{store, meter}},
			Batch:  pillows.Batching{MaxStubs: c.batch, MaxWait: 10 * time.Millisecond},
		}
	}
	rctx, rcancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- runner.Run(rctx, mk(fmt.Sprintf("bench-%d", run), topic)) }()
	for meter.written.Load() < int64(c.docs) {
		select {
		case err := <-done:
			rcancel()
			return fmt.Errorf("pillow stopped: %w", err)
		case <-time.After(5 * time.Millisecond):
		}
		if ctx.Err() != nil {
			rcancel()
			return ctx.Err()
		}
	}
	end := time.Now()
	el := end.Sub(start)
	rcancel()
	if err := <-done; err != nil {
		return err
	}
	// The group join is not throughput: measure from the first batch the
	// pillow took (its fetch included) to the last write.
	first := meter.firstCall()
	pillowRate := float64(c.docs) / end.Sub(first).Seconds()
	fmt.Printf("(b) pillow Kafka → fetch → same table:      %8.0f docs/s (%s from first batch; %s with group join)\n",
		pillowRate, end.Sub(first).Round(time.Millisecond), el.Round(time.Millisecond))
	fmt.Printf("ratio b ÷ a: %.2f (target ≥ 0.5)\n", pillowRate/floorRate)
	if *verbose {
		printHistograms(reg)
	}
	if err := checkEqual(ctx, pool, "bench_rep_pillow"); err != nil {
		return err
	}

	// Latency at a steady rate of half the measured throughput.
	rate := max(100, int(pillowRate/2))
	meter.track(true)
	rctx, rcancel = context.WithCancel(ctx)
	go func() { done <- runner.Run(rctx, mk(fmt.Sprintf("bench-lat-%d", run), latTopic)) }()
	time.Sleep(500 * time.Millisecond) // let the group form before the clock starts
	n := int(float64(rate) * c.latencyFor.Seconds())
	n = min(n, c.docs)
	if err := paced(ctx, prod, latTopic, ids[:n], rate, meter); err != nil {
		rcancel()
		return err
	}
	deadline := time.Now().Add(time.Minute)
	for meter.latencies() < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	rcancel()
	if err := <-done; err != nil {
		return err
	}
	p50, p99, got := meter.percentiles()
	fmt.Printf("latency publish_timestamp → sink write at %d docs/s: p50 %s, p99 %s (%d stubs)\n", rate, p50.Round(10*time.Microsecond), p99.Round(10*time.Microsecond), got)
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err == nil {
		fmt.Printf("max RSS: %.1f MiB (whole process%s)\n", float64(ru.Maxrss)/1024, map[bool]string{true: ", kfake included", false: ""}[c.brokers == ""])
	}
	return nil
}

func docID(i int) string { return fmt.Sprintf("bench-%07d", i) }

func columns() []pgsink.Column {
	return []pgsink.Column{{Name: "name", Type: "text"}, {Name: "n", Type: "integer"}, {Name: "payload", Type: "text"}}
}

func setupSource(ctx context.Context, pool *pgxpool.Pool, n int) error {
	for _, q := range []string{
		`DROP TABLE IF EXISTS bench_src`,
		`CREATE TABLE bench_src (id text PRIMARY KEY, doc_type text NOT NULL, domain text NOT NULL, name text, n int, payload text)`,
		fmt.Sprintf(`INSERT INTO bench_src
SELECT 'bench-' || lpad(i::text, 7, '0'), 'case', 'bench', 'name ' || i, i, repeat(md5(i::text), 6)
FROM generate_series(0, %d) AS i`, n-1),
		`ANALYZE bench_src`,
	} {
		if _, err := pool.Exec(ctx, q); err != nil {
			return err
		}
	}
	return nil
}

// floor writes the same documents, built in memory from the same rows, with
// the sink's batched upsert and nothing else.
func floor(ctx context.Context, pool *pgxpool.Pool, c config, log *slog.Logger) (float64, error) {
	if _, err := pool.Exec(ctx, `DROP TABLE IF EXISTS bench_rep_floor CASCADE`); err != nil {
		return 0, err
	}
	s, err := pgsink.New(pool, pgsink.Config{Table: "bench_rep_floor", Columns: columns()}, log)
	if err != nil {
		return 0, err
	}
	if err := s.Bootstrap(ctx); err != nil {
		return 0, err
	}
	rows, err := pool.Query(ctx, `SELECT id, name, n, payload FROM bench_src ORDER BY id`)
	if err != nil {
		return 0, err
	}
	var docs []*doc.Document
	for rows.Next() {
		var id, name, payload string
		var n int
		if err := rows.Scan(&id, &name, &n, &payload); err != nil {
			return 0, err
		}
		docs = append(docs, &doc.Document{ID: id, Type: "case", Domain: "bench", Source: stub.SourceSQL, SourceName: "bench",
			Body:    map[string]any{"id": id, "name": name, "n": n, "payload": payload, "doc_type": "case", "domain": "bench"},
			Version: doc.Version{SQL: stub.SQLVersion{CommitLSN: stub.LSN(1000 + n), Ordinal: 1}}})
	}
	if rows.Err() != nil {
		return 0, rows.Err()
	}
	start := time.Now()
	for b := range slices.Chunk(docs, c.batch) {
		if err := s.Write(ctx, b); err != nil {
			return 0, err
		}
	}
	return float64(len(docs)) / time.Since(start).Seconds(), nil
}

func mkStub(id string, i int) ([]byte, error) {
	return json.Marshal(&stub.Stub{DocumentID: id, DataSourceType: stub.SourceSQL, DataSourceName: "bench",
		DocumentType: "case", Domain: "bench", PublishTimestamp: time.Now(), LSN: stub.LSN(1000 + i), TxOrdinal: 1})
}

func produce(ctx context.Context, prod *kgo.Client, topic string, ids []string, _ *meteredSink) error {
	var wg sync.WaitGroup
	var firstErr atomic.Value
	for i, id := range ids {
		v, err := mkStub(id, i)
		if err != nil {
			return err
		}
		wg.Add(1)
		prod.Produce(ctx, &kgo.Record{Topic: topic, Key: []byte(id), Value: v}, func(_ *kgo.Record, err error) {
			if err != nil {
				firstErr.CompareAndSwap(nil, err)
			}
			wg.Done()
		})
	}
	wg.Wait()
	if err, ok := firstErr.Load().(error); ok {
		return err
	}
	return nil
}

// paced publishes ids at rate per second, noting each publish time.
func paced(ctx context.Context, prod *kgo.Client, topic string, ids []string, rate int, m *meteredSink) error {
	start := time.Now()
	var firstErr atomic.Value
	for i, id := range ids {
		due := start.Add(time.Duration(i) * time.Second / time.Duration(rate))
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		v, err := mkStub(id, i)
		if err != nil {
			return err
		}
		m.published(id, time.Now())
		prod.Produce(ctx, &kgo.Record{Topic: topic, Key: []byte(id), Value: v}, func(_ *kgo.Record, err error) {
			if err != nil {
				firstErr.CompareAndSwap(nil, err)
			}
		})
	}
	if err := prod.Flush(ctx); err != nil {
		return err
	}
	if err, ok := firstErr.Load().(error); ok {
		return err
	}
	return nil
}

// meteredSink counts written documents and, when tracking, the latency of
// each from its publication to the end of its sink write.
type meteredSink struct {
	inner   *pgsink.Sink
	written atomic.Int64

	firstOnce sync.Once
	first     time.Time // the first fetch's start

	mu       sync.Mutex
	tracking bool
	pub      map[string]time.Time
	lat      []time.Duration
}

func (m *meteredSink) Name() string                        { return "bench" }
func (m *meteredSink) Bootstrap(ctx context.Context) error { return m.inner.Bootstrap(ctx) }

func (m *meteredSink) Process(ctx context.Context, docs []*doc.Document) error {
	if err := m.inner.Write(ctx, docs); err != nil {
		return err
	}
	now := time.Now()
	m.written.Add(int64(len(docs)))
	m.mu.Lock()
	if m.tracking {
		for _, d := range docs {
			if t, ok := m.pub[d.ID]; ok {
				m.lat = append(m.lat, now.Sub(t))
				delete(m.pub, d.ID)
			}
		}
	}
	m.mu.Unlock()
	return nil
}

func (m *meteredSink) firstCall() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.first
}

func (m *meteredSink) track(on bool) {
	m.mu.Lock()
	m.tracking, m.pub = on, map[string]time.Time{}
	m.mu.Unlock()
}

func (m *meteredSink) published(id string, t time.Time) {
	m.mu.Lock()
	m.pub[id] = t
	m.mu.Unlock()
}

func (m *meteredSink) latencies() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.lat)
}

func (m *meteredSink) percentiles() (p50, p99 time.Duration, n int) {
	m.mu.Lock()
	l := slices.Clone(m.lat)
	m.mu.Unlock()
	if len(l) == 0 {
		return 0, 0, 0
	}
	slices.Sort(l)
	return l[len(l)*50/100], l[min(len(l)-1, len(l)*99/100)], len(l)
}

// checkEqual verifies the pillow's table holds every source row.
func checkEqual(ctx context.Context, pool *pgxpool.Pool, table string) error {
	var missing int
	err := pool.QueryRow(ctx, fmt.Sprintf(`SELECT count(*) FROM bench_src s LEFT JOIN %s r ON r.doc_id = s.id
WHERE r.doc_id IS NULL OR r.deleted OR r.name IS DISTINCT FROM s.name OR r.payload IS DISTINCT FROM s.payload`, table)).Scan(&missing)
	if err != nil {
		return err
	}
	if missing != 0 {
		return fmt.Errorf("%s differs from the source in %d rows", table, missing)
	}
	return nil
}

// timedStore notes when the first fetch started.
type timedStore struct {
	inner *docstore.Postgres
	m     *meteredSink
}

func (s timedStore) Fetch(ctx context.Context, stubs []*stub.Stub) ([]*doc.Document, error) {
	s.m.firstOnce.Do(func() {
		s.m.mu.Lock()
		s.m.first = time.Now()
		s.m.mu.Unlock()
	})
	return s.inner.Fetch(ctx, stubs)
}

// printHistograms prints count, sum and mean of the pillow's histograms.
func printHistograms(reg *prometheus.Registry) {
	mfs, err := reg.Gather()
	if err != nil {
		return
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if h := m.GetHistogram(); h != nil && h.GetSampleCount() > 0 {
				fmt.Printf("  %s: n=%d sum=%.3f mean=%.4f\n", mf.GetName(), h.GetSampleCount(), h.GetSampleSum(), h.GetSampleSum()/float64(h.GetSampleCount()))
			}
		}
	}
}
