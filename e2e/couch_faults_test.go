package e2e_test

import (
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func couchReady(f *couchFollower) bool {
	code, _ := f.get("/readyz")
	return code == http.StatusOK
}

// TestCouchServerRestart stops CouchDB while the follower reads a backlog
// and starts it again: the follower reconnects by itself and nothing is
// lost.
func TestCouchServerRestart(t *testing.T) {
	const db = "restart"
	e := couchSetup(t)
	ctx := couchCtx(t, 2*time.Minute)
	e.createDB(ctx, db)
	f := e.startFollower(e.followerEnv(e.couch.URL(), db))
	couchEventually(t, 30*time.Second, "the follower to be ready", func() bool { return couchReady(f) })
	kc := e.consume(db, "case", "form")

	want := map[string]string{}
	for i := 0; i < 2000; i += 500 {
		for id, rev := range e.bulk(ctx, db, couchDocs("a", i, i+500, map[string]any{"doc_type": "CommCareCase", "domain": "r"})) {
			want[id] = rev
		}
	}
	// Mid-feed: as soon as the first stubs arrive.
	couchEventually(t, 30*time.Second, "the first stubs", func() bool { return kc.count() > 0 })
	if err := e.couch.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("CouchDB stopped after %d stubs", kc.count())
	couchEventually(t, 30*time.Second, "the follower to report not ready", func() bool { return !couchReady(f) })
	if err := e.couch.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for id, rev := range e.bulk(ctx, db, couchDocs("b", 0, 500, map[string]any{"doc_type": "XFormInstance", "domain": "r"})) {
		want[id] = rev
	}
	kc.waitRevs(t, 60*time.Second, want)
	couchEventually(t, 30*time.Second, "the follower to be ready again", func() bool { return couchReady(f) })
	if n := f.metric("changefeed_couch_feed_reconnects_total", `db="restart"`); n < 1 {
		t.Errorf("reconnects metric = %v, want ≥ 1", n)
	}
	if code, _ := f.get("/healthz"); code != http.StatusOK {
		t.Errorf("healthz = %d", code)
	}
	// Caught up: the checkpoint reaches update_seq, and the lag metric
	// (update_seq minus the checkpoint, where seqs have a numeric prefix)
	// and the checkpoint age return to 0.
	couchEventually(t, 30*time.Second, "lag and checkpoint age to return to 0", func() bool {
		return f.metric("changefeed_couch_lag", `db="restart"`) == 0 &&
			f.metric("changefeed_couch_checkpoint_age_seconds", `db="restart"`) == 0 &&
			strings.Contains(func() string { _, b := f.get("/metrics"); return b }(), `changefeed_couch_lag{db="restart"}`)
	})
	f.stop()
}

// TestCouchDatabaseRecreated deletes the followed database and creates it
// again with fewer changes than the checkpoint covers, twice: while the
// follower runs, and while it is stopped (where the missing database must
// show as not ready). Each time the follower must detect the new
// incarnation, count it and replay it from the start: on a server with
// integer seqs, the old checkpoint would otherwise skip every new change.
func TestCouchDatabaseRecreated(t *testing.T) {
	const db = "recreate"
	e := couchSetup(t)
	ctx := couchCtx(t, 2*time.Minute)
	e.createDB(ctx, db)
	env := e.followerEnv(e.couch.URL(), db)
	f := e.startFollower(env)
	couchEventually(t, 30*time.Second, "the follower to be ready", func() bool { return couchReady(f) })
	kc := e.consume(db, "group")

	old := e.bulk(ctx, db, couchDocs("old", 0, 300, map[string]any{"doc_type": "Group", "domain": "one"}))
	kc.waitRevs(t, 30*time.Second, old)
	var oldSeq, oldIdentity string
	couchEventually(t, 30*time.Second, "the checkpoint to cover the old database", func() bool {
		oldSeq, oldIdentity = e.checkpoint(ctx, db)
		return oldSeq != "" && couchSeqNumber(t, oldSeq) >= 300
	})

	// 1. Deleted and recreated under a running follower. (pouchdb-server
	// may itself bring a database deleted under an open feed back, empty:
	// then the PUT finds it there.)
	e.do(ctx, http.MethodDelete, "/"+db, nil, nil)
	e.do(ctx, http.MethodPut, "/"+db, nil, nil, http.StatusCreated, http.StatusAccepted, http.StatusPreconditionFailed)
	second := e.bulk(ctx, db, couchDocs("second", 0, 50, map[string]any{"doc_type": "Group", "domain": "two"}))
	kc.waitRevs(t, 30*time.Second, second)
	couchEventually(t, 30*time.Second, "the reset to be counted", func() bool {
		return f.metric("changefeed_couch_rewinds_total", `db="recreate"`, `reason="identity_changed"`) >= 1
	})
	var seq, identity string
	couchEventually(t, 30*time.Second, "the checkpoint of the new database", func() bool {
		seq, identity = e.checkpoint(ctx, db)
		return identity != oldIdentity && seq != "" && couchSeqNumber(t, seq) >= 50 && couchSeqNumber(t, seq) < 300
	})
	t.Logf("live: checkpoint %s/%s became %s/%s", oldSeq, oldIdentity, seq, identity)
	if lines := f.stderr.grep("database reset detected"); len(lines) == 0 {
		t.Error("no log line for the reset")
	}

	// 2. Deleted while the follower is stopped: it starts on a missing
	// database (an error, not ready, retried), then the database is
	// recreated.
	f.stop()
	e.do(ctx, http.MethodDelete, "/"+db, nil, nil)
	f = e.startFollower(env)
	couchEventually(t, 30*time.Second, "readiness to report the missing database", func() bool {
		code, body := f.get("/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "database missing")
	})
	if lines := f.stderr.grep("database does not exist (404)"); len(lines) == 0 {
		t.Error("no error log line for the missing database")
	}
	if code, _ := f.get("/healthz"); code != http.StatusOK {
		t.Errorf("a missing database made the follower unhealthy (%d): it must retry", code)
	}
	e.createDB(ctx, db)
	third := e.bulk(ctx, db, couchDocs("third", 0, 20, map[string]any{"doc_type": "Group", "domain": "three"}))
	kc.waitRevs(t, 30*time.Second, third)
	couchEventually(t, 30*time.Second, "the follower to be ready again", func() bool { return couchReady(f) })
	if n := f.metric("changefeed_couch_rewinds_total", `db="recreate"`, `reason="identity_changed"`); n < 1 {
		t.Errorf("rewinds metric = %v after the second recreation, want ≥ 1", n)
	}
	if n := f.metric("changefeed_couch_feed_reconnects_total", `db="recreate"`, `reason="db_missing"`); n < 1 {
		t.Errorf("db_missing reconnects = %v, want ≥ 1", n)
	}
	for _, r := range kc.records("third00000") {
		if r.Stub.Domain != "three" {
			t.Errorf("stub of the third database with domain %q", r.Stub.Domain)
		}
	}
	f.stop()
}

// couchRewindProxy forwards to CouchDB and, once armed, rewrites the since
// of the next _changes request: a server-side rewind, the feed replaying
// changes from before the position asked for.
type couchRewindProxy struct {
	srv     *httptest.Server
	rewinds atomic.Int32
	mu      sync.Mutex
	to      string
}

func newCouchRewindProxy(t *testing.T, target string) *couchRewindProxy {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &couchRewindProxy{}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1 // stream feeds
	rp.Transport = &http.Transport{DisableCompression: true}
	base := rp.Director
	rp.Director = func(r *http.Request) {
		base(r)
		if strings.HasSuffix(r.URL.Path, "/_changes") {
			p.mu.Lock()
			if p.to != "" {
				q := r.URL.Query()
				q.Set("since", p.to)
				r.URL.RawQuery = q.Encode()
				p.to = ""
				p.rewinds.Add(1)
			}
			p.mu.Unlock()
		}
	}
	p.srv = httptest.NewServer(rp)
	t.Cleanup(p.srv.Close)
	return p
}

func (p *couchRewindProxy) arm(since string) {
	p.mu.Lock()
	p.to = since
	p.mu.Unlock()
}

// TestCouchReplayOlderCheckpoint restarts the follower on a feed that
// replays from an older position than its checkpoint. The replayed changes
// are published again (duplicates), nothing is lost, and the stored
// checkpoint never moves backwards.
func TestCouchReplayOlderCheckpoint(t *testing.T) {
	const db = "replay"
	e := couchSetup(t)
	ctx := couchCtx(t, 2*time.Minute)
	e.createDB(ctx, db)
	proxy := newCouchRewindProxy(t, e.couch.URL())
	env := e.followerEnv(proxy.srv.URL, db)
	if u, _ := url.Parse(e.couch.URL()); u.User != nil {
		// CouchDB 3: the proxy passes the follower's credentials on.
		env = e.followerEnv(strings.Replace(proxy.srv.URL, "://", "://"+u.User.String()+"@", 1), db)
	}
	f := e.startFollower(env)
	couchEventually(t, 30*time.Second, "the follower to be ready", func() bool { return couchReady(f) })
	kc := e.consume(db, "app")

	first := e.bulk(ctx, db, couchDocs("doc", 0, 400, map[string]any{"doc_type": "Application", "domain": "p"}))
	kc.waitRevs(t, 30*time.Second, first)
	last := string(kc.records("doc00399")[0].Stub.Seq)
	couchEventually(t, 30*time.Second, "the checkpoint to reach the last change", func() bool {
		seq, _ := e.checkpoint(ctx, db)
		return seq == last
	})
	f.stop()
	stored, _ := e.checkpoint(ctx, db)

	// An older position: the seq of the 100th change.
	var older struct {
		Results []struct {
			ID  string
			Seq any
		}
	}
	e.do(ctx, http.MethodGet, "/"+db+"/_changes?limit=100", nil, &older)
	olderSeq := couchSeqString(older.Results[99].Seq)
	proxy.arm(olderSeq)

	// Sample the stored checkpoint throughout the replay.
	var (
		smu     sync.Mutex
		samples []string
	)
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if seq, _, err := e.readCheckpoint(ctx, db); err == nil {
				smu.Lock()
				samples = append(samples, seq)
				smu.Unlock()
			}
			select {
			case <-stopSampling:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()

	before := kc.count()
	f = e.startFollower(env)
	// The replay: every document after the older position comes again.
	couchEventually(t, 30*time.Second, "the replayed stubs", func() bool {
		return proxy.rewinds.Load() == 1 && kc.count() >= before+300
	})
	for i := 100; i < 400; i += 37 {
		id := couchDocs("doc", i, i+1, nil)[0]["_id"].(string)
		if n := len(kc.records(id)); n < 2 {
			t.Errorf("%s: %d stubs, want a duplicate from the replay", id, n)
		}
	}
	second := e.bulk(ctx, db, couchDocs("more", 0, 100, map[string]any{"doc_type": "Application", "domain": "p"}))
	kc.waitRevs(t, 30*time.Second, second)
	kc.waitRevs(t, time.Second, first)
	lastMore := string(kc.records("more00099")[0].Stub.Seq)
	couchEventually(t, 30*time.Second, "the checkpoint to pass the replay", func() bool {
		seq, _ := e.checkpoint(ctx, db)
		return seq == lastMore
	})
	close(stopSampling)
	<-sampled
	if n := f.metric("changefeed_couch_checkpoint_held_total", `db="replay"`); n < 1 {
		t.Errorf("checkpoint_held metric = %v: the replay never reached the guard", n)
	}
	f.stop()

	floor := couchSeqNumber(t, stored)
	smu.Lock()
	defer smu.Unlock()
	for _, s := range samples {
		if s == "" || couchSeqNumber(t, s) < floor {
			t.Fatalf("the stored checkpoint moved backwards during the replay: %q after %q (older position %q; %d samples)", s, stored, olderSeq, len(samples))
		}
	}
	t.Logf("stored %s, replayed from %s, %d checkpoint samples, final %s", stored, olderSeq, len(samples), samples[len(samples)-1])
}

// couchSeqString turns a seq from JSON (a number on pouchdb-server, a
// string on CouchDB) into its text.
func couchSeqString(v any) string {
	switch s := v.(type) {
	case string:
		return s
	case float64:
		return strconv.FormatFloat(s, 'f', -1, 64)
	default:
		return ""
	}
}

// TestCouchKafkaDown pauses Kafka while changes are read: the checkpoint
// must not move until Kafka acknowledges them, and nothing is lost after.
func TestCouchKafkaDown(t *testing.T) {
	const db = "kafkadown"
	e := couchSetup(t)
	ctx := couchCtx(t, 2*time.Minute)
	e.createDB(ctx, db)
	f := e.startFollower(e.followerEnv(e.couch.URL(), db))
	couchEventually(t, 30*time.Second, "the follower to be ready", func() bool { return couchReady(f) })
	kc := e.consume(db, "web-user")

	first := e.bulk(ctx, db, couchDocs("u", 0, 200, map[string]any{"doc_type": "WebUser", "domain": "k"}))
	kc.waitRevs(t, 30*time.Second, first)
	last := string(kc.records("u00199")[0].Stub.Seq)
	couchEventually(t, 30*time.Second, "the checkpoint to reach the last change", func() bool {
		seq, _ := e.checkpoint(ctx, db)
		return seq == last
	})

	if err := e.kafka.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	paused := true
	t.Cleanup(func() {
		if paused {
			_ = e.kafka.Unpause(ctx)
		}
	})
	second := e.bulk(ctx, db, couchDocs("v", 0, 200, map[string]any{"doc_type": "WebUser", "domain": "k"}))
	couchEventually(t, 30*time.Second, "the follower to read the new changes", func() bool {
		return f.metric("changefeed_couch_changes_read_total", `db="kafkadown"`) >= 400
	})
	// Observe the checkpoint for several checkpoint intervals while Kafka
	// cannot acknowledge anything.
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if seq, _ := e.checkpoint(ctx, db); seq != last {
			t.Fatalf("the checkpoint moved to %q while Kafka was paused (was %q)", seq, last)
		}
	}
	if err := e.kafka.Unpause(ctx); err != nil {
		t.Fatal(err)
	}
	paused = false
	kc.waitRevs(t, 60*time.Second, second)
	lastV := string(kc.records("v00199")[0].Stub.Seq)
	couchEventually(t, 30*time.Second, "the checkpoint to move after Kafka returned", func() bool {
		seq, _ := e.checkpoint(ctx, db)
		return seq == lastV
	})
	f.stop()
}
