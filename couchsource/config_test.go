package couchsource

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/changefeed/changefeed/stub"
)

func TestCouchConfigDefaults(t *testing.T) {
	c, err := Config{URL: "http://h:5984", Databases: []string{"users", "apps"}}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if c.Source != "couch" || c.Feed != FeedAuto || c.Heartbeat != 10*time.Second || c.ReadTimeout != 31*time.Second ||
		c.CheckpointEvery != 1000 || c.CheckpointInterval != 5*time.Second || c.Routing == nil {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestCouchConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		c    Config
		want string
	}{
		{"no url", Config{Databases: []string{"a"}}, "URL is empty"},
		{"bad scheme", Config{URL: "ftp://h", Databases: []string{"a"}}, "scheme"},
		{"malformed url hides password", Config{URL: "http://u:sec ret@h%zz", Databases: []string{"a"}}, "invalid CouchDB URL"},
		{"no db", Config{URL: "http://h"}, "no database"},
		{"bad db", Config{URL: "http://h", Databases: []string{"Bad Name"}}, "not a valid CouchDB database name"},
		{"dup db", Config{URL: "http://h", Databases: []string{"a", "a"}}, "twice"},
		{"feed", Config{URL: "http://h", Databases: []string{"a"}, Feed: "eventsource"}, "feed"},
		{"timeout", Config{URL: "http://h", Databases: []string{"a"}, Heartbeat: time.Second, ReadTimeout: time.Second}, "read timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.c.withDefaults()
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want ErrConfig mentioning %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "sec ret") {
				t.Fatalf("password in error: %v", err)
			}
		})
	}
}

func TestCouchSplitCouchURL(t *testing.T) {
	base, user, pw, err := splitCouchURL("https://admin:p%40ss@couch.example:6984/prefix")
	if err != nil {
		t.Fatal(err)
	}
	if base != "https://couch.example:6984/prefix/" || user != "admin" || pw != "p@ss" {
		t.Fatalf("got %q %q %q", base, user, pw)
	}
	if CouchPassword("http://a:b%20c@h") != "b c" || CouchPassword("http://h") != "" {
		t.Fatal("CouchPassword")
	}
}

func TestCouchNumericPrefixAndBehind(t *testing.T) {
	tests := []struct {
		seq stub.Seq
		n   int64
		ok  bool
	}{
		{"12", 12, true},
		{"12-g1AAAAFTeJzLYWBg4MhgTmHgz8tPSTV0MDQ", 12, true},
		{"0", 0, true},
		{"now", 0, false},
		{"", 0, false},
		{"-3", 0, false},
	}
	for _, tt := range tests {
		n, ok := numericPrefix(tt.seq)
		if n != tt.n || ok != tt.ok {
			t.Errorf("numericPrefix(%q) = %d, %v", tt.seq, n, ok)
		}
	}
	if !behind("9", "10") || behind("10", "9") || behind("10", "10") || behind("opaque", "10") || !behind("3-abc", "4-xyz") {
		t.Error("behind")
	}
}

func TestCouchBackoff(t *testing.T) {
	b := backoff{min: 100 * time.Millisecond, max: time.Second}
	var last time.Duration
	for i := range 10 {
		d := b.next()
		if d < 75*time.Millisecond || d > time.Second {
			t.Fatalf("attempt %d: %s out of range", i, d)
		}
		last = d
	}
	if last < 750*time.Millisecond {
		t.Fatalf("backoff did not reach its max: %s", last)
	}
	b.reset()
	if d := b.next(); d > 100*time.Millisecond {
		t.Fatalf("after reset: %s", d)
	}
}
