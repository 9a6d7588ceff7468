package publish

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/stub"
)

// TestPublishKeysAndAcks publishes stubs to a kfake container and checks what
// a consumer reads: one record per stub, keyed by document id, every stub of
// one document in one partition in publication order, and done called once
// per record with nil only after the ack.
func TestPublishKeysAndAcks(t *testing.T) {
	k := testenv.Kafka(t)
	reg := prometheus.NewRegistry()
	p, err := New(kafkaconn.Config{Brokers: k.Brokers()}, Options{Partitions: 4, Component: "test", ReplicationFactor: 1, MinInsyncReplicas: 1}, slog.New(slog.DiscardHandler), reg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.EnsureTopics(ctx, "stubs"); err != nil {
		t.Fatal(err)
	}
	// Idempotent: an existing topic is left as it is.
	if err := p.EnsureTopics(ctx, "stubs"); err != nil {
		t.Fatalf("second EnsureTopics: %v", err)
	}
	adm := kadm.NewClient(kgoClient(t, k.Brokers()))
	td, err := adm.ListTopics(ctx, "stubs")
	if err != nil {
		t.Fatal(err)
	}
	if n := len(td["stubs"].Partitions); n != 4 {
		t.Fatalf("topic has %d partitions, want 4", n)
	}

	const docs, versions = 20, 5
	var mu sync.Mutex
	acked := 0
	var wg sync.WaitGroup
	for v := range versions {
		for d := range docs {
			s := &stub.Stub{DocumentID: docID(d), DataSourceType: stub.SourceSQL, DataSourceName: "t",
				DocumentType: "X", LSN: stub.LSN(100 + v), PublishTimestamp: time.Now()}
			wg.Add(1)
			p.Publish(ctx, "stubs", s, func(err error) {
				defer wg.Done()
				if err != nil {
					t.Errorf("publish %s: %v", s.DocumentID, err)
					return
				}
				mu.Lock()
				acked++
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if acked != docs*versions {
		t.Fatalf("%d acks, want %d", acked, docs*versions)
	}
	var m dto.Metric
	if err := p.metrics.published.WithLabelValues("stubs").Write(&m); err != nil {
		t.Fatal(err)
	}
	if got := m.GetCounter().GetValue(); got != docs*versions {
		t.Fatalf("published metric = %v, want %d", got, docs*versions)
	}

	cl := kgoClient(t, k.Brokers(), kgo.ConsumeTopics("stubs"), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	partOf := map[string]int32{}
	lastLSN := map[string]stub.LSN{}
	read := 0
	for read < docs*versions {
		fs := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			t.Fatalf("read %d of %d records: %v", read, docs*versions, err)
		}
		fs.EachRecord(func(r *kgo.Record) {
			read++
			s, err := stub.Unmarshal(r.Value)
			if err != nil {
				t.Fatalf("record %d: %v", r.Offset, err)
			}
			if string(r.Key) != s.DocumentID {
				t.Fatalf("key %q for document %q", r.Key, s.DocumentID)
			}
			if p, ok := partOf[s.DocumentID]; ok && p != r.Partition {
				t.Fatalf("%s in partitions %d and %d", s.DocumentID, p, r.Partition)
			}
			partOf[s.DocumentID] = r.Partition
			if s.LSN <= lastLSN[s.DocumentID] {
				t.Fatalf("%s: lsn %s after %s", s.DocumentID, s.LSN, lastLSN[s.DocumentID])
			}
			lastLSN[s.DocumentID] = s.LSN
		})
	}
}

func TestPingFailsWhileKafkaPaused(t *testing.T) {
	k := testenv.Kafka(t)
	p, err := New(kafkaconn.Config{Brokers: k.Brokers()}, oneBroker, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	ctx := context.Background()
	pingCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := p.Ping(pingCtx); err != nil {
		t.Fatalf("ping: %v", err)
	}
	if err := k.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Unpause(context.Background()) })
	short, cancel2 := context.WithTimeout(ctx, 2*time.Second)
	defer cancel2()
	if err := p.Ping(short); err == nil {
		t.Fatal("ping succeeded while Kafka was paused")
	}
}

func docID(i int) string { return "doc-" + string(rune('a'+i)) }

func kgoClient(t *testing.T, brokers []string, opts ...kgo.Opt) *kgo.Client {
	t.Helper()
	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(brokers...)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// oneBroker are the options for a one-broker kfake cluster.
var oneBroker = Options{ReplicationFactor: 1, MinInsyncReplicas: 1}

// logBuffer collects JSON log lines from several goroutines.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// count returns how many lines contain every one of subs.
func (l *logBuffer) count(subs ...string) int {
	n := 0
	for _, line := range strings.Split(l.String(), "\n") {
		all := line != ""
		for _, s := range subs {
			all = all && strings.Contains(line, s)
		}
		if all {
			n++
		}
	}
	return n
}

// newProducer starts a producer whose logs go to the returned buffer.
func newProducer(t *testing.T, conn kafkaconn.Config, opts Options) (*Producer, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	p, err := New(conn, opts, slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p, logs
}
