package e2e_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/changefeed/changefeed/stub"
)

// TestCouchStubs follows a database through creates, updates, hard and soft
// deletes, design documents, documents without doc_type and a conflict, and
// checks every stub's fields and topic.
func TestCouchStubs(t *testing.T) {
	e := couchSetup(t)
	ctx := couchCtx(t, 2*time.Minute)
	const db = "stubs"
	e.createDB(ctx, db)
	// Creates, before the follower starts: its first run is an initial
	// load from seq 0.
	revs := e.bulk(ctx, db, []map[string]any{
		{"_id": "case1", "doc_type": "CommCareCase", "domain": "d1", "type": "patient", "name": "big", "history": strings.Repeat("x", 200000)},
		{"_id": "form1", "doc_type": "XFormInstance", "domain": "d1", "xmlns": "http://openrosa.org/f1", "form": map[string]any{"q": []int{1, 2}}},
		{"_id": "user1", "doc_type": "CommCareUser", "domain": "d2"},
		{"_id": "web1", "doc_type": "WebUser", "domain": "d2"},
		{"_id": "group1", "doc_type": "Group", "domain": "d2"},
		{"_id": "dom1", "doc_type": "Domain", "name": "d3"},
		{"_id": "app1", "doc_type": "Application", "domain": "d1"},
		{"_id": "other1", "doc_type": "Something", "domain": "d1"},
		{"_id": "plain1", "value": 1},
		{"_id": "_design/views", "views": map[string]any{}},
		{"_id": "gone1", "doc_type": "CommCareCase", "domain": "d4", "type": "household"},
		{"_id": "soft1", "doc_type": "CommCareUser", "domain": "d5"},
		{"_id": "conflict1", "doc_type": "CommCareCase", "domain": "loser", "type": "t"},
	})
	// Checkpoints only at shutdown: a long interval and count, so that the
	// final checkpoint below can only come from SIGTERM's flush.
	env := append(e.followerEnv(e.couch.URL(), db), "CHANGEFEED_COUCH_CHECKPOINT_INTERVAL=1h", "CHANGEFEED_COUCH_CHECKPOINT_EVERY=1000000")
	f := e.startFollower(env)
	couchEventually(t, 30*time.Second, "the follower to be ready", func() bool {
		code, _ := f.get("/readyz")
		return code == http.StatusOK
	})
	kc := e.consume(db, "case", "form", "commcare-user", "web-user", "group", "domain", "app", "meta")
	kc.waitRevs(t, 30*time.Second, map[string]string{"case1": revs["case1"], "plain1": revs["plain1"], "conflict1": revs["conflict1"]})

	// Updates, a hard delete, a soft delete and a conflicting revision
	// (new_edits=false, as replication writes it): its hash outranks the
	// other leaf, so it becomes the winner.
	upd := e.bulk(ctx, db, []map[string]any{
		{"_id": "case1", "_rev": revs["case1"], "doc_type": "CommCareCase", "domain": "d1", "type": "patient", "name": "updated"},
		{"_id": "form1", "_rev": revs["form1"], "doc_type": "XFormArchived", "domain": "d1", "xmlns": "http://openrosa.org/f1"},
		{"_id": "gone1", "_rev": revs["gone1"], "_deleted": true},
		{"_id": "soft1", "_rev": revs["soft1"], "doc_type": "CommCareUser-Deleted", "domain": "d5"},
	})
	winner := "1-ffffffffffffffffffffffffffffffff"
	e.do(ctx, http.MethodPost, "/"+db+"/_bulk_docs", map[string]any{"new_edits": false, "docs": []map[string]any{
		{"_id": "conflict1", "_rev": winner, "doc_type": "CommCareCase", "domain": "winner", "type": "t"},
	}}, nil)
	var conflictDoc struct {
		Rev       string   `json:"_rev"`
		Conflicts []string `json:"_conflicts"`
	}
	e.do(ctx, http.MethodGet, "/"+db+"/conflict1?conflicts=true", nil, &conflictDoc)
	if conflictDoc.Rev != winner || len(conflictDoc.Conflicts) != 1 {
		t.Fatalf("the conflict was not set up: %+v", conflictDoc)
	}
	// A sentinel written last: once its stub is read, so is everything
	// before it in feed order that was acknowledged.
	sentinel := e.bulk(ctx, db, []map[string]any{{"_id": "zz-sentinel", "doc_type": "Group", "domain": "end"}})

	want := map[string]string{
		"case1": upd["case1"], "form1": upd["form1"], "gone1": upd["gone1"], "soft1": upd["soft1"],
		"conflict1": winner, "zz-sentinel": sentinel["zz-sentinel"],
		"user1": revs["user1"], "web1": revs["web1"], "group1": revs["group1"], "dom1": revs["dom1"],
		"app1": revs["app1"], "other1": revs["other1"],
	}
	kc.waitRevs(t, 30*time.Second, want)
	// Every change read is acknowledged (design documents are skipped).
	couchEventually(t, 10*time.Second, "every read change to be published or skipped", func() bool {
		read := f.metric("changefeed_couch_changes_read_total", `db="stubs"`)
		pub := f.metric("changefeed_couch_changes_published_total", `db="stubs"`)
		skipped := f.metric("changefeed_couch_changes_skipped_total", `db="stubs"`, `reason="design_doc"`)
		return read > 0 && skipped >= 1 && read == pub+skipped
	})

	tests := []struct {
		id, rev, topic, docType, domain, subtype string
		deletion                                 bool
	}{
		{"case1", upd["case1"], "case", "CommCareCase", "d1", "patient", false},
		{"form1", upd["form1"], "form", "XFormArchived", "d1", "http://openrosa.org/f1", false},
		{"user1", revs["user1"], "commcare-user", "CommCareUser", "d2", "", false},
		{"web1", revs["web1"], "web-user", "WebUser", "d2", "", false},
		{"group1", revs["group1"], "group", "Group", "d2", "", false},
		{"dom1", revs["dom1"], "domain", "Domain", "d3", "", false},
		{"app1", revs["app1"], "app", "Application", "d1", "", false},
		{"other1", revs["other1"], "meta", "Something", "d1", "", false},
		{"plain1", revs["plain1"], "meta", "Unknown", "", "", false},
		// A DELETE leaves a tombstone without fields: the stub takes them
		// from the revision before it.
		{"gone1", upd["gone1"], "case", "CommCareCase", "d4", "household", true},
		{"soft1", upd["soft1"], "commcare-user", "CommCareUser-Deleted", "d5", "", true},
		{"conflict1", winner, "case", "CommCareCase", "winner", "t", false},
	}
	for _, tt := range tests {
		var got *couchRecord
		for _, r := range kc.records(tt.id) {
			if r.Stub.DocumentRev == tt.rev {
				got = &r
			}
		}
		if got == nil {
			t.Errorf("%s: no stub of revision %s", tt.id, tt.rev)
			continue
		}
		s := got.Stub
		if got.Topic != tt.topic || s.DocumentType != tt.docType || s.Domain != tt.domain || s.DocumentSubtype != tt.subtype ||
			s.IsDeletion != tt.deletion || s.DataSourceType != stub.SourceCouch || s.DataSourceName != db || s.Seq == "" ||
			s.PublishTimestamp.IsZero() || s.OriginalPublicationDatetime.IsZero() {
			t.Errorf("%s: topic %s stub %+v; want topic %s type %s domain %s subtype %s deletion %v",
				tt.id, got.Topic, s, tt.topic, tt.docType, tt.domain, tt.subtype, tt.deletion)
		}
	}
	if recs := kc.records("_design/views"); len(recs) != 0 {
		t.Errorf("design document published: %+v", recs)
	}
	// Updates produced their own stubs: the first revisions were read
	// before the updates were written.
	for _, id := range []string{"case1", "conflict1"} {
		if !kc.hasRev(id, revs[id]) {
			t.Errorf("%s: no stub of its first revision %s", id, revs[id])
		}
	}
	if code, body := f.get("/healthz"); code != http.StatusOK {
		t.Errorf("healthz = %d %s", code, body)
	}
	if got := f.metric("changefeed_stubs_published_total", `component="couch"`, `topic="case"`); got < 4 {
		t.Errorf("producer metric for topic case = %v", got)
	}
	// --print-stubs printed acknowledged stubs.
	if lines := f.stdout.grep(`"document_id":"zz-sentinel"`); len(lines) == 0 {
		t.Error("no printed stub for the sentinel")
	}
	if got := f.metric("changefeed_couch_initial_load_target", `db="stubs"`); got < 12 {
		t.Errorf("initial load target = %v, want the documents present at start", got)
	}
	if len(f.stderr.grep("initial load from seq 0")) == 0 || len(f.stderr.grep("initial load reached")) == 0 {
		t.Error("no progress log lines for the initial load")
	}
	if seq, _ := e.checkpoint(ctx, db); seq != "" {
		t.Fatalf("checkpoint %q written before shutdown despite the 1h interval", seq)
	}
	f.stop()
	seq, identity := e.checkpoint(ctx, db)
	if seq != string(kc.records("zz-sentinel")[0].Stub.Seq) || identity == "" {
		t.Errorf("after SIGTERM the checkpoint is %q (identity %q), want the last change's seq %s", seq, identity, kc.records("zz-sentinel")[0].Stub.Seq)
	}
}
