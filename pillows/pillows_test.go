package pillows_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/pillows"
	"github.com/changefeed/changefeed/stub"
)

// Stubs arrive duplicated and in reverse order: every document ends at its
// newest version, deleted ones stay deleted, and duplicates are skipped
// before any fetch.
func TestDuplicatedAndReversedStubs(t *testing.T) {
	e := newEnv(t)
	all, final := history(40, 4, 5)
	e.apply(final)
	rev := slices.Clone(all)
	slices.Reverse(rev)
	e.produce(append(rev, rev...)...)

	sink := e.repSink("rep")
	reg := prometheus.NewRegistry()
	m, err := pillows.NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	r := e.runner(func(o *pillows.Options) { o.Metrics = m })
	run := e.start(r, e.pillow("dup", sink))
	e.sinkEqualsSource(30 * time.Second)
	// Deleted documents are present as tombstones at their newest version.
	var tombstones int
	if err := e.pool.QueryRow(e.ctx, `SELECT count(*) FROM rep WHERE deleted`).Scan(&tombstones); err != nil {
		t.Fatal(err)
	}
	if tombstones != 8 {
		t.Fatalf("tombstones = %d, want 8", tombstones)
	}
	var stale int
	if err := e.pool.QueryRow(e.ctx, `SELECT count(*) FROM rep WHERE NOT deleted AND name NOT LIKE '%-v4'`).Scan(&stale); err != nil {
		t.Fatal(err)
	}
	if stale != 0 {
		t.Fatalf("%d rows hold an older state", stale)
	}
	if err := run.stop(); err != nil {
		t.Fatal(err)
	}
	dups := metricValue(t, reg, "changefeed_pillow_stubs_skipped_total", "pillow", "dup", "reason", "duplicate")
	// 320 stubs for 40 documents: at least the second copies of the
	// newest versions are skipped by the memory or collapsed.
	if dups < 40 {
		t.Fatalf("duplicates skipped = %v, want >= 40", dups)
	}
	if got := sink.writes.Load(); got >= int64(len(all))*2 {
		t.Fatalf("sink saw %d writes for %d stubs: nothing was deduplicated", got, 2*len(all))
	}
	if rows := e.errorRows("dup"); len(rows) != 0 {
		t.Fatalf("error rows: %+v", rows)
	}
}

// A poison document lands in the errors table, the others are processed,
// it is retried on schedule with growing attempts, goes dead after the
// maximum and is published to the dead-letter topic. A panic is recovered
// and recorded as that document's error.
func TestPoisonDocumentRetriedThenDead(t *testing.T) {
	e := newEnv(t)
	_, final := history(20, 2, 0)
	e.apply(final)
	sink := e.repSink("rep")
	sink.poison.Store("doc-007", true)
	sink.panics.Store("doc-013", true)
	var cs []change
	for _, c := range final {
		cs = append(cs, c)
	}
	e.produce(cs...)

	p := e.pillow("poison", sink)
	p.Retry = pillows.Retry{MaxAttempts: 3, BackoffUnit: 400 * time.Millisecond, Interval: 100 * time.Millisecond}
	r := e.runner(func(o *pillows.Options) { o.DeadLetters = e.deadLetters() })
	start := time.Now()
	e.start(r, p)

	// The others are unaffected.
	testenv.Eventually(t, 30*time.Second, func() string {
		want := e.sourceState()
		delete(want, "doc-007")
		delete(want, "doc-013")
		return testenv.DiffStates(want, e.sinkState())
	})
	// Both go dead after 3 attempts; attempts are spaced by the backoff
	// (0.4·1² then 0.4·2² seconds).
	testenv.Eventually(t, 30*time.Second, func() string {
		rows := e.errorRows("poison")
		if len(rows) != 2 {
			return "want 2 error rows"
		}
		for _, r := range rows {
			if !r.Dead || r.Attempts != 3 {
				return r.DocumentID + " not dead yet"
			}
		}
		return ""
	})
	if el := time.Since(start); el < 2*time.Second {
		t.Fatalf("dead after %s: retries did not wait for the backoff (0.4s + 1.6s)", el)
	}
	rows := e.errorRows("poison")
	byID := map[string]pillows.ErrorRow{}
	for _, r := range rows {
		byID[r.DocumentID] = r
	}
	if r := byID["doc-007"]; r.Processor != "rep" || !strings.Contains(r.ErrorMessage, "poison document doc-007") {
		t.Fatalf("poison row = %+v", r)
	}
	if r := byID["doc-013"]; r.ErrorType != "panic" || !strings.Contains(r.ErrorMessage, "processor bug on doc-013") {
		t.Fatalf("panic row = %+v", r)
	}

	// Dead letters carry the stubs.
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.brokers...), kgo.ConsumeTopics("poison-dead-letter"), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	got := map[string]bool{}
	ctx, cancel := context.WithTimeout(e.ctx, 20*time.Second)
	defer cancel()
	for len(got) < 2 && ctx.Err() == nil {
		cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) { got[string(r.Key)] = true })
	}
	if !got["doc-007"] || !got["doc-013"] {
		t.Fatalf("dead letters = %v", got)
	}

	// Fixing the document and retrying: a new version of a dead document
	// revives its row; once the processor accepts it the row goes away.
	sink.poison.Delete("doc-007")
	e.exec(`UPDATE src SET name = 'fixed' WHERE id = 'doc-007'`)
	e.produce(change{id: "doc-007", lsn: 10000, name: "fixed"})
	testenv.Eventually(t, 20*time.Second, func() string {
		if e.sinkState()["doc-007"] != "fixed" {
			return "doc-007 not fixed in the sink"
		}
		for _, r := range e.errorRows("poison") {
			if r.DocumentID == "doc-007" {
				return "doc-007 still in the errors table"
			}
		}
		return ""
	})
}

// A transient failure pauses the partition: no error rows, nothing lost,
// processing resumes when the sink is back.
func TestTransientFailurePausesWithoutErrorRows(t *testing.T) {
	e := newEnv(t)
	all, final := history(30, 2, 4)
	e.apply(final)
	sink := e.repSink("rep")
	sink.down.Store(true)
	e.produce(all...)
	reg := prometheus.NewRegistry()
	m, _ := pillows.NewMetrics(reg)
	r := e.runner(func(o *pillows.Options) { o.Metrics = m })
	e.start(r, e.pillow("transient", sink))
	testenv.Eventually(t, 20*time.Second, func() string {
		if metricValue(t, reg, "changefeed_pillow_transient_errors_total", "pillow", "transient") < 3 {
			return "fewer than 3 transient retries"
		}
		return ""
	})
	if len(e.sinkState()) != 0 {
		t.Fatal("sink written while down")
	}
	if rows := e.errorRows("transient"); len(rows) != 0 {
		t.Fatalf("error rows while transient: %d", len(rows))
	}
	sink.down.Store(false)
	e.sinkEqualsSource(30 * time.Second)
	if rows := e.errorRows("transient"); len(rows) != 0 {
		t.Fatalf("error rows: %d", len(rows))
	}
}

// A second worker joins mid-stream and leaves again: the sink still equals
// the source, and no partition is processed into an older state.
func TestSecondWorkerJoinsAndLeaves(t *testing.T) {
	e := newEnv(t)
	all, final := history(90, 3, 7)
	e.apply(final)
	sinkA := e.repSink("rep")
	sinkB := e.repSink("rep")
	third := len(all) / 3
	e.produce(all[:third]...)

	rA := e.runner()
	e.start(rA, e.pillow("shared", sinkA))
	testenv.Eventually(t, 20*time.Second, func() string {
		if sinkA.writes.Load() == 0 {
			return "worker A wrote nothing"
		}
		return ""
	})
	rB := e.runner()
	runB := e.start(rB, e.pillow("shared", sinkB))
	e.waitMembers("shared", 2)
	e.produce(all[third : 2*third]...)
	testenv.Eventually(t, 30*time.Second, func() string {
		if sinkB.writes.Load() == 0 {
			return "worker B got no partition"
		}
		return ""
	})
	if err := runB.stop(); err != nil {
		t.Fatal(err)
	}
	e.produce(all[2*third:]...)
	// Replaying everything once more must not move any row back.
	e.produce(all...)
	e.sinkEqualsSource(40 * time.Second)
	var stale int
	if err := e.pool.QueryRow(e.ctx, `SELECT count(*) FROM rep WHERE NOT deleted AND name NOT LIKE '%-v3'`).Scan(&stale); err != nil {
		t.Fatal(err)
	}
	if stale != 0 {
		t.Fatalf("%d rows hold an older state", stale)
	}
}

// A committed offset below the log start (retention deleted it) stops the
// pillow with an error naming the pillow and partition.
func TestCommittedOffsetGoneStops(t *testing.T) {
	e := newEnv(t)
	all, final := history(30, 1, 0)
	e.apply(final)
	e.produce(all...)
	sink := e.repSink("rep")
	first := e.start(e.runner(), e.pillow("gone", sink))
	e.sinkEqualsSource(20 * time.Second)
	if err := first.stop(); err != nil {
		t.Fatal(err)
	}
	// More changes, then retention deletes them before the pillow ran.
	more, final2 := history(30, 2, 0)
	e.apply(final2)
	e.produce(more...)
	adm := kadm.NewClient(e.prod)
	ends, err := adm.ListEndOffsets(e.ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	del := kadm.Offsets{}
	ends.Each(func(o kadm.ListedOffset) { del.Add(kadm.Offset{Topic: o.Topic, Partition: o.Partition, At: o.Offset}) })
	if resp, err := adm.DeleteRecords(e.ctx, del); err != nil || resp.Error() != nil {
		t.Fatalf("delete records: %v %v", err, resp.Error())
	}
	second := e.start(e.runner(), e.pillow("gone", sink))
	select {
	case <-second.finished:
		err := second.err
		var gone *pillows.CheckpointGoneError
		if !errors.As(err, &gone) || !errors.Is(err, pillows.ErrCheckpointGone) {
			t.Fatalf("Run = %v, want CheckpointGoneError", err)
		}
		if gone.Pillow != "gone" || gone.Topic != topic || !strings.Contains(err.Error(), "reindex") {
			t.Fatalf("error does not name pillow/partition/reindex: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("pillow kept running over a gap in the log")
	}
	// Nothing after the gap was processed.
	if got := e.sinkState()["doc-000"]; got != "doc-000-v1" {
		t.Fatalf("doc-000 = %q: records after the gap were processed", got)
	}
}

// Once runs an effect once per (pillow, document, state read), in the
// caller's transaction. The document is named with its source: one id at
// one revision in two Couch databases is two documents. The SQL state is
// the one read, not the stubs' version: a fetch that already read a newer
// state runs the effect for it, and the later stub of that state does not
// run it again; a later change back to an earlier content runs it again.
func TestOnce(t *testing.T) {
	e := newEnv(t)
	e.exec(`CREATE TABLE sms (doc text, version text)`)
	send := func(d *doc.Document) bool {
		t.Helper()
		tx, err := e.pool.Begin(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(e.ctx) //nolint:errcheck
		ran, err := pillows.Once(e.ctx, tx, "sms", d, func(tx pgx.Tx) error {
			_, err := tx.Exec(e.ctx, `INSERT INTO sms VALUES ($1, $2)`, d.Key(), d.Version.String())
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(e.ctx); err != nil {
			t.Fatal(err)
		}
		return ran
	}
	couchDoc := func(db, rev string) *doc.Document {
		r, _ := stub.ParseRev(rev)
		return &doc.Document{ID: "x", Source: stub.SourceCouch, SourceName: db, Body: map[string]any{"n": 1}, Version: doc.Version{Rev: r}}
	}
	if !send(couchDoc("hq", "1-a")) || send(couchDoc("hq", "1-a")) || !send(couchDoc("hq", "2-b")) {
		t.Fatal("Once did not run exactly once per Couch revision")
	}
	if !send(couchDoc("hq2", "1-a")) {
		t.Fatal("the same id and revision in another database is another document: its effect did not run")
	}

	st := e.store()
	fetch := func(lsn uint64) *doc.Document {
		t.Helper()
		docs, err := st.Fetch(e.ctx, []*stub.Stub{mkStub(change{id: "s1", lsn: lsn})})
		if err != nil || len(docs) != 1 {
			t.Fatalf("fetch: %v %v", docs, err)
		}
		return docs[0]
	}
	e.apply(map[string]change{"s1": {id: "s1", lsn: 10, name: "A"}})
	if !send(fetch(10)) || send(fetch(10)) {
		t.Fatal("Once did not run exactly once for the first state")
	}
	e.exec(`UPDATE src SET name = 'B' WHERE id = 's1'`) // change 11 …
	e.exec(`UPDATE src SET name = 'C' WHERE id = 's1'`) // … and 12, read by the fetch of 11
	if !send(fetch(11)) {
		t.Fatal("a new state read did not run the effect")
	}
	if send(fetch(12)) {
		t.Fatal("the stub of a state already read ran the effect again")
	}
	e.exec(`UPDATE src SET name = 'A' WHERE id = 's1'`) // back to the first content: a change
	if !send(fetch(13)) {
		t.Fatal("a change back to an earlier content did not run the effect")
	}

	// A rolled-back effect is not recorded: it runs again.
	tx, _ := e.pool.Begin(e.ctx)
	ran, err := pillows.Once(e.ctx, tx, "sms", couchDoc("hq", "3-c"), func(pgx.Tx) error { return errors.New("gateway down") })
	if ran || err == nil {
		t.Fatalf("failed effect: ran=%v err=%v", ran, err)
	}
	_ = tx.Rollback(e.ctx)
	if !send(couchDoc("hq", "3-c")) {
		t.Fatal("effect rolled back but not run again")
	}
	var n int
	if err := e.pool.QueryRow(e.ctx, `SELECT count(*) FROM sms`).Scan(&n); err != nil || n != 7 {
		t.Fatalf("sms rows = %d (%v), want 7", n, err)
	}
}

// The errors table unreachable is a transient failure: a poison document
// cannot be recorded, so the partition pauses without moving its offset;
// once the table is back the failure is recorded and processing goes on.
func TestErrorsTableDownIsTransient(t *testing.T) {
	e := newEnv(t)
	errPG := testenv.Postgres(t)
	if err := migrations.Up(e.ctx, errPG.URL(), nil); err != nil {
		t.Fatal(err)
	}
	errPool, err := pgxpool.New(e.ctx, errPG.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(errPool.Close)
	_, final := history(10, 1, 0)
	e.apply(final)
	sink := e.repSink("rep")
	sink.poison.Store("doc-004", true)
	if err := errPG.Stop(e.ctx); err != nil {
		t.Fatal(err)
	}
	var cs []change
	for _, c := range final {
		cs = append(cs, c)
	}
	e.produce(cs...)
	reg := prometheus.NewRegistry()
	m, _ := pillows.NewMetrics(reg)
	r := e.runner(func(o *pillows.Options) { o.Metrics = m; o.Errors = pillows.NewErrorLog(errPool) })
	e.start(r, e.pillow("errdown", sink))
	testenv.Eventually(t, 20*time.Second, func() string {
		if metricValue(t, reg, "changefeed_pillow_transient_errors_total", "pillow", "errdown") < 2 {
			return "no transient retries while the errors table is down"
		}
		return ""
	})
	lags, err := kadm.NewClient(e.prod).Lag(e.ctx, "errdown")
	if err != nil {
		t.Fatal(err)
	}
	if c := lags["errdown"].Lag.Total(); c == 0 {
		t.Fatal("offsets moved past a failure that was not recorded")
	}
	if err := errPG.Start(e.ctx); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, func() string {
		rows, err := pillows.NewErrorLog(errPool).Rows(e.ctx, "errdown")
		if err != nil || len(rows) != 1 || rows[0].DocumentID != "doc-004" {
			return fmt.Sprintf("error rows = %v, %v", rows, err)
		}
		want := e.sourceState()
		delete(want, "doc-004")
		return testenv.DiffStates(want, e.sinkState())
	})
}
