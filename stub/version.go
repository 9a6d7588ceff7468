package stub

import (
	"cmp"
	"fmt"
	"strconv"
	"strings"
)

// SQLVersion orders the changes of SQL documents: by the commit LSN of the
// transaction, then by the change's position within that transaction.
//
// Why the commit LSN: one document can span several rows (a case and its
// indices). T1 writes the case row at LSN 100 and commits at 300; T2 writes an
// index row of the same case at 200 and commits at 250. By change LSN T2 looks
// newer, but T1 committed last and its state is the final one. Ordering by
// commit LSN puts T1 last.
type SQLVersion struct {
	CommitLSN LSN
	Ordinal   uint32
}

// Compare returns -1, 0 or +1 as v is older than, equal to or newer than o.
func (v SQLVersion) Compare(o SQLVersion) int {
	if c := cmp.Compare(v.CommitLSN, o.CommitLSN); c != 0 {
		return c
	}
	return cmp.Compare(v.Ordinal, o.Ordinal)
}

func (v SQLVersion) String() string { return fmt.Sprintf("%s#%d", v.CommitLSN, v.Ordinal) }

// Seq is a position in a CouchDB _changes feed. It is opaque: CouchDB 2/3
// send "12-g1AAAA…", other servers an integer. It is never parsed for ordering.
type Seq string

// Rev is a CouchDB document revision, "<generation>-<hash>".
type Rev struct {
	Gen  int
	Hash string
}

// ParseRev parses "3-917fa23…".
func ParseRev(s string) (Rev, error) {
	g, h, ok := strings.Cut(s, "-")
	if !ok || h == "" {
		return Rev{}, fmt.Errorf("parse rev %q: want <generation>-<hash>", s)
	}
	n, err := strconv.Atoi(g)
	if err != nil || n < 1 {
		return Rev{}, fmt.Errorf("parse rev %q: bad generation", s)
	}
	return Rev{Gen: n, Hash: h}, nil
}

func (r Rev) String() string {
	if r.Gen == 0 {
		return ""
	}
	return strconv.Itoa(r.Gen) + "-" + r.Hash
}

// IsZero reports whether r is the empty revision.
func (r Rev) IsZero() bool { return r.Gen == 0 && r.Hash == "" }

// RankLeaves compares two concurrent leaf revisions the way CouchDB picks a
// winner among non-deleted leaves: higher generation, then higher hash. It is
// only meaningful between leaves of one document's revision tree at one moment;
// it does NOT say which revision is newer in time.
func RankLeaves(a, b Rev) int {
	if c := cmp.Compare(a.Gen, b.Gen); c != 0 {
		return c
	}
	return cmp.Compare(a.Hash, b.Hash)
}

// Revisions is a document's revision path as CouchDB returns it with
// ?revs=true (the _revisions field): the leaf's generation and the hashes from
// the leaf back towards the root (possibly truncated by revs_limit).
type Revisions struct {
	Start int      `json:"start"`
	IDs   []string `json:"ids"`
}

// Leaf returns the revision the path ends at.
func (p Revisions) Leaf() Rev {
	if len(p.IDs) == 0 {
		return Rev{}
	}
	return Rev{Gen: p.Start, Hash: p.IDs[0]}
}

// Contains reports whether r is on the path (the leaf itself or an ancestor).
func (p Revisions) Contains(r Rev) bool {
	i := p.Start - r.Gen
	return i >= 0 && i < len(p.IDs) && p.IDs[i] == r.Hash
}

// Relation is what is known about two revisions of one document.
type Relation int

const (
	// Unrelated: neither revision is on the other's known path. They are
	// concurrent branches, or the history was truncated; only the database's
	// current winner can settle which state is current.
	Unrelated Relation = iota
	// Same revision.
	Same
	// Ancestor: the revision is an ancestor of the path's leaf (older).
	Ancestor
)

// Relate says how r relates to the leaf of path.
func Relate(r Rev, path Revisions) Relation {
	switch {
	case r == path.Leaf():
		return Same
	case path.Contains(r):
		return Ancestor
	default:
		return Unrelated
	}
}
