// Package sinktest is the conformance suite every sink runs: it writes
// documents the way a pillow does under at-least-once delivery — duplicated,
// reordered, late, after deletions, from restarted and concurrent writers —
// and checks what the sink's storage ends up holding.
//
// A sink under test must store two body fields and give them back through
// Harness.Read: "title" (a string; the suite makes it name the document's
// version, so it witnesses which version is stored) and "n" (an integer). It
// must reject a body whose "n" is not an integer as that document's own
// error (doc.Errors), for the per-document error case.
package sinktest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/stub"
)

// Sink is the part of a sink the suite drives.
type Sink interface {
	Name() string
	Bootstrap(ctx context.Context) error
	Write(ctx context.Context, docs []*doc.Document) error
}

// Stored is what a sink's storage holds for one document.
type Stored struct {
	// Deleted is a tombstone. A sink that removes deleted documents
	// outright reports them as absent instead; the suite treats both alike.
	Deleted bool
	// Title and N are the body fields "title" and "n" in text form.
	Title, N string
}

// Harness connects the suite to one sink on fresh, empty storage (a new
// table, a new index).
type Harness struct {
	// Sink is the instance under test; the suite bootstraps it.
	Sink Sink
	// Reopen returns another instance on the same storage: a restarted
	// process, or a second worker of the same pillow.
	Reopen func(t *testing.T) Sink
	// Read returns what the storage holds for ids, reading what is
	// committed (an index is refreshed first). Ids of which the storage has
	// no trace are left out.
	Read func(t *testing.T, ids []string) map[string]Stored
}

// Run runs every case, each on storage from its own newSink call.
func Run(t *testing.T, newSink func(t *testing.T) Harness) {
	cases := []struct {
		name string
		run  func(*testing.T, *check)
	}{
		{"EmptyBatch", emptyBatch},
		{"Duplicates", duplicates},
		{"ReorderedVersions", reorderedVersions},
		{"DeleteThenLateOlder", deleteThenLateOlder},
		{"RecreateAfterDelete", recreateAfterDelete},
		{"RestartMidBatch", restartMidBatch},
		{"CouchLowerGenerationWinner", couchLowerGenerationWinner},
		{"ConcurrentWriters", concurrentWriters},
		{"PerDocumentError", perDocumentError},
		{"CouchToSQLMigration", couchToSQLMigration},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := newSink(t)
			if err := h.Sink.Bootstrap(t.Context()); err != nil {
				t.Fatalf("%s: Bootstrap: %v", h.Sink.Name(), err)
			}
			c.run(t, &check{h: h})
		})
	}
}

// SQL makes a SQL document at version (lsn, ordinal). Its title is
// "<id>@<lsn>.<ordinal>" and n is the LSN.
func SQL(id string, lsn uint64, ordinal uint32, deleted bool) *doc.Document {
	d := &doc.Document{
		ID: id, Type: "Case", Domain: "sinktest", Source: stub.SourceSQL, SourceName: "sinktest",
		Deleted: deleted,
		Version: doc.Version{SQL: stub.SQLVersion{CommitLSN: stub.LSN(lsn), Ordinal: ordinal}},
	}
	if !deleted {
		d.Body = map[string]any{
			"id": id, "title": SQLTitle(id, lsn, ordinal), "n": json.Number(strconv.FormatUint(lsn, 10)),
		}
	}
	return d
}

// SQLTitle is the title SQL gives a document.
func SQLTitle(id string, lsn uint64, ordinal uint32) string {
	return fmt.Sprintf("%s@%d.%d", id, lsn, ordinal)
}

// Couch makes a Couch document at the revision path given leaf first
// ("3-c", "2-b", "1-a"). Its title is "<id>@<leaf>" and n the leaf's
// generation.
func Couch(id string, deleted bool, path ...string) *doc.Document {
	leaf := mustRev(path[0])
	revs := stub.Revisions{Start: leaf.Gen}
	for i, p := range path {
		r := mustRev(p)
		if r.Gen != leaf.Gen-i {
			panic("sinktest: revision path " + strings.Join(path, ",") + " is not contiguous")
		}
		revs.IDs = append(revs.IDs, r.Hash)
	}
	d := &doc.Document{
		ID: id, Type: "Form", Domain: "sinktest", Source: stub.SourceCouch, SourceName: "sinktest",
		Deleted: deleted,
		Version: doc.Version{Rev: leaf, Revisions: revs},
	}
	if !deleted {
		d.Body = map[string]any{
			"_id": id, "_rev": path[0], "title": CouchTitle(id, path[0]),
			"n": json.Number(strconv.Itoa(leaf.Gen)),
		}
	}
	return d
}

// CouchTitle is the title Couch gives a document.
func CouchTitle(id, rev string) string { return id + "@" + rev }

// chain returns the path of generation g of a linear history whose hashes
// are letters: chain(3) = 3-c, 2-b, 1-a.
func chain(g int) []string {
	p := make([]string, 0, g)
	for i := g; i >= 1; i-- {
		p = append(p, fmt.Sprintf("%d-%c", i, 'a'+i-1))
	}
	return p
}

func mustRev(s string) stub.Rev {
	r, err := stub.ParseRev(s)
	if err != nil {
		panic(err)
	}
	return r
}

type check struct{ h Harness }

func (c *check) write(t *testing.T, s Sink, docs ...*doc.Document) {
	t.Helper()
	if err := s.Write(t.Context(), docs); err != nil {
		t.Fatalf("Write(%s): %v", describe(docs), err)
	}
}

func describe(docs []*doc.Document) string {
	var parts []string
	for _, d := range docs {
		p := d.ID + "@" + d.Version.String()
		if d.Deleted {
			p += "(deleted)"
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, " ")
}

// live checks that id is stored, not deleted, with title.
func (c *check) live(t *testing.T, id, title string) {
	t.Helper()
	got, ok := c.h.Read(t, []string{id})[id]
	switch {
	case !ok:
		t.Fatalf("%s: absent, want live %q", id, title)
	case got.Deleted:
		t.Fatalf("%s: deleted, want live %q", id, title)
	case got.Title != title:
		t.Fatalf("%s: title %q, want %q", id, got.Title, title)
	}
}

// gone checks that id is deleted or absent.
func (c *check) gone(t *testing.T, id string) {
	t.Helper()
	if got, ok := c.h.Read(t, []string{id})[id]; ok && !got.Deleted {
		t.Fatalf("%s: live with title %q, want deleted", id, got.Title)
	}
}

func emptyBatch(t *testing.T, c *check) {
	if err := c.h.Sink.Write(t.Context(), nil); err != nil {
		t.Fatalf("Write(nil) = %v", err)
	}
	if err := c.h.Sink.Write(t.Context(), []*doc.Document{}); err != nil {
		t.Fatalf("Write(empty) = %v", err)
	}
}

func duplicates(t *testing.T, c *check) {
	s := c.h.Sink
	// The same stub twice in a batch, and the batch delivered twice.
	batch := []*doc.Document{SQL("s1", 10, 0, false), SQL("s1", 10, 0, false), SQL("s2", 10, 0, false),
		Couch("c1", false, chain(2)...), Couch("c1", false, chain(2)...)}
	c.write(t, s, batch...)
	c.write(t, s, batch...)
	c.live(t, "s1", SQLTitle("s1", 10, 0))
	c.live(t, "s2", SQLTitle("s2", 10, 0))
	c.live(t, "c1", CouchTitle("c1", "2-b"))

	// Several versions of one document in one batch: the newest stays,
	// wherever it is in the batch.
	c.write(t, s, SQL("s3", 12, 0, false), SQL("s3", 11, 0, false), SQL("s3", 12, 0, false))
	c.live(t, "s3", SQLTitle("s3", 12, 0))
	c.write(t, s, Couch("c2", false, chain(3)...), Couch("c2", false, chain(1)...), Couch("c2", false, chain(2)...))
	c.live(t, "c2", CouchTitle("c2", "3-c"))
}

func reorderedVersions(t *testing.T, c *check) {
	s := c.h.Sink
	var newest uint64
	for _, v := range []uint64{40, 20, 60, 10, 50, 30} {
		c.write(t, s, SQL("s1", v, 0, false))
		newest = max(newest, v)
		c.live(t, "s1", SQLTitle("s1", newest, 0))
	}
	c.live(t, "s1", SQLTitle("s1", 60, 0))

	// Versions in the high half of the LSN range (uint64 care).
	c.write(t, s, SQL("s2", 1<<62+2, 0, false))
	c.write(t, s, SQL("s2", 1<<62+1, 0, false))
	c.write(t, s, SQL("s2", 1<<40, 0, false))
	c.live(t, "s2", SQLTitle("s2", 1<<62+2, 0))

	// A Couch history delivered out of order: descendants win, ancestors
	// are refused, whatever the order.
	for _, g := range []int{3, 1, 4, 2} {
		c.write(t, s, Couch("c1", false, chain(g)...))
	}
	c.live(t, "c1", CouchTitle("c1", "4-d"))
}

func deleteThenLateOlder(t *testing.T, c *check) {
	s := c.h.Sink
	c.write(t, s, SQL("s1", 10, 0, false))
	c.write(t, s, SQL("s1", 20, 0, true))
	c.gone(t, "s1")
	c.write(t, s, SQL("s1", 15, 0, false)) // fetched before the delete, written after
	c.gone(t, "s1")
	c.write(t, s, SQL("s1", 20, 0, true), SQL("s1", 18, 0, true)) // duplicates of deletions
	c.gone(t, "s1")
	c.write(t, s, SQL("s1", 20, 0, false)) // same version as the deletion: not newer
	c.gone(t, "s1")

	// A deletion of a document the sink never had still keeps its version.
	c.write(t, s, SQL("s2", 30, 0, true))
	c.write(t, s, SQL("s2", 25, 0, false))
	c.gone(t, "s2")

	// A late older deletion does not delete a newer live version.
	c.write(t, s, SQL("s3", 30, 0, false))
	c.write(t, s, SQL("s3", 25, 0, true))
	c.live(t, "s3", SQLTitle("s3", 30, 0))

	// Couch: a tombstone, then a late write of a revision it descends from.
	c.write(t, s, Couch("c1", false, chain(2)...))
	c.write(t, s, Couch("c1", true, chain(3)...))
	c.gone(t, "c1")
	c.write(t, s, Couch("c1", false, chain(2)...))
	c.write(t, s, Couch("c1", false, chain(1)...))
	c.write(t, s, Couch("c1", true, chain(3)...))
	c.gone(t, "c1")

	c.write(t, s, Couch("c2", true, chain(3)...)) // never seen live
	c.write(t, s, Couch("c2", false, chain(2)...))
	c.gone(t, "c2")
}

func recreateAfterDelete(t *testing.T, c *check) {
	s := c.h.Sink
	c.write(t, s, SQL("s1", 10, 0, false))
	c.write(t, s, SQL("s1", 20, 0, true))
	c.write(t, s, SQL("s1", 30, 0, false))
	c.live(t, "s1", SQLTitle("s1", 30, 0))
	c.write(t, s, SQL("s1", 20, 0, true)) // the old deletion, late
	c.live(t, "s1", SQLTitle("s1", 30, 0))

	// CouchDB recreates a deleted document as a child of its tombstone.
	c.write(t, s, Couch("c1", false, chain(1)...))
	c.write(t, s, Couch("c1", true, chain(2)...))
	c.write(t, s, Couch("c1", false, chain(3)...))
	c.live(t, "c1", CouchTitle("c1", "3-c"))
	c.write(t, s, Couch("c1", true, chain(2)...)) // the tombstone is now an ancestor
	c.live(t, "c1", CouchTitle("c1", "3-c"))
}

func restartMidBatch(t *testing.T, c *check) {
	var old, batch []*doc.Document
	for i := range 20 {
		id := fmt.Sprintf("s%02d", i)
		old = append(old, SQL(id, 100, 0, false))
		batch = append(batch, SQL(id, 200, 0, i%5 == 0))
		cid := fmt.Sprintf("c%02d", i)
		old = append(old, Couch(cid, false, chain(1)...))
		batch = append(batch, Couch(cid, i%5 == 0, chain(2)...))
	}
	c.write(t, c.h.Sink, old...)
	// The process wrote part of the batch, then died before committing its
	// offset; a write cut off by cancellation may or may not have landed.
	c.write(t, c.h.Sink, batch[:15]...)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := c.h.Sink.Write(ctx, batch[15:]); err == nil {
		t.Fatal("Write with a cancelled context returned nil")
	} else if !errors.Is(err, doc.ErrTransient) {
		t.Fatalf("Write with a cancelled context: %v, want an error wrapping doc.ErrTransient", err)
	}

	// The restarted process bootstraps again and gets the records again
	// from the committed offset: the older stubs, then the batch.
	s := c.h.Reopen(t)
	if err := s.Bootstrap(t.Context()); err != nil {
		t.Fatalf("Bootstrap after restart: %v", err)
	}
	c.write(t, s, old...)
	c.write(t, s, batch...)
	ids := make([]string, len(batch))
	for i, d := range batch {
		ids[i] = d.ID
	}
	got := c.h.Read(t, ids)
	for _, d := range batch {
		g, ok := got[d.ID]
		switch {
		case d.Deleted && ok && !g.Deleted:
			t.Errorf("%s: live %q, want deleted", d.ID, g.Title)
		case !d.Deleted && (!ok || g.Deleted || g.Title != d.Body["title"]):
			t.Errorf("%s: %+v (present %v), want live %q", d.ID, g, ok, d.Body["title"])
		}
	}
}

func couchLowerGenerationWinner(t *testing.T, c *check) {
	s := c.h.Sink
	// 5-e won a conflict against 3-x (both descend from 2-b); then 5-e's
	// branch was deleted and CouchDB's winner became 3-x, of lower
	// generation. The fetch returns 3-x: it must be written.
	c.write(t, s, Couch("c1", false, "5-e", "4-d", "3-c", "2-b", "1-a"))
	c.write(t, s, Couch("c1", false, "3-x", "2-b", "1-a"))
	c.live(t, "c1", CouchTitle("c1", "3-x"))
	c.write(t, s, Couch("c1", false, "3-x", "2-b", "1-a")) // duplicate
	c.write(t, s, Couch("c1", false, "2-b", "1-a"))        // late ancestor
	c.live(t, "c1", CouchTitle("c1", "3-x"))
	c.write(t, s, Couch("c1", false, "4-y", "3-x", "2-b", "1-a"))
	c.live(t, "c1", CouchTitle("c1", "4-y"))

	// The same when the winner was deleted: a tombstone of higher
	// generation, then a live lower-generation winner.
	c.write(t, s, Couch("c2", true, "6-f", "5-e", "4-d", "3-c", "2-b", "1-a"))
	c.write(t, s, Couch("c2", false, "3-x", "2-b", "1-a"))
	c.live(t, "c2", CouchTitle("c2", "3-x"))
}

func concurrentWriters(t *testing.T, c *check) {
	const (
		writers  = 4
		docs     = 8
		versions = 12
		perBatch = 3
	)
	var all []*doc.Document
	for i := range docs {
		for v := 1; v <= versions; v++ {
			all = append(all, SQL(fmt.Sprintf("s%d", i), uint64(v*10), 0, false))
			all = append(all, Couch(fmt.Sprintf("c%d", i), false, chain(v)...))
		}
	}
	sinks := []Sink{c.h.Sink}
	for range writers - 1 {
		sinks = append(sinks, c.h.Reopen(t))
	}
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w, s := range sinks {
		mine := make([]*doc.Document, len(all))
		copy(mine, all)
		r := rand.New(rand.NewPCG(uint64(w), 42))
		r.Shuffle(len(mine), func(i, j int) { mine[i], mine[j] = mine[j], mine[i] })
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < len(mine); i += perBatch {
				if err := s.Write(t.Context(), mine[i:min(i+perBatch, len(mine))]); err != nil {
					errs <- fmt.Errorf("writer %d: %w", w, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i := range docs {
		c.live(t, fmt.Sprintf("s%d", i), SQLTitle(fmt.Sprintf("s%d", i), versions*10, 0))
		c.live(t, fmt.Sprintf("c%d", i), CouchTitle(fmt.Sprintf("c%d", i), chain(versions)[0]))
	}
}

func perDocumentError(t *testing.T, c *check) {
	s := c.h.Sink
	bad := SQL("bad", 10, 0, false)
	bad.Body["n"] = "not a number"
	badCouch := Couch("badc", false, chain(1)...)
	badCouch.Body["n"] = "not a number"
	err := s.Write(t.Context(), []*doc.Document{SQL("ok1", 10, 0, false), bad, badCouch, Couch("okc", false, chain(1)...)})
	var de doc.Errors
	if !errors.As(err, &de) {
		t.Fatalf("Write = %v, want doc.Errors", err)
	}
	if errors.Is(err, doc.ErrTransient) {
		t.Fatalf("Write = %v: a document's own error must not be transient", err)
	}
	if len(de) != 2 || de["bad"] == nil || de["badc"] == nil {
		t.Fatalf("doc.Errors = %v, want exactly bad and badc", de)
	}
	c.live(t, "ok1", SQLTitle("ok1", 10, 0))
	c.live(t, "okc", CouchTitle("okc", "1-a"))
	// The fixed document goes through on retry.
	c.write(t, s, SQL("bad", 11, 0, false), Couch("badc", false, chain(2)...))
	c.live(t, "bad", SQLTitle("bad", 11, 0))
	c.live(t, "badc", CouchTitle("badc", "2-b"))
}

// couchToSQLMigration: one id from a Couch database and a SQL table (HQ's
// Couch→SQL migration keeps ids). The sink holds one document per id and
// the SQL copy wins whatever the order: a replayed or late Couch stub never
// overwrites the SQL copy, live or deleted, and a batch holding both copies
// writes the SQL one.
func couchToSQLMigration(t *testing.T, c *check) {
	s := c.h.Sink
	c.write(t, s, Couch("m1", false, chain(2)...))
	c.live(t, "m1", CouchTitle("m1", "2-b"))
	c.write(t, s, SQL("m1", 100, 1, false)) // migrated
	c.live(t, "m1", SQLTitle("m1", 100, 1))
	c.write(t, s, Couch("m1", false, chain(2)...)) // the old stub replayed
	c.write(t, s, Couch("m1", false, chain(3)...)) // a revision the sink never saw
	c.write(t, s, Couch("m1", true, chain(4)...))  // the Couch copy deleted after the migration
	c.live(t, "m1", SQLTitle("m1", 100, 1))

	// Both copies in one batch, in either order.
	c.write(t, s, SQL("m2", 200, 1, false), Couch("m2", false, chain(5)...))
	c.live(t, "m2", SQLTitle("m2", 200, 1))
	c.write(t, s, Couch("m3", false, chain(5)...), SQL("m3", 200, 1, false))
	c.live(t, "m3", SQLTitle("m3", 200, 1))
	c.write(t, s, SQL("m1", 300, 1, false), Couch("m1", false, chain(6)...), SQL("m1", 250, 1, false))
	c.live(t, "m1", SQLTitle("m1", 300, 1))

	// The SQL copy deleted: a Couch replay does not bring it back.
	c.write(t, s, SQL("m1", 400, 1, true))
	c.gone(t, "m1")
	c.write(t, s, Couch("m1", false, chain(7)...))
	c.gone(t, "m1")
}
