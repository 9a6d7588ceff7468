package e2e_test

// The built cdc-publisher against kfake with SASL enabled: settings from the
// environment only, stubs published and acknowledged, SIGTERM exits 0, and
// neither password shows in the output.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/e2e/internal/faultenv"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/stub"
)

const cdcKafkaSecret = "kafka-pass-not-for-logs"

// cdcProc is a publisher process running in the background.
type cdcProc struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	out  bytes.Buffer
	done chan struct{}
	err  error
}

func (p *cdcProc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.Write(b)
}

func (p *cdcProc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

func cdcStart(t *testing.T, env map[string]string, args ...string) *cdcProc {
	t.Helper()
	p := &cdcProc{done: make(chan struct{})}
	p.cmd = exec.Command(faultenv.PublisherBinary(t), args...)
	p.cmd.Env = cdcEnv(env)
	p.cmd.Stdout, p.cmd.Stderr = p, p
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("publisher output:\n%s", p.output())
		}
	})
	return p
}

// stop sends SIGTERM and returns the exit status.
func (p *cdcProc) stop(t *testing.T) int {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(time.Minute):
		t.Fatal("publisher did not exit within a minute of SIGTERM")
	}
	var exit *exec.ExitError
	if errors.As(p.err, &exit) {
		return exit.ExitCode()
	}
	return 0
}

func (p *cdcProc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

func TestCDCKafkaSASL(t *testing.T) {
	pg := testenv.Postgres(t, testenv.WithPassword(cdcSecret))
	pg.Exec(t, "CREATE TABLE cases (case_id text PRIMARY KEY, domain text)")
	routing := cdcWriteFile(t, "routing.yaml", `
tables:
  - {table: cases, topic: case-sql, document_type: CommCareCase, id_column: case_id, domain_column: domain}
`)
	for i, mech := range []string{"SCRAM-SHA-256", "SCRAM-SHA-512"} {
		t.Run(mech, func(t *testing.T) {
			kafka := testenv.Kafka(t, testenv.WithSASL(mech, "changefeed", cdcKafkaSecret))
			slot := strings.ToLower(strings.ReplaceAll(mech, "-", "_"))
			env := map[string]string{
				"CHANGEFEED_POSTGRES_URL":         pg.URL(),
				"CHANGEFEED_KAFKA_BROKERS":        strings.Join(kafka.Brokers(), ","),
				"CHANGEFEED_KAFKA_SASL_MECHANISM": mech,
				"CHANGEFEED_KAFKA_SASL_USER":      "changefeed",
				"CHANGEFEED_KAFKA_SASL_PASSWORD":  cdcKafkaSecret,
				"CHANGEFEED_SLOT":                 slot,
				"CHANGEFEED_PUBLICATION":          slot,
				"CHANGEFEED_ROUTING_FILE":         routing,
				"CHANGEFEED_HTTP_ADDR":            "off",
				"CHANGEFEED_STATUS_INTERVAL":      "100ms",
				// kfake has one broker.
				"CHANGEFEED_KAFKA_REPLICATION_FACTOR":  "1",
				"CHANGEFEED_KAFKA_MIN_INSYNC_REPLICAS": "1",
			}

			if i == 0 {
				cdcWrongKafkaPassword(t, env)
			}
			p := cdcStart(t, env, "--print-stubs")
			ctx := context.Background()
			conn, err := pgx.Connect(ctx, pg.URL())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			faultenv.Poll(t, time.Minute, 50*time.Millisecond, "slot streamed", func() bool {
				var active bool
				err := conn.QueryRow(ctx, "SELECT active FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&active)
				return err == nil && active
			})
			id := "sasl-" + slot
			if _, err := conn.Exec(ctx, "INSERT INTO cases VALUES ($1, 'd')", id); err != nil {
				t.Fatal(err)
			}

			opts, err := kafkaconn.Config{Brokers: kafka.Brokers(), SASLMechanism: mech, SASLUser: "changefeed", SASLPassword: cdcKafkaSecret}.Opts()
			if err != nil {
				t.Fatal(err)
			}
			cl, err := kgo.NewClient(append(opts, kgo.ConsumeTopics("case-sql"), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))...)
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			var got *stub.Stub
			deadline := time.Now().Add(time.Minute)
			for got == nil && time.Now().Before(deadline) {
				pctx, cancel := context.WithTimeout(ctx, time.Second)
				fs := cl.PollFetches(pctx)
				cancel()
				fs.EachRecord(func(r *kgo.Record) {
					s, err := stub.Unmarshal(r.Value)
					if err == nil && s.DocumentID == id {
						got = s
					}
				})
			}
			if got == nil {
				t.Fatalf("stub %s not in Kafka", id)
			}
			if got.Domain != "d" || got.DocumentType != "CommCareCase" || got.LSN == 0 {
				t.Errorf("stub = %+v", got)
			}
			// --print-stubs prints acknowledged stubs on stdout.
			faultenv.Poll(t, time.Minute, 50*time.Millisecond, "stub printed", func() bool {
				for _, line := range strings.Split(p.output(), "\n") {
					var rec struct {
						Topic string          `json:"topic"`
						Value json.RawMessage `json:"value"`
					}
					if json.Unmarshal([]byte(line), &rec) == nil && rec.Topic == "case-sql" && strings.Contains(string(rec.Value), id) {
						return true
					}
				}
				return false
			})
			if code := p.stop(t); code != 0 {
				t.Errorf("exit %d after SIGTERM, want 0", code)
			}
			out := p.output()
			if strings.Contains(out, cdcKafkaSecret) || strings.Contains(out, cdcSecret) {
				t.Error("output contains a password")
			}
			// After SIGTERM the slot is confirmed past the stub's commit.
			var confirmed string
			if err := conn.QueryRow(ctx, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&confirmed); err != nil {
				t.Fatal(err)
			}
			if c, err := stub.ParseLSN(confirmed); err != nil || c <= got.LSN {
				t.Errorf("slot confirmed %s, not past the stub's commit %s (%v)", confirmed, got.LSN, err)
			}
		})
	}
}

// cdcWrongKafkaPassword: with a wrong SASL password the publisher stays up,
// retrying, never streams, and exits 0 on SIGTERM.
func cdcWrongKafkaPassword(t *testing.T, env map[string]string) {
	t.Helper()
	bad := map[string]string{}
	for k, v := range env {
		bad[k] = v
	}
	bad["CHANGEFEED_KAFKA_SASL_PASSWORD"] = cdcKafkaSecret + "-wrong"
	bp := cdcStart(t, bad)
	faultenv.Poll(t, time.Minute, 50*time.Millisecond, "retry logged", func() bool {
		return strings.Contains(bp.output(), "cannot create Kafka topics; retrying")
	})
	if !bp.running() {
		t.Fatal("publisher exited on a Kafka authentication failure")
	}
	if code := bp.stop(t); code != 0 {
		t.Errorf("exit %d after SIGTERM", code)
	}
	if strings.Contains(bp.output(), cdcKafkaSecret) {
		t.Error("output contains the Kafka password")
	}

	// Left alone, the refusal ends the process after --kafka-fail-after
	// with exit 2 and the cause, logged once.
	bad["CHANGEFEED_KAFKA_FAIL_AFTER"] = "2s"
	bp = cdcStart(t, bad)
	select {
	case <-bp.done:
	case <-time.After(time.Minute):
		t.Fatal("publisher still running a minute after a SASL refusal with --kafka-fail-after 2s")
	}
	var exit *exec.ExitError
	if !errors.As(bp.err, &exit) || exit.ExitCode() != 2 {
		t.Fatalf("exit %v after a lasting SASL refusal, want 2", bp.err)
	}
	out := bp.output()
	if n := strings.Count(out, "retrying cannot cure"); n != 1 || !strings.Contains(out, "SASL") {
		t.Errorf("%d lines naming the lasting refusal, want 1 naming SASL", n)
	}
	if strings.Contains(out, cdcKafkaSecret) {
		t.Error("output contains the Kafka password")
	}
}
