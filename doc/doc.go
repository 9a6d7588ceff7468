// Package doc defines the full document a pillow fetches from a document store
// and hands to its sinks, with the version sinks use to refuse stale writes.
package doc

import (
	"fmt"

	"github.com/changefeed/changefeed/stub"
)

// Document is one document's state at the version it was fetched.
type Document struct {
	ID         string
	Type       string
	Domain     string
	Source     stub.Source
	SourceName string
	// Deleted is true when the store no longer has the document or holds a
	// tombstone. A deletion keeps its version so that a late, older stub
	// cannot bring the document back.
	Deleted bool
	// Body is the document as JSON-compatible values; nil when Deleted.
	Body    map[string]any
	Version Version
}

// Version is what a sink compares before writing.
type Version struct {
	// SQL documents: totally ordered.
	SQL stub.SQLVersion
	// Couch documents: the revision fetched, and its known path of ancestors.
	// Revisions are not monotonic (a deleted conflict winner can leave a
	// lower generation winning): compare by equality and ancestry only.
	Rev       stub.Rev
	Revisions stub.Revisions
	// Row, when the store knows it, names the stored row version that was
	// read (PostgreSQL: the xmin of the row, the transaction that wrote
	// it). SQL is the version of the stubs that caused the fetch, and the
	// state read can be newer than that; Row tells states apart for effects
	// that must run once per state (pillows.Once). Sinks do not use it.
	Row string
}

func (v Version) String() string {
	if !v.Rev.IsZero() {
		return v.Rev.String()
	}
	return v.SQL.String()
}

// Key identifies a document across stores.
func (d *Document) Key() string {
	return fmt.Sprintf("%s/%s/%s", d.Source, d.SourceName, d.ID)
}
