package e2e_test

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"
)

// couchSeedEnv replays a run of the kill test: its seed is logged.
const couchSeedEnv = "CHANGEFEED_COUCH_SEED"

func couchSeed(t *testing.T) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv(couchSeedEnv); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("$%s: %v", couchSeedEnv, err)
		}
		seed = n
	}
	t.Logf("seed %d (set $%s to replay)", seed, couchSeedEnv)
	return seed
}

// TestCouchKillNine kills the follower with SIGKILL at random points five
// times while 5,000 documents are written and then updated (some twice),
// restarting it each time. Every document's latest revision must reach
// Kafka: the checkpoint never covers a change Kafka has not acknowledged.
func TestCouchKillNine(t *testing.T) {
	const (
		db    = "killnine"
		docs  = 5000
		batch = 100
		kills = 5
	)
	rng := rand.New(rand.NewPCG(couchSeed(t), 9))
	e := couchSetup(t)
	ctx := couchCtx(t, 3*time.Minute)
	e.createDB(ctx, db)
	env := e.followerEnv(e.couch.URL(), db)
	f := e.startFollower(env)
	couchEventually(t, 30*time.Second, "the follower to be ready", func() bool {
		code, _ := f.get("/readyz")
		return code == http.StatusOK
	})
	kc := e.consume(db, "case")

	// The writer: creates, then updates every document, then updates a
	// fifth of them again (the feed may skip intermediate revisions).
	var (
		mu     sync.Mutex
		latest = map[string]string{}
	)
	writeDone := make(chan error, 1)
	go func() {
		writeDone <- func() error {
			write := func(docs []map[string]any) error {
				// Spread the writes over seconds, so that the kills
				// fall while they go on.
				time.Sleep(40 * time.Millisecond)
				var res []struct{ ID, Rev, Error string }
				if _, err := e.try(ctx, e.couch.URL(), http.MethodPost, "/"+db+"/_bulk_docs", map[string]any{"docs": docs}, &res); err != nil {
					return err
				}
				mu.Lock()
				defer mu.Unlock()
				for _, r := range res {
					if r.Error != "" {
						return fmt.Errorf("write %s: %s", r.ID, r.Error)
					}
					latest[r.ID] = r.Rev
				}
				return nil
			}
			update := func(from, to, round int) error {
				docs := couchDocs("doc", from, to, map[string]any{"doc_type": "CommCareCase", "domain": "kill", "round": round})
				mu.Lock()
				for _, d := range docs {
					d["_rev"] = latest[d["_id"].(string)]
				}
				mu.Unlock()
				return write(docs)
			}
			for i := 0; i < docs; i += batch {
				if err := write(couchDocs("doc", i, i+batch, map[string]any{"doc_type": "CommCareCase", "domain": "kill", "round": 0})); err != nil {
					return err
				}
			}
			for i := 0; i < docs; i += batch {
				if err := update(i, i+batch, 1); err != nil {
					return err
				}
			}
			for i := 0; i < docs/5; i += batch {
				if err := update(i, i+batch, 2); err != nil {
					return err
				}
			}
			return nil
		}()
	}()

	// The killer: five SIGKILLs at random points while this run reads, a
	// restart after each.
	var written bool
	var prevCheckpoint int64
	for k := range kills {
		couchEventually(t, time.Minute, "the restarted follower to read changes", func() bool {
			if !written {
				select {
				case err := <-writeDone:
					if err != nil {
						t.Fatalf("writer: %v", err)
					}
					written = true
				default:
				}
			}
			return written || f.metric("changefeed_couch_changes_read_total", `db="killnine"`) > 0
		})
		// A random point of the run, not a wait for a condition.
		time.Sleep(time.Duration(rng.IntN(1200)) * time.Millisecond)
		read := f.metric("changefeed_couch_changes_read_total", `db="killnine"`)
		f.kill()
		seq, _ := e.checkpoint(ctx, db)
		cp := int64(0)
		if seq != "" {
			cp = couchSeqNumber(t, seq)
		}
		t.Logf("kill %d: %v changes read by this run, checkpoint %q, %d stubs in Kafka so far", k+1, read, seq, kc.count())
		if cp < prevCheckpoint {
			t.Fatalf("the checkpoint moved backwards across a kill: %d after %d", cp, prevCheckpoint)
		}
		prevCheckpoint = cp
		f = e.startFollower(env)
	}
	if !written {
		select {
		case err := <-writeDone:
			if err != nil {
				t.Fatalf("writer: %v", err)
			}
		case <-ctx.Done():
			t.Fatal("writer did not finish")
		}
	}
	mu.Lock()
	want := maps.Clone(latest)
	mu.Unlock()
	if len(want) != docs {
		t.Fatalf("writer wrote %d documents, want %d", len(want), docs)
	}
	if cur := e.currentRevs(ctx, db); !maps.Equal(cur, want) {
		t.Fatal("the writer's record of latest revisions differs from the database")
	}
	kc.waitRevs(t, 90*time.Second, want)
	t.Logf("%d documents, %d stubs read from Kafka (duplicates come from replays after kills)", docs, kc.count())

	// The last run stops cleanly with a checkpoint covering everything.
	couchEventually(t, 30*time.Second, "the checkpoint to cover every change", func() bool {
		seq, _ := e.checkpoint(ctx, db)
		var info struct {
			UpdateSeq any `json:"update_seq"`
		}
		e.do(ctx, http.MethodGet, "/"+db, nil, &info)
		return seq != "" && couchSeqNumber(t, seq) >= couchSeqNumber(t, fmt.Sprint(info.UpdateSeq))
	})
	f.stop()
}
