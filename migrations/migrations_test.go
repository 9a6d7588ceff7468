package migrations

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/changefeed/changefeed/internal/testenv"
)

// TestUpConcurrentAndIdempotent applies the migrations from several callers
// at once (binaries starting together), then again: every table exists once
// and a second Up is a no-op.
func TestUpConcurrentAndIdempotent(t *testing.T) {
	pg := testenv.Postgres(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	log := slog.New(slog.DiscardHandler)

	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = Up(ctx, pg.URL(), log)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("concurrent Up %d: %v", i, err)
		}
	}
	if err := Up(ctx, pg.URL(), log); err != nil {
		t.Fatalf("second Up: %v", err)
	}
	conn, err := pgx.Connect(ctx, pg.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, table := range []string{"cdc_checkpoint", "couch_checkpoint", "pillow_errors", "pillow_effects"} {
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_tables WHERE schemaname = 'changefeed' AND tablename = $1`, table).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Fatalf("table changefeed.%s: %d found", table, n)
		}
	}
	var applied int
	if err := conn.QueryRow(ctx, `SELECT count(DISTINCT version_id) FROM changefeed_schema_version WHERE version_id > 0 AND is_applied`).Scan(&applied); err != nil {
		t.Fatal(err)
	}
	entries, err := files.ReadDir("sql")
	if err != nil {
		t.Fatal(err)
	}
	if applied != len(entries) {
		t.Fatalf("%d migrations recorded, %d embedded", applied, len(entries))
	}
}

// A malformed URL must not come back in the error: it may hold a password.
func TestUpInvalidURLHidesPassword(t *testing.T) {
	err := Up(context.Background(), "postgres://u:hunter2@[::1/db", slog.New(slog.DiscardHandler))
	if err == nil {
		t.Fatal("Up accepted a malformed URL")
	}
	if strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("error leaks the password: %v", err)
	}
}

// 00003 names an error row's document by source: rows recorded before it
// take their source from their stub, and the same id from two sources gets
// two rows. Down collapses them back to one per id.
func TestPillowErrorsSource(t *testing.T) {
	pg := testenv.Postgres(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg, err := pgx.ParseConfig(pg.URL())
	if err != nil {
		t.Fatal(err)
	}
	db := stdlib.OpenDB(*cfg)
	defer db.Close()
	p, err := provider(db)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.UpTo(ctx, 2); err != nil {
		t.Fatal(err)
	}
	exec := func(q string, args ...any) {
		t.Helper()
		if _, err := db.ExecContext(ctx, q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	insert := `INSERT INTO changefeed.pillow_errors (pillow, processor, document_id, version, stub, error_type, error_message, next_attempt)
VALUES ('p', 'proc', 'x', '1-a', $1::jsonb, 't', 'm', now())`
	exec(insert, `{"document_id": "x", "data_source_type": "couch", "data_source_name": "hq"}`)
	if _, err := p.Up(ctx); err != nil {
		t.Fatal(err)
	}
	var typ, name string
	if err := db.QueryRowContext(ctx, `SELECT data_source_type, data_source_name FROM changefeed.pillow_errors`).Scan(&typ, &name); err != nil {
		t.Fatal(err)
	}
	if typ != "couch" || name != "hq" {
		t.Fatalf("existing row: source %q/%q, want couch/hq from its stub", typ, name)
	}
	// The same id from SQL is another row; from the same source, a conflict.
	exec(`INSERT INTO changefeed.pillow_errors (pillow, processor, data_source_type, data_source_name, document_id, version, stub, error_type, error_message, next_attempt)
VALUES ('p', 'proc', 'sql', 'cases', 'x', 'v', '{}', 't', 'm', now())`)
	if _, err := db.ExecContext(ctx, `INSERT INTO changefeed.pillow_errors (pillow, processor, data_source_type, data_source_name, document_id, version, stub, error_type, error_message, next_attempt)
VALUES ('p', 'proc', 'couch', 'hq', 'x', 'v', '{}', 't', 'm', now())`); err == nil {
		t.Fatal("a second row for couch/hq/x was accepted")
	}

	if _, err := p.DownTo(ctx, 2); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM changefeed.pillow_errors`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("%d rows after down, want 1", n)
	}
	if _, err := p.Up(ctx); err != nil {
		t.Fatalf("up again: %v", err)
	}
}
