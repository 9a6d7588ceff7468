package e2e_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// TestCouchOversizedStubSkipped: a document whose id makes its stub larger
// than the topic's max.message.bytes is recorded to changefeed-oversized
// (keyed by the id's SHA-256), counted, and checkpointed past; the follower
// stays healthy and publishes the document after it.
func TestCouchOversizedStubSkipped(t *testing.T) {
	e := couchSetup(t)
	ctx := couchCtx(t, 2*time.Minute)
	const db = "oversized"
	e.createDB(ctx, db)
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.kafka.Brokers()...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	if _, err := kadm.NewClient(cl).CreateTopic(ctx, 3, 1, map[string]*string{"max.message.bytes": kadm.StringPtr("2048")}, "case"); err != nil {
		t.Fatal(err)
	}
	huge := strings.Repeat("h", 3000)
	revs := e.bulk(ctx, db, []map[string]any{
		{"_id": huge, "doc_type": "CommCareCase", "domain": "d"},
		{"_id": "after", "doc_type": "CommCareCase", "domain": "d"},
	})
	f := e.startFollower(e.followerEnv(e.couch.URL(), db))
	kc := e.consume(db, "case")
	kc.waitRevs(t, 30*time.Second, map[string]string{"after": revs["after"]})
	couchEventually(t, 30*time.Second, "the oversized stub to be counted", func() bool {
		return f.metric("changefeed_stubs_oversized_total", `topic="case"`) == 1
	})
	if code, body := f.get("/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz %d: %s", code, body)
	}
	if n := len(kc.records(huge)); n != 0 {
		t.Fatalf("%d stubs of the oversized document on the topic", n)
	}
	sum := sha256.Sum256([]byte(huge))
	oc, err := kgo.NewClient(kgo.SeedBrokers(e.kafka.Brokers()...), kgo.ConsumeTopics("changefeed-oversized"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(oc.Close)
	fs := oc.PollFetches(ctx)
	if recs := fs.Records(); len(recs) != 1 || string(recs[0].Key) != hex.EncodeToString(sum[:]) || !bytes.Contains(recs[0].Value, []byte(revs[huge])) {
		t.Fatalf("oversized topic: %d records, errors %v", len(recs), fs.Errors())
	}
	f.stop()
	var info struct {
		UpdateSeq json.RawMessage `json:"update_seq"`
	}
	e.do(ctx, http.MethodGet, "/"+db, nil, &info)
	seq, _ := e.checkpoint(context.Background(), db)
	if want := strings.Trim(string(info.UpdateSeq), `"`); seq != want {
		t.Fatalf("checkpoint %q, want the database's update_seq %q (past the oversized document)", seq, want)
	}
}
