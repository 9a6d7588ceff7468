package faultenv

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/changefeed/changefeed/stub"
)

// ChangeKey identifies one committed change: a document changed by a
// transaction. A workload transaction touches each document at most once.
type ChangeKey struct {
	XID   uint32
	DocID string
}

func (k ChangeKey) String() string { return fmt.Sprintf("%s@xid%d", k.DocID, k.XID) }

// Workload writes documents to a published table and records what it
// committed and what it rolled back.
type Workload struct {
	pool  *pgxpool.Pool
	table string
	ident string
	rng   *rand.Rand

	mu         sync.Mutex
	committed  []ChangeKey
	rolledBack map[uint32]bool // xids of rolled-back transactions
	// after maps a committed transaction's xid to the WAL insert position
	// read after its COMMIT returned: above its commit record.
	after map[uint32]stub.LSN
	live  []string // documents that exist
	next  int
}

// WorkloadTable is the DDL of a workload table: a document table shaped
// like HQ's case table (id, domain, type, a deleted flag).
func WorkloadTable(name string) string {
	return fmt.Sprintf(`CREATE TABLE %s (
		id text PRIMARY KEY,
		domain text NOT NULL,
		type text NOT NULL,
		n integer NOT NULL DEFAULT 0,
		deleted boolean NOT NULL DEFAULT false,
		body text NOT NULL DEFAULT '')`, pgx.Identifier{name}.Sanitize())
}

// RoutingFor is the routing entry of a workload table, publishing to topic.
func RoutingFor(table, topic string) string {
	return fmt.Sprintf(`  - table: public.%s
    topic: %s
    document_type: CommCareCase
    id_column: id
    domain_column: domain
    subtype_column: type
    deletion:
      column: deleted
`, table, topic)
}

// NewWorkload creates table (WorkloadTable) and returns a writer to it.
func NewWorkload(t testing.TB, url, table string, seed uint64) *Workload {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatalf("faultenv: workload: invalid URL")
	}
	cfg.MaxConns = 4
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatalf("faultenv: workload: %v", err)
	}
	t.Cleanup(pool.Close)
	if _, err := pool.Exec(context.Background(), WorkloadTable(table)); err != nil {
		t.Fatalf("faultenv: workload: create table: %v", err)
	}
	return &Workload{
		pool: pool, table: table, ident: pgx.Identifier{table}.Sanitize(),
		rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), rolledBack: map[uint32]bool{}, after: map[uint32]stub.LSN{},
	}
}

// Tx writes one transaction of n changes on distinct documents (inserts,
// updates, a few deletes), committing it or rolling it back.
func (w *Workload) Tx(ctx context.Context, n int, rollback bool) error {
	w.mu.Lock()
	type op struct {
		kind byte
		id   string
	}
	ops := make([]op, 0, n)
	used := map[string]bool{}
	for range n {
		r := w.rng.IntN(100)
		switch {
		case r < 10 && len(w.live) > 50:
			id := w.live[w.rng.IntN(len(w.live))]
			if !used[id] {
				used[id] = true
				ops = append(ops, op{'D', id})
				continue
			}
		case r < 50 && len(w.live) > 0:
			id := w.live[w.rng.IntN(len(w.live))]
			if !used[id] {
				used[id] = true
				ops = append(ops, op{'U', id})
				continue
			}
		}
		w.next++
		id := fmt.Sprintf("doc-%07d", w.next)
		if rollback {
			id = fmt.Sprintf("rolledback-%07d", w.next)
		}
		used[id] = true
		ops = append(ops, op{'I', id})
	}
	w.mu.Unlock()

	if err := ctx.Err(); err != nil {
		return err
	}
	// Once begun, a transaction is not cancelled by ctx: a commit cut short
	// by a cancellation may still have committed, and the workload would
	// not know what it committed.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	tx, err := w.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	var xid8 int64
	if err := tx.QueryRow(ctx, `SELECT txid_current()`).Scan(&xid8); err != nil {
		return err
	}
	xid := uint32(xid8)
	for i, o := range ops {
		var sql string
		switch o.kind {
		case 'I':
			sql = `INSERT INTO ` + w.ident + ` (id, domain, type, body) VALUES ($1, 'fault', 'case', repeat('b', 100))`
		case 'U':
			sql = `UPDATE ` + w.ident + ` SET n = n + 1 WHERE id = $1`
		case 'D':
			// Half the deletions are soft (deleted = true), half are DELETEs.
			if i%2 == 0 {
				sql = `UPDATE ` + w.ident + ` SET deleted = true WHERE id = $1`
			} else {
				sql = `DELETE FROM ` + w.ident + ` WHERE id = $1`
			}
		}
		tag, err := tx.Exec(ctx, sql, o.id)
		if err != nil {
			return err
		}
		if tag.RowsAffected() != 1 {
			return fmt.Errorf("workload: %c %s touched %d rows", o.kind, o.id, tag.RowsAffected())
		}
	}
	if rollback {
		if err := tx.Rollback(ctx); err != nil {
			return err
		}
		w.mu.Lock()
		w.rolledBack[xid] = true
		w.mu.Unlock()
		return nil
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	var after string
	if err := w.pool.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&after); err != nil {
		return fmt.Errorf("workload: committed xid %d, then: %w", xid, err)
	}
	afterLSN, err := stub.ParseLSN(after)
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.after[xid] = afterLSN
	for _, o := range ops {
		w.committed = append(w.committed, ChangeKey{xid, o.id})
		switch o.kind {
		case 'I':
			w.live = append(w.live, o.id)
		case 'D':
			for i, id := range w.live {
				if id == o.id {
					w.live[i] = w.live[len(w.live)-1]
					w.live = w.live[:len(w.live)-1]
					break
				}
			}
		}
	}
	return nil
}

// Run writes about total changes at rate changes per second, in
// transactions of 1..maxTx changes, rolling back one transaction in
// rollbackEvery (0: never). It stops early when ctx ends and returns the
// number of changes committed.
func (w *Workload) Run(ctx context.Context, total int, rate float64, maxTx, rollbackEvery int) (int, error) {
	start := time.Now()
	written := 0
	for i := 0; written < total; i++ {
		if ctx.Err() != nil {
			return written, nil
		}
		n := min(1+w.rng.IntN(maxTx), total-written)
		rollback := rollbackEvery > 0 && i%rollbackEvery == rollbackEvery-1
		if err := w.Tx(ctx, n, rollback); err != nil {
			if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
				return written, nil
			}
			return written, err
		}
		if !rollback {
			written += n
		}
		// Pace the workload: wait for the schedule, not for a condition.
		due := start.Add(time.Duration(float64(written) / rate * float64(time.Second)))
		if d := time.Until(due); d > 0 {
			select {
			case <-ctx.Done():
				return written, nil
			case <-time.After(d):
			}
		}
	}
	return written, nil
}

// Committed returns the committed changes, in commit order.
func (w *Workload) Committed() []ChangeKey {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]ChangeKey(nil), w.committed...)
}

// After returns a WAL position read after the commit of transaction xid
// returned: its commit record lies below it. ok is false for an xid the
// workload did not commit.
func (w *Workload) After(xid uint32) (lsn stub.LSN, ok bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	lsn, ok = w.after[xid]
	return lsn, ok
}

// RolledBack reports whether xid belongs to a rolled-back transaction.
func (w *Workload) RolledBack(xid uint32) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.rolledBack[xid]
}

// RolledBackCount is the number of rolled-back transactions.
func (w *Workload) RolledBackCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.rolledBack)
}

// Pool is the workload's connection pool.
func (w *Workload) Pool() *pgxpool.Pool { return w.pool }

// Unpublished writes rows to a table outside the publication until ctx ends:
// WAL that the slot reads and pgoutput filters out, so the walsender sends
// keepalives whose WAL end moves while the published tables are quiet. It
// returns the number of transactions written.
func Unpublished(ctx context.Context, pool *pgxpool.Pool, table string) (int, error) {
	ident := pgx.Identifier{table}.Sanitize()
	if _, err := pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+ident+` (id bigserial PRIMARY KEY, body text NOT NULL)`); err != nil {
		return 0, err
	}
	n := 0
	for ctx.Err() == nil {
		if _, err := pool.Exec(ctx, `INSERT INTO `+ident+` (body) SELECT repeat('u', 500) FROM generate_series(1, 200)`); err != nil {
			if ctx.Err() != nil {
				break
			}
			return n, err
		}
		n++
	}
	return n, nil
}
