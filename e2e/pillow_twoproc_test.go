package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/stub"
)

// Two `pillow run` processes of one pillow while changes keep arriving: the
// second joins mid-stream, the first leaves with SIGTERM, the second is
// killed with kill -9 and a third takes over. The sink ends equal to the
// source (every document's latest version, deleted ones tombstones absent
// from the live view), the group's lag is 0, and no document's stored
// version ever went backwards while the partitions moved.
func TestPillowTwoProcesses(t *testing.T) {
	r := newPillowRig(t, pillowRigOpts{})
	// Small batches: a rebalance or kill lands with work in hand.
	file := r.writeFileBatch(5, "cases")

	w := pillowTwoProcStartWriter(r, 200, 8, 20*time.Millisecond)
	mon := pillowTwoProcStartMonitor(r, "rep_cases", 100*time.Millisecond)

	p1 := r.startPillow(file, "--pillow", "cases")
	pillowTwoProcWaitAssigned(t, p1, 1)
	testenv.Eventually(t, 20*time.Second, func() string {
		if len(r.sink("cases")) == 0 {
			return "p1 wrote nothing yet"
		}
		return ""
	})
	time.Sleep(time.Second) // p1 alone, stream flowing

	p2 := r.startPillow(file, "--pillow", "cases")
	pillowTwoProcWaitAssigned(t, p2, 1)
	p1.waitLog(t, `"msg":"partitions revoked"`)
	time.Sleep(1500 * time.Millisecond) // p1 and p2 share the partitions

	p1.signal(t, syscall.SIGTERM)
	if code := p1.wait(t, 20*time.Second); code != 0 {
		t.Fatalf("p1 exit code after SIGTERM = %d, want 0", code)
	}
	pillowTwoProcWaitAssigned(t, p2, 2) // p1's partitions moved to p2
	time.Sleep(1500 * time.Millisecond) // p2 alone, stream flowing

	p2.signal(t, syscall.SIGKILL)
	p2.wait(t, 10*time.Second)
	t.Logf("p2 killed: %d changes written, %d live sink rows, %s", w.count.Load(), len(r.sink("cases")), r.lag("cases"))
	p3 := r.startPillow(file, "--pillow", "cases")
	// p2's membership lives until its session times out (6 s).
	pillowTwoProcWaitAssigned(t, p3, 1)
	time.Sleep(time.Second) // p3 with the stream still flowing

	final := w.stopAndWait(t)
	t.Logf("writer done: %d changes to %d documents", w.count.Load(), len(final))

	testenv.Eventually(t, 20*time.Second, func() string { return testenv.DiffStates(r.source(), r.sink("cases")) })
	testenv.Eventually(t, 20*time.Second, func() string { return r.lag("cases") })

	samples, violations := mon.stopAndWait()
	if len(violations) > 0 {
		t.Fatalf("stored version went backwards (%d times): %s", len(violations), strings.Join(violations[:min(5, len(violations))], "; "))
	}
	if samples < 50 {
		t.Fatalf("only %d samples of the reporting table", samples)
	}
	t.Logf("%d samples of rep_cases, versions never went backwards", samples)

	// Full contents, tombstones included: each document's latest version.
	want := map[string]string{}
	for id, c := range final {
		want[id] = fmt.Sprintf("%d deleted=%t name=%q", c.lsn, c.deleted, pillowTwoProcName(c))
	}
	if d := testenv.DiffStates(want, pillowTwoProcStored(r, "rep_cases")); d != "" {
		t.Fatalf("reporting table vs latest versions: %s", d)
	}
	if n := r.errorRows("cases"); n != 0 {
		t.Fatalf("%d error rows", n)
	}
	p3.signal(t, syscall.SIGTERM)
	if code := p3.wait(t, 20*time.Second); code != 0 {
		t.Fatalf("p3 exit code after SIGTERM = %d, want 0", code)
	}
}

// pillowTwoProcWaitAssigned waits until p has logged at least n non-empty
// assignments of the topic's partitions.
func pillowTwoProcWaitAssigned(t *testing.T, p *pillowProc, n int) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, func() string {
		got := 0
		for _, line := range strings.Split(p.output(), "\n") {
			var l struct {
				Msg      string             `json:"msg"`
				Assigned map[string][]int32 `json:"assigned"`
			}
			if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "partitions assigned" && len(l.Assigned[pillowTopic]) > 0 {
				got++
			}
		}
		if got < n {
			return fmt.Sprintf("pillow logged %d non-empty assignments, want %d", got, n)
		}
		return ""
	})
}

func pillowTwoProcName(c pillowChange) string {
	if c.deleted {
		return ""
	}
	return c.name
}

// pillowTwoProcWriter changes source documents and publishes a stub per
// change (after the change commits, with increasing LSNs) until stopped.
type pillowTwoProcWriter struct {
	stop  chan struct{}
	done  chan struct{}
	err   error
	final map[string]pillowChange // read only after done
	count atomic.Int64
}

func pillowTwoProcStartWriter(r *pillowRig, docs, perTx int, every time.Duration) *pillowTwoProcWriter {
	w := &pillowTwoProcWriter{stop: make(chan struct{}), done: make(chan struct{}), final: map[string]pillowChange{}}
	seed := time.Now().UnixNano()
	r.t.Logf("writer seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 0))
	go func() {
		defer close(w.done)
		tick := time.NewTicker(every) // the write rate, not a condition
		defer tick.Stop()
		lsn := uint64(1000)
		for {
			select {
			case <-w.stop:
				return
			case <-tick.C:
			}
			var changes []pillowChange
			for _, i := range rng.Perm(docs)[:perTx] {
				id := fmt.Sprintf("tp-%04d", i)
				lsn++
				prev, seen := w.final[id]
				c := pillowChange{id: id, lsn: lsn, name: fmt.Sprintf("%s-l%d", id, lsn)}
				if seen && !prev.deleted && rng.IntN(5) == 0 {
					c.deleted, c.name = true, ""
				}
				changes = append(changes, c)
			}
			if w.err = pillowTwoProcWrite(r, changes); w.err != nil {
				return
			}
			for _, c := range changes {
				w.final[c.id] = c
			}
			w.count.Add(int64(len(changes)))
		}
	}()
	return w
}

// pillowTwoProcWrite applies changes in one transaction, then publishes
// their stubs.
func pillowTwoProcWrite(r *pillowRig, changes []pillowChange) error {
	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
	defer cancel()
	tx, err := r.srcPool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	for _, c := range changes {
		if c.deleted {
			_, err = tx.Exec(ctx, `DELETE FROM cases WHERE id = $1`, c.id)
		} else {
			_, err = tx.Exec(ctx, `INSERT INTO cases (id, doc_type, domain, name, n) VALUES ($1, 'case', 'demo', $2, $3)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, n = excluded.n`, c.id, c.name, int(c.lsn))
		}
		if err != nil {
			return err
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	recs := make([]*kgo.Record, len(changes))
	for i, c := range changes {
		b, err := json.Marshal(&stub.Stub{
			DocumentID: c.id, DataSourceType: stub.SourceSQL, DataSourceName: "cases",
			DocumentType: "case", Domain: "demo", IsDeletion: c.deleted,
			PublishTimestamp: time.Now(), LSN: stub.LSN(c.lsn), TxOrdinal: 1,
		})
		if err != nil {
			return err
		}
		recs[i] = &kgo.Record{Key: []byte(c.id), Value: b}
	}
	return r.prod.ProduceSync(ctx, recs...).FirstErr()
}

// stopAndWait stops the writer and returns each document's final change.
func (w *pillowTwoProcWriter) stopAndWait(t *testing.T) map[string]pillowChange {
	t.Helper()
	close(w.stop)
	select {
	case <-w.done:
	case <-time.After(20 * time.Second):
		t.Fatal("writer did not stop within 20s")
	}
	if w.err != nil {
		t.Fatalf("writer: %v", w.err)
	}
	return w.final
}

// pillowTwoProcMonitor samples a reporting table and records every
// document whose stored version is lower than one seen before.
type pillowTwoProcMonitor struct {
	stop       chan struct{}
	done       chan struct{}
	mu         sync.Mutex
	samples    int
	violations []string
}

func pillowTwoProcStartMonitor(r *pillowRig, table string, every time.Duration) *pillowTwoProcMonitor {
	m := &pillowTwoProcMonitor{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(m.done)
		seen := map[string]int64{}
		tick := time.NewTicker(every) // the sampling rate, not a condition
		defer tick.Stop()
		for {
			select {
			case <-m.stop:
				return
			case <-tick.C:
			}
			vs, err := pillowTwoProcVersions(r, table)
			if err != nil {
				continue // e.g. the table is not bootstrapped yet
			}
			m.mu.Lock()
			m.samples++
			for id, v := range vs {
				if old, ok := seen[id]; ok && v < old {
					m.violations = append(m.violations, fmt.Sprintf("%s: %d after %d", id, v, old))
				}
				if v > seen[id] {
					seen[id] = v
				}
			}
			m.mu.Unlock()
		}
	}()
	return m
}

func (m *pillowTwoProcMonitor) stopAndWait() (int, []string) {
	close(m.stop)
	<-m.done
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.samples, m.violations
}

// pillowTwoProcVersions reads doc_id → version_lsn (as a number) of table.
func pillowTwoProcVersions(r *pillowRig, table string) (map[string]int64, error) {
	ctx, cancel := context.WithTimeout(r.ctx, 2*time.Second)
	defer cancel()
	rows, err := r.repPool.Query(ctx, fmt.Sprintf(`SELECT doc_id, (version_lsn - '0/0'::pg_lsn)::bigint FROM %s`, table))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var id string
		var v int64
		if err := rows.Scan(&id, &v); err != nil {
			return nil, err
		}
		out[id] = v
	}
	return out, rows.Err()
}

// pillowTwoProcStored reads every row of table, tombstones included, as
// doc_id → "version deleted=… name=…".
func pillowTwoProcStored(r *pillowRig, table string) map[string]string {
	r.t.Helper()
	rows, err := r.repPool.Query(r.ctx, fmt.Sprintf(`SELECT doc_id, (version_lsn - '0/0'::pg_lsn)::bigint, deleted, coalesce(name, '') FROM %s`, table))
	if err != nil {
		r.t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var id, name string
		var v int64
		var deleted bool
		if err := rows.Scan(&id, &v, &deleted, &name); err != nil {
			r.t.Fatal(err)
		}
		out[id] = fmt.Sprintf("%d deleted=%t name=%q", v, deleted, name)
	}
	if err := rows.Err(); err != nil {
		r.t.Fatal(err)
	}
	return out
}
