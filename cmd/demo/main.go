// Command demo runs the whole of changefeed on one machine: it embeds a
// Kafka-protocol cluster (kfake, in memory) unless -kafka-brokers names a real
// one, creates HQ-like tables in PostgreSQL and a CouchDB database, starts the
// cdc-publisher, the couch-follower and a pillow process, writes changes, and
// prints the stubs Kafka carries and the reporting tables the pillow fills.
//
// scripts/demo.sh starts the servers and runs it; see the README.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/embedkafka"
	"github.com/changefeed/changefeed/stub"
)

// Topics the demo's routing uses; created up front so the demo's own
// consumer can subscribe before the first stub.
var demoTopics = []string{"case-sql", "form-sql", "commcare-user", "meta", "changefeed-control"}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

type options struct {
	bin, pgURL, couchURL, brokers, workDir, esURL string
	follow                                        bool
	timeout                                       time.Duration
}

func run() error {
	var o options
	flag.StringVar(&o.bin, "bin", "bin", "directory holding cdc-publisher, couch-follower and pillow")
	flag.StringVar(&o.pgURL, "postgres-url", os.Getenv("CHANGEFEED_POSTGRES_URL"), "PostgreSQL with wal_level=logical")
	flag.StringVar(&o.couchURL, "couch-url", os.Getenv("CHANGEFEED_COUCH_URL"), "CouchDB API server")
	flag.StringVar(&o.brokers, "kafka-brokers", "", "a real Kafka cluster; default: an embedded in-memory kfake cluster")
	flag.StringVar(&o.workDir, "work-dir", ".demo", "where config files and process logs go")
	flag.StringVar(&o.esURL, "es-url", "", "an Elasticsearch cluster to index cases into as well (none can be installed here; optional)")
	flag.BoolVar(&o.follow, "follow", false, "keep running after the demo data is shown; Ctrl-C stops")
	flag.DurationVar(&o.timeout, "timeout", 90*time.Second, "how long to wait for the reporting tables to settle")
	flag.Parse()
	if o.pgURL == "" || o.couchURL == "" {
		return errors.New("-postgres-url and -couch-url are required (scripts/demo.sh sets them)")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	brokers := strings.Split(o.brokers, ",")
	if o.brokers == "" {
		var (
			stopKafka func()
			err       error
		)
		brokers, stopKafka, err = embedkafka.Start()
		if err != nil {
			return err
		}
		defer stopKafka()
		say("embedded Kafka (kfake, in memory) on %s", strings.Join(brokers, ","))
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(demoTopics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		return err
	}
	defer cl.Close()
	if _, err := kadm.NewClient(cl).CreateTopics(ctx, 3, -1, nil, demoTopics...); err != nil {
		return fmt.Errorf("create topics: %w", err)
	}

	conn, err := pgx.Connect(ctx, o.pgURL)
	if err != nil {
		return fmt.Errorf("connect postgres: %w", err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, schema); err != nil {
		return fmt.Errorf("create demo schema: %w", err)
	}
	if err := couch(ctx, http.MethodPut, o.couchURL+"/commcarehq", nil); err != nil {
		return err
	}

	dir, err := filepath.Abs(o.workDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(dir, "logs"), 0o755); err != nil {
		return err
	}
	routing := filepath.Join(dir, "routing.yaml")
	pillowsFile := filepath.Join(dir, "pillows.yaml")
	if err := os.WriteFile(routing, []byte(routingYAML), 0o644); err != nil {
		return err
	}
	pillows := pillowsYAML
	if o.esURL != "" {
		pillows = strings.Replace(pillows, esMarker, "      - elasticsearch:\n          urls: [\"${CHANGEFEED_DEMO_ES_URL}\"]\n          index: demo-cases\n", 1)
		say("cases are also indexed into Elasticsearch at %s, index demo-cases", o.esURL)
	}
	if err := os.WriteFile(pillowsFile, []byte(pillows), 0o644); err != nil {
		return err
	}
	env := []string{
		"CHANGEFEED_POSTGRES_URL=" + o.pgURL,
		"CHANGEFEED_SOURCE_URL=" + o.pgURL,
		"CHANGEFEED_COUCH_URL=" + o.couchURL,
		"CHANGEFEED_KAFKA_BROKERS=" + strings.Join(brokers, ","),
		"CHANGEFEED_LOG_LEVEL=info",
		"CHANGEFEED_DEMO_ES_URL=" + o.esURL,
	}
	if o.brokers == "" {
		// The embedded cluster has one broker.
		env = append(env, "CHANGEFEED_KAFKA_REPLICATION_FACTOR=1", "CHANGEFEED_KAFKA_MIN_INSYNC_REPLICAS=1")
	}
	specs := []struct {
		name  string
		extra []string
		args  []string
	}{
		{"cdc-publisher", []string{"CHANGEFEED_ROUTING_FILE=" + routing}, nil},
		{"couch-follower", []string{"CHANGEFEED_COUCH_DATABASES=commcarehq"}, nil},
		{"pillow", []string{"CHANGEFEED_PILLOWS_FILE=" + pillowsFile}, []string{"run", "--all"}},
	}
	// Changes written before the publisher has created its slot are not in
	// the slot: each process must say it is ready before the demo writes.
	for _, sp := range specs {
		p, err := startReady(ctx, dir, o.bin, sp.name, append(env, sp.extra...), sp.args)
		if err != nil {
			return err
		}
		defer p.stop()
	}

	go printStubs(ctx, cl)

	if err := writeChanges(ctx, conn, o.couchURL); err != nil {
		return err
	}
	if err := waitForReports(ctx, conn, o.timeout); err != nil {
		return err
	}
	if o.esURL != "" {
		var count struct {
			Count int `json:"count"`
		}
		// The pillow marks a batch only after every processor wrote it, so
		// the cases are in the index once the reporting table shows them.
		if err := couch(ctx, http.MethodGet, strings.TrimRight(o.esURL, "/")+"/demo-cases/_count", nil, &count); err != nil {
			return fmt.Errorf("elasticsearch: %w", err)
		}
		say("Elasticsearch index demo-cases holds %d documents", count.Count)
	}
	if o.follow {
		say("running; write to the tables or to %s/commcarehq and watch. Ctrl-C stops.", o.couchURL)
		<-ctx.Done()
	}
	return nil
}

func say(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

// proc is a child process and the channel closed when it exits.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// startReady starts bin/name and waits for its /readyz. The HTTP port is
// picked free just before the start, so another program can take it in
// between: a process that exits before it is ready is started again on a new
// port, a bounded number of times.
func startReady(ctx context.Context, dir, bin, name string, env, args []string) (*proc, error) {
	const attempts = 3
	var lastErr error
	for range attempts {
		addr := freeAddr()
		c := exec.Command(filepath.Join(bin, name), args...)
		c.Env = append(append(os.Environ(), env...), "CHANGEFEED_HTTP_ADDR="+addr)
		logPath := filepath.Join(dir, "logs", name+".log")
		f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return nil, err
		}
		c.Stdout, c.Stderr = f, f
		if err := c.Start(); err != nil {
			f.Close()
			return nil, fmt.Errorf("start %s: %w", name, err)
		}
		p := &proc{cmd: c, done: make(chan struct{})}
		go func() { p.err = c.Wait(); f.Close(); close(p.done) }()
		say("started %s (pid %d), log in %s", name, c.Process.Pid, logPath)
		if lastErr = p.waitReady(ctx, addr, 60*time.Second); lastErr == nil {
			return p, nil
		}
		p.stop()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	return nil, fmt.Errorf("%s: %w (see its log)", name, lastErr)
}

// waitReady polls /readyz until it answers 200, the process exits or the
// timeout passes.
func (p *proc) waitReady(ctx context.Context, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready within %s", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.done:
			return fmt.Errorf("exited before it was ready: %v", p.err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func freeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return ""
	}
	defer l.Close()
	return l.Addr().String()
}

// stop sends SIGTERM, which every changefeed process answers by flushing,
// checkpointing and exiting 0.
func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.err != nil {
			say("%s exited: %v", filepath.Base(p.cmd.Path), p.err)
		}
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func printStubs(ctx context.Context, cl *kgo.Client) {
	for ctx.Err() == nil {
		fetches := cl.PollFetches(ctx)
		fetches.EachRecord(func(r *kgo.Record) {
			s, err := stub.Unmarshal(r.Value)
			if err != nil {
				fmt.Printf("    %-14s %s\n", r.Topic, r.Value)
				return
			}
			version := "lsn=" + s.LSN.String() + fmt.Sprintf("#%d", s.TxOrdinal)
			if s.DataSourceType == stub.SourceCouch {
				version = "rev=" + s.DocumentRev + " seq=" + string(s.Seq)
			}
			fmt.Printf("    stub %-14s %-5s %-10s %-14s deletion=%-5t %s\n",
				r.Topic, s.DataSourceType, s.DocumentID, s.DocumentType, s.IsDeletion, version)
		})
	}
}

func writeChanges(ctx context.Context, conn *pgx.Conn, couchURL string) error {
	say("writing: 3 cases and an index in one transaction, an update, a soft delete, a rolled-back insert")
	steps := []struct {
		sql      string
		rollback bool
	}{
		{`INSERT INTO form_processor_commcarecasesql (case_id, domain, type, name, owner_id) VALUES
		   ('case-1','demo','patient','Asha','u1'),('case-2','demo','patient','Ben','u1'),('case-3','demo','household','Chen','u2');
		  INSERT INTO form_processor_commcarecaseindexsql (case_id, domain, referenced_id, identifier) VALUES ('case-1','demo','case-3','parent')`, false},
		{`UPDATE form_processor_commcarecasesql SET name = 'Benjamin', closed = true WHERE case_id = 'case-2'`, false},
		{`UPDATE form_processor_commcarecasesql SET deleted = true WHERE case_id = 'case-3'`, false},
		{`INSERT INTO form_processor_commcarecasesql (case_id, domain, type, name) VALUES ('case-never','demo','patient','Rolled Back')`, true},
	}
	for _, s := range steps {
		tx, err := conn.Begin(ctx)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, s.sql); err != nil {
			_ = tx.Rollback(ctx)
			return fmt.Errorf("demo write: %w", err)
		}
		if s.rollback {
			err = tx.Rollback(ctx)
		} else {
			err = tx.Commit(ctx)
		}
		if err != nil {
			return err
		}
	}
	say("writing to CouchDB: two users, an update, a deletion")
	db := couchURL + "/commcarehq"
	rev1, err := putDoc(ctx, db, "user-1", `{"doc_type":"CommCareUser","domain":"demo","username":"asha"}`)
	if err != nil {
		return err
	}
	rev2, err := putDoc(ctx, db, "user-2", `{"doc_type":"CommCareUser","domain":"demo","username":"ben"}`)
	if err != nil {
		return err
	}
	if _, err := putDoc(ctx, db, "user-1", `{"_rev":"`+rev1+`","doc_type":"CommCareUser","domain":"demo","username":"asha.k"}`); err != nil {
		return err
	}
	return couch(ctx, http.MethodDelete, db+"/user-2?rev="+rev2, nil)
}

func putDoc(ctx context.Context, db, id, body string) (string, error) {
	var resp struct {
		Rev string `json:"rev"`
	}
	err := couch(ctx, http.MethodPut, db+"/"+id, []byte(body), &resp)
	return resp.Rev, err
}

// couch sends a JSON request (CouchDB, or Elasticsearch for -es-url).
func couch(ctx context.Context, method, url string, body []byte, out ...any) error {
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("couch %s: %w", method, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 && resp.StatusCode != http.StatusPreconditionFailed {
		return fmt.Errorf("couch %s: %s: %s", method, resp.Status, b)
	}
	if len(out) > 0 {
		return json.Unmarshal(b, out[0])
	}
	return nil
}

// waitForReports polls the reporting tables until they show the demo's final
// state, then prints them.
func waitForReports(ctx context.Context, conn *pgx.Conn, timeout time.Duration) error {
	say("waiting for the pillows to fill report_cases and report_users")
	wantCases := []string{"case-1 Asha false", "case-2 Benjamin true"}
	wantUsers := []string{"user-1 asha.k"}
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		cases, _ := rows(ctx, conn, `SELECT doc_id || ' ' || name || ' ' || closed FROM report_cases_live ORDER BY 1`)
		users, _ := rows(ctx, conn, `SELECT doc_id || ' ' || username FROM report_users_live ORDER BY 1`)
		if slices.Equal(cases, wantCases) && slices.Equal(users, wantUsers) {
			say("report_cases (case-3 was soft-deleted: a tombstone row keeps its version, the report_cases_live view hides it; case-never was rolled back and never published):")
			printTable(ctx, conn, `SELECT doc_id, domain, name, owner_id, closed, deleted FROM report_cases ORDER BY doc_id`)
			say("report_users (user-2 was deleted in CouchDB: tombstone row, hidden by report_users_live):")
			printTable(ctx, conn, `SELECT doc_id, domain, username, deleted FROM report_users ORDER BY doc_id`)
			say("done: every committed change reached the reporting tables")
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("reporting tables did not settle within %s: cases=%v users=%v (see the logs in the work dir)", timeout, cases, users)
		}
	}
}

func rows(ctx context.Context, conn *pgx.Conn, q string) ([]string, error) {
	r, err := conn.Query(ctx, q)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(r, pgx.RowTo[string])
}

func printTable(ctx context.Context, conn *pgx.Conn, q string) {
	r, err := conn.Query(ctx, q)
	if err != nil {
		fmt.Println("   ", err)
		return
	}
	defer r.Close()
	var names []string
	for _, f := range r.FieldDescriptions() {
		names = append(names, f.Name)
	}
	fmt.Printf("    %s\n", strings.Join(names, " | "))
	for r.Next() {
		vals, _ := r.Values()
		cells := make([]string, len(vals))
		for i, v := range vals {
			cells[i] = fmt.Sprint(v)
		}
		fmt.Printf("    %s\n", strings.Join(cells, " | "))
	}
}
