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
// configuration, failed authentication or a failed start-up check, 3 on a possible gap between checkpoint and slot, 4 when the
// slot stayed busy past --slot-wait-timeout.
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
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/changefeed/changefeed/cdc"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/publish"
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

type settings struct {
	postgresURL       string
	kafka             kafkaconn.Config
	embeddedKafka     bool
	partitions        int
	replication       int
	slot, publication string
	routingFile       string
	httpAddr          string
	allowNewSlot      bool
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
	cmd := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	s, err := parseFlags(cmd, args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "cdc-publisher: %v\n", err)
		return 2
	}
	log := newLogger(stderr, s.logLevel)
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
		// Above the publisher's own bound, so that Publish never blocks.
		MaxBufferedRecords: 2*s.maxInFlight + 100,
		Component:          "cdc",
	}, log, reg)
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
		ln, err := net.Listen("tcp", s.httpAddr)
		if err != nil {
			log.Error("http listen", "addr", s.httpAddr, "err", err)
			return 2
		}
		srv := &http.Server{Handler: p.Handler(reg), ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
		log.Info("http listening", "addr", ln.Addr().String())
	}
	if err := p.Run(ctx); err != nil {
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
	case errors.Is(err, cdc.ErrConfig), errors.Is(err, cdc.ErrPrecondition), errors.Is(err, cdc.ErrSchema), errors.Is(err, kafkaconn.ErrConfig):
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

func newLogger(w io.Writer, level string) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		l = slog.LevelInfo
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: l})).With("component", "cdc-publisher")
}

// parseFlags reads flags whose defaults come from the environment.
func parseFlags(cmd string, args []string, getenv func(string) string, stderr io.Writer) (settings, error) {
	var s settings
	fs := flag.NewFlagSet("cdc-publisher "+cmd, flag.ContinueOnError)
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
	var urlFlag, brokers string
	envURL := getenv("CHANGEFEED_POSTGRES_URL")
	fs.StringVar(&urlFlag, "postgres-url", "", "PostgreSQL URL without a password (put the password in $CHANGEFEED_POSTGRES_URL, $PGPASSWORD or ~/.pgpass); default $CHANGEFEED_POSTGRES_URL")
	str(&s.logLevel, "log-level", "CHANGEFEED_LOG_LEVEL", "info", "debug, info, warn or error")
	if cmd == "run" {
		str(&brokers, "kafka-brokers", "CHANGEFEED_KAFKA_BROKERS", "", "comma-separated Kafka seed brokers host:port")
		boolean(&s.embeddedKafka, "embedded-kafka", "CHANGEFEED_EMBEDDED_KAFKA", false, "run an in-memory Kafka (kfake) in the process instead of --kafka-brokers: demos only")
		str(&s.kafka.ClientID, "kafka-client-id", "CHANGEFEED_KAFKA_CLIENT_ID", "changefeed-cdc-publisher", "Kafka client id")
		str(&s.kafka.SASLMechanism, "kafka-sasl-mechanism", "CHANGEFEED_KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; password from $CHANGEFEED_KAFKA_SASL_PASSWORD")
		str(&s.kafka.SASLUser, "kafka-sasl-user", "CHANGEFEED_KAFKA_SASL_USER", "", "SASL user")
		boolean(&s.kafka.TLS, "kafka-tls", "CHANGEFEED_KAFKA_TLS", false, "connect to Kafka with TLS")
		str(&s.kafka.CAFile, "kafka-tls-ca-file", "CHANGEFEED_KAFKA_TLS_CA_FILE", "", "PEM CA bundle added to the system pool")
		str(&s.kafka.CertFile, "kafka-tls-cert-file", "CHANGEFEED_KAFKA_TLS_CERT_FILE", "", "client certificate (mutual TLS)")
		str(&s.kafka.KeyFile, "kafka-tls-key-file", "CHANGEFEED_KAFKA_TLS_KEY_FILE", "", "client key (mutual TLS)")
		boolean(&s.kafka.InsecureSkipVerify, "kafka-tls-insecure-skip-verify", "CHANGEFEED_KAFKA_TLS_INSECURE_SKIP_VERIFY", false, "do not verify the brokers' certificates (test clusters only)")
		integer(&s.partitions, "kafka-partitions", "CHANGEFEED_KAFKA_PARTITIONS", 3, "partitions of topics the publisher creates")
		integer(&s.replication, "kafka-replication-factor", "CHANGEFEED_KAFKA_REPLICATION_FACTOR", -1, "replication factor of created topics (-1: broker default)")
		str(&s.slot, "slot", "CHANGEFEED_SLOT", "changefeed", "replication slot name")
		str(&s.publication, "publication", "CHANGEFEED_PUBLICATION", "changefeed", "publication name")
		str(&s.routingFile, "routing-file", "CHANGEFEED_ROUTING_FILE", "", "routing YAML (tables → stubs)")
		str(&s.httpAddr, "http-addr", "CHANGEFEED_HTTP_ADDR", ":8080", "address of /metrics, /healthz, /readyz (off: none)")
		boolean(&s.allowNewSlot, "allow-new-slot", "CHANGEFEED_ALLOW_NEW_SLOT", false, "accept a possible gap: create a fresh slot although a checkpoint exists, or take a slot ahead of the checkpoint")
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
	if err := errors.Join(errs...); err != nil {
		return s, err
	}
	if urlFlag != "" && cdc.URLHasPassword(urlFlag) {
		return s, errors.New("--postgres-url carries a password, which would show in the process list: put it in $CHANGEFEED_POSTGRES_URL, $PGPASSWORD or ~/.pgpass")
	}
	s.postgresURL = envURL
	if urlFlag != "" {
		s.postgresURL = urlFlag
	}
	if s.postgresURL == "" {
		return s, errors.New("no PostgreSQL URL: set $CHANGEFEED_POSTGRES_URL or --postgres-url")
	}
	if cmd == "run" {
		s.kafka.SASLPassword = getenv("CHANGEFEED_KAFKA_SASL_PASSWORD")
		for _, b := range strings.Split(brokers, ",") {
			if b = strings.TrimSpace(b); b != "" {
				s.kafka.Brokers = append(s.kafka.Brokers, b)
			}
		}
		if len(s.kafka.Brokers) == 0 && !s.embeddedKafka {
			return s, errors.New("no Kafka brokers: set $CHANGEFEED_KAFKA_BROKERS, --kafka-brokers or --embedded-kafka")
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
