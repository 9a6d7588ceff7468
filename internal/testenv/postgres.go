package testenv

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

// The superuser and database every Postgres container gets.
const (
	pgUser     = "postgres"
	pgDatabase = "changefeed"
)

// PG is a running PostgreSQL 15 server with wal_level=logical,
// max_replication_slots=20 and max_wal_senders=20, reachable on a fixed
// loopback port. Data and port survive Stop/Start.
type PG struct {
	c        *testcontainers.DockerContainer
	port     int
	password string
}

// PGOption configures [Postgres].
type PGOption func(*pgConfig)

type pgConfig struct {
	args     []string
	password string
}

// WithPGArgs passes server arguments, overriding the image's settings:
// WithPGArgs("-c", "wal_level=replica").
func WithPGArgs(args ...string) PGOption {
	return func(c *pgConfig) { c.args = append(c.args, args...) }
}

// WithPassword sets the superuser's password (default "postgres").
func WithPassword(password string) PGOption {
	return func(c *pgConfig) { c.password = password }
}

// Postgres starts a PostgreSQL 15 container (image changefeed/postgres:15)
// that is removed when the test ends. The superuser is "postgres" and the
// database "changefeed".
func Postgres(t testing.TB, opts ...PGOption) *PG {
	t.Helper()
	cfg := pgConfig{password: "postgres"}
	for _, opt := range opts {
		opt(&cfg)
	}
	c, port := runOnFreePort(t, PostgresImage, func(int) containerSpec {
		return containerSpec{
			containerPort: "5432/tcp",
			opts: []testcontainers.ContainerCustomizer{
				testcontainers.WithEnv(map[string]string{
					"POSTGRES_USER":     pgUser,
					"POSTGRES_PASSWORD": cfg.password,
					"POSTGRES_DB":       pgDatabase,
				}),
				testcontainers.WithCmd(append([]string{"postgres"}, cfg.args...)...),
				// The image logs the line once per start (the official image
				// logs it twice, which the postgres module's default wait expects).
				testcontainers.WithWaitStrategyAndDeadline(startTimeout,
					wait.ForLog("database system is ready to accept connections").WithOccurrence(1),
					wait.ForListeningPort("5432/tcp"),
				),
			},
		}
	})
	pg := &PG{c: c, port: port, password: cfg.password}
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	if err := pollUntil(ctx, "postgres ready", pg.ping); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return pg
}

// URL is the superuser's connection string:
// postgres://postgres:PASSWORD@127.0.0.1:PORT/changefeed?sslmode=disable.
func (p *PG) URL() string { return p.url(nil) }

// ReplicationURL is URL with replication=database, for logical replication
// connections (pglogrepl).
func (p *PG) ReplicationURL() string {
	return p.url(url.Values{"replication": {"database"}})
}

func (p *PG) url(extra url.Values) string {
	q := url.Values{"sslmode": {"disable"}}
	for k, v := range extra {
		q[k] = v
	}
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(pgUser, p.password),
		Host:     net.JoinHostPort(loopback, strconv.Itoa(p.port)),
		Path:     "/" + pgDatabase,
		RawQuery: q.Encode(),
	}
	return u.String()
}

// Port is the host port, the same across Stop/Start.
func (p *PG) Port() int { return p.port }

// Container is the underlying container, for what the helpers do not cover.
func (p *PG) Container() *testcontainers.DockerContainer { return p.c }

// Stop shuts the server down (fast shutdown); its data is kept.
func (p *PG) Stop(ctx context.Context) error {
	if err := stopContainer(ctx, p.c); err != nil {
		return fmt.Errorf("postgres: %w", err)
	}
	return nil
}

// Start restarts a stopped server on the same port and waits until it
// accepts connections.
func (p *PG) Start(ctx context.Context) error {
	// The wait strategy cannot tell this start apart: the container's log
	// still holds the previous run's ready line. Hence the ping.
	if err := startContainer(ctx, p.c, "postgres ready", p.ping); err != nil {
		return fmt.Errorf("postgres: %w", err)
	}
	return nil
}

// Exec runs one SQL statement as the superuser on a fresh connection and
// fails the test on error.
func (p *PG) Exec(t testing.TB, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.URL())
	if err != nil {
		t.Fatalf("testenv: connect to postgres: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("testenv: exec %q: %v", sql, err)
	}
}

// ping succeeds once a query runs over TCP with the password, which is what
// callers need; on Start it also replaces the log wait (see Start).
func (p *PG) ping(ctx context.Context) error {
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(pingCtx, p.URL())
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(pingCtx)
	if _, err := conn.Exec(pingCtx, "SELECT 1"); err != nil {
		return fmt.Errorf("select 1: %w", err)
	}
	return nil
}
