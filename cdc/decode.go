package cdc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"

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
type relation struct {
	id           uint32
	schema, name string
	qualified    string
	route        *TableRoute // nil: published but not routed (goes to the default topic)
	skip         bool        // changefeed's own tables, or unroutable
	noKey        bool        // published, not routed, and without a key
	need         []int       // per column: slot, slotNone, or slotKeyBase-k
	nkeys        int

	// Constants of the route, as bytes so that stubs encode without copies.
	topic         string // "" = by document type
	docType       []byte
	sourceName    []byte
	deletedSuffix []byte
}

// newRelation maps a Relation message onto the routing.
func newRelation(m *pglogrepl.RelationMessage, r *Routing) (*relation, error) {
	rel := &relation{
		id:        m.RelationID,
		schema:    m.Namespace,
		name:      m.RelationName,
		qualified: m.Namespace + "." + m.RelationName,
		need:      make([]int, len(m.Columns)),
	}
	for i := range rel.need {
		rel.need[i] = slotNone
	}
	if m.Namespace == "changefeed" {
		rel.skip = true
		return rel, nil
	}
	rel.route = r.Table(m.Namespace, m.RelationName)
	if rel.route == nil {
		// Published but not routed: a stub per row on the default topic,
		// document_type the table, id the replica identity key.
		rel.docType = []byte(m.RelationName)
		rel.sourceName = []byte(m.RelationName)
		rel.topic = r.DefaultTopic
		var keys []int
		for i, c := range m.Columns {
			if c.Flags&1 != 0 {
				keys = append(keys, i)
			}
		}
		if len(keys) == 0 {
			// No replica identity: nothing names a document.
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
