// Command kfake-server runs github.com/twmb/franz-go/pkg/kfake, an in-memory
// Kafka wire-protocol cluster, as its own process. Tests run it in a container
// (image changefeed/kfake:dev) so that "Kafka" can be paused independently of
// the code under test.
//
// kfake is not a broker: it keeps everything in memory, has no replication and
// no fsync. Code under test must not rely on kfake-only behaviour.
//
// Usage:
//
//	kfake-server -listen 0.0.0.0:9092 -advertise 127.0.0.1:9092 [-brokers N]
//	    [-partitions N] [-sasl-mechanism SCRAM-SHA-256 -sasl-user NAME]
//
// The SASL password is read from the environment variable KFAKE_SASL_PASSWORD
// so that it never shows up in argv (docker inspect, ps).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/twmb/franz-go/pkg/kfake"
)

// passwordEnv names the environment variable holding the SASL password.
const passwordEnv = "KFAKE_SASL_PASSWORD"

type config struct {
	listenHost    string
	listenPort    int
	advertiseHost string
	advertisePort int
	brokers       int
	partitions    int
	autoCreate    bool
	seedTopics    []string
	saslMechanism string
	saslUser      string
	saslPassword  string
	logLevel      kfake.LogLevel
}

func main() {
	logger := log.New(os.Stderr, "kfake-server: ", log.LstdFlags)
	cfg, err := parseConfig(os.Args[1:], os.Getenv)
	if err != nil {
		logger.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	cluster, err := start(cfg, logger)
	if err != nil {
		logger.Fatal(err)
	}
	<-ctx.Done()
	logger.Printf("shutting down")
	cluster.Close()
}

func parseConfig(args []string, getenv func(string) string) (config, error) {
	fs := flag.NewFlagSet("kfake-server", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:9092", "host:port of the first broker; broker i listens on port+i")
	advertise := fs.String("advertise", "", "host:port of the first broker as clients must dial it (returned in metadata); broker i gets port+i; default: -listen")
	brokers := fs.Int("brokers", 1, "number of brokers")
	// Apache Kafka defaults num.partitions to 1 (kfake to 10); match Kafka.
	partitions := fs.Int("partitions", 1, "partitions of auto-created and seeded topics")
	autoCreate := fs.Bool("auto-create-topics", true, "create topics on metadata requests that ask for it")
	seed := fs.String("seed-topics", "", "comma-separated topics to create at start, with -partitions partitions")
	mechanism := fs.String("sasl-mechanism", "", "enable SASL with this mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (password from $"+passwordEnv+")")
	user := fs.String("sasl-user", "", "SASL superuser name")
	level := fs.String("log-level", "warn", "kfake log level: none, error, warn, info, debug")
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	if fs.NArg() > 0 {
		return config{}, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}

	cfg := config{
		brokers:       *brokers,
		partitions:    *partitions,
		autoCreate:    *autoCreate,
		saslMechanism: strings.ToUpper(*mechanism),
		saslUser:      *user,
	}
	var err error
	if cfg.listenHost, cfg.listenPort, err = splitHostPort(*listen); err != nil {
		return config{}, fmt.Errorf("-listen: %w", err)
	}
	if *advertise == "" {
		*advertise = *listen
	}
	if cfg.advertiseHost, cfg.advertisePort, err = splitHostPort(*advertise); err != nil {
		return config{}, fmt.Errorf("-advertise: %w", err)
	}
	if cfg.listenPort == 0 || cfg.advertisePort == 0 {
		// A random port could not be advertised: clients must know it up front.
		return config{}, errors.New("-listen and -advertise need explicit, non-zero ports")
	}
	if cfg.brokers < 1 || cfg.listenPort+cfg.brokers-1 > 65535 || cfg.advertisePort+cfg.brokers-1 > 65535 {
		return config{}, fmt.Errorf("-brokers %d does not fit the port range", cfg.brokers)
	}
	if cfg.partitions < 1 {
		return config{}, fmt.Errorf("-partitions must be positive, got %d", cfg.partitions)
	}
	for _, t := range strings.Split(*seed, ",") {
		if t = strings.TrimSpace(t); t != "" {
			cfg.seedTopics = append(cfg.seedTopics, t)
		}
	}
	if cfg.logLevel, err = parseLogLevel(*level); err != nil {
		return config{}, err
	}

	switch cfg.saslMechanism {
	case "":
		if cfg.saslUser != "" {
			return config{}, errors.New("-sasl-user needs -sasl-mechanism")
		}
	case "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512":
		cfg.saslPassword = getenv(passwordEnv)
		if cfg.saslUser == "" || cfg.saslPassword == "" {
			return config{}, fmt.Errorf("-sasl-mechanism needs -sasl-user and $%s", passwordEnv)
		}
	default:
		return config{}, fmt.Errorf("unsupported -sasl-mechanism %q", *mechanism)
	}
	return cfg, nil
}

// start starts the cluster; it serves until closed.
func start(cfg config, logger *log.Logger) (*kfake.Cluster, error) {
	ports := make([]int, cfg.brokers)
	for i := range ports {
		ports[i] = cfg.listenPort + i
	}
	opts := []kfake.Opt{
		kfake.NumBrokers(cfg.brokers),
		kfake.Ports(ports...),
		kfake.ListenFn(cfg.listen),
		kfake.DefaultNumPartitions(cfg.partitions),
		kfake.WithLogger(kfake.BasicLogger(os.Stderr, cfg.logLevel)),
	}
	if cfg.autoCreate {
		opts = append(opts, kfake.AllowAutoTopicCreation())
	}
	if len(cfg.seedTopics) > 0 {
		opts = append(opts, kfake.SeedTopics(int32(cfg.partitions), cfg.seedTopics...))
	}
	if cfg.saslMechanism != "" {
		opts = append(opts, kfake.EnableSASL(), kfake.Superuser(cfg.saslMechanism, cfg.saslUser, cfg.saslPassword))
	}

	cluster, err := kfake.NewCluster(opts...)
	if err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}

	sasl := "off"
	if cfg.saslMechanism != "" {
		sasl = cfg.saslMechanism + " user " + cfg.saslUser
	}
	// Tests wait for this exact line: it is printed only once every listener is up.
	logger.Printf("ready: %d broker(s) listening on %s:%d, advertised as %v, sasl %s",
		cfg.brokers, cfg.listenHost, cfg.listenPort, cluster.ListenAddrs(), sasl)
	return cluster, nil
}

// listen is the kfake.ListenFn. kfake asks for "127.0.0.1:<port>"; we listen
// on the configured host instead and report the advertised address from
// Addr(), which is what kfake returns to clients in metadata.
func (cfg config) listen(network, address string) (net.Listener, error) {
	_, port, err := splitHostPort(address)
	if err != nil {
		return nil, fmt.Errorf("kfake listen address %q: %w", address, err)
	}
	offset := port - cfg.listenPort
	if offset < 0 || offset >= cfg.brokers {
		return nil, fmt.Errorf("kfake asked for unexpected port %d", port)
	}
	ln, err := net.Listen(network, net.JoinHostPort(cfg.listenHost, strconv.Itoa(port)))
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	adv := net.JoinHostPort(cfg.advertiseHost, strconv.Itoa(cfg.advertisePort+offset))
	return advertisedListener{Listener: ln, addr: advertisedAddr{network: network, hostport: adv}}, nil
}

// advertisedListener is a net.Listener whose Addr is the address clients are
// told to dial, not the local socket address.
type advertisedListener struct {
	net.Listener
	addr net.Addr
}

func (l advertisedListener) Addr() net.Addr { return l.addr }

// advertisedAddr is a net.Addr for a host:port that may be a host name.
type advertisedAddr struct {
	network  string
	hostport string
}

func (a advertisedAddr) Network() string { return a.network }
func (a advertisedAddr) String() string  { return a.hostport }

func splitHostPort(hostport string) (string, int, error) {
	host, p, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", 0, fmt.Errorf("split host and port: %w", err)
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("invalid port %q", p)
	}
	return host, port, nil
}

func parseLogLevel(s string) (kfake.LogLevel, error) {
	switch strings.ToLower(s) {
	case "none":
		return kfake.LogLevelNone, nil
	case "error":
		return kfake.LogLevelError, nil
	case "warn":
		return kfake.LogLevelWarn, nil
	case "info":
		return kfake.LogLevelInfo, nil
	case "debug":
		return kfake.LogLevelDebug, nil
	default:
		return 0, fmt.Errorf("unknown -log-level %q", s)
	}
}
