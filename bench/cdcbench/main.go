// Command cdcbench measures the cdc-publisher against the floor of logical
// decoding, on one machine and the same pre-generated WAL.
//
//	cdcbench prepare   create a dataset: table, publication, base slot, changes
//	cdcbench run       prepare if missing, then measure the floor and the
//	                   publisher -runs times each and print the comparison
//	cdcbench info      print a dataset's slot, publication and LSN range
//	cdcbench copy      copy a dataset's base slot for another tool to stream
//	cdcbench floor     stream any slot with the floor loop (consumes it)
//	cdcbench drop      remove a dataset and its slots
//
// (a) The floor is a bare pglogrepl + pgconn loop that parses every pgoutput
// message and every column of every tuple until the dataset's last commit.
// (b) The publisher is the built cmd/cdc-publisher, run as a child process
// against a Kafka cluster (kfake in this process unless -kafka-brokers is
// given), timed from the moment its slot becomes active until Kafka holds
// every stub of the dataset; the time until its confirmed_flush_lsn reaches
// the dataset's end is reported beside it. Both run as child processes so
// that their max RSS and CPU time are their own.
//
// Every run streams a fresh copy of the dataset's base slot
// (pg_copy_logical_replication_slot), so all runs decode the same WAL. The
// PostgreSQL URL comes from -postgres-url or, to keep a password out of the
// process list, from $CDCBENCH_POSTGRES_URL or $CHANGEFEED_POSTGRES_URL.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/changefeed/changefeed/bench/cdcbench/walbench"
)

const usageText = `usage: cdcbench [command] [flags]

commands:
  run        prepare the dataset if missing, measure floor and publisher (default)
  prepare    create the dataset (table, publication, base slot) and write its changes
  info       print the dataset's slot, publication and LSN range
  copy       copy the dataset's base slot to -copy-name and print it, for other tools
  floor      stream -slot (or a copy of the dataset's slot) with the floor loop
  drop       remove the dataset, its slots and its table

Run 'cdcbench <command> -h' for flags. The PostgreSQL URL comes from
-postgres-url, $CDCBENCH_POSTGRES_URL or $CHANGEFEED_POSTGRES_URL.
`

// urlEnv passes the URL to child processes (never argv: it may hold a password).
const urlEnv = "CDCBENCH_POSTGRES_URL"

type config struct {
	url     string
	dataset string
	gen     walbench.GenOptions
	bigTx   bool
	reset   bool

	runs          int
	proto         int
	values        bool
	skipFloor     bool
	skipPublisher bool
	publisherBin  string
	kafkaBrokers  string
	partitions    int
	verify        bool
	pubEnv        multiFlag
	timeout       time.Duration

	// floor/copy on an explicit slot
	slot, publication, endLSN, copyName string
}

type multiFlag []string

func (m *multiFlag) String() string     { return fmt.Sprint(*m) }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	os.Exit(mainErr(os.Args[1:], os.Stdout, os.Stderr))
}

func mainErr(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	if cmd == floorChildCmd {
		return floorChild(args, stdout, stderr)
	}
	cfg, err := parseFlags(cmd, args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "cdcbench:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	if err := dispatch(ctx, cmd, cfg, stdout, stderr); err != nil {
		fmt.Fprintln(stderr, "cdcbench:", err)
		return 1
	}
	return 0
}

func parseFlags(cmd string, args []string, stderr io.Writer) (config, error) {
	switch cmd {
	case "run", "prepare", "info", "copy", "floor", "drop":
	default:
		fmt.Fprint(stderr, usageText)
		return config{}, fmt.Errorf("unknown command %q", cmd)
	}
	var c config
	fs := flag.NewFlagSet("cdcbench "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usageText)
		fmt.Fprintf(stderr, "\nflags of %s (not all apply to every command):\n", cmd)
		fs.PrintDefaults()
	}
	fs.StringVar(&c.url, "postgres-url", "", "PostgreSQL URL (default $"+urlEnv+" or $CHANGEFEED_POSTGRES_URL); the role needs REPLICATION")
	fs.StringVar(&c.dataset, "dataset", "", "dataset name, [a-z0-9_] (default tx<tx-rows>, or bigtx with -big-tx)")
	fs.IntVar(&c.gen.Changes, "changes", 200000, "row changes to generate")
	fs.IntVar(&c.gen.TxRows, "tx-rows", 100, "row changes per transaction (0: one transaction)")
	fs.BoolVar(&c.bigTx, "big-tx", false, "the single-transaction dataset: -changes 1000000 -tx-rows 0, named bigtx")
	fs.IntVar(&c.gen.UpdatePct, "update-pct", 35, "share of updates in each transaction, percent")
	fs.IntVar(&c.gen.DeletePct, "delete-pct", 5, "share of deletes in each transaction, percent")
	fs.IntVar(&c.gen.PayloadBytes, "payload", 200, "padding of each row's JSON column, bytes")
	fs.BoolVar(&c.reset, "reset", false, "drop the dataset first and prepare it again")
	fs.IntVar(&c.runs, "runs", 3, "measured runs of each side")
	fs.IntVar(&c.proto, "proto", 1, "pgoutput proto_version of the floor: 1, or 2 to stream large transactions")
	fs.BoolVar(&c.values, "values", false, "floor also converts every column to a Go value with pgtype (as pglogrepl's demo)")
	fs.BoolVar(&c.skipFloor, "skip-floor", false, "do not measure the floor")
	fs.BoolVar(&c.skipPublisher, "skip-publisher", false, "do not measure the publisher")
	fs.StringVar(&c.publisherBin, "publisher-bin", "", "cdc-publisher binary (default: go build ./cmd/cdc-publisher into a temporary directory)")
	fs.StringVar(&c.kafkaBrokers, "kafka-brokers", "", "Kafka seed brokers, comma-separated (default: a kfake cluster in this process)")
	fs.IntVar(&c.partitions, "partitions", 3, "partitions of the publisher's topic")
	fs.BoolVar(&c.verify, "verify", true, "after each publisher run, read the topic back and check every change is there (not timed)")
	fs.Var(&c.pubEnv, "publisher-env", "KEY=VALUE added to the publisher's environment (repeatable)")
	fs.DurationVar(&c.timeout, "timeout", 2*time.Hour, "give up after this long")
	fs.StringVar(&c.slot, "slot", "", "floor: stream this slot instead of a copy of the dataset's (the slot is consumed)")
	fs.StringVar(&c.publication, "publication", "", "floor: publication for -slot (default the dataset's)")
	fs.StringVar(&c.endLSN, "end-lsn", "", "floor: stop after the first commit at or after this LSN (default the dataset's)")
	fs.StringVar(&c.copyName, "copy-name", "", "copy: suffix of the new slot's name (cdcbench_run_<dataset>_<suffix>)")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.url == "" {
		c.url = os.Getenv(urlEnv)
	}
	if c.url == "" {
		c.url = os.Getenv("CHANGEFEED_POSTGRES_URL")
	}
	if c.url == "" {
		return c, errors.New("no PostgreSQL URL: set -postgres-url or $" + urlEnv)
	}
	if c.bigTx {
		c.gen.Changes, c.gen.TxRows = 1_000_000, 0
		if c.dataset == "" {
			c.dataset = "bigtx"
		}
	}
	if c.dataset == "" {
		c.dataset = fmt.Sprintf("tx%d", c.gen.TxRows)
	}
	c.gen.Name = c.dataset
	if c.runs < 1 {
		return c, errors.New("-runs must be at least 1")
	}
	if c.proto != 1 && c.proto != 2 {
		return c, errors.New("-proto must be 1 or 2")
	}
	if cmd == "copy" && c.copyName == "" {
		return c, errors.New("copy needs -copy-name")
	}
	return c, nil
}

func connect(ctx context.Context, url string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		// pgx's parse errors can echo the URL with its password.
		return nil, errors.New("invalid PostgreSQL URL")
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to PostgreSQL: %w", err)
	}
	return conn, nil
}

func dispatch(ctx context.Context, cmd string, c config, stdout, stderr io.Writer) error {
	conn, err := connect(ctx, c.url)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())

	switch cmd {
	case "drop":
		if err := walbench.Drop(ctx, conn, c.dataset); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "dropped dataset %s\n", c.dataset)
		return nil
	case "prepare":
		if c.reset {
			if err := walbench.Drop(ctx, conn, c.dataset); err != nil {
				return err
			}
		}
		d, err := prepare(ctx, conn, c, stderr)
		if err != nil {
			return err
		}
		printDataset(stdout, d)
		return nil
	case "floor":
		if c.slot != "" {
			return floorOnSlot(ctx, c, conn, stdout)
		}
	}

	if c.reset {
		if err := walbench.Drop(ctx, conn, c.dataset); err != nil {
			return err
		}
	}
	d, err := walbench.Load(ctx, conn, c.dataset)
	if errors.Is(err, walbench.ErrNoDataset) && cmd == "run" {
		d, err = prepare(ctx, conn, c, stderr)
	}
	if err != nil {
		return err
	}
	switch cmd {
	case "info":
		printDataset(stdout, d)
		return nil
	case "copy":
		slot, err := walbench.CopySlot(ctx, conn, d, c.copyName)
		if err != nil {
			return err
		}
		printDataset(stdout, d)
		fmt.Fprintf(stdout, "copy_slot=%s\n", slot)
		return nil
	case "floor":
		c.skipPublisher = true
	}
	return measure(ctx, c, conn, d, stdout, stderr)
}

func prepare(ctx context.Context, conn *pgx.Conn, c config, stderr io.Writer) (walbench.Dataset, error) {
	start := time.Now()
	next := int64(0)
	c.gen.Progress = func(n int64) {
		if n >= next {
			fmt.Fprintf(stderr, "prepare %s: %d/%d changes (%s)\n", c.dataset, n, c.gen.Changes, time.Since(start).Round(time.Second))
			next = n + max(int64(c.gen.Changes)/10, 1)
		}
	}
	fmt.Fprintf(stderr, "prepare %s: %d changes, %d per transaction\n", c.dataset, c.gen.Changes, c.gen.TxRows)
	d, err := walbench.Prepare(ctx, conn, c.gen)
	if err != nil {
		return d, fmt.Errorf("prepare %s: %w", c.dataset, err)
	}
	if _, err := conn.Exec(ctx, `CHECKPOINT`); err != nil {
		// Not fatal: the checkpoint only keeps it out of the measured runs.
		fmt.Fprintf(stderr, "prepare %s: checkpoint: %v\n", c.dataset, err)
	}
	fmt.Fprintf(stderr, "prepare %s: done in %s\n", c.dataset, time.Since(start).Round(time.Millisecond))
	return d, nil
}

func printDataset(w io.Writer, d walbench.Dataset) {
	fmt.Fprintf(w, "dataset=%s table=%s publication=%s slot=%s start_lsn=%s end_lsn=%s last_commit_end=%s changes=%d txs=%d wal_bytes=%d\n",
		d.Name, d.Table, d.Publication, d.Slot, d.StartLSN, d.EndLSN, d.LastCommitEnd, d.Changes, d.Txs, d.WALBytes())
}

// floorOnSlot streams a caller-named slot in this process.
func floorOnSlot(ctx context.Context, c config, conn *pgx.Conn, stdout io.Writer) error {
	pub, end := c.publication, pglogrepl.LSN(0)
	if c.endLSN != "" {
		var err error
		if end, err = pglogrepl.ParseLSN(c.endLSN); err != nil {
			return fmt.Errorf("-end-lsn: %w", err)
		}
	}
	if pub == "" || end == 0 {
		d, err := walbench.Load(ctx, conn, c.dataset)
		if err != nil {
			return fmt.Errorf("-slot without -publication and -end-lsn needs a dataset: %w", err)
		}
		if pub == "" {
			pub = d.Publication
		}
		if end == 0 {
			end = d.EndLSN
		}
	}
	r, err := walbench.Floor(ctx, c.url, walbench.FloorOptions{
		Slot: c.slot, Publication: pub, EndLSN: end, ProtoVersion: c.proto, Values: c.values,
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "floor slot=%s changes=%d txs=%d elapsed=%s changes/s=%.0f last_commit_end=%s\n",
		c.slot, r.Changes, r.Txs, r.Elapsed.Round(time.Millisecond), float64(r.Changes)/r.Elapsed.Seconds(), r.LastCommitEnd)
	return nil
}
