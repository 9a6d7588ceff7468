package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/bench/cdcbench/walbench"
	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/stub"
)

func numCPU() int { return runtime.NumCPU() }

// publisherRunner measures cmd/cdc-publisher end to end.
type publisherRunner struct {
	c      config
	conn   *pgx.Conn
	d      walbench.Dataset
	bin    string
	tmp    string
	stderr io.Writer
}

func newPublisherRunner(ctx context.Context, c config, conn *pgx.Conn, d walbench.Dataset, stderr io.Writer) (*publisherRunner, error) {
	tmp, err := os.MkdirTemp("", "cdcbench-")
	if err != nil {
		return nil, err
	}
	p := &publisherRunner{c: c, conn: conn, d: d, bin: c.publisherBin, tmp: tmp, stderr: stderr}
	if p.bin == "" {
		p.bin = filepath.Join(tmp, "cdc-publisher")
		if err := buildPublisher(ctx, p.bin); err != nil {
			p.close()
			return nil, err
		}
	}
	// The publisher applies migrations itself; applying them here lets the
	// checkpoint row be written before it starts.
	if err := migrations.Up(ctx, c.url, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		p.close()
		return nil, err
	}
	return p, nil
}

func (p *publisherRunner) close() { _ = os.RemoveAll(p.tmp) }

// buildPublisher builds ./cmd/cdc-publisher of the module around the
// working directory.
func buildPublisher(ctx context.Context, out string) error {
	gomod, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil || strings.TrimSpace(string(gomod)) == "" || strings.TrimSpace(string(gomod)) == os.DevNull {
		return errors.New("build cdc-publisher: run inside the changefeed module or pass -publisher-bin")
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/cdc-publisher")
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(gomod)))
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build cdc-publisher: %w\n%s", err, b)
	}
	return nil
}

// run measures one publisher run on a fresh copy of the dataset's slot, into
// a topic of its own.
func (p *publisherRunner) run(ctx context.Context, run int) (result, error) {
	res := result{what: "publisher", run: run}
	brokers := strings.Split(p.c.kafkaBrokers, ",")
	if p.c.kafkaBrokers == "" {
		cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.DefaultNumPartitions(p.c.partitions))
		if err != nil {
			return res, fmt.Errorf("start kfake: %w", err)
		}
		defer cluster.Close()
		brokers = cluster.ListenAddrs()
	}
	topic := fmt.Sprintf("cdcbench-%s-%d-%d", p.d.Name, run, time.Now().Unix())

	slot, err := walbench.CopySlot(ctx, p.conn, p.d, fmt.Sprintf("pub%d", run))
	if err != nil {
		return res, err
	}
	defer func() {
		if err := walbench.DropSlot(context.Background(), p.conn, slot); err != nil {
			fmt.Fprintf(p.stderr, "cdcbench: drop slot %s: %v\n", slot, err)
		}
		_, _ = p.conn.Exec(context.Background(), `DELETE FROM changefeed.cdc_checkpoint WHERE slot_name = $1`, slot)
	}()
	// The copy is the publisher's slot at the dataset's start: record that
	// as its checkpoint, as if the publisher had created it there.
	if _, err := p.conn.Exec(ctx, `INSERT INTO changefeed.cdc_checkpoint (slot_name, confirmed_lsn)
		VALUES ($1, $2::pg_lsn) ON CONFLICT (slot_name) DO UPDATE SET confirmed_lsn = EXCLUDED.confirmed_lsn, updated_at = now()`,
		slot, p.d.StartLSN.String()); err != nil {
		return res, fmt.Errorf("write checkpoint: %w", err)
	}
	routing := filepath.Join(p.tmp, fmt.Sprintf("routing-%d.yaml", run))
	if err := os.WriteFile(routing, []byte(routingYAML(p.d, topic)), 0o600); err != nil {
		return res, err
	}
	metrics, err := freeAddr()
	if err != nil {
		return res, err
	}

	adm, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		return res, err
	}
	defer adm.Close()
	admin := kadm.NewClient(adm)

	logPath := filepath.Join(p.tmp, fmt.Sprintf("publisher-%d.log", run))
	logf, err := os.Create(logPath)
	if err != nil {
		return res, err
	}
	defer logf.Close()
	cmd := exec.Command(p.bin)
	cmd.Env = append(os.Environ(),
		"CHANGEFEED_POSTGRES_URL="+p.c.url,
		"CHANGEFEED_KAFKA_BROKERS="+strings.Join(brokers, ","),
		"CHANGEFEED_SLOT="+slot,
		"CHANGEFEED_PUBLICATION="+p.d.Publication,
		"CHANGEFEED_ROUTING_FILE="+routing,
		"CHANGEFEED_KAFKA_PARTITIONS="+strconv.Itoa(p.c.partitions),
		// The bench runs kfake (one broker); $CHANGEFEED_KAFKA_* in pubEnv overrides.
		"CHANGEFEED_KAFKA_REPLICATION_FACTOR=1",
		"CHANGEFEED_KAFKA_MIN_INSYNC_REPLICAS=1",
		"CHANGEFEED_HTTP_ADDR="+metrics,
	)
	cmd.Env = append(cmd.Env, p.c.pubEnv...)
	cmd.Stdout, cmd.Stderr = logf, logf
	started := time.Now()
	if err := cmd.Start(); err != nil {
		return res, fmt.Errorf("start %s: %w", p.bin, err)
	}
	// exited is closed when the process is gone; waitErr is then set.
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	s := sampleRSS(cmd.Process.Pid, 50*time.Millisecond)
	fail := func(err error) (result, error) {
		_ = cmd.Process.Kill()
		<-exited
		s.finish()
		return res, fmt.Errorf("publisher run %d: %w; its log ends with:\n%s", run, err, tail(logPath, 20))
	}

	// t0: the slot becomes active (START_REPLICATION).
	var t0 time.Time
	var walsender uint32
	if err := poll(ctx, exited, 2*time.Minute, 10*time.Millisecond, func() (bool, error) {
		var active bool
		var pid *int32
		err := p.conn.QueryRow(ctx, `SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&active, &pid)
		if active && pid != nil {
			t0, walsender = time.Now(), uint32(*pid)
		}
		return active && pid != nil, err
	}); err != nil {
		return fail(fmt.Errorf("waiting for the slot to become active: %w", err))
	}
	res.startup = t0.Sub(started)
	s.record(true)
	selfCPU0 := selfCPU()

	// t1: every stub is in Kafka (sum of the topic's high watermarks).
	if err := poll(ctx, exited, time.Hour, 25*time.Millisecond, func() (bool, error) {
		n, err := endOffsets(ctx, admin, topic)
		if n >= p.d.Changes {
			res.elapsed = time.Since(t0)
		}
		return n >= p.d.Changes, err
	}); err != nil {
		return fail(fmt.Errorf("waiting for %d stubs in Kafka: %w", p.d.Changes, err))
	}
	s.record(false)
	// Read now: after the dataset the walsender goes on decoding whatever
	// WAL follows (filtered out by the publication, but decoded).
	walCPU, _ := walbench.WalsenderCPU(walsender)
	if p.c.kafkaBrokers == "" {
		// This process's CPU in the window: kfake, plus the polling.
		res.note += fmt.Sprintf("kfake+bench CPU %.2f µs/chg; ", float64((selfCPU()-selfCPU0).Microseconds())/float64(p.d.Changes))
	}

	// t2: the slot confirmed the whole dataset.
	if err := poll(ctx, exited, 2*time.Minute, 25*time.Millisecond, func() (bool, error) {
		var ok bool
		err := p.conn.QueryRow(ctx, `SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1`,
			slot, p.d.EndLSN.String()).Scan(&ok)
		if ok {
			res.confirm = time.Since(t0)
		}
		return ok, err
	}); err != nil {
		return fail(fmt.Errorf("waiting for confirmed_flush_lsn >= %s: %w", p.d.EndLSN, err))
	}

	// The peak RSS so far (start-up and the measured run); the shutdown
	// that follows is not measured.
	peak, peakErr := readStatus(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid), "VmHWM:")
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		err = waitErr
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		err = waitErr
		res.note += "did not exit within 30s of SIGTERM; "
	}
	if err != nil {
		res.note += fmt.Sprintf("exit: %v; ", err)
	}
	res.usage = childUsage(cmd.ProcessState)
	res.usage.p50RSS, res.usage.p95RSS, res.usage.nSamples = s.finish()
	res.usage.maxRSS = peak
	res.usage.walCPU = walCPU
	if peakErr != nil {
		res.note += fmt.Sprintf("peak RSS unknown: %v; ", peakErr)
	}
	res.changes = p.d.Changes

	if p.c.verify {
		distinct, total, err := countStubs(ctx, brokers, topic)
		if err != nil {
			return res, fmt.Errorf("publisher run %d: verify: %w", run, err)
		}
		if distinct != p.d.Changes {
			return res, fmt.Errorf("publisher run %d: topic holds %d distinct changes, the dataset has %d", run, distinct, p.d.Changes)
		}
		if total != distinct {
			res.note += fmt.Sprintf("%d duplicates; ", total-distinct)
		}
	}
	return res, nil
}

// routingYAML routes the dataset's table to topic, as an HQ case table.
func routingYAML(d walbench.Dataset, topic string) string {
	return fmt.Sprintf(`tables:
  - table: public.%s
    topic: %s
    data_source_name: %s
    document_type: CommCareCase
    id_column: id
    domain_column: domain
    subtype_column: type
    deletion:
      column: deleted
`, d.Table, topic, d.Table)
}

// poll calls check every interval until it reports done, the process
// exits, or limit passes.
func poll(ctx context.Context, exited <-chan struct{}, limit, interval time.Duration, check func() (bool, error)) error {
	deadline := time.Now().Add(limit)
	var last error
	for {
		done, err := check()
		if done {
			return nil
		}
		last = err
		if time.Now().After(deadline) {
			return fmt.Errorf("not done after %s (last error: %v)", limit, last)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-exited:
			return errors.New("publisher exited")
		case <-time.After(interval):
		}
	}
}

// endOffsets is the sum of the topic's high watermarks: the number of
// records it holds (nothing is deleted during a run).
func endOffsets(ctx context.Context, admin *kadm.Client, topic string) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	offs, err := admin.ListEndOffsets(ctx, topic)
	if err != nil {
		return 0, err
	}
	var n int64
	var perr error
	offs.Each(func(o kadm.ListedOffset) {
		if o.Err != nil {
			perr = o.Err
			return
		}
		n += o.Offset
	})
	return n, perr
}

// countStubs reads the whole topic and counts its records and its distinct
// changes (commit LSN, ordinal).
func countStubs(ctx context.Context, brokers []string, topic string) (distinct, total int64, err error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		return 0, 0, err
	}
	defer cl.Close()
	admin := kadm.NewClient(cl)
	ends, err := admin.ListEndOffsets(ctx, topic)
	if err != nil {
		return 0, 0, err
	}
	want := map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) { want[o.Partition] = o.Offset })
	offsets := map[string]map[int32]kgo.Offset{topic: {}}
	for p := range want {
		offsets[topic][p] = kgo.NewOffset().AtStart()
	}
	cl.AddConsumePartitions(offsets)
	seen := make(map[stub.SQLVersion]struct{}, 1<<16)
	got := map[int32]int64{}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	for done := false; !done; {
		fs := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			return 0, 0, err
		}
		var ferr error
		fs.EachError(func(_ string, _ int32, err error) { ferr = err })
		if ferr != nil {
			return 0, 0, ferr
		}
		for it := fs.RecordIter(); !it.Done(); {
			r := it.Next()
			s, err := stub.Unmarshal(r.Value)
			if err != nil {
				return 0, 0, fmt.Errorf("record %d/%d: %w: key %q value %q", r.Partition, r.Offset, err, r.Key, r.Value)
			}
			seen[s.SQLVersion()] = struct{}{}
			total++
			got[r.Partition] = r.Offset + 1
		}
		done = true
		for p, end := range want {
			if got[p] < end {
				done = false
			}
		}
	}
	return int64(len(seen)), total, nil
}

// selfCPU is this process's CPU time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
