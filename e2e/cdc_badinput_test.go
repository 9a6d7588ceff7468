package e2e_test

// Bad input to the built cdc-publisher: each case must end with a clear
// error, a non-zero exit status, and no password anywhere in the output.

import (
	"bytes"
	"context"
	"errors"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/changefeed/changefeed/e2e/internal/faultenv"
	"github.com/changefeed/changefeed/internal/testenv"
)

const cdcSecret = "hunter2-not-for-logs"

// cdcRun runs the publisher binary to completion (bounded) and returns its
// exit status and combined output.
func cdcRun(t *testing.T, env map[string]string, args ...string) (int, string) {
	t.Helper()
	bin := faultenv.PublisherBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = cdcEnv(env)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("cdc-publisher did not exit within a minute:\n%s", out.String())
	}
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, out.String()
	case errors.As(err, &exit):
		return exit.ExitCode(), out.String()
	default:
		t.Fatalf("run cdc-publisher: %v", err)
		return 0, ""
	}
}

// cdcEnv is the test process's environment without CHANGEFEED_* settings,
// plus env.
func cdcEnv(env map[string]string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CHANGEFEED_") {
			out = append(out, kv)
		}
	}
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	return out
}

func cdcWriteFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// cdcWithUser returns u with another user and password.
func cdcWithUser(t *testing.T, u, user, password string) string {
	t.Helper()
	p, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	p.User = url.UserPassword(user, password)
	return p.String()
}

func cdcExpect(t *testing.T, code int, out string, wantCode int, wants ...string) {
	t.Helper()
	if code != wantCode {
		t.Errorf("exit status %d, want %d", code, wantCode)
	}
	for _, w := range wants {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q", w)
		}
	}
	if strings.Contains(out, cdcSecret) {
		t.Errorf("output contains the password")
	}
	if t.Failed() {
		t.Logf("output:\n%s", out)
	}
}

const cdcRoutingOK = `
tables:
  - table: cases
    document_type: CommCareCase
    id_column: case_id
`

func TestCDCBadInput(t *testing.T) {
	// Nothing listens on port 1: these cases must fail before any connection.
	deadURL := "postgres://postgres:" + cdcSecret + "@127.0.0.1:1/db"
	base := func(extra map[string]string) map[string]string {
		env := map[string]string{
			"CHANGEFEED_POSTGRES_URL":  deadURL,
			"CHANGEFEED_KAFKA_BROKERS": "127.0.0.1:1",
			"CHANGEFEED_HTTP_ADDR":     "off",
		}
		for k, v := range extra {
			env[k] = v
		}
		return env
	}

	t.Run("InvalidRoutingFile", func(t *testing.T) {
		file := cdcWriteFile(t, "routing.yaml", `
tables:
  - table: cases
    document_type: CommCareCase
    id_column: case_id
    domian_column: domain
`)
		code, out := cdcRun(t, base(map[string]string{"CHANGEFEED_ROUTING_FILE": file}))
		cdcExpect(t, code, out, 2, file, "table public.cases", "field domian_column")
	})
	t.Run("MissingRoutingFile", func(t *testing.T) {
		code, out := cdcRun(t, base(map[string]string{"CHANGEFEED_ROUTING_FILE": "/nonexistent/routing.yaml"}))
		cdcExpect(t, code, out, 2, "/nonexistent/routing.yaml")
	})
	t.Run("MalformedURLWithPassword", func(t *testing.T) {
		for _, u := range []string{
			"postgres://postgres:" + cdcSecret + "@127.0.0.1:notaport/db",
			"postgres://postgres:" + cdcSecret + "@127.0.0.1/db?sslmode=bogus",
			"host=127.0.0.1 password=" + cdcSecret + " sslmode=bogus",
		} {
			code, out := cdcRun(t, base(map[string]string{"CHANGEFEED_POSTGRES_URL": u}))
			cdcExpect(t, code, out, 2, "cannot parse the PostgreSQL URL")
		}
	})
	t.Run("PasswordOnCommandLine", func(t *testing.T) {
		code, out := cdcRun(t, base(nil), "--postgres-url", deadURL)
		cdcExpect(t, code, out, 2, "--postgres-url carries a password")
	})
	t.Run("InvalidSlotName", func(t *testing.T) {
		code, out := cdcRun(t, base(map[string]string{"CHANGEFEED_SLOT": "Bad-Slot"}))
		cdcExpect(t, code, out, 2, `--slot "Bad-Slot"`)
	})
	t.Run("InvalidPublicationName", func(t *testing.T) {
		code, out := cdcRun(t, base(nil), "--publication", "x;drop")
		cdcExpect(t, code, out, 2, `--publication "x;drop"`)
	})

	t.Run("WalLevelReplica", func(t *testing.T) {
		pg := testenv.Postgres(t, testenv.WithPGArgs("-c", "wal_level=replica"), testenv.WithPassword(cdcSecret))
		pg.Exec(t, "CREATE TABLE cases (case_id text PRIMARY KEY)")
		code, out := cdcRun(t, base(map[string]string{
			"CHANGEFEED_POSTGRES_URL": pg.URL(),
			"CHANGEFEED_ROUTING_FILE": cdcWriteFile(t, "routing.yaml", cdcRoutingOK),
		}))
		cdcExpect(t, code, out, 2, `wal_level is \"replica\"`, "wal_level = logical")
	})

	pg := testenv.Postgres(t, testenv.WithPassword(cdcSecret))
	pg.Exec(t, `CREATE TABLE cases (case_id text PRIMARY KEY);
CREATE TABLE nopk (case_id text);
CREATE ROLE norepl LOGIN PASSWORD '`+cdcSecret+`'`)
	t.Run("MissingReplicationPrivilege", func(t *testing.T) {
		code, out := cdcRun(t, base(map[string]string{
			"CHANGEFEED_POSTGRES_URL": cdcWithUser(t, pg.URL(), "norepl", cdcSecret),
			"CHANGEFEED_NO_MIGRATE":   "true",
			"CHANGEFEED_ROUTING_FILE": cdcWriteFile(t, "routing.yaml", cdcRoutingOK),
		}))
		cdcExpect(t, code, out, 2, `role \"norepl\" lacks the REPLICATION attribute`)
	})
	t.Run("WrongPassword", func(t *testing.T) {
		code, out := cdcRun(t, base(map[string]string{
			"CHANGEFEED_POSTGRES_URL": cdcWithUser(t, pg.URL(), "postgres", cdcSecret+"-wrong"),
			"CHANGEFEED_ROUTING_FILE": cdcWriteFile(t, "routing.yaml", cdcRoutingOK),
		}))
		cdcExpect(t, code, out, 2, "password authentication failed")
		if strings.Contains(out, "-wrong") {
			t.Error("output contains the wrong password")
		}
	})
	t.Run("TableWithoutPrimaryKey", func(t *testing.T) {
		code, out := cdcRun(t, base(map[string]string{
			"CHANGEFEED_POSTGRES_URL": pg.URL(),
			"CHANGEFEED_ROUTING_FILE": cdcWriteFile(t, "routing.yaml", `
tables:
  - {table: nopk, document_type: C, id_column: case_id}
`),
		}))
		cdcExpect(t, code, out, 2, "table public.nopk has no primary key")
	})
	t.Run("MigrateSubcommand", func(t *testing.T) {
		code, out := cdcRun(t, map[string]string{"CHANGEFEED_POSTGRES_URL": pg.URL()}, "migrate")
		cdcExpect(t, code, out, 0, "migrations applied")
		ctx := context.Background()
		conn, err := pgx.Connect(ctx, pg.URL())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		var table *string
		if err := conn.QueryRow(ctx, "SELECT to_regclass('changefeed.cdc_checkpoint')::text").Scan(&table); err != nil || table == nil {
			t.Fatalf("checkpoint table missing after migrate: %v", err)
		}
		code, out = cdcRun(t, map[string]string{"CHANGEFEED_POSTGRES_URL": "postgres://u:" + cdcSecret + "@h:bad/db"}, "migrate")
		cdcExpect(t, code, out, 1, "invalid PostgreSQL URL")
	})
	t.Run("MissingTable", func(t *testing.T) {
		code, out := cdcRun(t, base(map[string]string{
			"CHANGEFEED_POSTGRES_URL": pg.URL(),
			"CHANGEFEED_ROUTING_FILE": cdcWriteFile(t, "routing.yaml", `
tables:
  - {table: nosuch, document_type: C, id_column: case_id}
`),
		}))
		cdcExpect(t, code, out, 2, "table public.nosuch", "does not exist")
	})
}
