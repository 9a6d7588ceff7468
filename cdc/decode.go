package cdc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/changefeed/changefeed/stub"
)

// Slots of the values a stub needs from a row. A relation maps each of its
// columns to a slot, or to none: only those columns are looked at while a
// tuple is scanned, and their values stay slices of the receive buffer.
const (
	slotID = iota // document id (id_column, parent.id_column or the key)
	slotType
	slotDomain
	slotSubtype
	slotDeleted
	nSlots

	slotNone = -1
	// Columns of a composite key of an unmapped table are -2, -3, …
	slotKeyBase = -2
)

type colVal struct {
	kind byte // 0: absent, 't'/'b': data, 'n': null, 'u': unchanged TOAST
	data []byte
}

func (v colVal) present() bool { return v.kind == 't' || v.kind == 'b' }

type rowVals struct {
	v    [nSlots]colVal
	keys []colVal // composite key of an unmapped table
}

func (r *rowVals) reset() {
	r.v = [nSlots]colVal{}
	clear(r.keys)
}

// relation is what the stream knows of one table from its Relation message.
// It is rebuilt from every Relation message, so a table renamed, swapped or
// recreated mid-stream is routed by the name and columns the server
// describes now, never by an OID remembered from an earlier session.
type relation struct {
	id           uint32
	schema, name string
	qualified    string
	// root is the table the routing knows this relation by: the relation
	// itself, or the root of the partition tree it belongs to (a partition
	// published under its own name, publish_via_partition_root = false).
	root         string
	route        *TableRoute // nil: published but not routed (goes to the default topic)
	skip         bool        // changefeed's own tables, or unroutable
	noKey        bool        // published, not routed, and without a key
	gone         bool        // not routed by name and no longer in the catalog
	identity     byte        // pgoutput's replica identity: 'd', 'n', 'f' or 'i'
	identityCols []string    // the columns a DELETE carries
	need         []int       // per column: slot, slotNone, or slotKeyBase-k
	nkeys        int
	// deleteMissing are the routed columns a DELETE needs (the document or
	// parent id, the document type column) that are not in the replica
	// identity: such a DELETE cannot be routed.
	deleteMissing []fieldColumn

	// Constants of the route, as bytes so that stubs encode without copies.
	topic         string // "" = by document type
	docType       []byte
	fallbackType  []byte // document_type of a row whose type column is empty
	sourceName    []byte
	deletedSuffix []byte
}

// catalog answers what a Relation message does not say: whether the
// relation is a partition (and of which root), and its primary key. It reads
// the current catalog, so it is asked only for relations the routing does
// not name (and for unrouted tables with REPLICA IDENTITY FULL).
type catalog interface {
	describe(ctx context.Context, oid uint32) (relInfo, error)
}

// relInfo is what the catalog says of a relation.
type relInfo struct {
	exists     bool
	rootSchema string // the root of its partition tree, or the relation
	rootName   string
	primaryKey []string
}

// newRelation maps a Relation message onto the routing. cat may be nil
// (then no partition is resolved and FULL identity keys stay unresolved).
func newRelation(ctx context.Context, m *pglogrepl.RelationMessage, r *Routing, cat catalog) (*relation, error) {
	rel := &relation{
		id:        m.RelationID,
		schema:    m.Namespace,
		name:      m.RelationName,
		qualified: m.Namespace + "." + m.RelationName,
		identity:  m.ReplicaIdentity,
		need:      make([]int, len(m.Columns)),
	}
	rel.root = rel.qualified
	for i := range rel.need {
		rel.need[i] = slotNone
	}
	for _, c := range m.Columns {
		if c.Flags&1 != 0 {
			rel.identityCols = append(rel.identityCols, c.Name)
		}
	}
	if m.Namespace == "changefeed" {
		rel.skip = true
		return rel, nil
	}
	rel.route = r.Table(m.Namespace, m.RelationName)
	tableName := m.RelationName
	var info relInfo
	if rel.route == nil && cat != nil {
		var err error
		if info, err = cat.describe(ctx, m.RelationID); err != nil {
			return nil, fmt.Errorf("describe relation %s: %w", rel.qualified, err)
		}
		rel.gone = !info.exists
		if info.exists && (info.rootSchema != m.Namespace || info.rootName != m.RelationName) {
			// A partition published under its own name: route it by its
			// root, as publish_via_partition_root = true would.
			rel.root = info.rootSchema + "." + info.rootName
			tableName = info.rootName
			rel.route = r.Table(info.rootSchema, info.rootName)
		}
	}
	if rel.route == nil {
		// Published but not routed: a stub per row on the default topic,
		// document_type the table, id the primary key (or replica identity
		// key), see keyID.
		rel.docType = []byte(tableName)
		rel.sourceName = []byte(tableName)
		rel.topic = r.DefaultTopic
		var keys []int
		for i, c := range m.Columns {
			if c.Flags&1 != 0 {
				keys = append(keys, i)
			}
		}
		if m.ReplicaIdentity == 'f' {
			// FULL flags every column: the document is named by the
			// primary key, not by the whole row (which every UPDATE
			// changes).
			keys = keys[:0]
			for i, c := range m.Columns {
				if slices.Contains(info.primaryKey, c.Name) {
					keys = append(keys, i)
				}
			}
		}
		if len(keys) == 0 {
			// No replica identity (or FULL without a primary key): nothing
			// names a document.
			rel.skip, rel.noKey = true, true
			return rel, nil
		}
		if len(keys) == 1 {
			rel.need[keys[0]] = slotID
		} else {
			for k, i := range keys {
				rel.need[i] = slotKeyBase - k
			}
			rel.nkeys = len(keys)
		}
		return rel, nil
	}
	t := rel.route
	rel.topic = t.Topic
	rel.sourceName = []byte(t.DataSourceName)
	if t.DocumentType != "" {
		rel.docType = []byte(t.DocumentType)
		if rel.topic == "" {
			rel.topic = r.topicFor(t.DocumentType)
		}
	}
	rel.fallbackType = []byte(tableName)
	rel.deletedSuffix = []byte(t.DeletedSuffix)
	index := make(map[string]int, len(m.Columns))
	for i, c := range m.Columns {
		index[c.Name] = i
	}
	set := func(field, col string, slot int) error {
		if col == "" {
			return nil
		}
		i, ok := index[col]
		if !ok {
			return fmt.Errorf("%w: routing file %s: table %s: field %s: column %q is not in the published table (dropped or renamed?)",
				ErrSchema, r.File, rel.qualified, field, col)
		}
		rel.need[i] = slot
		if (slot == slotID || slot == slotType) && m.Columns[i].Flags&1 == 0 {
			rel.deleteMissing = append(rel.deleteMissing, fieldColumn{field, col})
		}
		return nil
	}
	idField := "id_column"
	if t.IsChild() {
		idField = "parent.id_column"
	}
	return rel, errors.Join(
		set(idField, t.docIDColumn(), slotID),
		set("document_type_column", t.DocumentTypeColumn, slotType),
		set("domain_column", t.DomainColumn, slotDomain),
		set("subtype_column", t.SubtypeColumn, slotSubtype),
		set("deletion.column", t.DeletedColumn, slotDeleted),
	)
}

// errDeleteUnroutable is the loud error for a DELETE (or the old row of a
// key-changing UPDATE) that lacks a column its routing needs.
func (rel *relation) errDeleteUnroutable(file, slot string, lsn stub.LSN, xid uint32) error {
	var cols []string
	for _, fc := range rel.deleteMissing {
		cols = append(cols, fmt.Sprintf("%s (field %s)", fc.column, fc.field))
	}
	table := rel.qualified
	if rel.root != rel.qualified {
		table += " (a partition of " + rel.root + ")"
	}
	ident := strings.Join(rel.identityCols, ", ")
	if ident == "" {
		ident = "none"
	}
	return fmt.Errorf("%w: routing file %s: table %s: the DELETE in transaction %d (commit LSN %s) does not carry %s: "+
		"not in the table's replica identity (now REPLICA IDENTITY %s: %s), so its deletion stub cannot be routed. "+
		"Remedy: run ALTER TABLE %s REPLICA IDENTITY FULL (on a partitioned table: on each partition too) so that later DELETEs carry it; the deletions already written "+
		"cannot be routed: resync this table's documents in the consumers and, with the publisher stopped, move the slot past commit LSN %s "+
		"(SELECT pg_replication_slot_advance('%s', pg_current_wal_lsn())); the next start then refuses the gap and prints the --allow-new-slot value that accepts it",
		ErrSchema, file, table, xid, lsn, strings.Join(cols, ", "), identityName(rel.identity), ident,
		pgx.Identifier{rel.schema, rel.name}.Sanitize(), lsn, slot)
}

func identityName(b byte) string {
	switch b {
	case 'd':
		return "DEFAULT"
	case 'f':
		return "FULL"
	case 'i':
		return "USING INDEX"
	case 'n':
		return "NOTHING"
	}
	return string(b)
}

// errBadID marks an id that cannot be published as it is.
var errBadID = errors.New("invalid document id")

// appendKeyID appends the document id of an unrouted table's composite key:
// each part percent-encoded ('%' as %25, '/' as %2F) and the parts joined
// with '/', so that ('a/b','c') and ('a','b/c') stay two documents and the
// parts can be recovered by splitting on '/' and unescaping each.
func appendKeyID(b []byte, parts []colVal) ([]byte, error) {
	for i, k := range parts {
		if !k.present() {
			return b, fmt.Errorf("%w: key part %d is null or missing", errBadID, i+1)
		}
		if i > 0 {
			b = append(b, '/')
		}
		for _, c := range k.data {
			switch c {
			case '%':
				b = append(b, "%25"...)
			case '/':
				b = append(b, "%2F"...)
			default:
				b = append(b, c)
			}
		}
	}
	return b, nil
}

// checkID refuses an id that JSON cannot carry unchanged: encoding/json
// (and every stub reader) would replace invalid UTF-8 with U+FFFD, so two
// ids could become one.
func checkID(id []byte) error {
	if !utf8.Valid(id) {
		return fmt.Errorf("%w: not valid UTF-8 (%q)", errBadID, truncate(id, 128))
	}
	return nil
}

var errShortMessage = errors.New("pgoutput message too short")

// scanTuple reads a TupleData at src into out, keeping only the columns the
// relation needs (as slices of src), and returns the bytes after it.
func scanTuple(src []byte, rel *relation, out *rowVals) ([]byte, error) {
	if len(src) < 2 {
		return nil, errShortMessage
	}
	n := int(binary.BigEndian.Uint16(src))
	if n != len(rel.need) {
		return nil, fmt.Errorf("tuple of %s has %d columns, relation has %d", rel.qualified, n, len(rel.need))
	}
	p := 2
	for i := 0; i < n; i++ {
		if p >= len(src) {
			return nil, errShortMessage
		}
		kind := src[p]
		p++
		var data []byte
		switch kind {
		case 't', 'b':
			if p+4 > len(src) {
				return nil, errShortMessage
			}
			l := int(binary.BigEndian.Uint32(src[p:]))
			p += 4
			if l < 0 || p+l > len(src) {
				return nil, errShortMessage
			}
			data = src[p : p+l : p+l]
			p += l
		case 'n', 'u':
		default:
			return nil, fmt.Errorf("tuple of %s: unknown column kind %q", rel.qualified, kind)
		}
		switch s := rel.need[i]; {
		case s >= 0:
			out.v[s] = colVal{kind, data}
		case s <= slotKeyBase:
			out.keys[slotKeyBase-s] = colVal{kind, data}
		}
	}
	return src[p:], nil
}

// pgEpoch is 2000-01-01 in Unix seconds: pgoutput times count microseconds
// from it.
const pgEpoch = 946684800

func pgTime(us int64) time.Time {
	return time.Unix(pgEpoch+us/1_000_000, (us%1_000_000)*1000).UTC()
}

// begin is a decoded Begin message.
type begin struct {
	finalLSN stub.LSN
	commit   time.Time
	xid      uint32
}

func decodeBegin(src []byte) (begin, error) {
	if len(src) < 20 {
		return begin{}, errShortMessage
	}
	return begin{
		finalLSN: stub.LSN(binary.BigEndian.Uint64(src)),
		commit:   pgTime(int64(binary.BigEndian.Uint64(src[8:]))),
		xid:      binary.BigEndian.Uint32(src[16:]),
	}, nil
}

// commit is a decoded Commit message.
type commit struct {
	commitLSN, endLSN stub.LSN
	time              time.Time
}

func decodeCommit(src []byte) (commit, error) {
	if len(src) < 25 {
		return commit{}, errShortMessage
	}
	return commit{
		commitLSN: stub.LSN(binary.BigEndian.Uint64(src[1:])),
		endLSN:    stub.LSN(binary.BigEndian.Uint64(src[9:])),
		time:      pgTime(int64(binary.BigEndian.Uint64(src[17:]))),
	}, nil
}
