package main

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

func TestParseConfig(t *testing.T) {
	env := func(m map[string]string) func(string) string {
		return func(k string) string { return m[k] }
	}
	cfg, err := parseConfig([]string{"-listen", "0.0.0.0:9092", "-advertise", "kafka.example:19092", "-brokers", "3",
		"-sasl-mechanism", "scram-sha-512", "-sasl-user", "u"}, env(map[string]string{passwordEnv: "secret"}))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.listenHost != "0.0.0.0" || cfg.listenPort != 9092 || cfg.advertiseHost != "kafka.example" ||
		cfg.advertisePort != 19092 || cfg.brokers != 3 || cfg.partitions != 1 ||
		cfg.saslMechanism != "SCRAM-SHA-512" || cfg.saslUser != "u" || cfg.saslPassword != "secret" {
		t.Fatalf("unexpected config %+v", cfg)
	}

	bad := map[string][]string{
		"random port":        {"-listen", "127.0.0.1:0"},
		"no password":        {"-sasl-mechanism", "PLAIN", "-sasl-user", "u"},
		"unknown mechanism":  {"-sasl-mechanism", "GSSAPI", "-sasl-user", "u"},
		"user without mech":  {"-sasl-user", "u"},
		"zero partitions":    {"-partitions", "0"},
		"ports out of range": {"-listen", "127.0.0.1:65535", "-brokers", "2"},
		"positional args":    {"extra"},
	}
	for name, args := range bad {
		if _, err := parseConfig(args, env(nil)); err == nil {
			t.Errorf("%s: parseConfig(%q) succeeded", name, args)
		}
	}
}

// TestAdvertise runs two brokers in process and checks that metadata reports
// the advertised host and consecutive ports, and that a record round-trips.
func TestAdvertise(t *testing.T) {
	port := consecutiveFreePorts(t, 2)
	cfg, err := parseConfig([]string{
		"-listen", fmt.Sprintf("127.0.0.1:%d", port),
		// "localhost" resolves to the listener, yet differs from the bind address.
		"-advertise", fmt.Sprintf("localhost:%d", port),
		"-brokers", "2",
	}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var logs bytes.Buffer
	cluster, err := start(cfg, log.New(&logs, "", 0))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	if !strings.Contains(logs.String(), "ready: 2 broker(s)") {
		t.Errorf("log lacks the ready line: %q", logs.String())
	}

	cl, err := kgo.NewClient(
		kgo.SeedBrokers(fmt.Sprintf("localhost:%d", port)),
		kgo.DefaultProduceTopic("t"),
		kgo.ConsumeTopics("t"),
		kgo.AllowAutoTopicCreation(),
	)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()

	meta, err := kmsg.NewPtrMetadataRequest().RequestWith(ctx, cl)
	if err != nil {
		t.Fatalf("metadata: %v", err)
	}
	got := map[string]bool{}
	for _, b := range meta.Brokers {
		got[fmt.Sprintf("%s:%d", b.Host, b.Port)] = true
	}
	for i := range 2 {
		if want := fmt.Sprintf("localhost:%d", port+i); !got[want] {
			t.Errorf("metadata brokers %v lack %s", got, want)
		}
	}

	if err := cl.ProduceSync(ctx, kgo.StringRecord("hello")).FirstErr(); err != nil {
		t.Fatalf("produce: %v", err)
	}
	fetches := cl.PollRecords(ctx, 1)
	if err := fetches.Err(); err != nil {
		t.Fatalf("poll: %v", err)
	}
	if recs := fetches.Records(); len(recs) != 1 || string(recs[0].Value) != "hello" {
		t.Fatalf("consumed %v, want one record \"hello\"", recs)
	}
}

// consecutiveFreePorts finds n consecutive free loopback ports. It holds
// none of them afterwards, so another process may grab one; that race is
// accepted in tests.
func consecutiveFreePorts(t *testing.T, n int) int {
	t.Helper()
	for range 50 {
		first, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		base := first.Addr().(*net.TCPAddr).Port
		held := []net.Listener{first}
		ok := true
		for i := 1; i < n && ok; i++ {
			ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", base+i))
			if err != nil {
				ok = false
				break
			}
			held = append(held, ln)
		}
		for _, ln := range held {
			ln.Close()
		}
		if ok {
			return base
		}
	}
	t.Fatalf("no %d consecutive free ports found", n)
	return 0
}
