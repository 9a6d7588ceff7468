package testenv

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"testing"

	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

// KafkaServer is a running kfake cluster of one broker, in its own container
// (image changefeed/kfake:dev), reachable on a fixed loopback port.
//
// kfake keeps everything in memory: stopping it would lose every topic, so an
// outage is simulated with Pause/Unpause. It is not Apache Kafka; code under
// test must not depend on kfake-only behaviour.
type KafkaServer struct {
	c    *testcontainers.DockerContainer
	port int
}

// KafkaOption configures [Kafka].
type KafkaOption func(*kafkaConfig)

type kafkaConfig struct {
	mechanism, user, password string
	partitions                int
}

// WithSASL requires SASL authentication with mechanism (PLAIN,
// SCRAM-SHA-256 or SCRAM-SHA-512) and makes user/password a superuser.
// The password reaches kfake through its environment, never its argv.
func WithSASL(mechanism, user, password string) KafkaOption {
	return func(c *kafkaConfig) { c.mechanism, c.user, c.password = mechanism, user, password }
}

// WithPartitions sets the partition count of auto-created topics (default 1,
// like Apache Kafka's num.partitions).
func WithPartitions(n int) KafkaOption {
	return func(c *kafkaConfig) { c.partitions = n }
}

// Kafka starts a kfake container that is removed when the test ends. Topics
// are created automatically on first use.
func Kafka(t testing.TB, opts ...KafkaOption) *KafkaServer {
	t.Helper()
	cfg := kafkaConfig{partitions: 1}
	for _, opt := range opts {
		opt(&cfg)
	}
	c, port := runOnFreePort(t, KafkaImage, func(hostPort int) containerSpec {
		// kfake tells clients the address it was told to advertise, so the
		// port inside the container equals the host port: P maps to P.
		addr := net.JoinHostPort("0.0.0.0", strconv.Itoa(hostPort))
		args := []string{
			"-listen", addr,
			"-advertise", net.JoinHostPort(loopback, strconv.Itoa(hostPort)),
			"-partitions", strconv.Itoa(cfg.partitions),
		}
		env := map[string]string{}
		if cfg.mechanism != "" {
			args = append(args, "-sasl-mechanism", cfg.mechanism, "-sasl-user", cfg.user)
			env["KFAKE_SASL_PASSWORD"] = cfg.password
		}
		cport := strconv.Itoa(hostPort) + "/tcp"
		return containerSpec{
			containerPort: cport,
			opts: []testcontainers.ContainerCustomizer{
				testcontainers.WithCmd(args...),
				testcontainers.WithEnv(env),
				// The image is FROM scratch: no shell for the internal port
				// check. kfake-server logs this once every broker listens.
				testcontainers.WithWaitStrategyAndDeadline(startTimeout,
					wait.ForLog("broker(s) listening on").WithOccurrence(1),
					wait.ForListeningPort(cport).SkipInternalCheck(),
				),
			},
		}
	})
	return &KafkaServer{c: c, port: port}
}

// Brokers are the seed brokers for a Kafka client, like kgo.SeedBrokers.
func (k *KafkaServer) Brokers() []string {
	return []string{net.JoinHostPort(loopback, strconv.Itoa(k.port))}
}

// Port is the host port of the broker.
func (k *KafkaServer) Port() int { return k.port }

// Container is the underlying container, for what the helpers do not cover.
func (k *KafkaServer) Container() *testcontainers.DockerContainer { return k.c }

// Pause freezes the broker (docker pause): connections stay open but nothing
// is answered, like a hung or partitioned broker. Data is kept.
func (k *KafkaServer) Pause(ctx context.Context) error {
	return k.withDocker(ctx, "pause", func(cli *testcontainers.DockerClient) error {
		_, err := cli.ContainerPause(ctx, k.c.GetContainerID(), client.ContainerPauseOptions{})
		return err
	})
}

// Unpause resumes a paused broker.
func (k *KafkaServer) Unpause(ctx context.Context) error {
	return k.withDocker(ctx, "unpause", func(cli *testcontainers.DockerClient) error {
		_, err := cli.ContainerUnpause(ctx, k.c.GetContainerID(), client.ContainerUnpauseOptions{})
		return err
	})
}

func (k *KafkaServer) withDocker(ctx context.Context, what string, fn func(*testcontainers.DockerClient) error) error {
	cli, err := testcontainers.NewDockerClientWithOpts(ctx)
	if err != nil {
		return fmt.Errorf("kafka %s: docker client: %w", what, err)
	}
	defer cli.Close()
	if err := fn(cli); err != nil {
		return fmt.Errorf("kafka %s: %w", what, err)
	}
	return nil
}
