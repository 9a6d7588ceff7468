package pillows_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/docstore"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/pillows"
	"github.com/changefeed/changefeed/sink/pgsink"
	"github.com/changefeed/changefeed/stub"
)

// couch sends a JSON request to a CouchDB server and returns the new
// revision of a write.
func couch(t *testing.T, method, url string, body any) string {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(t.Context(), method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode/100 != 2 {
		t.Fatalf("%s %s = %d %s", method, url, res.StatusCode, b)
	}
	var out struct {
		Rev string `json:"rev"`
	}
	_ = json.Unmarshal(b, &out)
	return out.Rev
}

// caseSink is a reporting table "cases" (column name) written by pgsink.
func (e *env) caseSink() *pgsink.Sink {
	e.t.Helper()
	s, err := pgsink.New(e.pool, pgsink.Config{Table: "cases", Columns: []pgsink.Column{{Name: "name", Type: "text"}}}, e.log)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := s.Bootstrap(e.ctx); err != nil {
		e.t.Fatal(err)
	}
	return s
}

func (e *env) liveCases() map[string]string {
	e.t.Helper()
	rows, err := e.pool.Query(e.ctx, `SELECT doc_id, coalesce(name, '') FROM cases_live`)
	if err != nil {
		e.t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var id, name string
		if err := rows.Scan(&id, &name); err != nil {
			e.t.Fatal(err)
		}
		out[id] = name
	}
	return out
}

// A pillow filtered on CommCareCase must see the deletions of its cases:
// a soft delete ("CommCareCase-Deleted") by its base type, and a hard
// delete whose type the follower could not find ("Unknown", on the default
// topic the pillow also consumes). Before, both were filtered out and
// committed, and the cases stayed live in the sink forever.
func TestTypeFilterPassesDeletions(t *testing.T) {
	e := newEnv(t)
	srv := testenv.Couch(t)
	db := srv.URL() + "/hq"
	couch(t, "PUT", db, nil)
	st, err := docstore.NewCouch(srv.URL(), nil)
	if err != nil {
		t.Fatal(err)
	}
	cstub := func(id, typ, rev string, deletion bool) *stub.Stub {
		return &stub.Stub{DocumentID: id, DocumentRev: rev, DataSourceType: stub.SourceCouch, DataSourceName: "hq",
			DocumentType: typ, Domain: "demo", IsDeletion: deletion, PublishTimestamp: time.Now()}
	}
	put := func(id string, body map[string]any) string { return couch(t, "PUT", db+"/"+id, body) }

	r1 := put("case-1", map[string]any{"doc_type": "CommCareCase", "domain": "demo", "name": "one"})
	r2 := put("case-2", map[string]any{"doc_type": "CommCareCase", "domain": "demo", "name": "two"})
	rf := put("form-1", map[string]any{"doc_type": "XFormInstance", "domain": "demo", "name": "form"})
	e.produceStubs(cstub("case-1", "CommCareCase", r1, false), cstub("case-2", "CommCareCase", r2, false),
		cstub("form-1", "XFormInstance", rf, false))

	p := e.pillow("cases", pillows.SinkProcessor(e.caseSink()))
	p.Filter = pillows.Filter{DocumentTypes: []string{"CommCareCase"}}
	p.Stores = map[pillows.StoreKey]pillows.Store{{Type: stub.SourceCouch}: st}
	e.start(e.runner(), p)
	testenv.Eventually(t, 30*time.Second, func() string {
		return testenv.DiffStates(map[string]string{"case-1": "one", "case-2": "two"}, e.liveCases())
	})

	// HQ's soft delete renames the type; a hard delete leaves a tombstone
	// whose type is gone.
	r1 = put("case-1?rev="+r1, map[string]any{"doc_type": "CommCareCase-Deleted", "domain": "demo", "name": "one"})
	r2 = couch(t, "DELETE", db+"/case-2?rev="+r2, nil)
	r3 := put("case-3", map[string]any{"doc_type": "CommCareCase", "domain": "demo", "name": "three"})
	e.produceStubs(cstub("case-1", "CommCareCase-Deleted", r1, true), cstub("case-2", "Unknown", r2, true),
		cstub("case-3", "CommCareCase", r3, false))
	testenv.Eventually(t, 30*time.Second, func() string {
		return testenv.DiffStates(map[string]string{"case-3": "three"}, e.liveCases())
	})
}

// Invalid records are not processed, and they are not dropped either: each
// goes to the dead-letter topic, as read, with the reason, before the
// offset passes it. A SQL stub without an LSN is invalid: all such stubs
// would have the version 0/0, so the document would be written once and
// never updated.
func TestInvalidStubsDeadLettered(t *testing.T) {
	e := newEnv(t)
	e.apply(map[string]change{"no-lsn": {id: "no-lsn", lsn: 5, name: "no lsn"}, "ok": {id: "ok", lsn: 6, name: "fine"}})
	noLSN := mkStub(change{id: "no-lsn"})
	e.produceStubs(noLSN)
	if err := e.prod.ProduceSync(e.ctx, &kgo.Record{Key: []byte("junk"), Value: []byte("not a stub")}).FirstErr(); err != nil {
		t.Fatal(err)
	}
	e.produce(change{id: "ok", lsn: 6})

	s := e.repSink("rep")
	r := e.runner(func(o *pillows.Options) { o.DeadLetters = e.deadLetters() })
	e.start(r, e.pillow("strict", s))
	testenv.Eventually(t, 30*time.Second, func() string {
		return testenv.DiffStates(map[string]string{"ok": "fine"}, e.sinkState())
	})

	cl, err := kgo.NewClient(kgo.SeedBrokers(e.brokers...), kgo.ConsumeTopics("strict-dead-letter"), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	got := map[string]string{} // key → error_message
	ctx, cancel := context.WithTimeout(e.ctx, 20*time.Second)
	defer cancel()
	for len(got) < 2 && ctx.Err() == nil {
		cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) {
			h := map[string]string{}
			for _, x := range r.Headers {
				h[x.Key] = string(x.Value)
			}
			if h["error_type"] != "invalid_stub" || h["pillow"] != "strict" || h["source_topic"] != topic {
				t.Errorf("dead letter %s: headers %v", r.Key, h)
			}
			got[string(r.Key)] = h["error_message"]
		})
	}
	if len(got) != 2 || !bytes.Contains([]byte(got["no-lsn"]), []byte("without lsn")) || got["junk"] == "" {
		t.Fatalf("dead letters = %v", got)
	}
	if _, ok := e.sinkState()["no-lsn"]; ok {
		t.Fatal("the stub without an LSN was processed")
	}
}
