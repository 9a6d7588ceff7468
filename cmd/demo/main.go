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
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

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
	bin, pgURL, couchURL, brokers, workDir string
	follow                                 bool
	timeout                                time.Duration
}

func run() error {
	var o options
	flag.StringVar(&o.bin, "bin", "bin", "directory holding cdc-publisher, couch-follower and pillow")
	flag.StringVar(&o.pgURL, "postgres-url", os.Getenv("CHANGEFEED_POSTGRES_URL"), "PostgreSQL with wal_level=logical")
	flag.StringVar(&o.couchURL, "couch-url", os.Getenv("CHANGEFEED_COUCH_URL"), "CouchDB API server")
	flag.StringVar(&o.brokers, "kafka-brokers", "", "a real Kafka cluster; default: an embedded in-memory kfake cluster")
	flag.StringVar(&o.workDir, "work-dir", ".demo", "where config files and process logs go")
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
		cluster, err := kfake.NewCluster(kfake.NumBrokers(1))
		if err != nil {
			return fmt.Errorf("embedded kafka: %w", err)
		}
		defer cluster.Close()
		brokers = cluster.ListenAddrs()
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
	if err := os.WriteFile(pillowsFile, []byte(pillowsYAML), 0o644); err != nil {
		return err
	}
	env := []string{
		"CHANGEFEED_POSTGRES_URL=" + o.pgURL,
		"CHANGEFEED_SOURCE_URL=" + o.pgURL,
		"CHANGEFEED_COUCH_URL=" + o.couchURL,
		"CHANGEFEED_KAFKA_BROKERS=" + strings.Join(brokers, ","),
		"CHANGEFEED_LOG_LEVEL=info",
	}
	procs := []*exec.Cmd{
		command(dir, o.bin, "cdc-publisher", env, "CHANGEFEED_ROUTING_FILE="+routing),
		command(dir, o.bin, "couch-follower", env, "CHANGEFEED_COUCH_DATABASES=commcarehq"),
		command(dir, o.bin, "pillow", env, "CHANGEFEED_PILLOWS_FILE="+pillowsFile),
	}
	procs[2].Args = append(procs[2].Args, "run", "--all")
	for _, p := range procs {
		if err := p.Start(); err != nil {
			return fmt.Errorf("start %s: %w", p.Path, err)
		}
		say("started %s (pid %d), log in %s", filepath.Base(p.Path), p.Process.Pid, p.Stdout.(*os.File).Name())
		defer stopProcess(p)
	}
	// Changes written before the publisher has created its slot are not in
	// the slot: wait until every process says it is ready.
	for _, p := range procs {
		if err := waitReady(ctx, p, 60*time.Second); err != nil {
			return err
		}
	}

	go printStubs(ctx, cl)

	if err := writeChanges(ctx, conn, o.couchURL); err != nil {
		return err
	}
	if err := waitForReports(ctx, conn, o.timeout); err != nil {
		return err
	}
	if o.follow {
		say("running; write to the tables or to %s/commcarehq and watch. Ctrl-C stops.", o.couchURL)
		<-ctx.Done()
	}
	return nil
}

func say(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

func command(dir, bin, name string, env []string, extra ...string) *exec.Cmd {
	c := exec.Command(filepath.Join(bin, name))
	c.Env = append(append(os.Environ(), env...), extra...)
	c.Env = append(c.Env, "CHANGEFEED_HTTP_ADDR="+freeAddr())
	f, err := os.Create(filepath.Join(dir, "logs", name+".log"))
	if err == nil {
		c.Stdout, c.Stderr = f, f
	}
	return c
}

// waitReady polls the process's /readyz until it answers 200.
func waitReady(ctx context.Context, c *exec.Cmd, timeout time.Duration) error {
	var addr string
	for _, kv := range c.Env {
		if v, ok := strings.CutPrefix(kv, "CHANGEFEED_HTTP_ADDR="); ok {
			addr = v
		}
	}
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
			return fmt.Errorf("%s not ready within %s (see its log)", filepath.Base(c.Path), timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
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

// stopProcess sends SIGTERM, which every changefeed process answers by
// flushing, checkpointing and exiting 0.
func stopProcess(c *exec.Cmd) {
	_ = c.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			say("%s exited: %v", filepath.Base(c.Path), err)
		}
	case <-time.After(15 * time.Second):
		_ = c.Process.Kill()
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
