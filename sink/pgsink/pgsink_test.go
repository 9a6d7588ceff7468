package pgsink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/sink/sinktest"
	"github.com/changefeed/changefeed/stub"
)

func newPool(t testing.TB, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

var conformanceColumns = []Column{{Name: "title", Type: "text"}, {Name: "n", Type: "bigint"}}

func TestConformance(t *testing.T) {
	pg := testenv.Postgres(t)
	pool := newPool(t, pg.URL())
	var n atomic.Int64
	sinktest.Run(t, func(t *testing.T) sinktest.Harness {
		cfg := Config{Table: fmt.Sprintf("public.conformance_%d", n.Add(1)), Columns: conformanceColumns}
		s, err := New(pool, cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		return sinktest.Harness{
			Sink: s,
			Reopen: func(t *testing.T) sinktest.Sink {
				// A new process: its own connections.
				s, err := New(newPool(t, pg.URL()), cfg, nil)
				if err != nil {
					t.Fatal(err)
				}
				return s
			},
			Read: func(t *testing.T, ids []string) map[string]sinktest.Stored {
				t.Helper()
				rows, err := pool.Query(t.Context(),
					fmt.Sprintf(`SELECT doc_id, deleted, coalesce(title, ''), coalesce(n::text, '') FROM %s WHERE doc_id = ANY($1)`, s.table), ids)
				if err != nil {
					t.Fatal(err)
				}
				out := map[string]sinktest.Stored{}
				var id string
				var st sinktest.Stored
				if _, err := pgx.ForEachRow(rows, []any{&id, &st.Deleted, &st.Title, &st.N}, func() error {
					out[id] = st
					return nil
				}); err != nil {
					t.Fatal(err)
				}
				return out
			},
		}
	})
}

func TestNewValidation(t *testing.T) {
	pool := newPool(t, "postgres://127.0.0.1:1/none") // never connected
	tests := []struct {
		name string
		cfg  Config
		want string // substring of the error; "" means valid
	}{
		{"valid", Config{Table: "r.cases", Columns: []Column{{Name: "owner", Field: "form.owner_id", Type: "text"}}}, ""},
		{"no columns", Config{Table: "cases"}, ""},
		{"empty table", Config{}, "pgsink: table: is empty"},
		{"three part table", Config{Table: "a.b.c"}, "pgsink: table:"},
		{"empty column name", Config{Table: "t", Columns: []Column{{Type: "text"}}}, "columns[0].name is empty"},
		{"reserved", Config{Table: "t", Columns: []Column{{Name: "deleted", Type: "boolean"}}}, `columns[0].name: "deleted" is reserved`},
		{"twice", Config{Table: "t", Columns: []Column{{Name: "a", Type: "text"}, {Name: "a", Type: "text"}}}, `columns[1].name: "a" is configured twice`},
		{"bad type", Config{Table: "t", Columns: []Column{{Name: "a", Type: "float"}}}, `columns[0].type: "float" is not one of`},
		{"bad path", Config{Table: "t", Columns: []Column{{Name: "a", Field: "x..y", Type: "text"}}}, `columns[0].field: "x..y" has an empty path segment`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(pool, tt.cfg, nil)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("New = %v, want nil", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("New = %v, want error containing %q", err, tt.want)
			}
		})
	}
	if _, err := New(nil, Config{Table: "t"}, nil); err == nil {
		t.Fatal("New(nil pool) succeeded")
	}
}

// TestPostgres covers what the conformance suite cannot see from outside:
// the stored versions, column types, the statement count and outages.
func TestPostgres(t *testing.T) {
	pg := testenv.Postgres(t)
	pool := newPool(t, pg.URL())
	ctx := t.Context()
	pg.Exec(t, "CREATE SCHEMA reports")

	t.Run("TombstoneKeepsVersionAndLiveViewHidesIt", func(t *testing.T) {
		s := bootstrap(t, pool, Config{Table: "reports.tomb", Columns: conformanceColumns})
		mustWrite(t, s, sinktest.SQL("a", 0x16B374D848, 3, false), sinktest.SQL("b", 5, 0, false))
		mustWrite(t, s, sinktest.SQL("a", 0x16B374D849, 1, true))
		var deleted bool
		var lsn stub.LSN
		var ord int64
		var title *string
		if err := pool.QueryRow(ctx, `SELECT deleted, version_lsn, version_ordinal, title FROM reports.tomb WHERE doc_id = 'a'`).
			Scan(&deleted, &lsn, &ord, &title); err != nil {
			t.Fatal(err)
		}
		if !deleted || lsn != 0x16B374D849 || ord != 1 || title != nil {
			t.Fatalf("tombstone = deleted %v, %s#%d, title %v", deleted, lsn, ord, title)
		}
		var live []string
		rows, _ := pool.Query(ctx, `SELECT doc_id FROM reports.tomb_live ORDER BY doc_id`)
		live, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(live) != "[b]" {
			t.Fatalf("tomb_live = %v, want [b]", live)
		}
	})

	t.Run("OrdinalOrdersWithinATransaction", func(t *testing.T) {
		s := bootstrap(t, pool, Config{Table: "ordinal", Columns: conformanceColumns})
		mustWrite(t, s, sinktest.SQL("a", 100, 2, false))
		mustWrite(t, s, sinktest.SQL("a", 100, 1, false))
		mustWrite(t, s, sinktest.SQL("b", 100, 1, false))
		mustWrite(t, s, sinktest.SQL("b", 100, 2, false))
		for id, want := range map[string]string{"a": "a@100.2", "b": "b@100.2"} {
			var got string
			if err := pool.QueryRow(ctx, `SELECT title FROM ordinal WHERE doc_id = $1`, id).Scan(&got); err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Fatalf("%s = %q, want %q", id, got, want)
			}
		}
	})

	t.Run("CouchRevisionPathStored", func(t *testing.T) {
		s := bootstrap(t, pool, Config{Table: "couchpath", Columns: conformanceColumns})
		mustWrite(t, s, sinktest.Couch("c", false, "3-c", "2-b", "1-a"))
		var rev string
		var path []string
		if err := pool.QueryRow(ctx, `SELECT version_rev, version_rev_path FROM couchpath WHERE doc_id = 'c'`).Scan(&rev, &path); err != nil {
			t.Fatal(err)
		}
		if rev != "3-c" || fmt.Sprint(path) != "[3-c 2-b 1-a]" {
			t.Fatalf("rev %q path %v", rev, path)
		}
		// A Couch document that vanished without a tombstone revision is
		// a deletion with no revision: written, and refusing nothing.
		gone := &doc.Document{ID: "c", Source: stub.SourceCouch, Deleted: true}
		mustWrite(t, s, gone)
		mustWrite(t, s, sinktest.Couch("c", false, "1-a"))
		var deleted bool
		if err := pool.QueryRow(ctx, `SELECT deleted, version_rev FROM couchpath WHERE doc_id = 'c'`).Scan(&deleted, &rev); err != nil {
			t.Fatal(err)
		}
		if deleted || rev != "1-a" {
			t.Fatalf("after unknown-revision deletion and 1-a: deleted %v rev %q", deleted, rev)
		}
	})

	t.Run("ColumnTypes", func(t *testing.T) {
		s := bootstrap(t, pool, Config{Table: "types", Columns: []Column{
			{Name: "owner", Field: "form.meta.owner", Type: "text"},
			{Name: "count", Field: "count", Type: "integer"},
			{Name: "big", Field: "big", Type: "bigint"},
			{Name: "amount", Field: "amount", Type: "numeric"},
			{Name: "closed", Field: "closed", Type: "boolean"},
			{Name: "opened_on", Field: "opened_on", Type: "timestamptz"},
			{Name: "props", Field: "form", Type: "jsonb"},
			{Name: "first_tag", Field: "tags.0", Type: "text"},
			{Name: "Missing", Field: "nope.nope", Type: "text"},
		}})
		d := sinktest.SQL("t1", 7, 0, false)
		d.Body = map[string]any{
			"form":      map[string]any{"meta": map[string]any{"owner": "ann"}, "q": json.Number("1.50")},
			"count":     json.Number("42"),
			"big":       json.Number("9223372036854775807"),
			"amount":    json.Number("12345678901234567890.123456789"),
			"closed":    true,
			"opened_on": "2024-02-29T13:14:15.123456Z",
			"tags":      []any{"x", "y"},
		}
		mustWrite(t, s, d)
		var owner, amount, props, firstTag, opened string
		var count int32
		var big int64
		var closed bool
		var missing *string
		err := pool.QueryRow(ctx, `SELECT owner, count, big, amount::text, closed,
			to_char(opened_on AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), props::text, first_tag, "Missing" FROM types`).
			Scan(&owner, &count, &big, &amount, &closed, &opened, &props, &firstTag, &missing)
		if err != nil {
			t.Fatal(err)
		}
		got := fmt.Sprint(owner, count, big, amount, closed, opened, props, firstTag, missing)
		want := fmt.Sprint("ann", 42, int64(9223372036854775807), "12345678901234567890.123456789", true,
			"2024-02-29T13:14:15.123456", `{"q": 1.50, "meta": {"owner": "ann"}}`, "x", (*string)(nil))
		if got != want {
			t.Fatalf("row = %s\nwant  %s", got, want)
		}

		// Values a column cannot hold are that document's error only.
		bad := func(id, field string, v any) *doc.Document {
			d := sinktest.SQL(id, 8, 0, false)
			d.Body = map[string]any{field: v}
			return d
		}
		err = s.Write(ctx, []*doc.Document{
			bad("overflow", "count", json.Number("2147483648")),
			bad("fraction", "big", json.Number("1.5")),
			bad("nul", "form", map[string]any{"meta": map[string]any{"owner": "a\x00b"}}),
			bad("nuljson", "form", map[string]any{"k": "a\x00b"}),
			bad("notbool", "closed", "maybe"),
			bad("notdate", "opened_on", "yesterday"),
			bad("notnum", "amount", "1/3"),
			bad("fine", "count", 3.0),
		})
		var de doc.Errors
		if !errors.As(err, &de) || len(de) != 7 || de["fine"] != nil {
			t.Fatalf("Write = %v, want doc.Errors for all but fine", err)
		}
		if !strings.Contains(de["overflow"].Error(), `column "count"`) {
			t.Fatalf("error does not name the column: %v", de["overflow"])
		}
	})

	t.Run("ConstraintViolationIsolated", func(t *testing.T) {
		// A check the sink cannot know about fails only its document.
		s := bootstrap(t, pool, Config{Table: "checked", Columns: conformanceColumns})
		pg.Exec(t, `ALTER TABLE checked ADD CONSTRAINT n_small CHECK (n < 100)`)
		err := s.Write(ctx, []*doc.Document{sinktest.SQL("a", 5, 0, false), sinktest.SQL("b", 500, 0, false), sinktest.SQL("c", 6, 0, false)})
		var de doc.Errors
		if !errors.As(err, &de) || len(de) != 1 || de["b"] == nil {
			t.Fatalf("Write = %v, want doc.Errors{b}", err)
		}
		var n int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM checked WHERE doc_id IN ('a', 'c')`).Scan(&n); err != nil || n != 2 {
			t.Fatalf("a and c written: %d, %v", n, err)
		}
	})

	t.Run("OneStatementPerBatch", func(t *testing.T) {
		var statements atomic.Int64
		cfg, err := pgxpool.ParseConfig(pg.URL())
		if err != nil {
			t.Fatal(err)
		}
		cfg.ConnConfig.Tracer = countingTracer{&statements}
		traced, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(traced.Close)
		s := bootstrap(t, traced, Config{Table: "statements", Columns: conformanceColumns})
		docs := make([]*doc.Document, 500)
		for i := range docs {
			docs[i] = sinktest.SQL(fmt.Sprintf("d%03d", i), 10, 0, i%7 == 0)
		}
		statements.Store(0)
		mustWrite(t, s, docs...)
		if n := statements.Load(); n != 1 {
			t.Fatalf("Write of 500 documents ran %d statements, want 1", n)
		}
	})

	t.Run("PoisonIDIsolatedByBisection", func(t *testing.T) {
		// A 4,000-byte id cannot enter doc_id's btree (54000 index row size
		// exceeds btree maximum): that document fails, not the batch, and
		// finding it costs O(log n) statements, not n.
		var statements atomic.Int64
		cfg, err := pgxpool.ParseConfig(pg.URL())
		if err != nil {
			t.Fatal(err)
		}
		cfg.ConnConfig.Tracer = countingTracer{&statements}
		traced, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(traced.Close)
		s := bootstrap(t, traced, Config{Table: "poison_id", Columns: conformanceColumns})
		// Random-looking text does not compress below the btree limit.
		rnd := rand.New(rand.NewPCG(1, 2))
		var b strings.Builder
		for range 4000 {
			b.WriteByte(byte('a' + rnd.IntN(26)))
		}
		long := b.String()
		docs := make([]*doc.Document, 500)
		for i := range docs {
			docs[i] = sinktest.SQL(fmt.Sprintf("d%03d", i), 10, 0, false)
		}
		docs[321] = sinktest.SQL(long, 10, 0, false)
		statements.Store(0)
		err = s.Write(ctx, docs)
		var de doc.Errors
		if !errors.As(err, &de) || len(de) != 1 || de[long] == nil || errors.Is(err, doc.ErrTransient) {
			t.Fatalf("Write = %v, want doc.Errors naming only the long id", err)
		}
		if !strings.Contains(de[long].Error(), "54000") {
			t.Errorf("error %v does not name SQLSTATE 54000", de[long])
		}
		if n := statements.Load(); n > 20 {
			t.Errorf("isolating one document of 500 took %d statements, want at most 2·log2(500)+1", n)
		}
		var n int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM poison_id`).Scan(&n); err != nil || n != 499 {
			t.Fatalf("healthy documents written: %d, %v; want 499", n, err)
		}
	})

	t.Run("BootstrapChecksAnExistingTable", func(t *testing.T) {
		pg.Exec(t, `CREATE TABLE premade (doc_id text PRIMARY KEY, title text, n integer, deleted boolean NOT NULL DEFAULT false,
			version_lsn pg_lsn, version_ordinal bigint, version_rev text, version_rev_path text[], updated_at timestamptz NOT NULL DEFAULT now())`)
		s, err := New(pool, Config{Table: "premade", Columns: conformanceColumns}, nil)
		if err != nil {
			t.Fatal(err)
		}
		err = s.Bootstrap(ctx)
		if err == nil || !strings.Contains(err.Error(), `column "n" is integer, want bigint`) || errors.Is(err, doc.ErrTransient) {
			t.Fatalf("Bootstrap = %v, want a non-transient error naming column n", err)
		}
		pg.Exec(t, `ALTER TABLE premade ALTER COLUMN n TYPE bigint`)
		// Concurrent bootstraps (several pillow processes starting) agree.
		var wg sync.WaitGroup
		errs := make([]error, 4)
		for i := range errs {
			wg.Go(func() { errs[i] = s.Bootstrap(ctx) })
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
		for i := range 4 {
			s, _ := New(pool, Config{Table: fmt.Sprintf("fresh%d", i%2), Columns: conformanceColumns}, nil)
			wg.Go(func() { errs[i] = s.Bootstrap(ctx) })
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("MissingTableIsTransient", func(t *testing.T) {
		s, err := New(pool, Config{Table: "never_bootstrapped", Columns: conformanceColumns}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Write(ctx, []*doc.Document{sinktest.SQL("a", 1, 0, false)}); !errors.Is(err, doc.ErrTransient) {
			t.Fatalf("Write = %v, want doc.ErrTransient", err)
		}
	})

	// Last: it stops the server.
	t.Run("ServerDownIsTransient", func(t *testing.T) {
		s := bootstrap(t, pool, Config{Table: "outage", Columns: conformanceColumns})
		if err := pg.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := s.Write(wctx, []*doc.Document{sinktest.SQL("a", 1, 0, false)})
		cancel()
		var de doc.Errors
		if !errors.Is(err, doc.ErrTransient) || errors.As(err, &de) {
			t.Fatalf("Write with the server down = %v, want doc.ErrTransient", err)
		}
		if strings.Contains(err.Error(), "postgres:postgres@") {
			t.Fatalf("error leaks the password: %v", err)
		}
		if err := pg.Start(ctx); err != nil {
			t.Fatal(err)
		}
		// The pool reconnects: the same batch goes through once the server
		// is back (poll: the first attempts may meet dead connections).
		deadline := time.Now().Add(30 * time.Second)
		for {
			err := s.Write(ctx, []*doc.Document{sinktest.SQL("a", 1, 0, false)})
			if err == nil {
				break
			}
			if !errors.Is(err, doc.ErrTransient) || time.Now().After(deadline) {
				t.Fatalf("Write after restart = %v", err)
			}
		}
	})
}

func bootstrap(t *testing.T, pool *pgxpool.Pool, cfg Config) *Sink {
	t.Helper()
	s, err := New(pool, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Bootstrap(t.Context()); err != nil {
		t.Fatal(err)
	}
	return s
}

func mustWrite(t *testing.T, s *Sink, docs ...*doc.Document) {
	t.Helper()
	if err := s.Write(t.Context(), docs); err != nil {
		t.Fatal(err)
	}
}

type countingTracer struct{ n *atomic.Int64 }

func (c countingTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	c.n.Add(1)
	return ctx
}

func (countingTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// BenchmarkWrite measures batched upserts of 500 documents, each iteration a
// newer version of the same documents (every row is rewritten).
func BenchmarkWrite(b *testing.B) {
	pg := testenv.Postgres(b)
	pool := newPool(b, pg.URL())
	s, err := New(pool, Config{Table: "bench", Columns: []Column{
		{Name: "title", Type: "text"}, {Name: "n", Type: "bigint"},
		{Name: "owner", Field: "form.owner", Type: "text"}, {Name: "opened_on", Type: "timestamptz"},
	}}, nil)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if err := s.Bootstrap(ctx); err != nil {
		b.Fatal(err)
	}
	const batch = 500
	docs := make([]*doc.Document, batch)
	for i := 0; b.Loop(); i++ {
		for j := range docs {
			d := sinktest.SQL(fmt.Sprintf("doc-%05d", j), uint64(i+1)*1000+uint64(j), 0, false)
			d.Body["form"] = map[string]any{"owner": "owner-1"}
			d.Body["opened_on"] = "2024-01-02T03:04:05Z"
			docs[j] = d
		}
		if err := s.Write(ctx, docs); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "docs/s")
}
