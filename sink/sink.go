// Package sink holds what every sink shares: collapsing a batch to one
// document per id, and the version rule for Couch documents. The sinks
// themselves live in sub-packages named for their backend (pgsink, essink);
// sinktest is the conformance suite every sink runs.
//
// The contract every sink keeps (Write):
//   - Every write carries the document's version, and a write whose version
//     is not newer than what the sink holds is refused. A refusal is a
//     successful no-op, not an error.
//   - A deletion keeps its version, so a late write of an older version
//     cannot bring the document back; a newer version recreates it.
//   - SQL versions (commit LSN, ordinal) are totally ordered: newer means
//     greater.
//   - Couch revisions are not ordered in time. A write is refused only when
//     its revision equals the stored one or is an ancestor of it (it is on the
//     stored revision path); a stored revision that is an ancestor of the new
//     one, or a revision unrelated to it (the fetched current winner, which
//     can have a lower generation after a conflict winner was deleted), is
//     overwritten. See Refuses.
//   - One document id can come from two sources (HQ's Couch→SQL migration
//     keeps ids), and a reporting table or index holds one row per id for its
//     readers. Across kinds the rule is the migration's direction: a SQL
//     version is newer than any Couch revision. A SQL write replaces a Couch
//     row; a Couch write never replaces a row written from SQL (live or
//     deleted), so a replayed or late Couch stub cannot bring back the state
//     from before the migration. Two SQL sources of one id compare by
//     version (so they must be tables of one database); two Couch databases
//     by revision. See Newer.
//   - Write returns nil, an error wrapping doc.ErrTransient (the sink itself
//     failed; retry the whole batch later), or doc.Errors (those documents
//     failed on their own; every other document of the batch was written or
//     refused).
package sink

import (
	"slices"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/stub"
)

// IsCouch reports whether d carries a Couch revision rather than a SQL
// version.
func IsCouch(d *doc.Document) bool {
	return d.Source == stub.SourceCouch || (d.Source == "" && !d.Version.Rev.IsZero())
}

// RevPath is d's revision path as "generation-hash" strings, leaf first. It
// always starts with the document's own revision when that is known, even if
// Version.Revisions is empty or ends elsewhere. An unknown revision (a Couch
// document that vanished without a tombstone) gives an empty path.
func RevPath(v doc.Version) []string {
	if v.Rev.IsZero() {
		return nil
	}
	p := v.Revisions
	if p.Leaf() != v.Rev {
		return []string{v.Rev.String()}
	}
	out := make([]string, 0, len(p.IDs))
	for i, h := range p.IDs {
		if p.Start-i < 1 {
			break
		}
		out = append(out, stub.Rev{Gen: p.Start - i, Hash: h}.String())
	}
	return out
}

// Refuses reports whether a sink holding a Couch document at the revision
// path storedPath (leaf first, as RevPath returns) must refuse a write of
// revision rev: rev is the stored revision or one of its ancestors. An unknown
// revision is never refused.
func Refuses(storedPath []string, rev stub.Rev) bool {
	if rev.IsZero() {
		return false
	}
	return slices.Contains(storedPath, rev.String())
}

// Newest collapses a batch to one document per id, keeping the newest by
// Newer, in the order of each id's first appearance. A batch without
// duplicates is returned as is.
func Newest(docs []*doc.Document) []*doc.Document {
	pos := make(map[string]int, len(docs))
	var out []*doc.Document
	for i, d := range docs {
		j, seen := pos[d.ID]
		if !seen {
			if out != nil {
				pos[d.ID] = len(out)
				out = append(out, d)
			} else {
				pos[d.ID] = i
			}
			continue
		}
		if out == nil {
			out = slices.Clone(docs[:i])
		}
		if Newer(d, out[j]) {
			out[j] = d
		}
	}
	if out == nil {
		return docs
	}
	return out
}

// Newer reports whether b, seen after a (in a batch, or written after it),
// replaces a of the same id. SQL versions compare by order. Of two Couch
// revisions the one whose path contains the other wins, and otherwise
// (unrelated) the later one, as the more recently fetched. A SQL version
// always replaces a Couch revision and is never replaced by one, whatever
// the order (the Couch→SQL migration rule in the package comment).
func Newer(b, a *doc.Document) bool {
	bc, ac := IsCouch(b), IsCouch(a)
	switch {
	case !bc && !ac:
		return b.Version.SQL.Compare(a.Version.SQL) >= 0
	case bc && ac:
		return !Refuses(RevPath(a.Version), b.Version.Rev) || b.Version.Rev == a.Version.Rev
	default:
		return !bc
	}
}
