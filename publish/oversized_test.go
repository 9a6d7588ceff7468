package publish

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/stub"
)

// TestOversizedStubRecordedAndSkipped: on a topic with max.message.bytes
// 4096, a stub with a 10,000-byte id is recorded to the oversized topic (id
// hash and prefix, version, size), counted, logged, and reported as
// delivered; the small stubs around it, published concurrently so that they
// batch, are all delivered to the topic itself.
func TestOversizedStubRecordedAndSkipped(t *testing.T) {
	k := testenv.Kafka(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	adm := kadm.NewClient(kgoClient(t, k.Brokers()))
	if _, err := adm.CreateTopic(ctx, 1, 1, map[string]*string{"max.message.bytes": kadm.StringPtr("4096")}, "small"); err != nil {
		t.Fatal(err)
	}
	opts := oneBroker
	opts.OversizedTopic = "oversized"
	opts.Linger = 50 * time.Millisecond // let the small stubs batch
	p, logs := newProducer(t, kafkaconn.Config{Brokers: k.Brokers()}, opts)
	if err := p.EnsureTopics(ctx, "small"); err != nil {
		t.Fatal(err)
	}
	hugeID := strings.Repeat("é", 5000) // 10,000 bytes
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed []string
	publish := func(s *stub.Stub) {
		wg.Add(1)
		p.Publish(ctx, "small", s, func(err error) {
			defer wg.Done()
			if err != nil {
				mu.Lock()
				failed = append(failed, fmt.Sprintf("%.20s: %v", s.DocumentID, err))
				mu.Unlock()
			}
		})
	}
	const small = 60 // about 250 bytes each: far more than 4096 together
	for i := range small {
		if i == small/2 {
			publish(&stub.Stub{DocumentID: hugeID, DataSourceType: stub.SourceSQL, DataSourceName: "t", DocumentType: "X", LSN: 0x1234, TxOrdinal: 7})
		}
		publish(&stub.Stub{DocumentID: fmt.Sprintf("doc-%03d", i), DataSourceType: stub.SourceSQL, DataSourceName: "t", DocumentType: "X", LSN: stub.LSN(i + 1)})
	}
	wg.Wait()
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if len(failed) > 0 {
		t.Fatalf("%d stubs failed, want none: %v", len(failed), failed)
	}

	if n := len(consume(t, ctx, k.Brokers(), "small", small)); n != small {
		t.Fatalf("%d records on the topic, want %d", n, small)
	}
	recs := consume(t, ctx, k.Brokers(), "oversized", 1)
	var o Oversized
	if err := json.Unmarshal(recs[0].Value, &o); err != nil {
		t.Fatal(err)
	}
	if o.Topic != "small" || o.RecordBytes <= 10000 || o.LimitBytes != 4096 || o.DocumentIDBytes != 10000 ||
		o.DocumentIDSHA256 != sha256Hex([]byte(hugeID)) || string(recs[0].Key) != o.DocumentIDSHA256 {
		t.Fatalf("oversized record %+v", o)
	}
	if o.Stub == nil || o.Stub.LSN != 0x1234 || o.Stub.TxOrdinal != 7 || len(o.Stub.DocumentID) != 256 || !strings.HasPrefix(hugeID, o.Stub.DocumentID) {
		t.Fatalf("oversized stub %+v", o.Stub)
	}
	var m dto.Metric
	if err := p.metrics.oversized.WithLabelValues("small").Write(&m); err != nil {
		t.Fatal(err)
	}
	if got := m.GetCounter().GetValue(); got != 1 {
		t.Fatalf("oversized metric = %v, want 1", got)
	}
	if n := logs.count(`"level":"ERROR"`, "recorded and skipped", o.DocumentIDSHA256); n != 1 {
		t.Fatalf("%d error lines about the oversized stub, want 1:\n%s", n, logs)
	}
}

// consume reads n records of topic from the start.
func consume(t *testing.T, ctx context.Context, brokers []string, topic string, n int) []*kgo.Record {
	t.Helper()
	cl := kgoClient(t, brokers, kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	var recs []*kgo.Record
	for len(recs) < n {
		fs := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			t.Fatalf("%s: read %d of %d records: %v", topic, len(recs), n, err)
		}
		recs = append(recs, fs.Records()...)
	}
	return recs
}
