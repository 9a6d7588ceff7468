package testenv

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/testcontainers/testcontainers-go"
	tclog "github.com/testcontainers/testcontainers-go/log"
)

// Images built by .ci/images.sh.
const (
	PostgresImage = "changefeed/postgres:15"
	KafkaImage    = "changefeed/kfake:dev"
	PouchDBImage  = "changefeed/pouchdb:4.2.0"
)

const (
	// startTimeout bounds creating and starting a container, waits included.
	startTimeout = 2 * time.Minute
	// readyTimeout bounds waiting for a restarted server when the caller's
	// context has no deadline.
	readyTimeout = time.Minute
	// pollInterval is how often readiness is re-checked.
	pollInterval = 100 * time.Millisecond
	// portAttempts is how often a start is retried when the chosen host
	// port was taken between FreePort and docker binding it.
	portAttempts = 5
)

// loopback is the only address containers are published on: tests must not
// send traffic anywhere else.
const loopback = "127.0.0.1"

// FreePort returns a TCP port that was free on 127.0.0.1 a moment ago. The
// port is not reserved: whoever binds it first gets it.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(loopback, "0"))
	if err != nil {
		t.Fatalf("testenv: find a free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// containerSpec is what a helper needs to start its image on a given host port.
type containerSpec struct {
	// containerPort is the port inside the container, like "5432/tcp".
	containerPort string
	opts          []testcontainers.ContainerCustomizer
}

// runOnFreePort starts image with the spec that build returns for a free
// host port, publishing the spec's container port on 127.0.0.1:<host port>.
// A fixed binding, unlike testcontainers' random one, survives a container
// restart, so clients can reconnect to the same address. The container is
// removed when the test ends.
func runOnFreePort(t testing.TB, image string, build func(hostPort int) containerSpec) (*testcontainers.DockerContainer, int) {
	t.Helper()
	var lastErr error
	for range portAttempts {
		hostPort := FreePort(t)
		spec := build(hostPort)
		cport, err := network.ParsePort(spec.containerPort)
		if err != nil {
			t.Fatalf("testenv: container port %q: %v", spec.containerPort, err)
		}
		opts := append([]testcontainers.ContainerCustomizer{
			testcontainers.WithLogger(tclog.TestLogger(t)),
			testcontainers.WithExposedPorts(spec.containerPort),
			testcontainers.WithHostConfigModifier(func(hc *container.HostConfig) {
				hc.PortBindings = network.PortMap{
					cport: {{HostIP: netip.MustParseAddr(loopback), HostPort: strconv.Itoa(hostPort)}},
				}
			}),
		}, spec.opts...)

		ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
		c, err := testcontainers.Run(ctx, image, opts...)
		cancel()
		if err == nil {
			testcontainers.CleanupContainer(t, c)
			return c, hostPort
		}
		// A container that failed to start still exists (testcontainers has
		// logged its output); remove it now.
		if termErr := testcontainers.TerminateContainer(c); termErr != nil {
			t.Logf("testenv: remove failed %s container: %v", image, termErr)
		}
		lastErr = err
		if !isPortConflict(err) {
			break
		}
		t.Logf("testenv: host port %d was taken, retrying: %v", hostPort, err)
	}
	t.Fatalf("testenv: start %s: %v (images are built by .ci/images.sh; "+
		"TESTCONTAINERS_RYUK_DISABLED=true and TESTCONTAINERS_HOST_OVERRIDE=127.0.0.1 must be set, see scripts/test.sh)",
		image, lastErr)
	return nil, 0
}

func isPortConflict(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "port is already allocated") || strings.Contains(msg, "address already in use")
}

// pollUntil calls check every pollInterval until it succeeds or ctx is done;
// without a deadline on ctx it gives up after readyTimeout.
func pollUntil(ctx context.Context, what string, check func(context.Context) error) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, readyTimeout)
		defer cancel()
	}
	ticker := time.NewTicker(pollInterval)
	defer ticker.Stop()
	for {
		err := check(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last error: %w)", what, context.Cause(ctx), err)
		case <-ticker.C:
		}
	}
}

// stopContainer stops c, letting the image's stop signal do its work.
func stopContainer(ctx context.Context, c *testcontainers.DockerContainer) error {
	if err := c.Stop(ctx, nil); err != nil {
		return fmt.Errorf("stop container: %w", err)
	}
	return nil
}

// startContainer starts a stopped c and waits until ready reports success.
func startContainer(ctx context.Context, c *testcontainers.DockerContainer, what string, ready func(context.Context) error) error {
	if err := c.Start(ctx); err != nil {
		return fmt.Errorf("start container: %w", err)
	}
	return pollUntil(ctx, what, ready)
}
