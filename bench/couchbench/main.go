// Command couchbench measures the couch-follower against the floor of
// reading a _changes feed, on one machine and the same database.
//
//	couchbench -url http://127.0.0.1:5984 -db bench [-docs 20000] [-runs 3]
//
// (a) The floor is a bare kivik client reading the database's whole
// _changes feed (continuous, include_docs, from seq 0, the same transport
// settings as the follower) and discarding every row.
// (b) The follower is couchsource.Follower end to end: the same feed, the
// projection, a stub per change, produced to Kafka, counted when Kafka
// acknowledges it, checkpoints written (in memory unless -postgres-url is
// given). Kafka is kfake running in this parent process unless
// -kafka-brokers is given: it shares the machine's cores but not the
// measured process's memory.
//
// Each run is a child process, so that its max RSS is its own; the phases
// alternate a, b, a, b… and the median of -runs is reported. With -docs,
// the database is created and filled to that many documents first (about
// 1 KiB each, CommCare-like doc types). The CouchDB URL may carry
// credentials; it is passed to children in the environment, not argv.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	kivik "github.com/go-kivik/kivik/v4"
	"github.com/go-kivik/kivik/v4/couchdb"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/changefeed/changefeed/couchsource"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/publish"
	"github.com/changefeed/changefeed/stub"
)

const (
	urlEnv      = "COUCHBENCH_URL"
	postgresEnv = "COUCHBENCH_POSTGRES_URL"
)

type options struct {
	url, db     string
	docs, runs  int
	brokers     string
	postgresURL string
	phase       string
	changes     int
	heartbeat   time.Duration
	timeout     time.Duration
	partitions  int
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "couchbench:", couchsource.NewMasker(couchsource.CouchPassword(os.Getenv(urlEnv))).String(err.Error()))
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, out io.Writer) error {
	var o options
	fs := flag.NewFlagSet("couchbench", flag.ContinueOnError)
	fs.StringVar(&o.url, "url", "", "CouchDB URL (credentials allowed; default $"+urlEnv+" or $CHANGEFEED_COUCH_URL)")
	fs.StringVar(&o.db, "db", "couchbench", "database to read")
	fs.IntVar(&o.docs, "docs", 0, "create the database and fill it to this many documents first (0: use it as it is)")
	fs.IntVar(&o.runs, "runs", 3, "runs of each phase; the median is reported")
	fs.StringVar(&o.brokers, "kafka-brokers", "", "Kafka brokers (default: kfake in this process)")
	fs.StringVar(&o.postgresURL, "postgres-url", "", "store checkpoints in this PostgreSQL (default: in memory; $"+postgresEnv+")")
	fs.DurationVar(&o.heartbeat, "heartbeat", 5*time.Second, "feed heartbeat")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Minute, "bound of one run")
	fs.IntVar(&o.partitions, "partitions", 3, "partitions of the topics")
	fs.StringVar(&o.phase, "phase", "", "internal: run one phase (floor or follower) in this process")
	fs.IntVar(&o.changes, "changes", 0, "internal: the feed's number of rows")
	if err := fs.Parse(args); err != nil {
		return err
	}
	for _, v := range []string{o.url, os.Getenv(urlEnv), os.Getenv("CHANGEFEED_COUCH_URL")} {
		if o.url == "" {
			o.url = v
		}
	}
	if o.url == "" {
		return errors.New("no CouchDB URL: -url or $" + urlEnv)
	}
	if o.postgresURL == "" {
		o.postgresURL = os.Getenv(postgresEnv)
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	switch o.phase {
	case "floor":
		return report(out, func() (int, time.Duration, error) { return floor(ctx, o) })
	case "follower":
		return report(out, func() (int, time.Duration, error) { return follow(ctx, o) })
	case "":
		return compare(ctx, o, out)
	default:
		return fmt.Errorf("unknown -phase %q", o.phase)
	}
}

// result is a child's report.
type result struct {
	Changes int     `json:"changes"`
	Seconds float64 `json:"seconds"`
	// RSS is the child's peak resident set in KiB (VmHWM). rusage's
	// ru_maxrss is no use here: a child inherits the high-water mark of
	// the parent it was forked from, which holds kfake's records.
	RSS int64 `json:"rss_kib"`
}

func (r result) rate() float64 { return float64(r.Changes) / r.Seconds }

func report(out io.Writer, fn func() (int, time.Duration, error)) error {
	n, d, err := fn()
	if err != nil {
		return err
	}
	return json.NewEncoder(out).Encode(result{Changes: n, Seconds: d.Seconds(), RSS: peakRSS()})
}

// peakRSS returns this process's VmHWM in KiB, 0 if unknown.
func peakRSS() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kib int64
			fmt.Sscanf(strings.TrimSpace(v), "%d", &kib)
			return kib
		}
	}
	return 0
}

func newClient(rawURL string) (*kivik.Client, error) {
	u, user, password, err := splitURL(rawURL)
	if err != nil {
		return nil, err
	}
	// The follower's transport settings: no compression (a gzipped live
	// feed is buffered by some servers).
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.DisableCompression = true
	opts := []kivik.Option{couchdb.OptionHTTPClient(&http.Client{Transport: t})}
	if user != "" {
		opts = append(opts, couchdb.BasicAuth(user, password))
	}
	return kivik.New("couch", u, opts...)
}

// floor reads the feed from seq 0 until it has read o.changes rows.
func floor(ctx context.Context, o options) (int, time.Duration, error) {
	client, err := newClient(o.url)
	if err != nil {
		return 0, 0, err
	}
	start := time.Now()
	ch := client.DB(o.db).Changes(ctx, kivik.Params(map[string]any{
		"feed": "continuous", "since": "0", "include_docs": true, "heartbeat": o.heartbeat.Milliseconds(),
	}))
	defer ch.Close()
	n := 0
	for n < o.changes && ch.Next() {
		if ch.ID() != "" {
			n++
		}
	}
	if n < o.changes {
		return n, 0, fmt.Errorf("floor: feed ended after %d of %d rows: %v", n, o.changes, ch.Err())
	}
	return n, time.Since(start), nil
}

// countingPublisher counts acknowledged stubs and says when all arrived.
type countingPublisher struct {
	*publish.Producer
	want  int64
	acked atomic.Int64
	done  chan struct{}
	end   atomic.Int64 // unix nanos of the last wanted ack
}

func (p *countingPublisher) Publish(ctx context.Context, topic string, s *stub.Stub, done func(error)) {
	p.Producer.Publish(ctx, topic, s, func(err error) {
		done(err)
		if err == nil && p.acked.Add(1) == p.want {
			p.end.Store(time.Now().UnixNano())
			close(p.done)
		}
	})
}

// follow runs the follower from seq 0 until Kafka acknowledged a stub per
// row of the feed.
func follow(ctx context.Context, o options) (int, time.Duration, error) {
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	prod, err := publish.New(kafkaconn.Config{Brokers: strings.Split(o.brokers, ",")},
		publish.Options{Component: "couch", Partitions: int32(o.partitions), ReplicationFactor: 1, MinInsyncReplicas: 1}, log, nil)
	if err != nil {
		return 0, 0, err
	}
	defer prod.Close()
	var store couchsource.Store = &couchsource.MemoryStore{}
	if o.postgresURL != "" {
		pg, err := couchsource.NewPGStore(ctx, o.postgresURL)
		if err != nil {
			return 0, 0, err
		}
		defer pg.Close()
		store = pg
	}
	routing := couchsource.DefaultRouting()
	// Benchmark docs are not design documents; publish whatever comes so
	// that every row yields a stub.
	routing.IncludeDesignDocs = true
	if err := prod.EnsureTopics(ctx, routing.Topics()...); err != nil {
		return 0, 0, err
	}
	pub := &countingPublisher{Producer: prod, want: int64(o.changes), done: make(chan struct{})}
	f, err := couchsource.New(couchsource.Config{
		URL: o.url, Databases: []string{o.db}, Source: fmt.Sprintf("couchbench-%d", time.Now().UnixNano()),
		Routing: routing, Heartbeat: o.heartbeat, Feed: couchsource.FeedContinuous,
	}, pub, store, log, nil)
	if err != nil {
		return 0, 0, err
	}
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	errc := make(chan error, 1)
	start := time.Now()
	go func() { errc <- f.Run(runCtx) }()
	select {
	case <-pub.done:
	case err := <-errc:
		return 0, 0, fmt.Errorf("follower stopped after %d stubs: %v", pub.acked.Load(), err)
	case <-ctx.Done():
		return 0, 0, fmt.Errorf("follower: %d of %d stubs acknowledged: %w", pub.acked.Load(), o.changes, ctx.Err())
	}
	elapsed := time.Unix(0, pub.end.Load()).Sub(start)
	stop()
	if err := <-errc; err != nil {
		return 0, 0, err
	}
	return o.changes, elapsed, nil
}

// compare prepares the database, then runs the phases as children.
func compare(ctx context.Context, o options, out io.Writer) error {
	client, err := newClient(o.url)
	if err != nil {
		return err
	}
	if o.docs > 0 {
		if err := prepare(ctx, client, o); err != nil {
			return err
		}
	}
	n, err := countRows(ctx, client, o.db)
	if err != nil {
		return err
	}
	if n == 0 {
		return fmt.Errorf("database %s has no changes: use -docs", o.db)
	}
	if o.brokers == "" {
		cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(o.partitions))
		if err != nil {
			return err
		}
		defer cluster.Close()
		o.brokers = strings.Join(cluster.ListenAddrs(), ",")
	}
	fmt.Fprintf(out, "database %s: %d changes; Kafka %s; checkpoints %s; %d runs per phase\n",
		o.db, n, kafkaWhere(o), storeWhere(o), o.runs)
	var floors, follows []result
	for i := range o.runs {
		for _, phase := range []string{"floor", "follower"} {
			r, err := child(ctx, o, phase, n)
			if err != nil {
				return fmt.Errorf("%s run %d: %w", phase, i+1, err)
			}
			fmt.Fprintf(out, "  run %d %-8s %7.0f changes/s  %6.2fs  max RSS %5.1f MiB\n", i+1, phase, r.rate(), r.Seconds, float64(r.RSS)/1024)
			if phase == "floor" {
				floors = append(floors, r)
			} else {
				follows = append(follows, r)
			}
		}
	}
	a, b := median(floors), median(follows)
	fmt.Fprintf(out, "(a) floor    (kivik, include_docs, discard): %7.0f changes/s, max RSS %5.1f MiB\n", a.rate(), float64(maxRSS(floors))/1024)
	fmt.Fprintf(out, "(b) follower (end to end, Kafka-acked):      %7.0f changes/s, max RSS %5.1f MiB\n", b.rate(), float64(maxRSS(follows))/1024)
	fmt.Fprintf(out, "ratio b/a = %.2f (target >= 0.70)\n", b.rate()/a.rate())
	return nil
}

func kafkaWhere(o options) string {
	if strings.Contains(o.brokers, "127.0.0.1") {
		return "kfake in the parent process (" + o.brokers + ")"
	}
	return o.brokers
}

func storeWhere(o options) string {
	if o.postgresURL != "" {
		return "PostgreSQL"
	}
	return "in memory"
}

func median(rs []result) result {
	s := slices.Clone(rs)
	slices.SortFunc(s, func(x, y result) int {
		switch {
		case x.rate() < y.rate():
			return -1
		case x.rate() > y.rate():
			return 1
		}
		return 0
	})
	return s[len(s)/2]
}

func maxRSS(rs []result) int64 {
	var m int64
	for _, r := range rs {
		m = max(m, r.RSS)
	}
	return m
}

// child runs one phase in a child process and returns its result and max
// RSS (KiB).
func child(ctx context.Context, o options, phase string, n int) (result, error) {
	self, err := os.Executable()
	if err != nil {
		return result{}, err
	}
	cmd := exec.CommandContext(ctx, self, "-phase", phase, "-db", o.db, "-changes", fmt.Sprint(n),
		"-kafka-brokers", o.brokers, "-heartbeat", o.heartbeat.String(), "-partitions", fmt.Sprint(o.partitions),
		"-timeout", o.timeout.String())
	cmd.Env = append(os.Environ(), urlEnv+"="+o.url, postgresEnv+"="+o.postgresURL)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return result{}, fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	var r result
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		if err := json.Unmarshal(sc.Bytes(), &r); err == nil && r.Changes > 0 {
			break
		}
	}
	if r.Changes == 0 {
		return result{}, fmt.Errorf("no result: %s %s", stdout.String(), stderr.String())
	}
	return r, nil
}

// countRows counts the rows of the feed (one per document).
func countRows(ctx context.Context, client *kivik.Client, db string) (int, error) {
	ch := client.DB(db).Changes(ctx, kivik.Param("since", "0"))
	defer ch.Close()
	n := 0
	for ch.Next() {
		n++
	}
	return n, ch.Err()
}

// prepare creates the database and fills it to o.docs documents.
func prepare(ctx context.Context, client *kivik.Client, o options) error {
	if ok, err := client.DBExists(ctx, o.db); err != nil {
		return err
	} else if !ok {
		if err := client.CreateDB(ctx, o.db); err != nil {
			return err
		}
	}
	st, err := client.DB(o.db).Stats(ctx)
	if err != nil {
		return err
	}
	types := []string{"CommCareCase", "XFormInstance", "CommCareUser", "Group", "Application"}
	for i := int(st.DocCount); i < o.docs; {
		var docs []any
		for ; i < o.docs && len(docs) < 1000; i++ {
			docs = append(docs, map[string]any{
				"_id": fmt.Sprintf("doc%07d", i), "doc_type": types[i%len(types)], "domain": fmt.Sprintf("domain%d", i%20),
				"type": "patient", "xmlns": "http://openrosa.org/formdesigner/bench",
				"properties": map[string]any{"name": fmt.Sprintf("Person %d", i), "notes": strings.Repeat("n", 700), "visits": []int{1, 2, 3, 4, 5}},
			})
		}
		if _, err := client.DB(o.db).BulkDocs(ctx, docs); err != nil {
			return fmt.Errorf("fill %s: %w", o.db, err)
		}
	}
	return nil
}

func splitURL(raw string) (base, user, password string, err error) {
	u, err := parseURL(raw)
	if err != nil {
		return "", "", "", err
	}
	if u.User != nil {
		user = u.User.Username()
		password, _ = u.User.Password()
		u.User = nil
	}
	return u.String(), user, password, nil
}

func parseURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, errors.New("invalid CouchDB URL (not shown: it may hold a password)")
	}
	return u, nil
}
