package docstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/stub"
)

func sqlStub(source, id string, lsn uint64, ord uint32) *stub.Stub {
	return &stub.Stub{DocumentID: id, DataSourceType: stub.SourceSQL, DataSourceName: source,
		DocumentType: "StubType", Domain: "stub-domain", LSN: stub.LSN(lsn), TxOrdinal: ord}
}

func newPool(t testing.TB, url string, tracer pgx.QueryTracer) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	cfg.ConnConfig.Tracer = tracer
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

type countingTracer struct{ n *atomic.Int64 }

func (c countingTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	c.n.Add(1)
	return ctx
}

func (countingTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func TestNewPostgresValidation(t *testing.T) {
	pool := newPool(t, "postgres://127.0.0.1:1/none", nil) // never connected
	tests := []struct {
		name   string
		tables []PostgresTable
		want   string
	}{
		{"valid", []PostgresTable{{Source: "cases", Table: "app.cases", IDColumn: "case_id"}}, ""},
		{"no source", []PostgresTable{{Table: "t", IDColumn: "id"}}, "tables[0].source is empty"},
		{"twice", []PostgresTable{{Source: "s", Table: "t", IDColumn: "id"}, {Source: "s", Table: "u", IDColumn: "id"}}, `tables[1].source: "s" is configured twice`},
		{"no id column", []PostgresTable{{Source: "s", Table: "t"}}, "tables[0].id_column is empty"},
		{"no table", []PostgresTable{{Source: "s", IDColumn: "id"}}, "tables[0].table: is empty"},
		{"bad table", []PostgresTable{{Source: "s", Table: "a.b.c", IDColumn: "id"}}, "tables[0].table:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewPostgres(pool, tt.tables)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("NewPostgres = %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("NewPostgres = %v, want %q", err, tt.want)
			}
		})
	}
	if _, err := NewPostgres(nil, nil); err == nil {
		t.Fatal("NewPostgres(nil) succeeded")
	}
}

func TestPostgresFetch(t *testing.T) {
	pg := testenv.Postgres(t)
	var queries atomic.Int64
	pool := newPool(t, pg.URL(), countingTracer{&queries})
	ctx := t.Context()
	pg.Exec(t, `CREATE SCHEMA app`)
	pg.Exec(t, `CREATE TABLE app."Cases" (case_id varchar(36) PRIMARY KEY, doc_type text, domain text, closed_deleted boolean,
		name text, amount numeric, big bigint)`)
	pg.Exec(t, `INSERT INTO app."Cases" VALUES
		('c1', 'CommCareCase', 'd1', false, 'one', 1.50, 9007199254740993),
		('c2', NULL, NULL, NULL, 'two', NULL, NULL),
		('c3', 'CommCareCase', 'd1', true, 'three', NULL, NULL)`)
	pg.Exec(t, `CREATE TABLE ledger (id bigint PRIMARY KEY, entry text)`)
	pg.Exec(t, `INSERT INTO ledger VALUES (7, 'seven'), (8, 'eight')`)

	s, err := NewPostgres(pool, []PostgresTable{
		{Source: "cases", Table: "app.Cases", IDColumn: "case_id", TypeColumn: "doc_type", DomainColumn: "domain", DeletedColumn: "closed_deleted"},
		{Source: "ledger", Table: "ledger", IDColumn: "id"},
	})
	if err != nil {
		t.Fatal(err)
	}
	stubs := []*stub.Stub{
		sqlStub("cases", "c2", 100, 1),
		sqlStub("cases", "c1", 100, 2),
		sqlStub("ledger", "8", 90, 0),
		sqlStub("cases", "c2", 150, 0), // newer stub of c2
		sqlStub("cases", "c2", 120, 9),
		sqlStub("cases", "missing", 100, 3),
		sqlStub("cases", "c3", 100, 4),
		sqlStub("ledger", "x", 90, 1), // not a bigint: that document's error
		sqlStub("ledger", "7", 90, 2),
		sqlStub("orders", "o1", 90, 0), // no table for this source
		{DocumentID: "k1", DataSourceType: stub.SourceCouch, DataSourceName: "cases", DocumentType: "X"},
	}
	docs, err := s.Fetch(ctx, stubs)
	var de doc.Errors
	if !errors.As(err, &de) || len(de) != 3 || de["x"] == nil || de["o1"] == nil || de["k1"] == nil {
		t.Fatalf("Fetch error = %v, want doc.Errors for x, o1, k1", err)
	}
	var got []string
	byID := map[string]*doc.Document{}
	for _, d := range docs {
		got = append(got, fmt.Sprintf("%s deleted=%v v=%s type=%s domain=%s", d.ID, d.Deleted, d.Version.SQL, d.Type, d.Domain))
		byID[d.ID] = d
	}
	want := []string{
		"c2 deleted=false v=0/96#0 type=StubType domain=stub-domain",
		"c1 deleted=false v=0/64#2 type=CommCareCase domain=d1",
		"8 deleted=false v=0/5A#0 type=StubType domain=stub-domain",
		"missing deleted=true v=0/64#3 type=StubType domain=stub-domain",
		"c3 deleted=true v=0/64#4 type=CommCareCase domain=d1",
		"7 deleted=false v=0/5A#2 type=StubType domain=stub-domain",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("Fetch =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	c1 := byID["c1"]
	if c1.Body["name"] != "one" || c1.Body["amount"] != json.Number("1.50") || c1.Body["big"] != json.Number("9007199254740993") {
		t.Fatalf("c1 body = %#v: want exact numbers", c1.Body)
	}
	if c1.Source != stub.SourceSQL || c1.SourceName != "cases" {
		t.Fatalf("c1 source = %s/%s", c1.Source, c1.SourceName)
	}
	if byID["c3"].Body != nil || byID["missing"].Body != nil {
		t.Fatal("deleted documents carry a body")
	}
	if byID["7"].Body["entry"] != "seven" {
		t.Fatalf("7 body = %v", byID["7"].Body)
	}

	t.Run("OneQueryPerTablePerBatch", func(t *testing.T) {
		queries.Store(0)
		if _, err := s.Fetch(ctx, []*stub.Stub{sqlStub("cases", "c1", 1, 0), sqlStub("cases", "c2", 1, 0),
			sqlStub("ledger", "7", 1, 0), sqlStub("cases", "nope", 1, 0)}); err != nil {
			t.Fatal(err)
		}
		if n := queries.Load(); n != 2 {
			t.Fatalf("a batch over two tables ran %d queries, want 2", n)
		}
	})

	t.Run("MissingTableIsTransientUntilCreated", func(t *testing.T) {
		s, err := NewPostgres(pool, []PostgresTable{{Source: "late", Table: "late_table", IDColumn: "id"}})
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.Fetch(ctx, []*stub.Stub{sqlStub("late", "1", 1, 0)})
		if !errors.Is(err, doc.ErrTransient) || !strings.Contains(err.Error(), `late_table has no column "id"`) {
			t.Fatalf("Fetch = %v, want doc.ErrTransient naming the table", err)
		}
		pg.Exec(t, `CREATE TABLE late_table (id uuid PRIMARY KEY, v int)`)
		pg.Exec(t, `INSERT INTO late_table VALUES ('6f1c2c8e-5d3a-4c8e-9b0a-3f5f6c7d8e9f', 1)`)
		docs, err := s.Fetch(ctx, []*stub.Stub{sqlStub("late", "6f1c2c8e-5d3a-4c8e-9b0a-3f5f6c7d8e9f", 1, 0)})
		if err != nil || len(docs) != 1 || docs[0].Deleted || docs[0].Body["v"] != json.Number("1") {
			t.Fatalf("Fetch after creation = %v, %v", docs, err)
		}
	})

	t.Run("ServerDownIsTransient", func(t *testing.T) {
		if err := pg.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := s.Fetch(fctx, []*stub.Stub{sqlStub("cases", "c1", 1, 0)})
		cancel()
		if !errors.Is(err, doc.ErrTransient) {
			t.Fatalf("Fetch with the server down = %v, want doc.ErrTransient", err)
		}
		if err := pg.Start(ctx); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, err := s.Fetch(ctx, []*stub.Stub{sqlStub("cases", "c1", 1, 0)})
			if err == nil {
				break
			}
			if !errors.Is(err, doc.ErrTransient) || time.Now().After(deadline) {
				t.Fatalf("Fetch after restart = %v", err)
			}
		}
	})
}

// BenchmarkPostgresFetch fetches batches of 500 documents from a table of
// 20,000 rows.
func BenchmarkPostgresFetch(b *testing.B) {
	pg := testenv.Postgres(b)
	pool := newPool(b, pg.URL(), nil)
	pg.Exec(b, `CREATE TABLE cases (case_id text PRIMARY KEY, domain text, owner_id text, name text, opened_on timestamptz, props jsonb)`)
	pg.Exec(b, `INSERT INTO cases SELECT 'case-' || i, 'demo', 'owner-' || (i % 50), 'name ' || i, now(), '{"a": 1, "b": "two"}'
		FROM generate_series(1, 20000) i`)
	pg.Exec(b, `ANALYZE cases`)
	s, err := NewPostgres(pool, []PostgresTable{{Source: "cases", Table: "cases", IDColumn: "case_id", DomainColumn: "domain"}})
	if err != nil {
		b.Fatal(err)
	}
	const batch = 500
	stubs := make([]*stub.Stub, batch)
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		for j := range stubs {
			stubs[j] = sqlStub("cases", fmt.Sprintf("case-%d", (i*batch+j)%20000+1), uint64(i+1), uint32(j))
		}
		docs, err := s.Fetch(ctx, stubs)
		if err != nil || len(docs) != batch {
			b.Fatalf("Fetch = %d docs, %v", len(docs), err)
		}
	}
	b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "docs/s")
}
