package testenv

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"testing"

	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

// CouchImageEnv names the environment variable that replaces pouchdb-server
// with another image speaking the CouchDB API on port 5984, normally Apache
// CouchDB 3 (CHANGEFEED_TEST_COUCH_IMAGE=couchdb:3). Such an image must exist
// locally or be pullable; it is run with the admin user admin/admin.
const CouchImageEnv = "CHANGEFEED_TEST_COUCH_IMAGE"

// CouchDB admin credentials used when CouchImageEnv selects CouchDB.
const (
	couchAdmin    = "admin"
	couchPassword = "admin"
)

// CouchServer is a running server speaking the CouchDB HTTP API, reachable on
// a fixed loopback port. Data and port survive Stop/Start.
//
// By default it is pouchdb-server 4.2.0, which differs from CouchDB 3 in ways
// to design around rather than depend on: seq is an integer, not an opaque
// string; feed timeouts are ignored (bound every feed read with a context);
// gzip buffers live feeds (use an http.Transport with DisableCompression).
type CouchServer struct {
	c      *testcontainers.DockerContainer
	port   int
	user   *url.Userinfo // nil for pouchdb-server, which needs no login
	pouch  bool
	client *http.Client
}

// CouchOption configures [Couch].
type CouchOption func(*couchConfig)

type couchConfig struct {
	image string
}

// WithCouchImage runs image (a CouchDB 3 image) instead of pouchdb-server,
// overriding CouchImageEnv.
func WithCouchImage(image string) CouchOption {
	return func(c *couchConfig) { c.image = image }
}

// Couch starts a CouchDB-API container that is removed when the test ends:
// changefeed/pouchdb:4.2.0, or the image named by CouchImageEnv.
func Couch(t testing.TB, opts ...CouchOption) *CouchServer {
	t.Helper()
	cfg := couchConfig{image: os.Getenv(CouchImageEnv)}
	for _, opt := range opts {
		opt(&cfg)
	}
	s := &CouchServer{
		pouch: cfg.image == "" || cfg.image == PouchDBImage,
		// No compression: pouchdb-server gzips on request, which buffers feeds.
		client: &http.Client{Transport: &http.Transport{DisableCompression: true}},
	}
	t.Cleanup(s.client.CloseIdleConnections)
	image, readyPath := PouchDBImage, "/"
	var env map[string]string
	if !s.pouch {
		image, readyPath = cfg.image, "/_up"
		env = map[string]string{"COUCHDB_USER": couchAdmin, "COUCHDB_PASSWORD": couchPassword}
		s.user = url.UserPassword(couchAdmin, couchPassword)
	}
	s.c, s.port = runOnFreePort(t, image, func(int) containerSpec {
		return containerSpec{
			containerPort: "5984/tcp",
			opts: []testcontainers.ContainerCustomizer{
				testcontainers.WithEnv(env),
				testcontainers.WithWaitStrategyAndDeadline(startTimeout,
					wait.ForHTTP(readyPath).WithPort("5984/tcp"),
				),
			},
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	if err := pollUntil(ctx, "couch ready", s.ping); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if !s.pouch {
		// A fresh single-node CouchDB lacks its system databases and logs
		// errors until they exist; pouchdb-server makes them itself.
		for _, db := range []string{"_users", "_replicator"} {
			if err := s.createDB(ctx, db); err != nil {
				t.Fatalf("testenv: %v", err)
			}
		}
	}
	return s
}

// URL is the server's base URL, http://127.0.0.1:PORT, with admin:admin@
// when the server is CouchDB.
func (s *CouchServer) URL() string {
	u := url.URL{Scheme: "http", User: s.user, Host: net.JoinHostPort(loopback, strconv.Itoa(s.port))}
	return u.String()
}

// IsPouchDB reports whether the server is pouchdb-server rather than CouchDB.
func (s *CouchServer) IsPouchDB() bool { return s.pouch }

// Port is the host port, the same across Stop/Start.
func (s *CouchServer) Port() int { return s.port }

// Container is the underlying container, for what the helpers do not cover.
func (s *CouchServer) Container() *testcontainers.DockerContainer { return s.c }

// Stop stops the server; its databases are kept. pouchdb-server is killed
// (SIGKILL): every acknowledged write is already in LevelDB's log.
func (s *CouchServer) Stop(ctx context.Context) error {
	if err := stopContainer(ctx, s.c); err != nil {
		return fmt.Errorf("couch: %w", err)
	}
	return nil
}

// Start restarts a stopped server on the same port and waits until it
// answers.
func (s *CouchServer) Start(ctx context.Context) error {
	if err := startContainer(ctx, s.c, "couch ready", s.ping); err != nil {
		return fmt.Errorf("couch: %w", err)
	}
	return nil
}

// ping succeeds once the server answers its root URL.
func (s *CouchServer) ping(ctx context.Context) error {
	return s.do(ctx, http.MethodGet, "/", http.StatusOK)
}

// createDB creates db; an existing db is fine.
func (s *CouchServer) createDB(ctx context.Context, db string) error {
	return s.do(ctx, http.MethodPut, "/"+db, http.StatusCreated, http.StatusAccepted, http.StatusPreconditionFailed)
}

func (s *CouchServer) do(ctx context.Context, method, path string, okStatus ...int) error {
	req, err := http.NewRequestWithContext(ctx, method, s.URL()+path, nil)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	resp.Body.Close()
	for _, code := range okStatus {
		if resp.StatusCode == code {
			return nil
		}
	}
	return fmt.Errorf("%s %s: status %s", method, path, resp.Status)
}
