package cdc

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/fuzzcheck"
	"github.com/changefeed/changefeed/stub"
)

// The publisher decodes Begin, Commit and the tuples of Insert, Update and
// Delete by hand (decode.go, stream.go), keeping only the columns a stub
// needs as slices of the receive buffer. FuzzPgoutput feeds the same
// messages to that decoder and to pglogrepl.Parse (proto_version 1) and
// requires them to agree on every field the publisher uses, or both to
// reject the message.
//
// pglogrepl is lax where PostgreSQL never sends bad input: it panics on
// short input, skips the byte between an old and a new tuple without
// looking at it, takes unknown column kinds for empty values and reads a
// message prefix without its terminator. The reference below is pglogrepl
// plus those checks (refParse, refRow); a panic of pglogrepl counts as a
// rejection.

// The fuzz input is a sequence of pgoutput messages (XLogData payloads),
// each preceded by its length as two bytes, big-endian; a short last
// message is taken as it is.
func splitMessages(b []byte) [][]byte {
	var msgs [][]byte
	for len(b) >= 2 {
		n := int(binary.BigEndian.Uint16(b))
		b = b[2:]
		n = min(n, len(b))
		msgs = append(msgs, b[:n:n])
		b = b[n:]
	}
	return msgs
}

func joinMessages(msgs ...[]byte) []byte {
	var b []byte
	for _, m := range msgs {
		b = binary.BigEndian.AppendUint16(b, uint16(len(m)))
		b = append(b, m...)
	}
	return b
}

// recordingProducer keeps a copy of every record and acknowledges it at
// once.
type recordingProducer struct{ recs []kgo.Record }

func (r *recordingProducer) EnsureTopics(context.Context, ...string) error { return nil }
func (r *recordingProducer) Flush(context.Context) error                   { return nil }
func (r *recordingProducer) Ping(context.Context) error                    { return nil }
func (r *recordingProducer) PublishRecord(_ context.Context, rec *kgo.Record, done func(error)) {
	// The publisher reuses the record once acknowledged.
	r.recs = append(r.recs, kgo.Record{Topic: rec.Topic, Key: bytes.Clone(rec.Key), Value: bytes.Clone(rec.Value)})
	done(nil)
}

// newFuzzStream is a stream without connections, fed message by message,
// routing the tables of the integration tests (testRoutingYAML).
func newFuzzStream(tb testing.TB) (*stream, *recordingProducer) {
	tb.Helper()
	r, err := ParseRouting("test-routing.yaml", []byte(testRoutingYAML))
	if err != nil {
		tb.Fatal(err)
	}
	prod := &recordingProducer{}
	p, err := New(Config{PostgresURL: "postgres://u@127.0.0.1/db", Routing: r}, Deps{Producer: prod})
	if err != nil {
		tb.Fatal(err)
	}
	s := newStream(p, nil, nil, 0)
	s.ctx = context.Background()
	s.setNow(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	return s, prod
}

// refParse is pglogrepl.Parse with its panics taken as rejections.
func refParse(m []byte) (msg pglogrepl.Message, err error) {
	defer func() {
		if r := recover(); r != nil {
			msg, err = nil, fmt.Errorf("pglogrepl panicked: %v", r)
		}
	}()
	if len(m) == 0 {
		return nil, errors.New("empty message")
	}
	// pglogrepl allocates the relation list before reading it: a huge
	// count would exhaust memory before the panic.
	if m[0] == 'T' && len(m) >= 5 && 5+4*uint64(binary.BigEndian.Uint32(m[1:])) > uint64(len(m)) {
		return nil, errors.New("truncate: more relations than bytes")
	}
	// It also allocates each column's data before checking its length.
	if (m[0] == 'I' || m[0] == 'U' || m[0] == 'D') && !columnsFit(m) {
		return nil, errors.New("a column longer than the message")
	}
	msg, err = pglogrepl.Parse(m)
	if _, ok := msg.(*pglogrepl.LogicalDecodingMessage); ok && err == nil && bytes.IndexByte(m[10:], 0) < 0 {
		return nil, errors.New("message: prefix without terminator") // pglogrepl reads on
	}
	return msg, err
}

// columnsFit reports whether no column of a row change's tuples claims
// more bytes than the message has (a rough walk: it only guards
// pglogrepl's allocations).
func columnsFit(m []byte) bool {
	p := 5
	// At most two tuples (an old one and a new one), each after its tag.
	for range 2 {
		if p >= len(m) || m[p] != 'K' && m[p] != 'O' && m[p] != 'N' {
			return true
		}
		last := m[p] == 'N' || m[0] == 'D'
		p++
		if p+2 > len(m) {
			return true
		}
		n := int(binary.BigEndian.Uint16(m[p:]))
		p += 2
		for range n {
			if p >= len(m) {
				return true
			}
			kind := m[p]
			p++
			if kind == 't' || kind == 'b' {
				if p+4 > len(m) {
					return true
				}
				l := uint64(binary.BigEndian.Uint32(m[p:]))
				p += 4
				if l > uint64(len(m)-p) {
					return false
				}
				p += int(l)
			}
		}
		if last {
			return true
		}
	}
	return true
}

// tupleLen is the encoded length of a decoded tuple.
func tupleLen(td *pglogrepl.TupleData) int {
	n := 2
	for _, c := range td.Columns {
		n++
		if c.DataType == 't' || c.DataType == 'b' {
			n += 4 + len(c.Data)
		}
	}
	return n
}

// refRow is the reference decoding of a row change: pglogrepl's, checked
// against the relation as the publisher knows it.
type refRowChange struct {
	rel      *relation
	old, new *pglogrepl.TupleData
}

func refRow(m []byte, msg pglogrepl.Message, rels map[uint32]*relation) (refRowChange, error) {
	var r refRowChange
	var id uint32
	switch v := msg.(type) {
	case *pglogrepl.InsertMessage:
		id, r.new = v.RelationID, v.Tuple
	case *pglogrepl.UpdateMessage:
		id, r.old, r.new = v.RelationID, v.OldTuple, v.NewTuple
		if r.old != nil && m[6+tupleLen(r.old)] != 'N' {
			return r, errors.New("update: no 'N' after the old tuple") // pglogrepl skips the byte
		}
	case *pglogrepl.DeleteMessage:
		id, r.old = v.RelationID, v.OldTuple
	default:
		return r, fmt.Errorf("not a row change: %T", msg)
	}
	if r.rel = rels[id]; r.rel == nil {
		return r, fmt.Errorf("unknown relation %d", id)
	}
	for _, td := range []*pglogrepl.TupleData{r.old, r.new} {
		if td == nil {
			continue
		}
		if int(td.ColumnNum) != len(r.rel.need) {
			return r, fmt.Errorf("tuple has %d columns, relation %d", td.ColumnNum, len(r.rel.need))
		}
		for _, c := range td.Columns {
			switch c.DataType {
			case 't', 'b', 'n', 'u':
			default:
				return r, fmt.Errorf("unknown column kind %q", c.DataType) // pglogrepl takes it for empty
			}
		}
	}
	return r, nil
}

// project keeps a reference tuple's columns as scanTuple does.
func (r refRowChange) project(td *pglogrepl.TupleData) rowVals {
	out := rowVals{keys: make([]colVal, r.rel.nkeys)}
	if td == nil {
		return out
	}
	for i, c := range td.Columns {
		v := colVal{kind: c.DataType}
		if c.DataType == 't' || c.DataType == 'b' {
			v.data = c.Data
		}
		switch s := r.rel.need[i]; {
		case s >= 0:
			out.v[s] = v
		case s <= slotKeyBase:
			out.keys[slotKeyBase-s] = v
		}
	}
	return out
}

func sameRow(got, want *rowVals, nkeys int) error {
	for i := range want.v {
		if g, w := got.v[i], want.v[i]; g.kind != w.kind || !bytes.Equal(g.data, w.data) {
			return fmt.Errorf("slot %d = %c %q, pglogrepl %c %q", i, g.kind, g.data, w.kind, w.data)
		}
	}
	for i := range nkeys {
		if g, w := got.keys[i], want.keys[i]; g.kind != w.kind || !bytes.Equal(g.data, w.data) {
			return fmt.Errorf("key %d = %c %q, pglogrepl %c %q", i, g.kind, g.data, w.kind, w.data)
		}
	}
	return nil
}

// comparableTime reports whether pglogrepl's time of a pgoutput timestamp
// is right: it counts in int64 nanoseconds since 1970, which overflows
// about 290 years from then (PostgreSQL's commit times are now()).
func comparableTime(us int64) bool { return us > -8e15 && us < 8e15 }

func agree(kind byte, got, ref error) error {
	if (got == nil) != (ref == nil) {
		return fmt.Errorf("%c: decoder error %v, pglogrepl %v", kind, got, ref)
	}
	return nil
}

// checkMessage feeds one message to the stream and compares what the
// stream decoded with pglogrepl's decoding of it.
func checkMessage(s *stream, prod *recordingProducer, m []byte, allocated *uint64) error {
	ref, refErr := refParse(m)
	if len(m) == 0 {
		return agree(0, s.walMessage(m), refErr)
	}
	// A message out of place (a BEGIN inside a transaction, a change
	// outside one) is an error of the stream, not of decoding: put the
	// stream where the message belongs.
	switch m[0] {
	case 'B':
		if s.inTx {
			s.u.End(txPos{})
			s.inTx = false
		}
	case 'C', 'I', 'U', 'D', 'T', 'M':
		if !s.inTx {
			s.inTx, s.u = true, s.tr.Begin()
		}
	}
	nrecs := len(prod.recs)
	var err error
	*allocated += fuzzcheck.Allocated(func() { err = s.walMessage(m) })
	switch m[0] {
	case 'B':
		if e := agree('B', err, refErr); e != nil || err != nil {
			return e
		}
		b := ref.(*pglogrepl.BeginMessage)
		if s.tx.finalLSN != stub.LSN(b.FinalLSN) || s.tx.xid != b.Xid {
			return fmt.Errorf("B: %+v, pglogrepl %+v", s.tx, b)
		}
		if comparableTime(int64(binary.BigEndian.Uint64(m[9:]))) && !s.tx.commit.Equal(b.CommitTime) {
			return fmt.Errorf("B: commit time %v, pglogrepl %v", s.tx.commit, b.CommitTime)
		}
	case 'C':
		if e := agree('C', err, refErr); e != nil || err != nil {
			return e
		}
		c := ref.(*pglogrepl.CommitMessage)
		pos, ok := s.tr.Confirmed() // every stub was acknowledged at once
		if !ok || pos.end != stub.LSN(c.TransactionEndLSN) {
			return fmt.Errorf("C: end %v (%v), pglogrepl %v", pos.end, ok, stub.LSN(c.TransactionEndLSN))
		}
		if comparableTime(int64(binary.BigEndian.Uint64(m[18:]))) && !pos.commit.Equal(c.CommitTime) {
			return fmt.Errorf("C: commit time %v, pglogrepl %v", pos.commit, c.CommitTime)
		}
	case 'I', 'U', 'D':
		var want refRowChange
		if refErr == nil {
			want, refErr = refRow(m, ref, s.rels)
		}
		if len(m) >= 5 {
			if rel := s.rels[binary.BigEndian.Uint32(m[1:])]; rel != nil && rel.skip {
				// Changes of a skipped table (changefeed's own, or one
				// without a key) are counted, not read: nothing of
				// them is used.
				return nil
			}
		}
		if m[0] == 'D' && refErr == nil && errors.Is(err, ErrSchema) {
			// A DELETE without a value its routing needs is refused
			// (routing, not decoding): the tuple was still read.
			err = nil
		}
		if e := agree(m[0], err, refErr); e != nil || err != nil {
			return e
		}
		wantOld, wantNew := want.project(want.old), want.project(want.new)
		if m[0] == 'U' && want.old != nil {
			for i := range wantNew.v {
				if wantNew.v[i].kind == 'u' {
					wantNew.v[i] = wantOld.v[i]
				}
			}
			for i := range wantNew.keys {
				if wantNew.keys[i].kind == 'u' {
					wantNew.keys[i] = wantOld.keys[i]
				}
			}
		}
		if e := sameRow(&s.old, &wantOld, want.rel.nkeys); e != nil {
			return fmt.Errorf("%c old tuple: %w", m[0], e)
		}
		if e := sameRow(&s.rows, &wantNew, want.rel.nkeys); e != nil {
			return fmt.Errorf("%c new tuple: %w", m[0], e)
		}
	case 'R':
		switch {
		case refErr != nil && err == nil:
			return fmt.Errorf("R: accepted, pglogrepl: %v", refErr)
		case refErr == nil && err != nil && !errors.Is(err, ErrSchema):
			return fmt.Errorf("R: %v, pglogrepl accepts", err)
		case err == nil:
			rm := ref.(*pglogrepl.RelationMessage)
			if rel := s.rels[rm.RelationID]; rel == nil || len(rel.need) != len(rm.Columns) || rel.name != rm.RelationName {
				return fmt.Errorf("R: relation %+v, pglogrepl %+v", rel, rm)
			}
		}
	case 'T':
		if refErr != nil && err == nil {
			return fmt.Errorf("T: accepted, pglogrepl: %v", refErr)
		}
		if refErr == nil {
			known := true
			for _, id := range ref.(*pglogrepl.TruncateMessage).RelationIDs {
				known = known && s.rels[id] != nil
			}
			if known != (err == nil) {
				return fmt.Errorf("T: %v, pglogrepl accepts (relations known: %v)", err, known)
			}
		}
	case 'M':
		if e := agree('M', err, refErr); e != nil {
			return e
		}
	case 'Y', 'O':
		// Read by nothing, accepted whatever they hold.
		if err != nil {
			return fmt.Errorf("%c: %v", m[0], err)
		}
	default:
		if err == nil {
			return fmt.Errorf("message type %q accepted", m[0])
		}
	}
	for _, r := range prod.recs[nrecs:] {
		if !json.Valid(r.Value) {
			return fmt.Errorf("%c: published invalid JSON %q", m[0], r.Value)
		}
	}
	return nil
}

func checkPgoutput(t *testing.T, in []byte) {
	s, prod := newFuzzStream(t)
	msgs := splitMessages(in)
	var allocated uint64
	for i, m := range msgs {
		if err := checkMessage(s, prod, m, &allocated); err != nil {
			t.Fatalf("message %d of %d (%q): %v", i, len(msgs), m, err)
		}
		prod.recs = prod.recs[:0]
	}
	// The decoder's allocations: relations, stubs and their records grow
	// with the input, nothing else may.
	if bound := 1<<20 + 64*uint64(len(in)); allocated > bound {
		t.Fatalf("decoding allocated %d bytes, bound %d", allocated, bound)
	}
}

// Builders for hand-made seeds.

func pgRelation(id uint32, ns, name string, cols ...string) []byte {
	b := binary.BigEndian.AppendUint32([]byte{'R'}, id)
	b = append(append(b, ns...), 0)
	b = append(append(b, name...), 0)
	b = append(b, 'd')
	b = binary.BigEndian.AppendUint16(b, uint16(len(cols)))
	for i, c := range cols {
		flags := byte(0)
		if i == 0 {
			flags = 1 // key
		}
		b = append(b, flags)
		b = append(append(b, c...), 0)
		b = binary.BigEndian.AppendUint32(b, 25) // text
		b = binary.BigEndian.AppendUint32(b, 0xFFFFFFFF)
	}
	return b
}

func pgBegin(final uint64, us int64, xid uint32) []byte {
	b := binary.BigEndian.AppendUint64([]byte{'B'}, final)
	b = binary.BigEndian.AppendUint64(b, uint64(us))
	return binary.BigEndian.AppendUint32(b, xid)
}

func pgCommit(commit, end uint64, us int64) []byte {
	b := binary.BigEndian.AppendUint64([]byte{'C', 0}, commit)
	b = binary.BigEndian.AppendUint64(b, end)
	return binary.BigEndian.AppendUint64(b, uint64(us))
}

func pgChange(kind byte, rel uint32, parts ...any) []byte {
	b := binary.BigEndian.AppendUint32([]byte{kind}, rel)
	for _, p := range parts {
		switch v := p.(type) {
		case byte:
			b = append(b, v)
		case []byte:
			b = append(b, v...)
		}
	}
	return b
}

func pgMessage(transactional bool, prefix, content string) []byte {
	b := []byte{'M', 0}
	if transactional {
		b[1] = 1
	}
	b = binary.BigEndian.AppendUint64(b, 0x16B374D848)
	b = append(append(b, prefix...), 0)
	b = binary.BigEndian.AppendUint32(b, uint32(len(content)))
	return append(b, content...)
}

func pgTruncate(opt byte, ids ...uint32) []byte {
	b := binary.BigEndian.AppendUint32([]byte{'T'}, uint32(len(ids)))
	b = append(b, opt)
	for _, id := range ids {
		b = binary.BigEndian.AppendUint32(b, id)
	}
	return b
}

// handSeeds cover every message kind with the test routing's tables; the
// captured corpus (testdata/fuzz/FuzzPgoutput) adds PostgreSQL's own.
func handSeeds() [][]byte {
	cases := pgRelation(1, "public", "cases", "case_id", "domain", "type", "deleted", "name")
	index := pgRelation(2, "public", "case_index", "id", "case_id", "domain", "referenced_id")
	forms := pgRelation(3, "public", "forms", "form_id", "domain", "doc_type", "xmlns")
	other := pgRelation(4, "public", "other", "a", "b")
	own := pgRelation(5, "changefeed", "cdc_checkpoint", "slot", "lsn")
	stubJSON := `{"document_id":"x","data_source_type":"sql","data_source_name":"n","document_type":"CommCareCase"}`
	return [][]byte{
		joinMessages(cases, pgBegin(0x100, 800_000_000_000_000, 7),
			pgChange('I', 1, byte('N'), tuple("c1", "d", "patient", "f", "n")),
			pgChange('U', 1, byte('N'), tuple("c1", "d", "patient", "t", byte('u'))),
			pgChange('U', 1, byte('K'), tuple("c0", nil, nil, nil, nil), byte('N'), tuple("c1", "d", "p", "f", "n")),
			pgChange('D', 1, byte('K'), tuple("c1", nil, nil, nil, nil)),
			pgCommit(0x100, 0x140, 800_000_000_000_001)),
		joinMessages(index, forms, pgBegin(0x200, -1, 1<<31),
			pgChange('U', 2, byte('O'), tuple("1", "c1", "d", "r", byte('u')), byte('N'), tuple("1", "c2", "d", byte('u'))),
			pgChange('D', 2, byte('O'), tuple("1", "c2", "d", nil)),
			pgChange('I', 3, byte('N'), tuple("f1", "d", "XFormInstance-Deleted", "http://x")),
			pgCommit(0x200, 0x240, 0)),
		joinMessages(other, own, pgBegin(0x300, 1, 0),
			pgChange('I', 4, byte('N'), tuple("k", "v")),
			pgChange('I', 5, byte('N'), tuple("s", "0/0")),
			pgTruncate(3, 1, 4),
			pgMessage(true, MessagePrefix, stubJSON),
			pgMessage(false, HeartbeatPrefix, "now"),
			pgCommit(0x300, 0x340, 1)),
		joinMessages(cases, pgBegin(0x400, 0, 9), []byte{'Y', 0, 0, 0, 1, 'p', 0, 't', 0}, []byte("O\x00\x00\x00\x00\x00\x00\x00\x01origin\x00"),
			pgChange('I', 1, byte('N'), tuple("c1", "d", "t", "f", "x")[:9])),
	}
}

func FuzzPgoutput(f *testing.F) {
	for _, s := range handSeeds() {
		f.Add(s)
	}
	f.Fuzz(checkPgoutput)
}

// TestPgoutputHandSeeds keeps the hand-made seeds meaningful: each is
// accepted by both decoders up to its deliberately broken last message.
func TestPgoutputHandSeeds(t *testing.T) {
	for i, in := range handSeeds() {
		t.Run(fmt.Sprint(i), func(t *testing.T) { checkPgoutput(t, in) })
	}
}
