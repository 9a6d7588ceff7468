package e2e_test

// End-to-end tests of the pillow binary: real PostgreSQL and kfake
// containers (internal/testenv), the built cmd/pillow as a child process,
// the PostgreSQL document store and the reporting-table sink (sink/pgsink).
// Sinks are compared with their sources by full contents.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/stub"
)

const (
	pillowTopic      = "pillow-cases"
	pillowPartitions = 3
)

var (
	pillowBinOnce sync.Once
	pillowBin     string
	pillowBinErr  error
)

// pillowBinary builds cmd/pillow once per test process.
func pillowBinary(t *testing.T) string {
	t.Helper()
	pillowBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "pillow-e2e-")
		if err != nil {
			pillowBinErr = err
			return
		}
		pillowBin = filepath.Join(dir, "pillow")
		out, err := exec.Command("go", "build", "-o", pillowBin, "github.com/changefeed/changefeed/cmd/pillow").CombinedOutput()
		if err != nil {
			pillowBinErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if pillowBinErr != nil {
		t.Fatal(pillowBinErr)
	}
	return pillowBin
}

// pillowRig is one test's world: a source/errors database, optionally a
// separate reporting database, a Kafka container and a producer.
type pillowRig struct {
	t       *testing.T
	ctx     context.Context
	src     *testenv.PG
	srcPool *pgxpool.Pool
	rep     *testenv.PG // reporting database (may equal src)
	repPool *pgxpool.Pool
	kafka   *testenv.KafkaServer
	prod    *kgo.Client
	adm     *kadm.Client
	dir     string
	seq     int
}

type pillowRigOpts struct {
	separateSink bool
}

func newPillowRig(t *testing.T, o pillowRigOpts) *pillowRig {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	r := &pillowRig{t: t, ctx: ctx, dir: t.TempDir()}
	r.kafka = testenv.Kafka(t, testenv.WithPartitions(pillowPartitions))
	r.src = testenv.Postgres(t)
	r.rep = r.src
	if o.separateSink {
		r.rep = testenv.Postgres(t)
	}
	if err := migrations.Up(ctx, r.src.URL(), nil); err != nil {
		t.Fatal(err)
	}
	var err error
	if r.srcPool, err = pgxpool.New(ctx, r.src.URL()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.srcPool.Close)
	r.repPool = r.srcPool
	if o.separateSink {
		if r.repPool, err = pgxpool.New(ctx, r.rep.URL()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(r.repPool.Close)
	}
	r.exec(r.srcPool, `CREATE TABLE cases (id text PRIMARY KEY, doc_type text NOT NULL, domain text NOT NULL, name text, n int)`)
	// The publisher routes by doc_type, which a DELETE carries only with FULL.
	r.exec(r.srcPool, `ALTER TABLE cases REPLICA IDENTITY FULL`)
	r.prod, err = kgo.NewClient(kgo.SeedBrokers(r.kafka.Brokers()...), kgo.DefaultProduceTopic(pillowTopic))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.prod.Close)
	r.adm = kadm.NewClient(r.prod)
	resp, err := r.adm.CreateTopics(ctx, pillowPartitions, 1, nil, pillowTopic)
	if err != nil || (resp[pillowTopic].Err != nil && !strings.Contains(resp[pillowTopic].Err.Error(), "EXISTS")) {
		t.Fatalf("create topic: %v %v", err, resp[pillowTopic].Err)
	}
	return r
}

func (r *pillowRig) exec(pool *pgxpool.Pool, sql string, args ...any) {
	r.t.Helper()
	if _, err := pool.Exec(r.ctx, sql, args...); err != nil {
		r.t.Fatalf("%s: %v", sql, err)
	}
}

// writeFile writes the pillows file: one pillow per name, each writing its
// own reporting table "rep_<name>" in the reporting database.
func (r *pillowRig) writeFile(names ...string) string {
	r.t.Helper()
	return r.writeFileBatch(50, names...)
}

// writeFileBatch is writeFile with batches of at most maxStubs stubs.
func (r *pillowRig) writeFileBatch(maxStubs int, names ...string) string {
	r.t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, `stores:
  postgres:
    - url: ${PILLOW_SRC_URL}
      tables:
        - {source: cases, table: cases, id_column: id, type_column: doc_type, domain_column: domain}
pillows:
`)
	for _, n := range names {
		fmt.Fprintf(&b, `  - name: %s
    topics: [%s]
    batch: {max_stubs: %d, max_wait: 20ms}
    retry: {max_attempts: 3, backoff: 1s, interval: 200ms}
    processors:
      - postgres:
          url: ${PILLOW_REP_URL}
          table: rep_%s
          columns:
            - {name: name, type: text}
            - {name: n, type: integer}
`, n, pillowTopic, maxStubs, strings.ReplaceAll(n, "-", "_"))
	}
	path := filepath.Join(r.dir, "pillows.yaml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		r.t.Fatal(err)
	}
	return path
}

func (r *pillowRig) environ(file string) []string {
	return append(os.Environ(),
		"CHANGEFEED_KAFKA_BROKERS="+strings.Join(r.kafka.Brokers(), ","),
		"CHANGEFEED_POSTGRES_URL="+r.src.URL(),
		"CHANGEFEED_PILLOWS_FILE="+file,
		"CHANGEFEED_HTTP_ADDR=127.0.0.1:0",
		"PILLOW_SRC_URL="+r.src.URL(),
		"PILLOW_REP_URL="+r.rep.URL(),
	)
}

// pillowProc is a running pillow binary.
type pillowProc struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	done   chan struct{}
	err    error
}

func (r *pillowRig) startPillow(file string, args ...string) *pillowProc {
	r.t.Helper()
	cmd := exec.Command(pillowBinary(r.t), append([]string{"run", "--commit-interval", "200ms", "--session-timeout", "6s"}, args...)...)
	cmd.Env = r.environ(file)
	p := &pillowProc{cmd: cmd, stderr: &bytes.Buffer{}, done: make(chan struct{})}
	cmd.Stderr = &lockedWriter{w: p.stderr}
	if err := cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	r.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.done
		if r.t.Failed() {
			r.t.Logf("pillow stderr (tail):\n%s", tail(p.output(), 4000))
		}
	})
	return p
}

type lockedWriter struct {
	mu sync.Mutex
	w  interface {
		Write([]byte) (int, error)
		String() string
	}
}

func (l *lockedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.String()
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// waitLog waits until the process logged s (e.g. "partitions assigned").
func (p *pillowProc) waitLog(t *testing.T, s string) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, func() string {
		if strings.Contains(p.output(), s) {
			return ""
		}
		return "pillow has not logged " + s
	})
}

func (p *pillowProc) output() string {
	lw := p.cmd.Stderr.(*lockedWriter)
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.w.String()
}

// httpAddr returns the address the process's HTTP server listens on.
func (p *pillowProc) httpAddr(t *testing.T) string {
	t.Helper()
	p.waitLog(t, `"msg":"http listening"`)
	for _, line := range strings.Split(p.output(), "\n") {
		var l struct {
			Msg  string `json:"msg"`
			Addr string `json:"addr"`
		}
		if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "http listening" {
			return l.Addr
		}
	}
	t.Fatal("no http listening line")
	return ""
}

// wait waits for the process to exit and returns its exit code.
func (p *pillowProc) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("pillow did not exit within %s", timeout)
	}
	return p.cmd.ProcessState.ExitCode()
}

func (p *pillowProc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// runCLI runs a non-daemon pillow command and returns its exit code and
// output.
func (r *pillowRig) runCLI(file string, args ...string) (int, string) {
	r.t.Helper()
	cmd := exec.Command(pillowBinary(r.t), args...)
	cmd.Env = r.environ(file)
	out, _ := cmd.CombinedOutput()
	return cmd.ProcessState.ExitCode(), string(out)
}

// pillowChange is one version of a source document.
type pillowChange struct {
	id      string
	lsn     uint64
	deleted bool
	name    string
}

// pillowHistory: n documents, v versions each, every deleteEvery-th
// document ends deleted. Returns every change and the final states.
func pillowHistory(prefix string, n, v, deleteEvery int, lsn0 uint64) ([]pillowChange, map[string]pillowChange) {
	var all []pillowChange
	final := map[string]pillowChange{}
	lsn := lsn0
	for i := range n {
		id := fmt.Sprintf("%s-%04d", prefix, i)
		for j := 1; j <= v; j++ {
			lsn++
			c := pillowChange{id: id, lsn: lsn, name: fmt.Sprintf("%s-v%d", id, j)}
			if deleteEvery > 0 && i%deleteEvery == 0 && j == v {
				c.deleted = true
			}
			all = append(all, c)
			final[id] = c
		}
	}
	return all, final
}

func (r *pillowRig) apply(final map[string]pillowChange) {
	r.t.Helper()
	batch := &pgxBatch{}
	for _, c := range final {
		if c.deleted {
			batch.add(`DELETE FROM cases WHERE id = $1`, c.id)
		} else {
			batch.add(`INSERT INTO cases (id, doc_type, domain, name, n) VALUES ($1, 'case', 'demo', $2, $3)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, n = excluded.n`, c.id, c.name, int(c.lsn))
		}
	}
	batch.run(r)
}

func (r *pillowRig) produce(cs ...pillowChange) {
	r.t.Helper()
	recs := make([]*kgo.Record, len(cs))
	for i, c := range cs {
		s := &stub.Stub{
			DocumentID: c.id, DataSourceType: stub.SourceSQL, DataSourceName: "cases",
			DocumentType: "case", Domain: "demo", IsDeletion: c.deleted,
			PublishTimestamp: time.Now(), LSN: stub.LSN(c.lsn), TxOrdinal: 1,
		}
		b, err := json.Marshal(s)
		if err != nil {
			r.t.Fatal(err)
		}
		recs[i] = &kgo.Record{Key: []byte(c.id), Value: b}
	}
	if err := r.prod.ProduceSync(r.ctx, recs...).FirstErr(); err != nil {
		r.t.Fatal(err)
	}
}

// state reads id → name of a query's rows.
func (r *pillowRig) state(pool *pgxpool.Pool, sql string) map[string]string {
	r.t.Helper()
	rows, err := pool.Query(r.ctx, sql)
	if err != nil {
		return map[string]string{"<error>": err.Error()}
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var id string
		var name *string
		if err := rows.Scan(&id, &name); err != nil {
			r.t.Fatal(err)
		}
		if name != nil {
			out[id] = *name
		} else {
			out[id] = ""
		}
	}
	if rows.Err() != nil {
		return map[string]string{"<error>": rows.Err().Error()}
	}
	return out
}

func (r *pillowRig) source() map[string]string {
	return r.state(r.srcPool, `SELECT id, name FROM cases`)
}

func (r *pillowRig) sink(name string) map[string]string {
	return r.state(r.repPool, fmt.Sprintf(`SELECT doc_id, name FROM rep_%s_live`, strings.ReplaceAll(name, "-", "_")))
}

func (r *pillowRig) errorRows(pillow string) int {
	r.t.Helper()
	var n int
	if err := r.srcPool.QueryRow(r.ctx, `SELECT count(*) FROM changefeed.pillow_errors WHERE pillow = $1`, pillow).Scan(&n); err != nil {
		r.t.Fatal(err)
	}
	return n
}

// pgxBatch sends many statements in one round trip.
type pgxBatch struct {
	sqls []string
	args [][]any
}

func (b *pgxBatch) add(sql string, args ...any) {
	b.sqls = append(b.sqls, sql)
	b.args = append(b.args, args)
}

func (b *pgxBatch) run(r *pillowRig) {
	r.t.Helper()
	tx, err := r.srcPool.Begin(r.ctx)
	if err != nil {
		r.t.Fatal(err)
	}
	defer tx.Rollback(r.ctx) //nolint:errcheck
	for i, s := range b.sqls {
		if _, err := tx.Exec(r.ctx, s, b.args[i]...); err != nil {
			r.t.Fatal(err)
		}
	}
	if err := tx.Commit(r.ctx); err != nil {
		r.t.Fatal(err)
	}
}

// lag returns "" when group has committed every partition's end offset.
func (r *pillowRig) lag(group string) string {
	r.t.Helper()
	lags, err := r.adm.Lag(r.ctx, group)
	if err != nil {
		return err.Error()
	}
	l := lags[group]
	if l.Error() != nil {
		return l.Error().Error()
	}
	if total := l.Lag.Total(); total != 0 {
		return fmt.Sprintf("group %s lags by %d records", group, total)
	}
	return ""
}
