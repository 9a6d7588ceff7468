// Package pillowcli is the `pillow` command: settings from flags and the
// environment, wiring of the runtime, the HTTP endpoints and the
// checkpoint tools. cmd/pillow calls Main with no custom processors; a
// deployment with its own Go processors builds its own binary that calls
// Main with its Registry.
//
//	pillow run (--all | --pillow NAME…)
//	pillow list
//	pillow checkpoints show [NAME…]
//	pillow checkpoints reset NAME (--to-earliest | --to-time RFC3339)
//	pillow checkpoints set-to-head NAME
//	pillow checkpoints copy FROM TO
//	pillow checkpoints merge A B… --into C
//
// A NAME in the checkpoint tools is a pillow of the file (its group and
// topics are used) or, when no pillow has that name, a consumer group.
//
// Exit codes: 0 done (including a SIGTERM/SIGINT shutdown), 1 error, 2 usage,
// 3 a committed offset is gone from the log (reindex needed).
package pillowcli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/cmdutil"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/pillows"
	"github.com/changefeed/changefeed/pillows/checkpoints"
	"github.com/changefeed/changefeed/pillows/pillowconf"
	"github.com/changefeed/changefeed/publish"
)

// Exit codes.
const (
	ExitOK      = 0
	ExitError   = 1
	ExitUsage   = 2
	ExitReindex = 3
)

// settings shared by the subcommands.
type settings struct {
	file        string
	kafka       kafkaconn.Config
	kafkaFlags  *cmdutil.KafkaFlags
	postgresURL string
	httpAddr    string
	logLevel    string
	commitEvery time.Duration
	getenv      func(string) string
}

// bind registers the shared flags with defaults from the environment.
//
// Unlike the other commands, pillow has always read a boolean variable it
// cannot parse (CHANGEFEED_KAFKA_TLS=yes) as false instead of refusing it, so
// the EnvFlags' errors are not checked.
func (s *settings) bind(fs *flag.FlagSet, getenv func(string) string) {
	ef := cmdutil.NewEnvFlags(fs, getenv)
	ef.String(&s.file, "file", "CHANGEFEED_PILLOWS_FILE", "", "pillow definitions (YAML)")
	s.kafkaFlags = cmdutil.BindKafka(ef, &s.kafka)
	// The URL may carry a password: its default is read after parsing, so
	// that -h never prints it.
	fs.StringVar(&s.postgresURL, "postgres-url", "", "database of the errors table (and default of postgres sinks); default $CHANGEFEED_POSTGRES_URL")
	s.getenv = getenv
	ef.String(&s.httpAddr, "http-addr", "CHANGEFEED_HTTP_ADDR", "127.0.0.1:9108", "address of /metrics, /healthz, /readyz; empty disables")
	ef.String(&s.logLevel, "log-level", "CHANGEFEED_LOG_LEVEL", "info", "debug, info, warn, error")
	fs.DurationVar(&s.commitEvery, "commit-interval", 5*time.Second, "how often marked offsets are committed besides revoke and shutdown")
}

// finish completes the settings after flag parsing: brokers and the SASL
// password (from the environment only, never argv). Checking for brokers is
// left to each command.
func (s *settings) finish() {
	_ = s.kafkaFlags.Finish()
	if s.postgresURL == "" {
		s.postgresURL = s.getenv("CHANGEFEED_POSTGRES_URL")
	}
}

// Main runs the command and returns the exit code.
func Main(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer, reg pillowconf.Registry) int {
	if len(args) == 0 {
		usage(stderr)
		return ExitUsage
	}
	switch args[0] {
	case "run":
		return cmdRun(ctx, args[1:], getenv, stdout, stderr, reg)
	case "list":
		return cmdList(args[1:], getenv, stdout, stderr)
	case "checkpoints":
		return cmdCheckpoints(ctx, args[1:], getenv, stdout, stderr)
	case "-h", "--help", "help":
		usage(stdout)
		return ExitOK
	default:
		fmt.Fprintf(stderr, "pillow: unknown command %q\n", args[0])
		usage(stderr)
		return ExitUsage
	}
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage:
  pillow run (--all | --pillow NAME ...)     run pillows until SIGTERM
  pillow list                                 list the pillows of the file
  pillow checkpoints show [NAME ...]
  pillow checkpoints reset NAME (--to-earliest | --to-time RFC3339)
  pillow checkpoints set-to-head NAME
  pillow checkpoints copy FROM TO
  pillow checkpoints merge A B ... --into C
Run "pillow COMMAND -h" for the settings.
`)
}

func loadFile(s *settings, getenv func(string) string) (*pillowconf.File, error) {
	if s.file == "" {
		return nil, errors.New("no pillows file: set --file or CHANGEFEED_PILLOWS_FILE")
	}
	data, err := os.ReadFile(s.file)
	if err != nil {
		return nil, err
	}
	return pillowconf.Parse(data, getenv)
}

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func cmdList(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	var s settings
	fs := flag.NewFlagSet("pillow list", flag.ContinueOnError)
	fs.SetOutput(stderr)
	s.bind(fs, getenv)
	if err := fs.Parse(args); err != nil {
		return ExitUsage
	}
	s.finish()
	f, err := loadFile(&s, getenv)
	if err != nil {
		fmt.Fprintln(stderr, "pillow:", err)
		return ExitError
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tGROUP\tTOPICS\tPROCESSORS")
	for _, p := range f.Pillows {
		group := p.Group
		if group == "" {
			group = p.Name
		}
		var procs []string
		for _, pr := range p.Processors {
			switch {
			case pr.Name != "":
				procs = append(procs, pr.Name)
			case pr.Postgres != nil:
				procs = append(procs, "postgres:"+pr.Postgres.Table)
			case pr.Elasticsearch != nil:
				procs = append(procs, "elasticsearch:"+pr.Elasticsearch.Index)
			default:
				procs = append(procs, "custom:"+pr.Custom)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Name, group, strings.Join(p.Topics, ","), strings.Join(procs, ","))
	}
	tw.Flush()
	return ExitOK
}

func cmdRun(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer, reg pillowconf.Registry) int {
	var s settings
	fs := flag.NewFlagSet("pillow run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	s.bind(fs, getenv)
	all := fs.Bool("all", false, "run every pillow of the file")
	var names stringList
	fs.Var(&names, "pillow", "run this pillow (repeatable)")
	shutdown := fs.Duration("shutdown-timeout", 30*time.Second, "bound on finishing the batches in hand at shutdown")
	session := fs.Duration("session-timeout", 45*time.Second, "consumer group session timeout: how long a crashed process keeps its partitions before the group moves them")
	if err := fs.Parse(args); err != nil {
		return ExitUsage
	}
	s.finish()
	if *all == (len(names) > 0) {
		fmt.Fprintln(stderr, "pillow run: give either --all or --pillow NAME")
		return ExitUsage
	}
	if _, err := cmdutil.ParseLevel(s.logLevel); err != nil {
		fmt.Fprintln(stderr, "pillow:", fmt.Errorf("log level %q: %w", s.logLevel, err))
		return ExitUsage
	}
	log := cmdutil.NewLogger(stderr, s.logLevel, "", nil)
	if err := run(ctx, &s, getenv, names, *shutdown, *session, log, reg); err != nil {
		log.Error("pillow stopped with an error", "err", err)
		if errors.Is(err, pillows.ErrCheckpointGone) {
			return ExitReindex
		}
		return ExitError
	}
	return ExitOK
}

func run(ctx context.Context, s *settings, getenv func(string) string, names []string, shutdown, session time.Duration, log *slog.Logger, reg pillowconf.Registry) error {
	f, err := loadFile(s, getenv)
	if err != nil {
		return err
	}
	if s.postgresURL == "" {
		return errors.New("no database for the errors table: set --postgres-url or CHANGEFEED_POSTGRES_URL")
	}
	if len(s.kafka.Brokers) == 0 {
		return errors.New("no Kafka brokers: set --kafka-brokers or CHANGEFEED_KAFKA_BROKERS")
	}
	if err := migrations.Up(ctx, s.postgresURL, log); err != nil {
		return err
	}
	pool, err := pgxpool.New(ctx, s.postgresURL)
	if err != nil {
		return errors.New("invalid CHANGEFEED_POSTGRES_URL")
	}
	defer pool.Close()

	built, err := pillowconf.Build(ctx, f, names, pillowconf.Deps{DefaultPostgresURL: s.postgresURL, Registry: reg, Log: log})
	if err != nil {
		return err
	}
	defer built.Close()

	registry := cmdutil.NewRegistry()
	metrics, err := pillows.NewMetrics(registry)
	if err != nil {
		return err
	}
	kc := s.kafka
	kc.ClientID = "changefeed-pillow-deadletter"
	producer, err := publish.New(kc, publish.Options{
		Component: "pillow-dead-letter",
		// The pillow has no topic settings yet: its dead-letter topics get
		// the broker's defaults and are not checked, as before.
		ReplicationFactor: -1, MinInsyncReplicas: -1,
	}, log, registry)
	if err != nil {
		return err
	}
	defer producer.Close()

	runner, err := pillows.NewRunner(pillows.Options{
		Kafka:           s.kafka,
		Errors:          pillows.NewErrorLog(pool),
		DeadLetters:     pillows.ProducerDeadLetters(producer),
		Log:             log,
		Metrics:         metrics,
		CommitInterval:  s.commitEvery,
		ShutdownTimeout: shutdown,
		KafkaOpts:       []kgo.Opt{kgo.SessionTimeout(session)},
	})
	if err != nil {
		return err
	}
	if s.httpAddr != "" {
		srv, err := serveHTTP(s.httpAddr, registry, runner, log)
		if err != nil {
			return err
		}
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
		}()
	}
	return runner.Run(ctx, built.Pillows...)
}

func serveHTTP(addr string, reg *prometheus.Registry, runner *pillows.Runner, log *slog.Logger) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := runner.Ready(ctx); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	srv, err := cmdutil.ServeHTTP(addr, mux, log)
	if err != nil {
		return nil, fmt.Errorf("http listen %s: %w", addr, err)
	}
	return srv, nil
}

func cmdCheckpoints(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return ExitUsage
	}
	sub := args[0]
	var s settings
	fs := flag.NewFlagSet("pillow checkpoints "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	s.bind(fs, getenv)
	var topics stringList
	fs.Var(&topics, "topic", "topic to act on (repeatable; default: the pillow's topics, or the group's committed ones)")
	toEarliest := fs.Bool("to-earliest", false, "reset: to the log start")
	toTime := fs.String("to-time", "", "reset: to the first record at or after this RFC 3339 time")
	into := fs.String("into", "", "merge: the target pillow or group")
	// Flags may follow the positional arguments.
	var pos []string
	rest := args[1:]
	for {
		if err := fs.Parse(rest); err != nil {
			return ExitUsage
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	s.finish()
	if len(s.kafka.Brokers) == 0 {
		fmt.Fprintln(stderr, "pillow: no Kafka brokers: set --kafka-brokers or CHANGEFEED_KAFKA_BROKERS")
		return ExitUsage
	}
	var f *pillowconf.File
	if s.file != "" {
		var err error
		if f, err = loadFile(&s, getenv); err != nil {
			fmt.Fprintln(stderr, "pillow:", err)
			return ExitError
		}
	}
	resolve := func(name string) (string, []string) {
		if f != nil {
			if p, ok := f.Find(name); ok {
				g := p.Group
				if g == "" {
					g = p.Name
				}
				if len(topics) > 0 {
					return g, topics
				}
				return g, p.Topics
			}
		}
		return name, topics
	}
	opts, err := s.kafka.Opts()
	if err != nil {
		fmt.Fprintln(stderr, "pillow:", err)
		return ExitUsage
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		fmt.Fprintln(stderr, "pillow:", err)
		return ExitError
	}
	defer cl.Close()
	tool := checkpoints.New(kadm.NewClient(cl))
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()

	printed := func(group string, offs kadm.Offsets, err error) int {
		if err != nil {
			fmt.Fprintln(stderr, "pillow:", err)
			return ExitError
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "GROUP\tTOPIC\tPARTITION\tCOMMITTED")
		offs.Each(func(o kadm.Offset) {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\n", group, o.Topic, o.Partition, o.At)
		})
		tw.Flush()
		return ExitOK
	}
	switch sub {
	case "show":
		if len(pos) == 0 && f != nil {
			pos = f.Names()
		}
		if len(pos) == 0 {
			fmt.Fprintln(stderr, "pillow checkpoints show: name a pillow or group")
			return ExitUsage
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "GROUP\tTOPIC\tPARTITION\tCOMMITTED\tSTART\tEND\tLAG\t")
		code := ExitOK
		for _, n := range pos {
			g, ts := resolve(n)
			rows, err := tool.Show(ctx, g, ts)
			if err != nil {
				fmt.Fprintf(stderr, "pillow: %s: %v\n", n, err)
				code = ExitError
				continue
			}
			for _, r := range rows {
				note := ""
				if r.Gone {
					note = "GONE: reindex needed"
				}
				committed := "-"
				if r.Committed >= 0 {
					committed = strconv.FormatInt(r.Committed, 10)
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%d\t%d\t%s\n", r.Group, r.Topic, r.Partition, committed, r.Start, r.End, r.Lag, note)
			}
		}
		tw.Flush()
		return code
	case "reset":
		if len(pos) != 1 || *toEarliest == (*toTime != "") {
			fmt.Fprintln(stderr, "usage: pillow checkpoints reset NAME (--to-earliest | --to-time RFC3339)")
			return ExitUsage
		}
		g, ts := resolve(pos[0])
		if *toEarliest {
			offs, err := tool.ResetToEarliest(ctx, g, ts)
			return printed(g, offs, err)
		}
		at, err := time.Parse(time.RFC3339, *toTime)
		if err != nil {
			fmt.Fprintln(stderr, "pillow: --to-time:", err)
			return ExitUsage
		}
		offs, err := tool.ResetToTime(ctx, g, ts, at)
		return printed(g, offs, err)
	case "set-to-head":
		if len(pos) != 1 {
			fmt.Fprintln(stderr, "usage: pillow checkpoints set-to-head NAME")
			return ExitUsage
		}
		g, ts := resolve(pos[0])
		offs, err := tool.SetToHead(ctx, g, ts)
		return printed(g, offs, err)
	case "copy":
		if len(pos) != 2 {
			fmt.Fprintln(stderr, "usage: pillow checkpoints copy FROM TO")
			return ExitUsage
		}
		from, ts := resolve(pos[0])
		to, _ := resolve(pos[1])
		offs, err := tool.Copy(ctx, from, to, ts)
		return printed(to, offs, err)
	case "merge":
		if len(pos) < 2 || *into == "" {
			fmt.Fprintln(stderr, "usage: pillow checkpoints merge A B ... --into C")
			return ExitUsage
		}
		var groups []string
		var ts []string
		for _, n := range pos {
			g, t := resolve(n)
			groups = append(groups, g)
			for _, x := range t {
				if !contains(ts, x) {
					ts = append(ts, x)
				}
			}
		}
		to, _ := resolve(*into)
		offs, err := tool.Merge(ctx, groups, to, ts)
		return printed(to, offs, err)
	default:
		fmt.Fprintf(stderr, "pillow checkpoints: unknown command %q\n", sub)
		usage(stderr)
		return ExitUsage
	}
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}
