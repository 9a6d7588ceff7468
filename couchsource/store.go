package couchsource

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/changefeed/changefeed/stub"
)

// Checkpoint is what the follower stores per database.
type Checkpoint struct {
	// Seq is the seq of a change such that it and every change before it in
	// feed order were acknowledged by Kafka. Opaque: sent back as given.
	Seq stub.Seq
	// Identity identifies the database incarnation the seq belongs to
	// (see identity.go); "" when it could not be established.
	Identity  string
	UpdatedAt time.Time
}

// Store keeps checkpoints durably, keyed by source and database.
type Store interface {
	// Load returns the database's checkpoint; ok is false when none exists.
	Load(ctx context.Context, source, db string) (cp Checkpoint, ok bool, err error)
	// Save writes the checkpoint durably before returning nil.
	Save(ctx context.Context, source, db string, cp Checkpoint) error
}

// PGStore keeps checkpoints in changefeed.couch_checkpoint (package
// migrations creates it).
type PGStore struct {
	pool *pgxpool.Pool
}

// NewPGStore opens a small pool. The URL is never echoed in errors: pgx's
// parse errors can carry the password.
func NewPGStore(ctx context.Context, dsn string) (*PGStore, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, errors.New("checkpoint store: invalid PostgreSQL URL (not shown: it may hold a password)")
	}
	cfg.MaxConns = 2
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("checkpoint store: %w", err)
	}
	return &PGStore{pool: pool}, nil
}

// Close closes the pool.
func (s *PGStore) Close() { s.pool.Close() }

// Ping checks the connection.
func (s *PGStore) Ping(ctx context.Context) error { return s.pool.Ping(ctx) }

func (s *PGStore) Load(ctx context.Context, source, db string) (Checkpoint, bool, error) {
	var cp Checkpoint
	var seq string
	err := s.pool.QueryRow(ctx,
		`SELECT seq, db_identity, updated_at FROM changefeed.couch_checkpoint WHERE source = $1 AND db = $2`,
		source, db).Scan(&seq, &cp.Identity, &cp.UpdatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return Checkpoint{}, false, nil
	}
	if err != nil {
		return Checkpoint{}, false, fmt.Errorf("load checkpoint of %s: %w", db, err)
	}
	cp.Seq = stub.Seq(seq)
	return cp, true, nil
}

func (s *PGStore) Save(ctx context.Context, source, db string, cp Checkpoint) error {
	_, err := s.pool.Exec(ctx, `
		INSERT INTO changefeed.couch_checkpoint (source, db, seq, db_identity, updated_at)
		VALUES ($1, $2, $3, $4, now())
		ON CONFLICT (source, db) DO UPDATE
		SET seq = EXCLUDED.seq, db_identity = EXCLUDED.db_identity, updated_at = EXCLUDED.updated_at`,
		source, db, string(cp.Seq), cp.Identity)
	if err != nil {
		return fmt.Errorf("save checkpoint of %s: %w", db, err)
	}
	return nil
}

// MemoryStore keeps checkpoints in memory: for benchmarks and demos only,
// since a restart forgets them.
type MemoryStore struct {
	mu  sync.Mutex
	cps map[[2]string]Checkpoint
}

func (s *MemoryStore) Load(_ context.Context, source, db string) (Checkpoint, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cp, ok := s.cps[[2]string{source, db}]
	return cp, ok, nil
}

func (s *MemoryStore) Save(_ context.Context, source, db string, cp Checkpoint) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cps == nil {
		s.cps = map[[2]string]Checkpoint{}
	}
	cp.UpdatedAt = time.Now()
	s.cps[[2]string{source, db}] = cp
	return nil
}
