package pillows

import (
	"container/list"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/stub"
)

// dedup remembers, for one partition, the highest version processed per
// document, bounded to size documents (least recently used forgotten first).
// Forgetting is always safe: a forgotten document is simply fetched again
// and the sink refuses the stale write.
//
// SQL versions are totally ordered, so a stub at or below the remembered
// version is skipped. Couch revisions are not (a deleted conflict winner can
// leave a lower generation winning), so a Couch stub is skipped only when its
// (id, rev) equals the remembered one exactly.
//
// Not safe for concurrent use: each partition worker owns its own.
type dedup struct {
	size  int
	ll    *list.List
	items map[docKey]*list.Element
}

// docKey names a document the way doc.Document.Key does: one pillow can
// read the same id from several sources (HQ's Couch→SQL migration keeps
// ids), and each copy is a document of its own everywhere in this package
// (collapse, dedup memory, failure attribution, the errors table).
type docKey struct {
	typ  stub.Source
	name string
	id   string
}

func keyOf(s *stub.Stub) docKey {
	return docKey{s.DataSourceType, s.DataSourceName, s.DocumentID}
}

func keyOfDoc(d *doc.Document) docKey {
	return docKey{d.Source, d.SourceName, d.ID}
}

func (k docKey) String() string { return string(k.typ) + "/" + k.name + "/" + k.id }

type seen struct {
	key docKey
	sql stub.SQLVersion
	rev string
}

func newDedup(size int) *dedup {
	return &dedup{size: size, ll: list.New(), items: make(map[docKey]*list.Element)}
}

// done reports whether s's version was already processed.
func (d *dedup) done(s *stub.Stub) bool {
	e, ok := d.items[keyOf(s)]
	if !ok {
		return false
	}
	v := e.Value.(*seen)
	switch s.DataSourceType {
	case stub.SourceSQL:
		return s.SQLVersion().Compare(v.sql) <= 0
	case stub.SourceCouch:
		return s.DocumentRev != "" && s.DocumentRev == v.rev
	}
	return false
}

// record notes that s's version was processed.
func (d *dedup) record(s *stub.Stub) {
	k := keyOf(s)
	if e, ok := d.items[k]; ok {
		v := e.Value.(*seen)
		if s.DataSourceType == stub.SourceSQL && s.SQLVersion().Compare(v.sql) < 0 {
			d.ll.MoveToFront(e)
			return
		}
		v.sql, v.rev = s.SQLVersion(), s.DocumentRev
		d.ll.MoveToFront(e)
		return
	}
	d.items[k] = d.ll.PushFront(&seen{key: k, sql: s.SQLVersion(), rev: s.DocumentRev})
	for d.ll.Len() > d.size {
		old := d.ll.Back()
		d.ll.Remove(old)
		delete(d.items, old.Value.(*seen).key)
	}
}

// newer reports whether a should replace b as the stub kept for a document
// within a batch: the higher SQL version, or for Couch the later one in
// partition order (a is always later).
func newer(a, b *stub.Stub) bool {
	if a.DataSourceType == stub.SourceSQL {
		return a.SQLVersion().Compare(b.SQLVersion()) >= 0
	}
	return true
}
