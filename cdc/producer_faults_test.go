package cdc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/publish"
)

// oversizedTopic receives the harness publisher's oversized stubs.
const oversizedTopic = "changefeed-oversized"

// TestOversizedStubDoesNotBlockSlot: a row whose stub exceeds the topic's
// max.message.bytes is recorded to the oversized topic with its version,
// and the slot is confirmed past it; the rows around it are published.
func TestOversizedStubDoesNotBlockSlot(t *testing.T) {
	pg := testenv.Postgres(t)
	db := newDB(t, pg, schema)
	k := testenv.Kafka(t)
	kafka := kafkaOf(k)
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	if _, err := kadm.NewClient(cl).CreateTopic(ctx, 3, 1, map[string]*string{"max.message.bytes": kadm.StringPtr("2048")}, "case-sql"); err != nil {
		t.Fatal(err)
	}
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql", oversizedTopic)
	huge := strings.Repeat("x", 3000) // a primary key fits in an index, its stub does not fit in 2048 bytes
	db.exec(t, "INSERT INTO cases VALUES ('before', 'd', 'p', false, 'x')")
	db.exec(t, "INSERT INTO cases VALUES ($1, 'd', 'p', false, 'x')", huge)
	db.exec(t, "INSERT INTO cases VALUES ('after', 'd', 'p', false, 'x')")
	got := cons.waitStubs(t, "case-sql", 2)
	if len(got) != 2 || got[0].DocumentID != "before" || got[1].DocumentID != "after" {
		t.Fatalf("stubs on case-sql: %v", got)
	}
	var o publish.Oversized
	eventually(t, "oversized record", func() error {
		for _, rec := range cons.records() {
			if rec.Topic == oversizedTopic {
				return json.Unmarshal(rec.Value, &o)
			}
		}
		return fmt.Errorf("none yet")
	})
	if o.Topic != "case-sql" || o.DocumentIDBytes != len(huge) || o.Stub == nil || o.Stub.LSN == 0 || !strings.HasPrefix(huge, o.Stub.DocumentID) {
		t.Fatalf("oversized record %+v", o)
	}
	eventually(t, "slot confirmed past the oversized row", func() error {
		if s := db.slotLSN(t); s < got[1].LSN || s <= o.Stub.LSN {
			return fmt.Errorf("slot at %s, oversized row's commit %s, next row's %s", s, o.Stub.LSN, got[1].LSN)
		}
		return nil
	})
	if s := r.p.State(); s != StateStreaming {
		t.Fatalf("publisher %s, want streaming", s)
	}
}

// TestDeletedTopicFailsReadiness: a routed topic deleted under a streaming
// publisher makes it not ready, naming the topic.
func TestDeletedTopicFailsReadiness(t *testing.T) {
	pg := testenv.Postgres(t)
	db := newDB(t, pg, schema)
	k := testenv.Kafka(t)
	r := start(t, db, kafkaOf(k), Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	ready := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return r.p.Ready(ctx)
	}
	eventually(t, "ready", ready)
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if _, err := kadm.NewClient(cl).DeleteTopic(ctx, "case-sql"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "not ready, naming the deleted topic", func() error {
		if err := ready(); !errors.Is(err, publish.ErrTopicDeleted) || !strings.Contains(err.Error(), "case-sql") {
			return fmt.Errorf("Ready = %v", err)
		}
		return nil
	})
}
