package main

import (
	"bytes"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/changefeed/changefeed/couchsource"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestCouchParseFlagsFromEnv(t *testing.T) {
	s, err := parseFlags("run", []string{"--checkpoint-every", "50", "--feed", "longpoll"}, env(map[string]string{
		"CHANGEFEED_COUCH_URL":            "http://admin:secret@couch:5984",
		"CHANGEFEED_COUCH_DATABASES":      "users, apps ,",
		"CHANGEFEED_POSTGRES_URL":         "postgres://cf:pw@pg/db",
		"CHANGEFEED_KAFKA_BROKERS":        "k1:9092,k2:9092",
		"CHANGEFEED_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
		"CHANGEFEED_KAFKA_SASL_USER":      "u",
		"CHANGEFEED_KAFKA_SASL_PASSWORD":  "kpw",
		"CHANGEFEED_HTTP_ADDR":            "127.0.0.1:0",
		"CHANGEFEED_ROUTING_FILE":         "/etc/routing.yaml",
		"CHANGEFEED_COUCH_HEARTBEAT":      "2s",
		"CHANGEFEED_PRINT_STUBS":          "true",
	}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	c := s.couch
	if c.URL != "http://admin:secret@couch:5984" || !slices.Equal(c.Databases, []string{"users", "apps"}) ||
		c.CheckpointEvery != 50 || c.Feed != couchsource.FeedLongpoll || c.Heartbeat != 2*time.Second || c.Source != "couch" {
		t.Fatalf("couch settings: %+v", c)
	}
	if s.postgresURL != "postgres://cf:pw@pg/db" || s.httpAddr != "127.0.0.1:0" || s.routingFile != "/etc/routing.yaml" || !s.printStubs {
		t.Fatalf("settings: %+v", s)
	}
	k := s.kafka
	if !slices.Equal(k.Brokers, []string{"k1:9092", "k2:9092"}) || k.SASLMechanism != "SCRAM-SHA-256" || k.SASLUser != "u" || k.SASLPassword != "kpw" {
		t.Fatalf("kafka: %+v", k)
	}
}

func TestCouchParseFlagsErrors(t *testing.T) {
	base := map[string]string{
		"CHANGEFEED_COUCH_URL":       "http://couch:5984",
		"CHANGEFEED_COUCH_DATABASES": "users",
		"CHANGEFEED_POSTGRES_URL":    "postgres://pg/db",
		"CHANGEFEED_KAFKA_BROKERS":   "k:9092",
	}
	tests := []struct {
		name  string
		args  []string
		unset string
		set   map[string]string
		want  string
	}{
		{"couch password in argv", []string{"--couch-url", "http://a:hunter22@h"}, "", nil, "--couch-url carries a password"},
		{"postgres password in argv", []string{"--postgres-url", "postgres://a:hunter22@h/db"}, "", nil, "--postgres-url carries a password"},
		{"no couch", nil, "CHANGEFEED_COUCH_URL", nil, "no CouchDB URL"},
		{"no databases", nil, "CHANGEFEED_COUCH_DATABASES", nil, "no database"},
		{"no postgres", nil, "CHANGEFEED_POSTGRES_URL", nil, "no PostgreSQL URL"},
		{"no brokers", nil, "CHANGEFEED_KAFKA_BROKERS", nil, "no Kafka brokers"},
		{"bad duration", nil, "", map[string]string{"CHANGEFEED_COUCH_HEARTBEAT": "soon"}, "not a duration"},
		{"bad bool", nil, "", map[string]string{"CHANGEFEED_PRINT_STUBS": "maybe"}, "not a boolean"},
		{"extra args", []string{"what"}, "", nil, "unexpected arguments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := map[string]string{}
			for k, v := range base {
				if k != tt.unset {
					m[k] = v
				}
			}
			for k, v := range tt.set {
				m[k] = v
			}
			_, err := parseFlags("run", tt.args, env(m), io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "hunter22") {
				t.Fatalf("password in error: %v", err)
			}
		})
	}
}

// TestRunConfigErrorExitsTwoWithoutSecrets runs the command with settings
// that fail validation and checks the exit status and that no password is
// printed.
func TestCouchRunConfigErrorExitsTwoWithoutSecrets(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := run([]string{"--databases", "Not A Db", "--no-migrate", "--http-addr", ""}, env(map[string]string{
		"CHANGEFEED_COUCH_URL":     "http://admin:hunter22@127.0.0.1:1",
		"CHANGEFEED_POSTGRES_URL":  "postgres://cf:pgsecret99@127.0.0.1:1/db",
		"CHANGEFEED_KAFKA_BROKERS": "127.0.0.1:1",
	}), &stdout, &stderr)
	if code != 2 {
		t.Fatalf("exit %d, want 2; stderr: %s", code, stderr.String())
	}
	out := stdout.String() + stderr.String()
	if strings.Contains(out, "hunter22") || strings.Contains(out, "pgsecret99") {
		t.Fatalf("secret printed: %s", out)
	}
	if !strings.Contains(out, "not a valid CouchDB database name") {
		t.Fatalf("unclear error: %s", out)
	}
}
