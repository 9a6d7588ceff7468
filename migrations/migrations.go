// Package migrations holds the schema changefeed itself needs (checkpoints,
// pillow errors, once-per-version effects) as embedded SQL files applied by
// goose. Tables live in the "changefeed" schema; goose's own version table is
// public.changefeed_schema_version so it never collides with an
// application's goose table.
package migrations

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"log/slog"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
)

//go:embed sql/*.sql
var files embed.FS

// Up applies every pending migration to the database at dsn. Concurrent
// callers (several binaries starting at once) are serialised by a PostgreSQL
// advisory lock.
func Up(ctx context.Context, dsn string, log *slog.Logger) error {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		// pgx's parse errors can echo the URL, password included.
		return fmt.Errorf("migrations: invalid PostgreSQL URL")
	}
	db := stdlib.OpenDB(*cfg)
	defer db.Close()
	return UpDB(ctx, db, log)
}

// UpDB is Up on an open database handle.
func UpDB(ctx context.Context, db *sql.DB, log *slog.Logger) error {
	p, err := provider(db)
	if err != nil {
		return err
	}
	results, err := p.Up(ctx)
	if err != nil {
		return fmt.Errorf("migrations: apply: %w", err)
	}
	for _, r := range results {
		if log != nil {
			log.Info("migration applied", "source", r.Source.Path, "duration", r.Duration)
		}
	}
	return nil
}

func provider(db *sql.DB) (*goose.Provider, error) {
	sub, err := fs.Sub(files, "sql")
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	locker, err := lock.NewPostgresSessionLocker()
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, sub,
		goose.WithTableName("changefeed_schema_version"),
		goose.WithSessionLocker(locker),
		goose.WithDisableGlobalRegistry(true),
	)
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	return p, nil
}
