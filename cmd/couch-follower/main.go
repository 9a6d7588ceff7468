// Command couch-follower follows CouchDB _changes feeds and publishes one
// change stub per change to Kafka. See package couchsource for the
// guarantees.
//
// Usage:
//
//	couch-follower [run] [flags]   follow (default)
//	couch-follower migrate [flags] apply changefeed's migrations and exit
//
// Every flag can be set from the environment variable named in its help.
// Secrets are read from the environment only: CHANGEFEED_COUCH_URL and
// CHANGEFEED_POSTGRES_URL (URLs given as flags must not carry a password,
// which would show in the process list) and CHANGEFEED_KAFKA_SASL_PASSWORD.
//
// Exit status: 0 after SIGTERM/SIGINT (flushed and checkpointed), 1 on a
// runtime failure (CouchDB refused the credentials, Kafka refused a stub),
// 2 on invalid configuration.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/changefeed/changefeed/couchsource"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/publish"
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

type settings struct {
	couch         couchsource.Config
	routingFile   string
	postgresURL   string
	kafka         kafkaconn.Config
	embeddedKafka bool
	partitions    int
	replication   int
	httpAddr      string
	noMigrate     bool
	printStubs    bool
	logLevel      string
}

func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	s, err := parseFlags(cmd, args, getenv, stderr)
	masker := couchsource.NewMasker(couchsource.CouchPassword(s.couch.URL), urlPassword(s.postgresURL), s.kafka.SASLPassword)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "couch-follower: %s\n", masker.String(err.Error()))
		return 2
	}
	log := newLogger(stderr, s.logLevel, masker)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	switch cmd {
	case "migrate":
		if err := migrations.Up(ctx, s.postgresURL, log); err != nil {
			log.Error("migrate failed", "err", err)
			return 1
		}
		log.Info("migrations applied")
		return 0
	case "run":
		return serve(ctx, s, log, stdout)
	default:
		fmt.Fprintf(stderr, "couch-follower: unknown command %q (want run or migrate)\n", cmd)
		return 2
	}
}

func serve(ctx context.Context, s settings, log *slog.Logger, stdout io.Writer) int {
	routing, err := couchsource.LoadRouting(s.routingFile)
	if err != nil {
		log.Error("invalid routing", "err", err)
		return 2
	}
	s.couch.Routing = routing
	if s.printStubs {
		s.couch.PrintStubs = stdout
	}
	if !s.noMigrate {
		if err := migrations.Up(ctx, s.postgresURL, log); err != nil {
			log.Error("applying migrations failed", "err", err)
			return 1
		}
	}
	store, err := couchsource.NewPGStore(ctx, s.postgresURL)
	if err != nil {
		log.Error("checkpoint store", "err", err)
		return 2
	}
	defer store.Close()
	if s.embeddedKafka {
		cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation())
		if err != nil {
			log.Error("start embedded Kafka", "err", err)
			return 1
		}
		defer cluster.Close()
		s.kafka.Brokers = cluster.ListenAddrs()
		log.Warn("using an embedded in-memory Kafka (kfake): for demos only, nothing survives the process", "brokers", s.kafka.Brokers)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	prod, err := publish.New(s.kafka, publish.Options{
		Partitions:        int32(s.partitions),
		ReplicationFactor: int16(s.replication),
		Component:         "couch",
	}, log, reg)
	if err != nil {
		log.Error("kafka", "err", err)
		return 2
	}
	defer prod.Close()
	f, err := couchsource.New(s.couch, prod, store, log, reg)
	if err != nil {
		log.Error("invalid configuration", "err", err)
		return 2
	}
	if s.httpAddr != "" {
		ln, err := net.Listen("tcp", s.httpAddr)
		if err != nil {
			log.Error("http listen", "addr", s.httpAddr, "err", err)
			return 2
		}
		srv := &http.Server{Handler: f.Handler(reg), ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
		log.Info("http listening", "addr", ln.Addr().String())
	}
	for {
		// Topics are created before the first stub; Kafka may still be
		// starting, so retry until it answers or we are told to stop.
		tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := prod.EnsureTopics(tctx, routing.Topics()...)
		cancel()
		if err == nil {
			break
		}
		log.Warn("creating topics failed; retrying", "topics", routing.Topics(), "err", err)
		select {
		case <-ctx.Done():
			return 0
		case <-time.After(2 * time.Second):
		}
	}
	log.Info("couch follower starting", "couch", couchsource.RedactURL(s.couch.URL), "databases", s.couch.Databases,
		"source", s.couch.Source, "kafka", s.kafka.String())
	if err := f.Run(ctx); err != nil {
		log.Error("couch follower failed", "err", err)
		return exitCode(err)
	}
	return 0
}

func exitCode(err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, couchsource.ErrConfig), errors.Is(err, couchsource.ErrRouting), errors.Is(err, kafkaconn.ErrConfig):
		return 2
	default:
		return 1
	}
}

func newLogger(w io.Writer, level string, m *couchsource.Masker) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		l = slog.LevelInfo
	}
	h := couchsource.NewMaskingHandler(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: l}), m)
	return slog.New(h).With("component", "couch-follower")
}

// urlPassword returns the password of a URL, or "" (also for a malformed
// URL or a keyword/value DSN, whose password the masker cannot single out;
// its URL-shaped credentials are still masked).
func urlPassword(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return ""
	}
	p, _ := u.User.Password()
	return p
}

// parseFlags reads flags whose defaults come from the environment.
func parseFlags(cmd string, args []string, getenv func(string) string, stderr io.Writer) (settings, error) {
	var s settings
	fs := flag.NewFlagSet("couch-follower "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var errs []error
	str := func(p *string, name, env, def, usage string) {
		if v := getenv(env); v != "" {
			def = v
		}
		fs.StringVar(p, name, def, usage+" ($"+env+")")
	}
	boolean := func(p *bool, name, env string, def bool, usage string) {
		if v := getenv(env); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("$%s: %q is not a boolean", env, v))
			}
			def = b
		}
		fs.BoolVar(p, name, def, usage+" ($"+env+")")
	}
	integer := func(p *int, name, env string, def int, usage string) {
		if v := getenv(env); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("$%s: %q is not an integer", env, v))
			}
			def = n
		}
		fs.IntVar(p, name, def, usage+" ($"+env+")")
	}
	duration := func(p *time.Duration, name, env string, def time.Duration, usage string) {
		if v := getenv(env); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("$%s: %q is not a duration", env, v))
			}
			def = d
		}
		fs.DurationVar(p, name, def, usage+" ($"+env+")")
	}
	var pgFlag, couchFlag, brokers, databases, feed string
	c := &s.couch
	fs.StringVar(&pgFlag, "postgres-url", "", "PostgreSQL URL without a password (put the password in $CHANGEFEED_POSTGRES_URL, $PGPASSWORD or ~/.pgpass); default $CHANGEFEED_POSTGRES_URL")
	str(&s.logLevel, "log-level", "CHANGEFEED_LOG_LEVEL", "info", "debug, info, warn or error")
	if cmd == "run" {
		fs.StringVar(&couchFlag, "couch-url", "", "CouchDB URL without a password (put user:password in $CHANGEFEED_COUCH_URL); default $CHANGEFEED_COUCH_URL")
		str(&databases, "databases", "CHANGEFEED_COUCH_DATABASES", "", "comma-separated databases to follow")
		str(&c.Source, "source", "CHANGEFEED_COUCH_SOURCE", "couch", "name of this follower's checkpoints (one per source and database)")
		str(&s.routingFile, "routing-file", "CHANGEFEED_ROUTING_FILE", "", "routing YAML (doc_type → topic); default HQ's topics")
		str(&feed, "feed", "CHANGEFEED_COUCH_FEED", "auto", "auto (continuous, longpoll when continuous stays silent), continuous or longpoll")
		duration(&c.Heartbeat, "heartbeat", "CHANGEFEED_COUCH_HEARTBEAT", 10*time.Second, "feed heartbeat asked of the server")
		duration(&c.ReadTimeout, "read-timeout", "CHANGEFEED_COUCH_READ_TIMEOUT", 0, "reconnect a feed silent this long, heartbeats included (default 3 heartbeats + 1s)")
		integer(&c.CheckpointEvery, "checkpoint-every", "CHANGEFEED_COUCH_CHECKPOINT_EVERY", 1000, "write the checkpoint after this many acknowledged changes")
		duration(&c.CheckpointInterval, "checkpoint-interval", "CHANGEFEED_COUCH_CHECKPOINT_INTERVAL", 5*time.Second, "write the checkpoint at least this often while it moves")
		duration(&c.CheckInterval, "check-interval", "CHANGEFEED_COUCH_CHECK_INTERVAL", 30*time.Second, "re-read each database's info and identity this often while following (lag, recreated databases)")
		duration(&c.BackoffMax, "backoff-max", "CHANGEFEED_COUCH_BACKOFF_MAX", 30*time.Second, "longest wait between reconnect attempts")
		duration(&c.ProgressInterval, "progress-interval", "CHANGEFEED_COUCH_PROGRESS_INTERVAL", 5*time.Second, "progress log period of an initial load from seq 0")
		duration(&c.ShutdownTimeout, "shutdown-timeout", "CHANGEFEED_SHUTDOWN_TIMEOUT", 15*time.Second, "how long to flush on SIGTERM")
		str(&brokers, "kafka-brokers", "CHANGEFEED_KAFKA_BROKERS", "", "comma-separated Kafka seed brokers host:port")
		boolean(&s.embeddedKafka, "embedded-kafka", "CHANGEFEED_EMBEDDED_KAFKA", false, "run an in-memory Kafka (kfake) in the process instead of --kafka-brokers: demos only")
		str(&s.kafka.ClientID, "kafka-client-id", "CHANGEFEED_KAFKA_CLIENT_ID", "changefeed-couch-follower", "Kafka client id")
		str(&s.kafka.SASLMechanism, "kafka-sasl-mechanism", "CHANGEFEED_KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; password from $CHANGEFEED_KAFKA_SASL_PASSWORD")
		str(&s.kafka.SASLUser, "kafka-sasl-user", "CHANGEFEED_KAFKA_SASL_USER", "", "SASL user")
		boolean(&s.kafka.TLS, "kafka-tls", "CHANGEFEED_KAFKA_TLS", false, "connect to Kafka with TLS")
		str(&s.kafka.CAFile, "kafka-tls-ca-file", "CHANGEFEED_KAFKA_TLS_CA_FILE", "", "PEM CA bundle added to the system pool")
		str(&s.kafka.CertFile, "kafka-tls-cert-file", "CHANGEFEED_KAFKA_TLS_CERT_FILE", "", "client certificate (mutual TLS)")
		str(&s.kafka.KeyFile, "kafka-tls-key-file", "CHANGEFEED_KAFKA_TLS_KEY_FILE", "", "client key (mutual TLS)")
		boolean(&s.kafka.InsecureSkipVerify, "kafka-tls-insecure-skip-verify", "CHANGEFEED_KAFKA_TLS_INSECURE_SKIP_VERIFY", false, "do not verify the brokers' certificates (test clusters only)")
		integer(&s.partitions, "kafka-partitions", "CHANGEFEED_KAFKA_PARTITIONS", 3, "partitions of topics the follower creates")
		integer(&s.replication, "kafka-replication-factor", "CHANGEFEED_KAFKA_REPLICATION_FACTOR", -1, "replication factor of created topics (-1: broker default)")
		str(&s.httpAddr, "http-addr", "CHANGEFEED_HTTP_ADDR", ":8081", "address of /metrics, /healthz, /readyz (empty: off)")
		boolean(&s.noMigrate, "no-migrate", "CHANGEFEED_NO_MIGRATE", false, "do not apply migrations at start")
		boolean(&s.printStubs, "print-stubs", "CHANGEFEED_PRINT_STUBS", false, "also print every acknowledged stub as a JSON line on stdout")
	}
	if err := fs.Parse(args); err != nil {
		return s, err
	}
	if fs.NArg() > 0 {
		return s, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := errors.Join(errs...); err != nil {
		return s, err
	}
	if pgFlag != "" && urlPassword(pgFlag) != "" {
		return s, errors.New("--postgres-url carries a password, which would show in the process list: put it in $CHANGEFEED_POSTGRES_URL, $PGPASSWORD or ~/.pgpass")
	}
	s.postgresURL = getenv("CHANGEFEED_POSTGRES_URL")
	if pgFlag != "" {
		s.postgresURL = pgFlag
	}
	if s.postgresURL == "" {
		return s, errors.New("no PostgreSQL URL: set $CHANGEFEED_POSTGRES_URL or --postgres-url")
	}
	if cmd != "run" {
		return s, nil
	}
	if couchFlag != "" && couchsource.CouchPassword(couchFlag) != "" {
		return s, errors.New("--couch-url carries a password, which would show in the process list: put the URL in $CHANGEFEED_COUCH_URL")
	}
	c.URL = getenv("CHANGEFEED_COUCH_URL")
	if couchFlag != "" {
		c.URL = couchFlag
	}
	if c.URL == "" {
		return s, errors.New("no CouchDB URL: set $CHANGEFEED_COUCH_URL or --couch-url")
	}
	for _, db := range strings.Split(databases, ",") {
		if db = strings.TrimSpace(db); db != "" {
			c.Databases = append(c.Databases, db)
		}
	}
	if len(c.Databases) == 0 {
		return s, errors.New("no database to follow: set $CHANGEFEED_COUCH_DATABASES or --databases")
	}
	c.Feed = couchsource.FeedMode(feed)
	s.kafka.SASLPassword = getenv("CHANGEFEED_KAFKA_SASL_PASSWORD")
	for _, b := range strings.Split(brokers, ",") {
		if b = strings.TrimSpace(b); b != "" {
			s.kafka.Brokers = append(s.kafka.Brokers, b)
		}
	}
	if len(s.kafka.Brokers) == 0 && !s.embeddedKafka {
		return s, errors.New("no Kafka brokers: set $CHANGEFEED_KAFKA_BROKERS, --kafka-brokers or --embedded-kafka")
	}
	return s, nil
}
