package e2e_test

// CouchDB → couch-follower → Kafka → pillow (Couch document store) →
// reporting table, with the real binaries. Identifiers of this file start
// with "pillowCouch"; the servers, processes and polling come from the
// couch_* and pillow_* helpers.

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/testenv"
)

const (
	pillowCouchDB     = "pillowcouch"
	pillowCouchName   = "couchrep"
	pillowCouchTopic  = "case" // the follower's topic for CommCareCase
	pillowCouchTable  = "rep_couchrep"
	pillowCouchDomain = "pc"
)

// pillowCouchDoc is one document's state, in CouchDB or in the sink: the
// winning (or tombstone) revision and the fields the sink has columns for.
type pillowCouchDoc struct {
	rev     string
	deleted bool
	name    string
	n       int64
	docType string
}

func (d pillowCouchDoc) String() string {
	if d.deleted {
		return "deleted@" + d.rev
	}
	return fmt.Sprintf("%s{name=%q n=%d doc_type=%q}", d.rev, d.name, d.n, d.docType)
}

// TestPillowCouch runs the couch-follower and a pillow with a Couch store
// and a PostgreSQL reporting table against pouchdb-server: creates, several
// revisions, hard deletes, and conflicts whose winning branch is deleted so
// that a revision of LOWER generation becomes the winner. The reporting
// table must equal CouchDB's current state (every live row at the winner's
// _rev with its fields, every deleted document a tombstone at its
// tombstone's revision, absent from <table>_live), before and after the
// pillow is killed with SIGKILL mid-stream and restarted.
//
// The second conflict is arranged so that the pillow fetches a document
// while its stub's revision is not the winner (the stub was published
// before a conflicting branch won), and the follower is stopped meanwhile,
// so that once the branch is deleted the feed names the document again only
// at that same revision. The pillow's per-partition dedup memory must then
// hold the revision it wrote (the branch), not the stub's: remembering the
// stub's made it skip the new stub as a duplicate and leave the deleted
// branch in the sink for good.
//
// Soft deletes (doc_type "…-Deleted") are not covered: the Couch store
// reports such a document as live (only _deleted marks a deletion), so the
// sink keeps it as a row like any other.
func TestPillowCouch(t *testing.T) {
	e := couchSetup(t) // parallel: the clock starts once the servers run
	start := time.Now()
	ctx := couchCtx(t, 2*time.Minute)
	e.createDB(ctx, pillowCouchDB)
	r := pillowCouchRig(t, ctx, e)
	file := pillowCouchFile(t, r, e.couch.URL())

	env := e.followerEnv(e.couch.URL(), pillowCouchDB)
	f := e.startFollower(env)
	couchEventually(t, 30*time.Second, "the follower to be ready", func() bool { return couchReady(f) })
	kc := e.consume(pillowCouchDB, pillowCouchTopic)
	p := r.startPillow(file, "--pillow", pillowCouchName)
	p.waitLog(t, "partitions assigned")

	// Every id ever written: CouchDB's state is read for all of them, so
	// deleted ones are compared as tombstones.
	var ids []string
	fields := func(id string, v int) map[string]any {
		return map[string]any{"_id": id, "doc_type": "CommCareCase", "domain": pillowCouchDomain, "name": fmt.Sprintf("%s v%d", id, v), "n": v}
	}
	revs := map[string]string{}
	write := func(docs []map[string]any) {
		t.Helper()
		for id, rev := range e.bulk(ctx, pillowCouchDB, docs) {
			revs[id] = rev
		}
	}

	// Phase 1: creates, updates (several revisions), hard deletes, and a
	// conflict whose higher-generation winner is deleted.
	phase := time.Now()
	var docs []map[string]any
	for i := range 40 {
		id := fmt.Sprintf("d-%02d", i)
		ids = append(ids, id)
		docs = append(docs, fields(id, 0))
	}
	ids = append(ids, "c1", "c2")
	write(append(docs, fields("c1", 0), fields("c2", 0)))
	for v := 1; v <= 3; v++ { // d-00..d-19 reach generation 4, one write each
		docs = docs[:0]
		for i := range 20 {
			id := fmt.Sprintf("d-%02d", i)
			d := fields(id, v)
			d["_rev"] = revs[id]
			docs = append(docs, d)
		}
		if v == 1 {
			d := fields("c1", 1)
			d["_rev"] = revs["c1"]
			docs = append(docs, d)
		}
		write(docs)
	}
	for i := 30; i < 35; i++ { // hard deletes: HTTP DELETE
		id := fmt.Sprintf("d-%02d", i)
		var res struct{ Rev string }
		e.do(ctx, http.MethodDelete, fmt.Sprintf("/%s/%s?rev=%s", pillowCouchDB, id, revs[id]), nil, &res)
		revs[id] = res.Rev
	}
	// c1 is at 2-a; a replicated branch 3-c (sharing 1-x) wins; the sink
	// must hold it before it is deleted, so that the lower 2-a must then
	// replace a higher generation in the sink.
	c1Low := revs["c1"]
	c1High := pillowCouchBranch(t, ctx, e, "c1", revs["c1"], "c1 branch", 100)
	pillowCouchWait(t, r, "the sink to hold c1's branch", func(sink map[string]pillowCouchDoc) string {
		if got := sink["c1"].rev; got != c1High {
			return fmt.Sprintf("c1 at %q in the sink, want the branch %s", got, c1High)
		}
		return ""
	})
	pillowCouchDeleteWinner(t, ctx, e, "c1", c1High, c1Low)
	pillowCouchWaitEqual(t, e, r, ids, 30*time.Second)
	t.Logf("phase 1 (creates, updates, deletes, conflict) equal after %s", time.Since(phase).Round(time.Millisecond))

	// Phase 2: a writer updates d-00..d-29 in rounds; the pillow is killed
	// with SIGKILL once it has processed the first round, while the
	// writer goes on.
	phase = time.Now()
	const rounds = 8
	var (
		mu      sync.Mutex
		written int
	)
	writerRevs := maps.Clone(revs)
	writerDone := make(chan error, 1)
	go func() {
		writerDone <- func() error {
			for v := 10; v < 10+rounds; v++ {
				var docs []map[string]any
				for i := range 30 {
					id := fmt.Sprintf("d-%02d", i)
					d := fields(id, v)
					d["_rev"] = writerRevs[id]
					docs = append(docs, d)
				}
				var res []struct{ ID, Rev, Error string }
				if _, err := e.try(ctx, e.couch.URL(), http.MethodPost, "/"+pillowCouchDB+"/_bulk_docs", map[string]any{"docs": docs}, &res); err != nil {
					return err
				}
				for _, x := range res {
					if x.Error != "" {
						return fmt.Errorf("write %s: %s", x.ID, x.Error)
					}
					writerRevs[x.ID] = x.Rev
				}
				mu.Lock()
				written++
				mu.Unlock()
				time.Sleep(80 * time.Millisecond) // the writer's pace, not a wait
			}
			return nil
		}()
	}()
	pillowCouchWait(t, r, "the pillow to process the writer's first round", func(sink map[string]pillowCouchDoc) string {
		for _, d := range sink {
			if d.n >= 10 {
				return ""
			}
		}
		return "no row at a writer's round yet"
	})
	p.signal(t, syscall.SIGKILL)
	p.wait(t, 10*time.Second)
	mu.Lock()
	atKill := written
	mu.Unlock()
	select {
	case err := <-writerDone:
		if err != nil {
			t.Fatalf("writer: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("writer did not finish within 30s")
	}
	revs = writerRevs
	if atKill >= rounds {
		t.Fatalf("the kill was not mid-stream: the writer had finished its %d rounds", rounds)
	}
	t.Logf("pillow killed after %d of %d rounds were written", atKill, rounds)

	// While the pillow is down: more creates and deletes, and c2 moves to
	// 2-a, a stub the restarted pillow will process.
	docs = docs[:0]
	for i := range 10 {
		id := fmt.Sprintf("e-%02d", i)
		ids = append(ids, id)
		docs = append(docs, fields(id, 0))
	}
	for _, id := range []string{"d-35", "d-36"} {
		docs = append(docs, map[string]any{"_id": id, "_rev": revs[id], "_deleted": true})
	}
	d := fields("c2", 1)
	d["_rev"] = revs["c2"]
	write(append(docs, d))
	c2Low := revs["c2"]

	// Every change so far is in Kafka; then the follower stops (SIGTERM,
	// checkpoint at shutdown) and c2 gets a winning branch it does not see.
	want := map[string]string{}
	for id, cd := range pillowCouchState(t, ctx, e, ids) {
		want[id] = cd.rev
	}
	kc.waitRevs(t, 30*time.Second, want)
	f.stop()
	c2High := pillowCouchBranch(t, ctx, e, "c2", c2Low, "c2 branch", 200)

	// The restarted pillow catches up; it processes c2's stub (2-a) while
	// the branch wins, so it writes the branch.
	p = r.startPillow(file, "--pillow", pillowCouchName)
	p.waitLog(t, "partitions assigned")
	pillowCouchWaitEqual(t, e, r, ids, 30*time.Second)
	t.Logf("after SIGKILL and restart, equal after %s (c2 at its branch %s)", time.Since(phase).Round(time.Millisecond), c2High)

	// The branch is deleted: 2-a, the revision of the stub already
	// processed, is the winner again. The follower restarts and publishes
	// c2 at 2-a.
	phase = time.Now()
	pillowCouchDeleteWinner(t, ctx, e, "c2", c2High, c2Low)
	c2Stubs := len(kc.records("c2"))
	f = e.startFollower(env)
	couchEventually(t, 30*time.Second, "the restarted follower to publish c2 again", func() bool {
		recs := kc.records("c2")
		return len(recs) > c2Stubs && recs[len(recs)-1].Stub.DocumentRev == c2Low
	})
	pillowCouchWaitEqual(t, e, r, ids, 30*time.Second)
	t.Logf("after c2's branch was deleted, equal after %s", time.Since(phase).Round(time.Millisecond))

	testenv.Eventually(t, 30*time.Second, func() string { return r.lag(pillowCouchName) })
	if n := r.errorRows(pillowCouchName); n != 0 {
		t.Fatalf("%d error rows", n)
	}
	t.Logf("total after the servers started: %s", time.Since(start).Round(time.Millisecond))
}

// pillowCouchRig is a pillowRig over the couch test's servers: one
// PostgreSQL for the follower's checkpoints, the pillow's errors table and
// the reporting table.
func pillowCouchRig(t *testing.T, ctx context.Context, e *couchEnv) *pillowRig {
	t.Helper()
	r := &pillowRig{t: t, ctx: ctx, src: e.pg, rep: e.pg, kafka: e.kafka, dir: t.TempDir()}
	pool, err := pgxpool.New(ctx, e.pg.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	r.srcPool, r.repPool = pool, pool
	if r.prod, err = kgo.NewClient(kgo.SeedBrokers(e.kafka.Brokers()...)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.prod.Close)
	r.adm = kadm.NewClient(r.prod)
	// The follower would create the topic on its first stub; the pillow
	// subscribes before that.
	resp, err := r.adm.CreateTopics(ctx, pillowPartitions, 1, nil, pillowCouchTopic)
	if err != nil || (resp[pillowCouchTopic].Err != nil && !strings.Contains(resp[pillowCouchTopic].Err.Error(), "EXISTS")) {
		t.Fatalf("create topic: %v %v", err, resp[pillowCouchTopic].Err)
	}
	return r
}

// pillowCouchFile writes a pillows file with a Couch store for the test's
// database and a reporting table. The pouchdb-server URL has no
// credentials; a CouchDB image's test admin is written to a test-only file.
func pillowCouchFile(t *testing.T, r *pillowRig, couchURL string) string {
	t.Helper()
	body := fmt.Sprintf(`stores:
  couch:
    - url: %s
      databases: [%s]
pillows:
  - name: %s
    topics: [%s]
    filter: {document_types: [CommCareCase], domains: [%s]}
    batch: {max_stubs: 20, max_wait: 20ms}
    retry: {max_attempts: 3, backoff: 1s, interval: 200ms}
    processors:
      - postgres:
          url: ${PILLOW_REP_URL}
          table: %s
          columns:
            - {name: name, type: text}
            - {name: n, type: bigint}
            - {name: doc_type, type: text}
`, couchURL, pillowCouchDB, pillowCouchName, pillowCouchTopic, pillowCouchDomain, pillowCouchTable)
	path := filepath.Join(r.dir, "pillows.yaml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// pillowCouchBranch writes, as replication does (new_edits=false), a
// branch of id two generations deep from the parent of base (which must be
// generation 2), so that its leaf (generation 3) wins over base. It returns
// the leaf's revision.
func pillowCouchBranch(t *testing.T, ctx context.Context, e *couchEnv, id, base, name string, n int) string {
	t.Helper()
	var cur struct {
		Revisions struct {
			Start int      `json:"start"`
			IDs   []string `json:"ids"`
		} `json:"_revisions"`
	}
	e.do(ctx, http.MethodGet, fmt.Sprintf("/%s/%s?rev=%s&revs=true", pillowCouchDB, id, base), nil, &cur)
	if cur.Revisions.Start != 2 || len(cur.Revisions.IDs) != 2 {
		t.Fatalf("%s at %s: revision path %+v, want generation 2", id, base, cur.Revisions)
	}
	leaf := strings.Repeat("c", 32)
	doc := map[string]any{
		"_id": id, "_rev": "3-" + leaf,
		"_revisions": map[string]any{"start": 3, "ids": []string{leaf, strings.Repeat("b", 32), cur.Revisions.IDs[1]}},
		"doc_type":   "CommCareCase", "domain": pillowCouchDomain, "name": name, "n": n,
	}
	e.do(ctx, http.MethodPost, "/"+pillowCouchDB+"/_bulk_docs", map[string]any{"new_edits": false, "docs": []any{doc}}, nil)
	var got struct {
		Rev       string   `json:"_rev"`
		Conflicts []string `json:"_conflicts"`
	}
	e.do(ctx, http.MethodGet, fmt.Sprintf("/%s/%s?conflicts=true", pillowCouchDB, id), nil, &got)
	if got.Rev != "3-"+leaf || !slices.Equal(got.Conflicts, []string{base}) {
		t.Fatalf("%s: the branch does not win: %+v", id, got)
	}
	return got.Rev
}

// pillowCouchDeleteWinner deletes id's winning revision and checks that
// the lower-generation want is the winner now.
func pillowCouchDeleteWinner(t *testing.T, ctx context.Context, e *couchEnv, id, winner, want string) {
	t.Helper()
	e.do(ctx, http.MethodDelete, fmt.Sprintf("/%s/%s?rev=%s", pillowCouchDB, id, winner), nil, nil)
	var got struct {
		Rev string `json:"_rev"`
	}
	e.do(ctx, http.MethodGet, fmt.Sprintf("/%s/%s", pillowCouchDB, id), nil, &got)
	if got.Rev != want {
		t.Fatalf("%s: winner after deleting %s is %s, want %s", id, winner, got.Rev, want)
	}
}

// pillowCouchState reads CouchDB's current state of ids: live documents at
// their winning revision, deleted ones at their tombstone's.
func pillowCouchState(t *testing.T, ctx context.Context, e *couchEnv, ids []string) map[string]pillowCouchDoc {
	t.Helper()
	var res struct {
		Rows []struct {
			Key   string
			Error string
			Value *struct {
				Rev     string
				Deleted bool
			}
			Doc *struct {
				Rev     string `json:"_rev"`
				Name    string `json:"name"`
				N       int64  `json:"n"`
				DocType string `json:"doc_type"`
			}
		}
	}
	e.do(ctx, http.MethodPost, "/"+pillowCouchDB+"/_all_docs?include_docs=true", map[string]any{"keys": ids}, &res)
	out := make(map[string]pillowCouchDoc, len(ids))
	for _, row := range res.Rows {
		switch {
		case row.Value == nil:
			t.Fatalf("couch has no document %s (%s)", row.Key, row.Error)
		case row.Value.Deleted:
			out[row.Key] = pillowCouchDoc{rev: row.Value.Rev, deleted: true}
		case row.Doc == nil || row.Doc.Rev != row.Value.Rev:
			t.Fatalf("couch: %s: no document at %s", row.Key, row.Value.Rev)
		default:
			out[row.Key] = pillowCouchDoc{rev: row.Value.Rev, name: row.Doc.Name, n: row.Doc.N, docType: row.Doc.DocType}
		}
	}
	if len(out) != len(ids) {
		t.Fatalf("couch returned %d of %d documents", len(out), len(ids))
	}
	return out
}

// pillowCouchSink reads the reporting table: every row, and whether the
// <table>_live view lists it (a deleted row with live=true, or a live one
// missing from the view, is reported as a difference by the caller).
func pillowCouchSink(r *pillowRig) (map[string]pillowCouchDoc, map[string]bool, error) {
	rows, err := r.repPool.Query(r.ctx, `SELECT t.doc_id, t.deleted, coalesce(t.version_rev, ''), coalesce(t.name, ''), coalesce(t.n, -1),
		coalesce(t.doc_type, ''), l.doc_id IS NOT NULL
		FROM `+pillowCouchTable+` t LEFT JOIN `+pillowCouchTable+`_live l USING (doc_id)`)
	if err != nil {
		return nil, nil, err
	}
	defer rows.Close()
	docs, live := map[string]pillowCouchDoc{}, map[string]bool{}
	for rows.Next() {
		var id string
		var d pillowCouchDoc
		var inLive bool
		if err := rows.Scan(&id, &d.deleted, &d.rev, &d.name, &d.n, &d.docType, &inLive); err != nil {
			return nil, nil, err
		}
		if d.deleted {
			d.name, d.n, d.docType = "", 0, ""
		}
		docs[id], live[id] = d, inLive
	}
	return docs, live, rows.Err()
}

// pillowCouchWait polls the sink until cond returns "".
func pillowCouchWait(t *testing.T, r *pillowRig, what string, cond func(map[string]pillowCouchDoc) string) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, func() string {
		sink, _, err := pillowCouchSink(r)
		if err != nil {
			return what + ": " + err.Error()
		}
		if s := cond(sink); s != "" {
			return what + ": " + s
		}
		return ""
	})
}

// pillowCouchWaitEqual polls until the reporting table equals CouchDB's
// state of ids, and the view lists exactly the live documents.
func pillowCouchWaitEqual(t *testing.T, e *couchEnv, r *pillowRig, ids []string, d time.Duration) {
	t.Helper()
	testenv.Eventually(t, d, func() string {
		want := pillowCouchState(t, r.ctx, e, ids)
		got, live, err := pillowCouchSink(r)
		if err != nil {
			return err.Error()
		}
		var diff []string
		for id, w := range want {
			g, ok := got[id]
			switch {
			case !ok:
				diff = append(diff, fmt.Sprintf("%s: missing, want %s", id, w))
			case g != w:
				diff = append(diff, fmt.Sprintf("%s: got %s, want %s", id, g, w))
			case live[id] == w.deleted:
				diff = append(diff, fmt.Sprintf("%s: in %s_live = %v, deleted = %v", id, pillowCouchTable, live[id], w.deleted))
			}
		}
		for id, g := range got {
			if _, ok := want[id]; !ok {
				diff = append(diff, fmt.Sprintf("%s: extra row %s", id, g))
			}
		}
		sort.Strings(diff)
		if len(diff) > 5 {
			diff = append(diff[:5], fmt.Sprintf("… %d differences", len(diff)))
		}
		return strings.Join(diff, "; ")
	})
}
