package cmdutil

import (
	"bytes"
	"flag"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/changefeed/changefeed/kafkaconn"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestEnvFlags(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	ef := NewEnvFlags(fs, env(map[string]string{"S": "from-env", "B": "true", "I": "7", "D": "2s", "BAD": "maybe"}))
	var s, s2 string
	var b, bad bool
	var i int
	var d time.Duration
	ef.String(&s, "s", "S", "def", "a string")
	ef.String(&s2, "s2", "UNSET", "def", "another")
	ef.Bool(&b, "b", "B", false, "a bool")
	ef.Bool(&bad, "bad", "BAD", true, "a bad bool")
	ef.Int(&i, "i", "I", 1, "an int")
	ef.Duration(&d, "d", "D", time.Second, "a duration")
	if err := fs.Parse([]string{"-i", "9"}); err != nil {
		t.Fatal(err)
	}
	if s != "from-env" || s2 != "def" || !b || bad || i != 9 || d != 2*time.Second {
		t.Fatalf("got %q %q %t %t %d %s", s, s2, b, bad, i, d)
	}
	if err := ef.Err(); err == nil || !strings.Contains(err.Error(), `$BAD: "maybe" is not a boolean`) {
		t.Fatalf("Err = %v", err)
	}
	if u := fs.Lookup("s").Usage; u != "a string ($S)" {
		t.Fatalf("usage %q", u)
	}
}

func TestKafkaFlags(t *testing.T) {
	newSet := func(m map[string]string, embedded bool) (*flag.FlagSet, *KafkaFlags, *kafkaconn.Config, *bool) {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		var cfg kafkaconn.Config
		var emb bool
		k := BindKafka(NewEnvFlags(fs, env(m)), &cfg)
		if embedded {
			k.BindEmbedded(&emb)
		}
		return fs, k, &cfg, &emb
	}
	fs, k, cfg, _ := newSet(map[string]string{"CHANGEFEED_KAFKA_BROKERS": "a:1, b:2,", "CHANGEFEED_KAFKA_SASL_PASSWORD": "pw"}, false)
	if fs.Lookup("kafka-sasl-password") != nil || fs.Lookup("kafka-client-id") != nil {
		t.Fatal("unexpected flag")
	}
	if err := fs.Parse([]string{"--kafka-sasl-user", "u", "--kafka-tls"}); err != nil {
		t.Fatal(err)
	}
	if err := k.Finish(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.Brokers, []string{"a:1", "b:2"}) || cfg.SASLPassword != "pw" || cfg.SASLUser != "u" || !cfg.TLS {
		t.Fatalf("cfg %+v", cfg)
	}
	// Without brokers: nil unless --embedded-kafka is bound.
	fs, k, _, _ = newSet(nil, false)
	_ = fs.Parse(nil)
	if err := k.Finish(); err != nil {
		t.Fatal(err)
	}
	fs, k, _, _ = newSet(nil, true)
	_ = fs.Parse(nil)
	if err := k.Finish(); err == nil || !strings.Contains(err.Error(), "no Kafka brokers") {
		t.Fatalf("Finish = %v", err)
	}
	fs, k, _, emb := newSet(nil, true)
	_ = fs.Parse([]string{"--embedded-kafka"})
	if err := k.Finish(); err != nil || !*emb {
		t.Fatalf("Finish = %v, embedded %t", err, *emb)
	}
}

func TestPostgresURL(t *testing.T) {
	has := func(u string) bool { return strings.Contains(u, ":pw@") }
	for _, tt := range []struct {
		args []string
		env  string
		want string
		err  string
	}{
		{nil, "postgres://u:pw@h/db", "postgres://u:pw@h/db", ""},
		{[]string{"--postgres-url", "postgres://u@h/x"}, "postgres://u:pw@h/db", "postgres://u@h/x", ""},
		{[]string{"--postgres-url", "postgres://u:pw@h/x"}, "", "", "carries a password"},
		{nil, "", "", "no PostgreSQL URL"},
	} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		resolve := BindPostgresURL(NewEnvFlags(fs, env(map[string]string{"CHANGEFEED_POSTGRES_URL": tt.env})), has)
		if err := fs.Parse(tt.args); err != nil {
			t.Fatal(err)
		}
		got, err := resolve()
		if got != tt.want || (err == nil) != (tt.err == "") || (err != nil && !strings.Contains(err.Error(), tt.err)) {
			t.Errorf("%v: got %q, %v", tt.args, got, err)
		}
	}
}

func TestLogger(t *testing.T) {
	if _, err := ParseLevel("loud"); err == nil {
		t.Fatal("ParseLevel accepted loud")
	}
	var buf bytes.Buffer
	log := NewLogger(&buf, "loud", "c", func(h slog.Handler) slog.Handler { return h.WithAttrs([]slog.Attr{slog.String("w", "1")}) })
	log.Debug("hidden")
	log.Info("shown")
	if out := buf.String(); strings.Contains(out, "hidden") || !strings.Contains(out, `"component":"c"`) || !strings.Contains(out, `"w":"1"`) {
		t.Fatalf("output %s", out)
	}
}

func TestSubcommand(t *testing.T) {
	for _, tt := range []struct {
		args    []string
		cmd     string
		restLen int
	}{
		{nil, "run", 0},
		{[]string{"--x", "1"}, "run", 2},
		{[]string{"migrate", "--x"}, "migrate", 1},
	} {
		cmd, rest := Subcommand(tt.args, "run")
		if cmd != tt.cmd || len(rest) != tt.restLen {
			t.Errorf("%v: %q %v", tt.args, cmd, rest)
		}
	}
}

func TestKafkaTopicFlagsAndPlaintextOptIn(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var cfg kafkaconn.Config
	var topics TopicFlags
	k := BindKafka(NewEnvFlags(fs, env(map[string]string{"CHANGEFEED_KAFKA_SASL_ALLOW_PLAINTEXT": "true"})), &cfg)
	k.BindTopics(&topics, "the test")
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if !cfg.AllowPlaintextSASL {
		t.Fatal("$CHANGEFEED_KAFKA_SASL_ALLOW_PLAINTEXT not applied")
	}
	o := topics.Options("x", false)
	if o.Partitions != 3 || o.ReplicationFactor != 3 || o.MinInsyncReplicas != 2 || o.AllowUnsafeTopics ||
		o.OversizedTopic != "changefeed-oversized" || o.FailAfter != time.Minute {
		t.Fatalf("defaults %+v", o)
	}
	if o := topics.Options("x", true); o.ReplicationFactor != 1 || o.MinInsyncReplicas != 1 {
		t.Fatalf("embedded: %+v", o)
	}
}
