package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/changefeed/changefeed/cdc"
)

func envOf(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestParseFlagsFromEnv(t *testing.T) {
	s, err := parseFlags("run", nil, envOf(map[string]string{
		"CHANGEFEED_POSTGRES_URL":         "postgres://u:pw@h/db",
		"CHANGEFEED_KAFKA_BROKERS":        "a:9092, b:9092",
		"CHANGEFEED_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
		"CHANGEFEED_KAFKA_SASL_USER":      "u",
		"CHANGEFEED_KAFKA_SASL_PASSWORD":  "kpw",
		"CHANGEFEED_KAFKA_TLS":            "true",
		"CHANGEFEED_SLOT":                 "s1",
		"CHANGEFEED_PUBLICATION":          "p1",
		"CHANGEFEED_STATUS_INTERVAL":      "250ms",
		"CHANGEFEED_ALLOW_NEW_SLOT":       "s1@0/16B3748",
		"CHANGEFEED_MAX_IN_FLIGHT":        "77",
	}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if s.postgresURL != "postgres://u:pw@h/db" || strings.Join(s.kafka.Brokers, ",") != "a:9092,b:9092" ||
		s.kafka.SASLMechanism != "SCRAM-SHA-512" || s.kafka.SASLPassword != "kpw" || !s.kafka.TLS ||
		s.slot != "s1" || s.publication != "p1" || s.statusInterval != 250*time.Millisecond || s.allowNewSlot.String() != "s1@0/16B3748" || s.maxInFlight != 77 {
		t.Fatalf("settings = %+v", s)
	}
	// Flags override the environment.
	s, err = parseFlags("run", []string{"--slot", "s2", "--kafka-brokers", "c:1"}, envOf(map[string]string{
		"CHANGEFEED_POSTGRES_URL": "postgres://u@h/db", "CHANGEFEED_SLOT": "s1", "CHANGEFEED_KAFKA_BROKERS": "a:1",
	}), io.Discard)
	if err != nil || s.slot != "s2" || s.kafka.Brokers[0] != "c:1" {
		t.Fatalf("flags: %+v, %v", s, err)
	}
}

func TestParseFlagsErrors(t *testing.T) {
	url := map[string]string{"CHANGEFEED_POSTGRES_URL": "postgres://u@h/db", "CHANGEFEED_KAFKA_BROKERS": "a:1"}
	with := func(k, v string) map[string]string {
		m := map[string]string{}
		for a, b := range url {
			m[a] = b
		}
		m[k] = v
		return m
	}
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"password on argv", []string{"--postgres-url", "postgres://u:secret@h/db"}, url, "carries a password"},
		{"keyword password on argv", []string{"--postgres-url", "host=h password=secret"}, url, "carries a password"},
		{"no url", nil, map[string]string{"CHANGEFEED_KAFKA_BROKERS": "a:1"}, "no PostgreSQL URL"},
		{"no brokers", nil, map[string]string{"CHANGEFEED_POSTGRES_URL": "postgres://u@h/db"}, "no Kafka brokers"},
		{"bad bool", nil, with("CHANGEFEED_PRINT_STUBS", "maybe"), "CHANGEFEED_PRINT_STUBS"},
		// A standing "accept every gap" is refused: it must name its gap.
		{"allow-new-slot without its gap", nil, with("CHANGEFEED_ALLOW_NEW_SLOT", "true"), "<slot>@<checkpoint LSN>"},
		{"allow-new-slot bad LSN", []string{"--allow-new-slot", "changefeed@xyz"}, url, "parse lsn"},
		{"bad duration", nil, with("CHANGEFEED_STATUS_INTERVAL", "soon"), "CHANGEFEED_STATUS_INTERVAL"},
		{"bad slot", nil, with("CHANGEFEED_SLOT", "a-b"), "--slot"},
		{"bad publication", []string{"--publication", "A"}, url, "--publication"},
		{"stray argument", []string{"extra"}, url, "unexpected arguments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseFlags("run", tt.args, envOf(tt.env), io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "secret") {
				t.Fatalf("error echoes the password: %v", err)
			}
		})
	}
}

func TestExitCode(t *testing.T) {
	tests := []struct {
		err  error
		want int
	}{
		{nil, 0},
		{fmt.Errorf("x: %w", cdc.ErrConfig), 2},
		{fmt.Errorf("x: %w", cdc.ErrPrecondition), 2},
		{fmt.Errorf("x: %w", &pgconn.PgError{Code: "28P01"}), 2},
		{fmt.Errorf("x: %w", cdc.ErrSchema), 2},
		{fmt.Errorf("x: %w", cdc.ErrPossibleGap), 3},
		{fmt.Errorf("x: %w", cdc.ErrSlotBusy), 4},
		{fmt.Errorf("x: %w", cdc.ErrProduce), 1},
		{errors.New("other"), 1},
	}
	for _, tt := range tests {
		if got := exitCode(tt.err); got != tt.want {
			t.Errorf("exitCode(%v) = %d, want %d", tt.err, got, tt.want)
		}
	}
}

func TestUnknownCommand(t *testing.T) {
	var out strings.Builder
	if code := run([]string{"frobnicate"}, envOf(map[string]string{"CHANGEFEED_POSTGRES_URL": "postgres://u@h/db"}), io.Discard, &out); code != 2 {
		t.Fatalf("code %d, output %s", code, out.String())
	}
}
