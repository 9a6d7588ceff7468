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
// runtime failure (CouchDB refused the credentials, Kafka refused a stub, a
// Kafka topic deleted or data loss detected), 2 on invalid configuration, a
// missing Kafka ACL, an unsafe topic, or Kafka SASL/TLS refused for longer
// than --kafka-fail-after.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/changefeed/changefeed/couchsource"
	"github.com/changefeed/changefeed/internal/cmdutil"
	"github.com/changefeed/changefeed/internal/embedkafka"
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
	topics        cmdutil.TopicFlags
	httpAddr      string
	noMigrate     bool
	printStubs    bool
	logLevel      string
}

func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	cmd, args := cmdutil.Subcommand(args, "run")
	s, err := parseFlags(cmd, args, getenv, stderr)
	masker := couchsource.NewMasker(couchsource.CouchPassword(s.couch.URL), urlPassword(s.postgresURL), s.kafka.SASLPassword)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "couch-follower: %s\n", masker.String(err.Error()))
		return 2
	}
	log := cmdutil.NewLogger(stderr, s.logLevel, "couch-follower", func(h slog.Handler) slog.Handler {
		return couchsource.NewMaskingHandler(h, masker)
	})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	switch cmd {
	case "migrate":
		return cmdutil.Migrate(ctx, s.postgresURL, log)
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
		brokers, stopKafka, err := embedkafka.Start()
		if err != nil {
			log.Error("embedded Kafka", "err", err)
			return 1
		}
		defer stopKafka()
		s.kafka.Brokers = brokers
		log.Warn("using an embedded in-memory Kafka (kfake): for demos only, nothing survives the process", "brokers", s.kafka.Brokers)
	}
	reg := cmdutil.NewRegistry()
	prod, err := publish.New(s.kafka, s.topics.Options("couch", s.embeddedKafka), log, reg)
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
		srv, err := cmdutil.ServeHTTP(s.httpAddr, f.Handler(reg), log)
		if err != nil {
			log.Error("http listen", "addr", s.httpAddr, "err", err)
			return 2
		}
		defer srv.Close()
	}
	for lastErr := ""; ; {
		// Topics are created before the first stub; Kafka may still be
		// starting, so retry until it answers, we are told to stop, or
		// the producer gives up (--kafka-fail-after).
		tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := prod.EnsureTopics(tctx, routing.Topics()...)
		cancel()
		if err == nil {
			break
		}
		if publish.Permanent(err) {
			log.Error("kafka topics", "topics", routing.Topics(), "err", err)
			return exitCode(err)
		}
		if err.Error() != lastErr { // once per distinct cause, not every 2s
			log.Warn("creating topics failed; retrying", "topics", routing.Topics(), "err", err)
			lastErr = err.Error()
		}
		select {
		case <-ctx.Done():
			return 0
		case <-prod.Failed():
			log.Error("kafka", "err", prod.Err())
			return exitCode(prod.Err())
		case <-time.After(2 * time.Second):
		}
	}
	log.Info("couch follower starting", "couch", couchsource.RedactURL(s.couch.URL), "databases", s.couch.Databases,
		"source", s.couch.Source, "kafka", s.kafka.String())
	// A Kafka failure that retrying cannot cure (SASL/TLS refused or a
	// topic deleted for longer than --kafka-fail-after, data loss) stops
	// the follower like SIGTERM: it checkpoints only what Kafka
	// acknowledged.
	runCtx, stopRun := prod.StopOnFailure(ctx)
	defer stopRun()
	err = f.Run(runCtx)
	if perr := prod.Err(); perr != nil && (err == nil || errors.Is(err, couchsource.ErrPublish)) {
		err = perr
	}
	if err != nil {
		log.Error("couch follower failed", "err", err)
		return exitCode(err)
	}
	return 0
}

func exitCode(err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, couchsource.ErrConfig), errors.Is(err, couchsource.ErrRouting), errors.Is(err, kafkaconn.ErrConfig),
		errors.Is(err, publish.ErrDenied), errors.Is(err, publish.ErrTopicSettings), errors.Is(err, publish.ErrAuth):
		return 2
	default:
		return 1
	}
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
	ef := cmdutil.NewEnvFlags(fs, getenv)
	str, boolean, integer, duration := ef.String, ef.Bool, ef.Int, ef.Duration
	var couchFlag, databases, feed string
	c := &s.couch
	postgresURL := cmdutil.BindPostgresURL(ef, func(u string) bool { return urlPassword(u) != "" })
	str(&s.logLevel, "log-level", "CHANGEFEED_LOG_LEVEL", "info", "debug, info, warn or error")
	var kafka *cmdutil.KafkaFlags
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
		kafka = cmdutil.BindKafka(ef, &s.kafka)
		kafka.BindEmbedded(&s.embeddedKafka)
		kafka.BindClientID("changefeed-couch-follower")
		kafka.BindTopics(&s.topics, "the follower")
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
	if err := ef.Err(); err != nil {
		return s, err
	}
	var err error
	if s.postgresURL, err = postgresURL(); err != nil {
		return s, err
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
	c.Databases = cmdutil.SplitList(databases)
	if len(c.Databases) == 0 {
		return s, errors.New("no database to follow: set $CHANGEFEED_COUCH_DATABASES or --databases")
	}
	c.Feed = couchsource.FeedMode(feed)
	if err := kafka.Finish(); err != nil {
		return s, err
	}
	return s, nil
}
