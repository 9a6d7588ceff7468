package couchsource

import (
	"errors"
	"fmt"
	"io"
	"net/url"
	"regexp"
	"strings"
	"time"
)

// ErrConfig marks invalid settings.
var ErrConfig = errors.New("couch follower config")

// FeedMode is the _changes feed type.
type FeedMode string

const (
	// FeedAuto uses a continuous feed and falls back to longpoll when the
	// continuous feed is refused or stays silent from its first byte
	// (a proxy that buffers responses).
	FeedAuto       FeedMode = "auto"
	FeedContinuous FeedMode = "continuous"
	FeedLongpoll   FeedMode = "longpoll"
)

// Config configures a Follower. Zero durations and counts take the defaults
// documented on each field.
type Config struct {
	// URL of the CouchDB server, optionally with user:password. The password
	// is sent as HTTP basic auth and masked in every log and error.
	URL string
	// Databases to follow, one goroutine each.
	Databases []string
	// Source names this follower's checkpoints (the table's key is source
	// and database). Default "couch".
	Source string
	// Routing maps doc_type to topic. Default DefaultRouting().
	Routing *Routing

	// Feed is the feed type. Default FeedAuto.
	Feed FeedMode
	// Heartbeat asks the server for a newline every Heartbeat on an idle
	// feed. Default 10s.
	Heartbeat time.Duration
	// ReadTimeout fails a feed read that receives nothing, not even a
	// heartbeat, for this long; the feed is then reconnected. Default
	// three heartbeats plus one second.
	ReadTimeout time.Duration
	// LongpollTimeout bounds one longpoll request. Some servers ignore the
	// timeout parameter, so the follower enforces it. Default 60s.
	LongpollTimeout time.Duration

	// CheckpointEvery writes the checkpoint after this many acknowledged
	// changes. Default 1000.
	CheckpointEvery int
	// CheckpointInterval writes the checkpoint at least this often while
	// it moves. Default 5s.
	CheckpointInterval time.Duration
	// CheckInterval re-reads the database's info and identity while the
	// feed is open: lag, a deleted or recreated database (some servers keep
	// a deleted database's feed open). Default 30s.
	CheckInterval time.Duration
	// BackoffMin and BackoffMax bound the reconnect backoff, which doubles
	// from BackoffMin with jitter. Defaults 500ms and 30s.
	BackoffMin, BackoffMax time.Duration
	// ProgressInterval is the period of the progress log line of an
	// initial run from seq 0. Default 5s.
	ProgressInterval time.Duration
	// ShutdownTimeout bounds the flush of in-flight stubs at shutdown.
	// Default 15s.
	ShutdownTimeout time.Duration
	// PrintStubs, when set, receives every acknowledged stub as a JSON
	// line (demos, debugging).
	PrintStubs io.Writer
}

var dbNameRE = regexp.MustCompile(`^[a-z][a-z0-9_$()+/-]*$`)

// withDefaults validates c and returns it with defaults filled in.
func (c Config) withDefaults() (Config, error) {
	if c.URL == "" {
		return c, fmt.Errorf("%w: the CouchDB URL is empty", ErrConfig)
	}
	if _, _, _, err := splitCouchURL(c.URL); err != nil {
		return c, err
	}
	if len(c.Databases) == 0 {
		return c, fmt.Errorf("%w: no database to follow", ErrConfig)
	}
	seen := map[string]bool{}
	for _, db := range c.Databases {
		if !dbNameRE.MatchString(db) {
			return c, fmt.Errorf("%w: database name %q is not a valid CouchDB database name", ErrConfig, db)
		}
		if seen[db] {
			return c, fmt.Errorf("%w: database %q listed twice", ErrConfig, db)
		}
		seen[db] = true
	}
	if c.Source == "" {
		c.Source = "couch"
	}
	if c.Routing == nil {
		c.Routing = DefaultRouting()
		if err := c.Routing.validate("defaults", nil); err != nil {
			return c, err
		}
	}
	switch c.Feed {
	case "":
		c.Feed = FeedAuto
	case FeedAuto, FeedContinuous, FeedLongpoll:
	default:
		return c, fmt.Errorf("%w: feed %q: want auto, continuous or longpoll", ErrConfig, c.Feed)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.Heartbeat, 10*time.Second)
	if c.Heartbeat < 100*time.Millisecond {
		return c, fmt.Errorf("%w: heartbeat %s is below 100ms", ErrConfig, c.Heartbeat)
	}
	def(&c.ReadTimeout, 3*c.Heartbeat+time.Second)
	if c.ReadTimeout <= c.Heartbeat {
		return c, fmt.Errorf("%w: read timeout %s must exceed the heartbeat %s", ErrConfig, c.ReadTimeout, c.Heartbeat)
	}
	def(&c.LongpollTimeout, 60*time.Second)
	if c.CheckpointEvery <= 0 {
		c.CheckpointEvery = 1000
	}
	def(&c.CheckpointInterval, 5*time.Second)
	def(&c.CheckInterval, 30*time.Second)
	def(&c.BackoffMin, 500*time.Millisecond)
	def(&c.BackoffMax, 30*time.Second)
	if c.BackoffMax < c.BackoffMin {
		c.BackoffMax = c.BackoffMin
	}
	def(&c.ProgressInterval, 5*time.Second)
	def(&c.ShutdownTimeout, 15*time.Second)
	return c, nil
}

// splitCouchURL returns the URL without credentials, and the credentials.
// Errors never echo the URL.
func splitCouchURL(raw string) (base, user, password string, err error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", "", "", fmt.Errorf("%w: invalid CouchDB URL (not shown: it may hold a password)", ErrConfig)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", "", "", fmt.Errorf("%w: CouchDB URL scheme %q: want http or https", ErrConfig, u.Scheme)
	}
	if u.Host == "" {
		return "", "", "", fmt.Errorf("%w: CouchDB URL has no host", ErrConfig)
	}
	if u.User != nil {
		user = u.User.Username()
		password, _ = u.User.Password()
		u.User = nil
	}
	u.Path = strings.TrimSuffix(u.Path, "/") + "/"
	return u.String(), user, password, nil
}

// CouchPassword returns the password in a CouchDB URL, for masking.
func CouchPassword(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return ""
	}
	p, _ := u.User.Password()
	return p
}
