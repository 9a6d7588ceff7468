package e2e_test

// Helpers of the couch-follower tests. Every identifier starts with "couch"
// because other engineers' tests share this package.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/stub"
)

// couchEnv is one test's servers: a CouchDB-API server, PostgreSQL for the
// checkpoints and a Kafka-protocol cluster.
type couchEnv struct {
	t     *testing.T
	couch *testenv.CouchServer
	pg    *testenv.PG
	kafka *testenv.KafkaServer
	bin   string
	hc    *http.Client
}

// couchSetup starts the servers of one test. The tests run in parallel:
// each has its own servers, so that stopping CouchDB or pausing Kafka in
// one does not disturb another.
func couchSetup(t *testing.T) *couchEnv {
	t.Helper()
	t.Parallel()
	start := time.Now()
	e := &couchEnv{
		t:     t,
		couch: testenv.Couch(t),
		pg:    testenv.Postgres(t),
		kafka: testenv.Kafka(t),
		// No compression: pouchdb-server gzips on request.
		hc: &http.Client{Transport: &http.Transport{DisableCompression: true}, Timeout: 30 * time.Second},
	}
	t.Cleanup(e.hc.CloseIdleConnections)
	servers := time.Since(start)
	e.bin = couchBuildFollower(t)
	t.Logf("servers started in %s, follower built in %s", servers.Round(time.Millisecond), (time.Since(start) - servers).Round(time.Millisecond))
	return e
}

// couchBuildFollower builds cmd/couch-follower, the binary the tests run
// and kill.
func couchBuildFollower(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "couch-follower")
	cmd := exec.Command("go", "build", "-ldflags=-s -w", "-o", bin, "github.com/changefeed/changefeed/cmd/couch-follower")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build couch-follower: %v\n%s", err, out)
	}
	return bin
}

func couchCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// do sends a request to the CouchDB server and decodes the JSON answer
// into out (when non-nil). It fails the test on a status not in ok.
func (e *couchEnv) do(ctx context.Context, method, path string, body any, out any, ok ...int) int {
	e.t.Helper()
	status, err := e.try(ctx, e.couch.URL(), method, path, body, out)
	if err != nil {
		e.t.Fatalf("couch %s %s: %v", method, path, err)
	}
	if len(ok) == 0 {
		ok = []int{http.StatusOK, http.StatusCreated, http.StatusAccepted}
	}
	for _, s := range ok {
		if s == status {
			return status
		}
	}
	e.t.Fatalf("couch %s %s: status %d", method, path, status)
	return 0
}

func (e *couchEnv) try(ctx context.Context, base, method, path string, body any, out any) (int, error) {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, base+path, r)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := e.hc.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, err
	}
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("decode %.200s: %w", b, err)
		}
	}
	return resp.StatusCode, nil
}

func (e *couchEnv) createDB(ctx context.Context, db string) {
	e.t.Helper()
	e.do(ctx, http.MethodPut, "/"+db, nil, nil)
}

// bulk writes docs and returns their new revisions by id.
func (e *couchEnv) bulk(ctx context.Context, db string, docs []map[string]any) map[string]string {
	e.t.Helper()
	var res []struct {
		ID, Rev, Error string
	}
	e.do(ctx, http.MethodPost, "/"+db+"/_bulk_docs", map[string]any{"docs": docs}, &res)
	revs := make(map[string]string, len(res))
	for _, r := range res {
		if r.Error != "" {
			e.t.Fatalf("bulk write %s: %s", r.ID, r.Error)
		}
		revs[r.ID] = r.Rev
	}
	return revs
}

// currentRevs returns every live document's winning revision (design
// documents excluded).
func (e *couchEnv) currentRevs(ctx context.Context, db string) map[string]string {
	e.t.Helper()
	var res struct {
		Rows []struct {
			ID    string
			Value struct{ Rev string }
		}
	}
	e.do(ctx, http.MethodGet, "/"+db+"/_all_docs", nil, &res)
	revs := map[string]string{}
	for _, r := range res.Rows {
		if !strings.HasPrefix(r.ID, "_design/") {
			revs[r.ID] = r.Value.Rev
		}
	}
	return revs
}

// couchFollower is one run of the follower binary.
type couchFollower struct {
	t      *testing.T
	cmd    *exec.Cmd
	addr   string
	stdout *couchLines
	stderr *couchLines
	done   chan struct{}
	err    error
}

// couchLines collects a process's output lines.
type couchLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *couchLines) add(s string) {
	l.mu.Lock()
	l.lines = append(l.lines, s)
	l.mu.Unlock()
}

func (l *couchLines) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.lines...)
}

func (l *couchLines) grep(substr string) []string {
	var out []string
	for _, s := range l.all() {
		if strings.Contains(s, substr) {
			out = append(out, s)
		}
	}
	return out
}

// couchFollowerEnv is the follower's configuration for tests: short
// heartbeats, checkpoints and checks so that faults show in seconds.
func (e *couchEnv) followerEnv(couchURL string, dbs ...string) []string {
	return []string{
		"CHANGEFEED_COUCH_URL=" + couchURL,
		"CHANGEFEED_COUCH_DATABASES=" + strings.Join(dbs, ","),
		"CHANGEFEED_POSTGRES_URL=" + e.pg.URL(),
		"CHANGEFEED_KAFKA_BROKERS=" + strings.Join(e.kafka.Brokers(), ","),
		"CHANGEFEED_HTTP_ADDR=127.0.0.1:0",
		"CHANGEFEED_COUCH_HEARTBEAT=500ms",
		"CHANGEFEED_COUCH_CHECKPOINT_EVERY=100",
		"CHANGEFEED_COUCH_CHECKPOINT_INTERVAL=200ms",
		"CHANGEFEED_COUCH_CHECK_INTERVAL=300ms",
		"CHANGEFEED_COUCH_BACKOFF_MAX=1s",
		"CHANGEFEED_COUCH_PROGRESS_INTERVAL=1s",
		"CHANGEFEED_SHUTDOWN_TIMEOUT=10s",
		"CHANGEFEED_KAFKA_PARTITIONS=3",
		"CHANGEFEED_KAFKA_REPLICATION_FACTOR=1", // kfake has one broker
		"CHANGEFEED_KAFKA_MIN_INSYNC_REPLICAS=1",
		"CHANGEFEED_PRINT_STUBS=true",
		"CHANGEFEED_LOG_LEVEL=debug",
	}
}

var couchAddrRE = regexp.MustCompile(`"msg":"http listening".*"addr":"([^"]+)"`)

// startFollower runs the follower with env and waits until its HTTP
// server listens.
func (e *couchEnv) startFollower(env []string) *couchFollower {
	t := e.t
	t.Helper()
	f := &couchFollower{t: t, stdout: &couchLines{}, stderr: &couchLines{}, done: make(chan struct{})}
	f.cmd = exec.Command(e.bin)
	f.cmd.Env = append(os.Environ(), env...)
	outPipe, err := f.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	errPipe, err := f.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := f.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	addr := make(chan string, 1)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		couchScan(outPipe, f.stdout, nil)
	}()
	go func() {
		defer wg.Done()
		couchScan(errPipe, f.stderr, func(line string) {
			if m := couchAddrRE.FindStringSubmatch(line); m != nil {
				select {
				case addr <- m[1]:
				default:
				}
			}
		})
	}()
	go func() {
		wg.Wait()
		f.err = f.cmd.Wait()
		close(f.done)
	}()
	t.Cleanup(func() {
		f.kill()
		if t.Failed() {
			for _, l := range f.stderr.all() {
				t.Log("follower: " + l)
			}
		}
	})
	select {
	case f.addr = <-addr:
	case <-f.done:
		t.Fatalf("follower exited at start: %v\n%s", f.err, strings.Join(f.stderr.all(), "\n"))
	case <-time.After(30 * time.Second):
		t.Fatalf("follower did not listen within 30s\n%s", strings.Join(f.stderr.all(), "\n"))
	}
	return f
}

func couchScan(r io.Reader, into *couchLines, each func(string)) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		into.add(sc.Text())
		if each != nil {
			each(sc.Text())
		}
	}
	_, _ = io.Copy(io.Discard, r)
}

// kill sends SIGKILL and waits for the process to end.
func (f *couchFollower) kill() {
	select {
	case <-f.done:
		return
	default:
	}
	_ = f.cmd.Process.Signal(syscall.SIGKILL)
	<-f.done
}

// stop sends SIGTERM and waits up to 30s for a clean exit.
func (f *couchFollower) stop() {
	f.t.Helper()
	_ = f.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-f.done:
	case <-time.After(30 * time.Second):
		f.kill()
		f.t.Fatal("follower did not exit within 30s of SIGTERM")
	}
	if f.err != nil {
		f.t.Fatalf("follower exited with %v after SIGTERM", f.err)
	}
}

// get fetches a path of the follower's HTTP server.
func (f *couchFollower) get(path string) (int, string) {
	resp, err := http.Get("http://" + f.addr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metric returns the sum of the samples of a metric whose labels contain
// every given label (`db="x"`).
func (f *couchFollower) metric(name string, labels ...string) float64 {
	_, body := f.get("/metrics")
	sum := 0.0
	for _, line := range strings.Split(body, "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		match := true
		for _, l := range labels {
			if !strings.Contains(line, l) {
				match = false
			}
		}
		if !match {
			continue
		}
		fields := strings.Fields(line)
		if v, err := strconv.ParseFloat(fields[len(fields)-1], 64); err == nil {
			sum += v
		}
	}
	return sum
}

// couchEventually polls cond every 50ms until it holds or d passes.
func couchEventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// couchRecord is a stub read from Kafka with its topic.
type couchRecord struct {
	Topic string
	Stub  *stub.Stub
}

// couchConsumer reads every stub of one database from the topics.
type couchConsumer struct {
	mu    sync.Mutex
	byID  map[string][]couchRecord
	total int
}

// couchConsume reads topics from the start in the background until the
// test ends, keeping the stubs of db.
func (e *couchEnv) consume(db string, topics ...string) *couchConsumer {
	t := e.t
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.kafka.Brokers()...), kgo.ConsumeTopics(topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.MetadataMinAge(200*time.Millisecond),
		kgo.FetchMaxWait(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	c := &couchConsumer{byID: map[string][]couchRecord{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			fs := cl.PollFetches(ctx)
			fs.EachRecord(func(r *kgo.Record) {
				s, err := stub.Unmarshal(r.Value)
				if err != nil || s.DataSourceName != db {
					return
				}
				if string(r.Key) != s.DocumentID {
					s.DocumentID = "KEY MISMATCH " + string(r.Key)
				}
				c.mu.Lock()
				c.byID[s.DocumentID] = append(c.byID[s.DocumentID], couchRecord{Topic: r.Topic, Stub: s})
				c.total++
				c.mu.Unlock()
			})
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		cl.Close()
	})
	return c
}

// records returns a copy of the stubs of one document.
func (c *couchConsumer) records(id string) []couchRecord {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]couchRecord(nil), c.byID[id]...)
}

// hasRev reports whether a stub of id with rev was read.
func (c *couchConsumer) hasRev(id, rev string) bool {
	for _, r := range c.records(id) {
		if r.Stub.DocumentRev == rev {
			return true
		}
	}
	return false
}

// missing returns the documents whose revision in want was not read yet.
func (c *couchConsumer) missing(want map[string]string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for id, rev := range want {
		found := false
		for _, r := range c.byID[id] {
			if r.Stub.DocumentRev == rev {
				found = true
				break
			}
		}
		if !found {
			out = append(out, id)
		}
	}
	return out
}

func (c *couchConsumer) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total
}

// waitRevs waits until every document's revision in want was read.
func (c *couchConsumer) waitRevs(t *testing.T, d time.Duration, want map[string]string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		missing := c.missing(want)
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			if len(missing) > 5 {
				missing = missing[:5]
			}
			t.Fatalf("after %s, %d of %d documents have no stub of their latest revision (e.g. %v)",
				d, len(c.missing(want)), len(want), missing)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkpoint reads the stored checkpoint of db ("" when none).
func (e *couchEnv) checkpoint(ctx context.Context, db string) (seq, identity string) {
	e.t.Helper()
	seq, identity, err := e.readCheckpoint(ctx, db)
	if err != nil {
		e.t.Fatalf("read checkpoint: %v", err)
	}
	return seq, identity
}

// readCheckpoint is checkpoint for goroutines other than the test's.
func (e *couchEnv) readCheckpoint(ctx context.Context, db string) (seq, identity string, err error) {
	conn, err := pgx.Connect(ctx, e.pg.URL())
	if err != nil {
		return "", "", err
	}
	defer conn.Close(ctx)
	err = conn.QueryRow(ctx, `SELECT seq, db_identity FROM changefeed.couch_checkpoint WHERE source = 'couch' AND db = $1`, db).Scan(&seq, &identity)
	if err == pgx.ErrNoRows {
		return "", "", nil
	}
	return seq, identity, err
}

// couchSeqNumber is a seq's numeric prefix: an integer seq itself, or
// CouchDB 2/3's "N-…". The tests compare checkpoints with it; the follower
// never orders changes by it.
func couchSeqNumber(t *testing.T, seq string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(strings.SplitN(seq, "-", 2)[0], 10, 64)
	if err != nil {
		t.Fatalf("seq %q has no numeric prefix", seq)
	}
	return n
}

func couchDocs(prefix string, from, to int, fields map[string]any) []map[string]any {
	docs := make([]map[string]any, 0, to-from)
	for i := from; i < to; i++ {
		d := map[string]any{"_id": fmt.Sprintf("%s%05d", prefix, i)}
		for k, v := range fields {
			d[k] = v
		}
		docs = append(docs, d)
	}
	return docs
}
