package pillows_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/docstore"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/pillows"
	"github.com/changefeed/changefeed/stub"
)

// scripted is a processor writing to the reporting table (pgsink, as
// repSink) whose answer for a document is decided by a function of the
// document id and how often it was seen: nil (write it), a permanent
// error, or a transient one that fails the whole call.
type scripted struct {
	rep    *repSink
	mu     sync.Mutex
	calls  map[string]int
	decide func(id string, call int) error
}

func (s *scripted) Name() string { return "rep" }

func (s *scripted) Process(ctx context.Context, docs []*doc.Document) error {
	s.mu.Lock()
	errs := doc.Errors{}
	var ok []*doc.Document
	var transient error
	for _, d := range docs {
		s.calls[d.ID]++
		err := s.decide(d.ID, s.calls[d.ID])
		switch {
		case errors.Is(err, doc.ErrTransient):
			transient = err
		case err != nil:
			errs[d.ID] = err
		default:
			ok = append(ok, d)
		}
	}
	s.mu.Unlock()
	if transient != nil {
		return transient
	}
	if err := s.rep.Process(ctx, ok); err != nil {
		return err
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

func (e *env) scripted(decide func(id string, call int) error) *scripted {
	return &scripted{rep: e.repSink("rep"), calls: map[string]int{}, decide: decide}
}

// deadLetterCounts reads the dead-letter topic from its start and counts
// records per key.
func (e *env) deadLetterCounts(topic string) map[string]int {
	e.t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.brokers...), kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		e.t.Fatal(err)
	}
	defer cl.Close()
	ends, err := kadm.NewClient(cl).ListEndOffsets(e.ctx, topic)
	if err != nil {
		e.t.Fatal(err)
	}
	var want int64
	ends.Each(func(o kadm.ListedOffset) { want += o.Offset })
	got := map[string]int{}
	var n int64
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	for n < want && ctx.Err() == nil {
		cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) { got[string(r.Key)]++; n++ })
	}
	return got
}

// waitCommitted waits until group has committed every record of the topic.
func (e *env) waitCommitted(group string) {
	e.t.Helper()
	adm := kadm.NewClient(e.prod)
	testenv.Eventually(e.t, 30*time.Second, func() string {
		lags, err := adm.Lag(e.ctx, group)
		if err != nil {
			return err.Error()
		}
		if l := lags[group].Lag.Total(); l != 0 {
			return fmt.Sprintf("group %s: lag %d", group, l)
		}
		return ""
	})
}

// A 4,000-byte id cannot enter the reporting table's primary key (SQLSTATE
// 54000). It is that document's error, not a transient failure of the
// batch: the healthy documents of its batch are written, the long one goes
// to the errors table and, after its attempts, to the dead letter, and the
// partition moves on.
func TestPoisonIDDoesNotBlockItsBatch(t *testing.T) {
	e := newEnv(t)
	// A source table without an index on id can hold the long id.
	e.exec(`CREATE TABLE bigids (id text NOT NULL, doc_type text NOT NULL, domain text NOT NULL, name text, n int)`)
	rnd := rand.New(rand.NewPCG(7, 7))
	var b strings.Builder
	for range 4000 {
		b.WriteByte(byte('a' + rnd.IntN(26))) // incompressible below the btree limit
	}
	long := b.String()
	ids := []string{long}
	for i := range 20 {
		ids = append(ids, fmt.Sprintf("doc-%02d", i))
	}
	var recs []*kgo.Record
	for i, id := range ids {
		e.exec(`INSERT INTO bigids VALUES ($1, 'case', 'demo', $1, $2)`, id, i)
		s := &stub.Stub{DocumentID: id, DataSourceType: stub.SourceSQL, DataSourceName: "bigids", DocumentType: "case",
			Domain: "demo", PublishTimestamp: time.Now(), LSN: stub.LSN(1000 + i), TxOrdinal: 1}
		v, err := s.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		// One key: one partition, one batch.
		recs = append(recs, &kgo.Record{Key: []byte("k"), Value: v})
	}
	if err := e.prod.ProduceSync(e.ctx, recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}
	st, err := docstore.NewPostgres(e.pool, []docstore.PostgresTable{{Source: "bigids", Table: "bigids", IDColumn: "id"}})
	if err != nil {
		t.Fatal(err)
	}
	p := e.pillow("bigids", e.repSink("rep"))
	p.Stores = map[pillows.StoreKey]pillows.Store{{Type: stub.SourceSQL, Name: "bigids"}: st}
	p.Retry = pillows.Retry{MaxAttempts: 2, BackoffUnit: 200 * time.Millisecond, Interval: 100 * time.Millisecond}
	e.start(e.runner(func(o *pillows.Options) { o.DeadLetters = e.deadLetters() }), p)

	testenv.Eventually(t, 30*time.Second, func() string {
		if n := len(e.sinkState()); n != 20 {
			return fmt.Sprintf("%d healthy documents in the sink, want 20", n)
		}
		rows := e.errorRows("bigids")
		if len(rows) != 1 || rows[0].DocumentID != long || !rows[0].Dead {
			return fmt.Sprintf("%d error rows; want the long id, dead", len(rows))
		}
		if !strings.Contains(rows[0].ErrorMessage, "54000") {
			return "error row does not name SQLSTATE 54000: " + rows[0].ErrorMessage
		}
		return ""
	})
	e.waitCommitted("bigids")
	if got := e.deadLetterCounts("bigids-dead-letter"); got[long] != 1 {
		t.Fatalf("dead letters of the long id: %d, want 1", got[long])
	}
}

// A document that makes its sink fail as a whole, as if the sink were down
// (a request too large, a decoder limit), while every other document
// succeeds: the batch is split until the document is alone, the others are
// written, and the document is recorded as failed, retried, and dead-
// lettered. The partition is not held.
func TestTransientPoisonIsolatedBySplitting(t *testing.T) {
	e := newEnv(t)
	all, final := history(40, 1, 0)
	e.apply(final)
	sink := e.scripted(func(id string, _ int) error {
		if id == "doc-023" {
			return fmt.Errorf("%w: HTTP 413 request entity too large", doc.ErrTransient)
		}
		return nil
	})
	// One partition, one batch.
	recs := make([]*kgo.Record, len(all))
	for i, c := range all {
		v, err := mkStub(c).Marshal()
		if err != nil {
			t.Fatal(err)
		}
		recs[i] = &kgo.Record{Key: []byte("k"), Value: v, Partition: 0}
	}
	if err := e.prod.ProduceSync(e.ctx, recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	m, _ := pillows.NewMetrics(reg)
	p := e.pillow("split", sink)
	p.Retry = pillows.Retry{MaxAttempts: 2, BackoffUnit: 200 * time.Millisecond, Interval: 100 * time.Millisecond}
	e.start(e.runner(func(o *pillows.Options) { o.DeadLetters = e.deadLetters(); o.Metrics = m }), p)

	testenv.Eventually(t, 30*time.Second, func() string {
		want := e.sourceState()
		delete(want, "doc-023")
		if d := testenv.DiffStates(want, e.sinkState()); d != "" {
			return d
		}
		rows := e.errorRows("split")
		if len(rows) != 1 || rows[0].DocumentID != "doc-023" || !rows[0].Dead {
			return fmt.Sprintf("error rows %+v; want doc-023, dead", rows)
		}
		return ""
	})
	e.waitCommitted("split")
	if n := metricValue(t, reg, "changefeed_pillow_stuck_documents_total", "pillow", "split"); n != 1 {
		t.Errorf("stuck documents = %v, want 1", n)
	}
	if got := e.deadLetterCounts("split-dead-letter"); got["doc-023"] != 1 {
		t.Fatalf("dead letters = %v, want doc-023 once", got)
	}
}

// The retry loop handles each row on its own and holds no row lock while it
// does I/O: a row failing transiently at the head of the queue neither
// starves the rows behind it nor rolls back their outcomes; a row marked
// dead stays dead and its dead letter is published once; and while a
// processor call of the retry loop is in progress, its row is not locked.
func TestRetryLoopRowsIndependent(t *testing.T) {
	e := newEnv(t)
	_, final := history(12, 1, 0)
	e.apply(final)
	block := make(chan struct{})
	var blockOnce sync.Once
	inRetry := make(chan struct{}, 1)
	sink := e.scripted(func(id string, call int) error {
		switch {
		case id == "doc-001" && call == 1: // recorded, then transient forever
			return errors.New("first failure of doc-001")
		case id == "doc-001":
			return fmt.Errorf("%w: sink answers 502 for doc-001 only", doc.ErrTransient)
		case id == "doc-002": // fails for good
			return errors.New("poison doc-002")
		case id == "doc-003" && call == 1: // resolves on retry
			return errors.New("first failure of doc-003")
		case id == "doc-004" && call == 1:
			return errors.New("first failure of doc-004")
		case id == "doc-004" && call == 2: // its retry blocks until released
			select {
			case inRetry <- struct{}{}:
			default:
			}
			<-block
		}
		return nil
	})
	t.Cleanup(func() { blockOnce.Do(func() { close(block) }) })
	// One partition and one batch, so all four rows are recorded together
	// and claimed together.
	var recs []*kgo.Record
	for _, id := range []string{"doc-000", "doc-001", "doc-002", "doc-003", "doc-004", "doc-005"} {
		v, err := mkStub(final[id]).Marshal()
		if err != nil {
			t.Fatal(err)
		}
		recs = append(recs, &kgo.Record{Key: []byte("k"), Value: v})
	}
	if err := e.prod.ProduceSync(e.ctx, recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}
	p := e.pillow("retries", sink)
	p.Retry = pillows.Retry{MaxAttempts: 3, BackoffUnit: 100 * time.Millisecond, Interval: 50 * time.Millisecond}
	e.start(e.runner(func(o *pillows.Options) { o.DeadLetters = e.deadLetters() }), p)

	// While doc-004's retry is in the processor, its row is not locked.
	select {
	case <-inRetry:
	case <-time.After(30 * time.Second):
		t.Fatal("doc-004 was never retried")
	}
	tx, err := e.pool.Begin(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, lockErr := tx.Exec(e.ctx, `SELECT 1 FROM changefeed.pillow_errors WHERE pillow = 'retries' FOR UPDATE NOWAIT`)
	_ = tx.Rollback(e.ctx)
	blockOnce.Do(func() { close(block) })
	if lockErr != nil {
		t.Fatalf("error rows locked while the retry loop does I/O: %v", lockErr)
	}

	// Traffic of other documents goes on (the sink works for them), so
	// doc-001's transient failures count as attempts and it ends dead.
	stopTraffic := make(chan struct{})
	trafficDone := make(chan struct{})
	go func() {
		defer close(trafficDone)
		for i := 0; i < 600; i++ {
			select {
			case <-stopTraffic:
				return
			case <-time.After(50 * time.Millisecond):
			}
			v, _ := mkStub(change{id: "doc-010", lsn: uint64(5000 + i), name: "doc-010-v1"}).Marshal()
			_ = e.prod.ProduceSync(e.ctx, &kgo.Record{Key: []byte("t"), Value: v}).FirstErr()
		}
	}()
	t.Cleanup(func() { close(stopTraffic); <-trafficDone })
	testenv.Eventually(t, 30*time.Second, func() string {
		rows := map[string]pillows.ErrorRow{}
		for _, r := range e.errorRows("retries") {
			rows[r.DocumentID] = r
		}
		switch {
		case len(rows) != 2:
			return fmt.Sprintf("%d error rows, want doc-001 and doc-002 (doc-003, doc-004 resolved)", len(rows))
		case !rows["doc-002"].Dead || rows["doc-002"].Attempts != 3:
			return fmt.Sprintf("doc-002: %+v, want dead after 3 attempts", rows["doc-002"])
		case !rows["doc-001"].Dead || rows["doc-001"].Attempts != 3:
			return fmt.Sprintf("doc-001: %+v, want dead after 3 attempts", rows["doc-001"])
		}
		return ""
	})
	// An absence to check, not a condition to wait for: ten more ticks of
	// the retry loop (interval 50ms) publish nothing again.
	<-time.After(500 * time.Millisecond)
	if got := e.deadLetterCounts("retries-dead-letter"); got["doc-001"] != 1 || got["doc-002"] != 1 || len(got) != 2 {
		t.Fatalf("dead letters = %v, want doc-001 and doc-002 once each", got)
	}
}
