package migrations

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

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
