// Command cdc-publisher streams PostgreSQL's WAL (a logical replication slot
// with pgoutput) into Kafka as change stubs. See package cdc for the
// guarantees.
//
// Usage:
//
//	cdc-publisher [run] [flags]   stream (default)
//	cdc-publisher migrate [flags] apply changefeed's migrations and exit
//
// Every flag can be set from the environment variable named in its help.
// Secrets are read from the environment only: CHANGEFEED_POSTGRES_URL (a URL
// given with --postgres-url must not carry a password) and
// CHANGEFEED_KAFKA_SASL_PASSWORD.
//
// Exit status: 0 after SIGTERM/SIGINT (flushed and confirmed), 1 on a runtime
// failure (Kafka refused a stub for good, an unexpected error), 2 on invalid
// configuration (including an --allow-new-slot no gap needs), failed
// authentication (PostgreSQL, or Kafka SASL/TLS for longer than
// --kafka-fail-after), a missing Kafka ACL, an unsafe topic, a failed start-up check or a routed table that stopped
// matching the routing while running, 3 on a possible gap (slot missing,
// ahead of the checkpoint or lost; checkpoint of another cluster or ahead of
// the server's WAL), 4 when the slot stayed busy past --slot-wait-timeout.
// See the table in README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/changefeed/changefeed/cdc"
	"github.com/changefeed/changefeed/internal/cmdutil"
	"github.com/changefeed/changefeed/internal/embedkafka"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/publish"
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

type settings struct {
	postgresURL       string
	kafka             kafkaconn.Config
	embeddedKafka     bool
	topics            cmdutil.TopicFlags
	slot, publication string
	routingFile       string
	httpAddr          string
	allowNewSlot      cdc.GapAcceptance
	noMigrate         bool
	statusInterval    time.Duration
	heartbeat         time.Duration
	lagInterval       time.Duration
	slotWait          time.Duration
	maxInFlight       int
	shutdownTimeout   time.Duration
	reconnectMin      time.Duration
	reconnectMax      time.Duration
	controlTopic      string
	printStubs        bool
	logLevel          string
}

func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	cmd, args := cmdutil.Subcommand(args, "run")
	s, err := parseFlags(cmd, args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "cdc-publisher: %v\n", err)
		return 2
	}
	log := cmdutil.NewLogger(stderr, s.logLevel, "cdc-publisher", nil)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	switch cmd {
	case "migrate":
		return cmdutil.Migrate(ctx, s.postgresURL, log)
	case "run":
		return serve(ctx, s, log, stdout)
	default:
		fmt.Fprintf(stderr, "cdc-publisher: unknown command %q (want run or migrate)\n", cmd)
		return 2
	}
}

func serve(ctx context.Context, s settings, log *slog.Logger, stdout io.Writer) int {
	var routing *cdc.Routing
	if s.routingFile != "" {
		var err error
		if routing, err = cdc.LoadRouting(s.routingFile); err != nil {
			log.Error("invalid routing", "err", err)
			return 2
		}
	}
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
	popts := s.topics.Options("cdc", s.embeddedKafka)
	// Above the publisher's own bound, so that Publish never blocks.
	popts.MaxBufferedRecords = 2*s.maxInFlight + 100
	prod, err := publish.New(s.kafka, popts, log, reg)
	if err != nil {
		log.Error("kafka", "err", err)
		return 2
	}
	defer prod.Close()
	cfg := cdc.Config{
		PostgresURL:       s.postgresURL,
		Slot:              s.slot,
		Publication:       s.publication,
		Routing:           routing,
		ControlTopic:      s.controlTopic,
		AllowNewSlot:      s.allowNewSlot,
		Migrate:           !s.noMigrate,
		StatusInterval:    s.statusInterval,
		HeartbeatInterval: s.heartbeat,
		LagInterval:       s.lagInterval,
		SlotWaitTimeout:   s.slotWait,
		MaxInFlight:       s.maxInFlight,
		ShutdownTimeout:   s.shutdownTimeout,
		ReconnectMin:      s.reconnectMin,
		ReconnectMax:      s.reconnectMax,
	}
	if s.printStubs {
		cfg.PrintStubs = stdout
	}
	p, err := cdc.New(cfg, cdc.Deps{Producer: prod, Logger: log, Registerer: reg})
	if err != nil {
		log.Error("invalid configuration", "err", err)
		return exitCode(err)
	}
	if s.httpAddr != "" && s.httpAddr != "off" {
		srv, err := cmdutil.ServeHTTP(s.httpAddr, p.Handler(reg), log)
		if err != nil {
			log.Error("http listen", "addr", s.httpAddr, "err", err)
			return 2
		}
		defer srv.Close()
	}
	// A Kafka failure that retrying cannot cure (SASL/TLS refused or a
	// topic deleted for longer than --kafka-fail-after, data loss) stops
	// the publisher like SIGTERM: it confirms only what Kafka acknowledged.
	runCtx, stopRun := prod.StopOnFailure(ctx)
	defer stopRun()
	err = p.Run(runCtx)
	if perr := prod.Err(); perr != nil && (err == nil || errors.Is(err, cdc.ErrProduce)) {
		err = perr
	}
	if err != nil {
		log.Error("cdc publisher failed", "err", err)
		return exitCode(err)
	}
	log.Info("cdc publisher stopped", "confirmed", p.Confirmed())
	return 0
}

func exitCode(err error) int {
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, cdc.ErrConfig), errors.Is(err, cdc.ErrPrecondition), errors.Is(err, cdc.ErrSchema), errors.Is(err, kafkaconn.ErrConfig),
		errors.Is(err, publish.ErrDenied), errors.Is(err, publish.ErrTopicSettings), errors.Is(err, publish.ErrAuth):
		return 2
	case errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "28") || pgErr.Code == "3D000"):
		// Authentication failed, or the database does not exist.
		return 2
	case errors.Is(err, cdc.ErrPossibleGap):
		return 3
	case errors.Is(err, cdc.ErrSlotBusy):
		return 4
	default:
		return 1
	}
}

// parseFlags reads flags whose defaults come from the environment.
func parseFlags(cmd string, args []string, getenv func(string) string, stderr io.Writer) (settings, error) {
	var s settings
	fs := flag.NewFlagSet("cdc-publisher "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	ef := cmdutil.NewEnvFlags(fs, getenv)
	str, boolean, integer, duration := ef.String, ef.Bool, ef.Int, ef.Duration
	postgresURL := cmdutil.BindPostgresURL(ef, cdc.URLHasPassword)
	str(&s.logLevel, "log-level", "CHANGEFEED_LOG_LEVEL", "info", "debug, info, warn or error")
	var kafka *cmdutil.KafkaFlags
	var allowNewSlot string
	if cmd == "run" {
		kafka = cmdutil.BindKafka(ef, &s.kafka)
		kafka.BindEmbedded(&s.embeddedKafka)
		kafka.BindClientID("changefeed-cdc-publisher")
		kafka.BindTopics(&s.topics, "the publisher")
		str(&s.slot, "slot", "CHANGEFEED_SLOT", "changefeed", "replication slot name")
		str(&s.publication, "publication", "CHANGEFEED_PUBLICATION", "changefeed", "publication name")
		str(&s.routingFile, "routing-file", "CHANGEFEED_ROUTING_FILE", "", "routing YAML (tables → stubs)")
		str(&s.httpAddr, "http-addr", "CHANGEFEED_HTTP_ADDR", ":8080", "address of /metrics, /healthz, /readyz (off: none)")
		str(&allowNewSlot, "allow-new-slot", "CHANGEFEED_ALLOW_NEW_SLOT", "", "accept one possible gap, as <slot>@<checkpoint LSN> printed by the refusal to start (fresh slot, slot ahead of the checkpoint, checkpoint of another cluster); refused on a start that has no such gap")
		boolean(&s.noMigrate, "no-migrate", "CHANGEFEED_NO_MIGRATE", false, "do not apply migrations at start")
		duration(&s.statusInterval, "status-interval", "CHANGEFEED_STATUS_INTERVAL", time.Second, "how often acknowledged progress is checkpointed and confirmed")
		duration(&s.heartbeat, "heartbeat-interval", "CHANGEFEED_HEARTBEAT_INTERVAL", 0, "emit a heartbeat message on this interval (0: off)")
		duration(&s.lagInterval, "lag-interval", "CHANGEFEED_LAG_INTERVAL", 10*time.Second, "how often lag in bytes is sampled")
		duration(&s.slotWait, "slot-wait-timeout", "CHANGEFEED_SLOT_WAIT_TIMEOUT", 0, "how long to wait while another process streams the slot (0: forever, negative: exit at once)")
		integer(&s.maxInFlight, "max-in-flight", "CHANGEFEED_MAX_IN_FLIGHT", 10000, "stubs produced and not yet acknowledged before decoding pauses")
		duration(&s.shutdownTimeout, "shutdown-timeout", "CHANGEFEED_SHUTDOWN_TIMEOUT", 30*time.Second, "how long to flush on SIGTERM")
		duration(&s.reconnectMin, "reconnect-min", "CHANGEFEED_RECONNECT_MIN", 500*time.Millisecond, "first delay before reconnecting to PostgreSQL or retrying Kafka (doubles each attempt)")
		duration(&s.reconnectMax, "reconnect-max", "CHANGEFEED_RECONNECT_MAX", 30*time.Second, "longest delay between reconnection attempts")
		str(&s.controlTopic, "control-topic", "CHANGEFEED_CONTROL_TOPIC", cdc.DefaultControlTopic, "topic of table-level events (TRUNCATE)")
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
	if cmd == "run" {
		if err := kafka.Finish(); err != nil {
			return s, err
		}
		if s.allowNewSlot, err = cdc.ParseGapAcceptance(allowNewSlot); err != nil {
			return s, err
		}
		if s.maxInFlight <= 0 {
			return s, errors.New("--max-in-flight must be positive")
		}
		for _, n := range []struct{ field, v string }{{"--slot", s.slot}, {"--publication", s.publication}} {
			if err := cdc.ValidateName(n.field, n.v); err != nil {
				return s, err
			}
		}
	}
	return s, nil
}
