package cdc

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/ack"
	"github.com/changefeed/changefeed/stub"
)

// Prefixes of logical decoding messages the publisher reads.
const (
	// MessagePrefix marks a published-from-anywhere stub:
	// pg_logical_emit_message(true, 'changefeed', '<stub json>').
	MessagePrefix = "changefeed"
	// HeartbeatPrefix marks the publisher's own heartbeats (skipped).
	HeartbeatPrefix = "changefeed_heartbeat"
)

var errStreamEnded = errors.New("replication stream ended by the server")

// txPos is a transaction's position for the tracker: its end LSN (what is
// confirmed) and its commit time (for lag).
type txPos struct {
	end    stub.LSN
	commit time.Time
}

// stream is one replication session: a connection, its tracker and the
// relations the server described on it. Only the goroutine running run
// touches it, except the tracker (acks arrive from the producer).
type stream struct {
	p    *Publisher
	db   *pgx.Conn
	conn *pgconn.PgConn
	tr   *ack.Tracker[txPos]
	rels map[uint32]*relation
	// cat describes relations the routing does not name (nil: no catalog,
	// as in decoding-only tests).
	cat catalog
	// parts reports partitions that left a routed table or were truncated
	// without the stream saying so.
	parts *partitionWatch
	// lacking holds, per routed root table, its partitions whose replica
	// identity lacks a column a DELETE needs (as their own Relation
	// messages say): a DELETE published via the root carries the
	// partition's old key, so the root's Relation message alone cannot tell.
	lacking map[string]map[uint32]*relation

	// Current transaction.
	inTx    bool
	u       *ack.Unit[txPos]
	tx      begin
	ordinal uint32

	startPos stub.LSN // confirmed when the stream started
	sent     stub.LSN // last position sent as flush
	// idlePos is a keepalive's WAL end seen with nothing open or in flight:
	// everything before it that was published is acknowledged.
	idlePos stub.LSN
	// selfWAL is the WAL position right after our own idle checkpoint
	// write: an idle position not past it is only our own write, and is not
	// worth another checkpoint (that would loop forever).
	selfWAL stub.LSN

	// now is the publish time of the stubs being built (refreshed per
	// transaction, every 256 changes and on every tick); nowText and
	// commitText are it and the commit time, encoded once for all stubs.
	now                 time.Time
	nowText, commitText []byte

	nextTick                           time.Time
	lastStatus, lastHeartbeat, lastLag time.Time
	lastReplyRequest                   time.Time
	// lastReceived is when the server last sent anything: a connection
	// silent for longer than silenceTimeout is taken as dead.
	lastReceived time.Time

	// Slot and publication watch (see watch): when a warning was last
	// logged, the previous safe_wal_size (-1: none), and per missing routed
	// table when it was last reported.
	lastSlotWarn  time.Time
	lastSafe      int64
	missingWarned map[string]time.Time

	// Scratch reused for every change.
	rows, old  rowVals
	left       rowVals // the old document of a key-changing UPDATE
	fields     stubFields
	statusBuf  [39]byte
	keyScratch []byte

	tickerC <-chan time.Time
	ctx     context.Context
}

func newStream(p *Publisher, db *pgx.Conn, conn *pgconn.PgConn, start stub.LSN) *stream {
	var cat catalog
	if db != nil {
		cat = pgCatalog{db}
	}
	return &stream{
		p: p, db: db, conn: conn, cat: cat,
		tr:       &ack.Tracker[txPos]{},
		rels:     map[uint32]*relation{},
		parts:    newPartitionWatch(p.cfg.Routing, p.cfg.Publication),
		lacking:  map[string]map[uint32]*relation{},
		startPos: start,
		lastSafe: -1,

		missingWarned: map[string]time.Time{},
	}
}

// run streams until ctx is done (then it flushes and confirms: shutdown) or
// an error. Before returning an error a restart would not cure, it confirms
// what Kafka acknowledged (see confirmBeforeExit).
func (s *stream) run(ctx context.Context) error {
	err := s.stream(ctx)
	if err != nil && ctx.Err() == nil && !isTransient(err) && !errors.Is(err, errConfirmFailed) {
		s.confirmBeforeExit(err)
	}
	return err
}

// confirmBeforeExit confirms the acknowledged prefix before a fatal exit:
// without it the next start (after the operator's fix) would replay, and
// publish again, everything since the last periodic confirmation; and a
// failure in a transaction would drag along the transactions before it. The
// tracker's position never passes an unacknowledged or failed stub, so
// confirming it loses nothing; a failure here only leaves more to replay.
func (s *stream) confirmBeforeExit(cause error) {
	p := s.p
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ShutdownTimeout)
	defer cancel()
	if err := p.prod.Flush(ctx); err != nil {
		p.log.Warn("stopping on an error: producer not flushed, unacknowledged stubs will be published again after restart", "err", err)
	}
	_ = s.conn.Conn().SetReadDeadline(time.Time{})
	s.ctx = ctx
	if err := s.confirm(true); err != nil {
		p.log.Warn("stopping on an error: could not confirm the acknowledged prefix; it will be published again after restart", "err", err, "cause", cause)
		return
	}
	p.log.Info("stopping on an error: confirmed what Kafka acknowledged", "confirmed", p.Confirmed(), "cause", cause)
}

func (s *stream) stream(ctx context.Context) error {
	p := s.p
	s.ctx = ctx
	ticker := time.NewTicker(p.cfg.StatusInterval)
	defer ticker.Stop()
	s.tickerC = ticker.C
	stopWatch := context.AfterFunc(ctx, func() {
		// Wake a blocked read so that shutdown starts at once.
		_ = s.conn.Conn().SetReadDeadline(time.Now())
	})
	defer stopWatch()

	// Confirm the start position at once (it is the checkpoint, acked).
	if err := s.sendStatus(s.startPos, false); err != nil {
		return err
	}
	s.sent = s.startPos
	p.confirmed.Store(uint64(s.startPos))
	p.m.confirmedLSN.Set(float64(s.startPos))
	p.state.Store(int32(StateStreaming))
	p.m.streaming.Set(1)
	p.log.Info("streaming", "slot", p.cfg.Slot, "publication", p.cfg.Publication, "start", s.startPos)

	s.now = time.Now()
	s.lastHeartbeat, s.lastLag, s.lastReceived = s.now, time.Time{}, s.now
	s.nextTick = s.now.Add(p.cfg.StatusInterval)
	for {
		if err := s.conn.Conn().SetReadDeadline(s.nextTick); err != nil {
			return fmt.Errorf("set read deadline: %w", err)
		}
		if ctx.Err() != nil {
			return s.shutdown()
		}
		msg, err := s.conn.ReceiveMessage(context.Background())
		if err == nil {
			s.lastReceived = s.now
		}
		if err != nil {
			if pgconn.Timeout(err) {
				if ctx.Err() != nil {
					return s.shutdown()
				}
				if err := s.tick(); err != nil {
					return err
				}
				continue
			}
			return fmt.Errorf("receive from replication stream: %w", err)
		}
		switch m := msg.(type) {
		case *pgproto3.CopyData:
			if err := s.copyData(m.Data); err != nil {
				if errors.Is(err, errStopping) {
					return s.shutdown()
				}
				return err
			}
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("replication stream: %w", pgconn.ErrorResponseToPgError(m))
		case *pgproto3.CopyDone:
			return errStreamEnded
		}
	}
}

var (
	errStopping      = errors.New("stopping")
	errConfirmFailed = errors.New("checkpoint")
)

// silenceTimeout is how long the replication connection may stay silent
// (no data, no keepalive, even when asked for one) before it is reconnected.
const silenceTimeout = 90 * time.Second

func (s *stream) copyData(d []byte) error {
	if len(d) == 0 {
		return nil
	}
	switch d[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		if len(d) < 18 {
			return errShortMessage
		}
		walEnd := stub.LSN(binary.BigEndian.Uint64(d[1:]))
		if !s.inTx && s.tr.Idle() && walEnd > s.idlePos {
			s.idlePos = walEnd
		}
		if d[17] != 0 {
			// The server wants an answer now (wal_sender_timeout).
			return s.confirm(true)
		}
		return nil
	case pglogrepl.XLogDataByteID:
		if len(d) < 25 {
			return errShortMessage
		}
		return s.walMessage(d[25:])
	}
	return nil
}

func (s *stream) walMessage(m []byte) error {
	if len(m) == 0 {
		return errShortMessage
	}
	switch m[0] {
	case 'B':
		if s.inTx {
			return errors.New("pgoutput: BEGIN inside a transaction")
		}
		b, err := decodeBegin(m[1:])
		if err != nil {
			return err
		}
		s.tx, s.inTx, s.ordinal = b, true, 0
		s.u = s.tr.Begin()
		s.setNow(time.Now())
		s.commitText = appendTime(s.commitText[:0], b.commit)
	case 'C':
		if !s.inTx {
			return errors.New("pgoutput: COMMIT outside a transaction")
		}
		c, err := decodeCommit(m[1:])
		if err != nil {
			return err
		}
		s.u.End(txPos{end: c.endLSN, commit: c.time})
		s.u, s.inTx = nil, false
		s.p.m.transactions.Inc()
	case 'I', 'U', 'D':
		return s.rowChange(m)
	case 'R':
		var rm pglogrepl.RelationMessage
		if err := decodeLib('R', &rm, m[1:]); err != nil {
			return fmt.Errorf("pgoutput relation: %w", err)
		}
		ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
		rel, err := newRelation(ctx, &rm, s.p.cfg.Routing, s.cat)
		cancel()
		if err != nil {
			// DDL on a routed table (see ddl.go).
			if rel, err = s.resolveSchemaChange(&rm, err); err != nil {
				return err
			}
		}
		s.logRelation(rel)
		s.rels[rel.id] = rel
	case 'T':
		return s.truncate(m[1:])
	case 'M':
		return s.message(m[1:])
	case 'Y', 'O':
		// Type and Origin messages carry nothing a stub needs.
	default:
		return fmt.Errorf("pgoutput: unexpected message type %q", m[0])
	}
	return nil
}

func (s *stream) rowChange(m []byte) error {
	if !s.inTx {
		return errors.New("pgoutput: row change outside a transaction")
	}
	if len(m) < 6 {
		return errShortMessage
	}
	rel := s.rels[binary.BigEndian.Uint32(m[1:])]
	if rel == nil {
		return fmt.Errorf("pgoutput: change of unknown relation %d", binary.BigEndian.Uint32(m[1:]))
	}
	s.ordinal++
	s.p.m.changes.Inc()
	if rel.skip {
		return nil
	}
	if s.ordinal%256 == 0 {
		// A long transaction: keep publish_timestamp current.
		s.setNow(time.Now())
	}
	kind := m[0]
	rest := m[5:]
	s.rows.reset()
	s.old.reset()
	if rel.nkeys > 0 {
		if len(s.rows.keys) != rel.nkeys {
			s.rows.keys = make([]colVal, rel.nkeys)
			s.old.keys = make([]colVal, rel.nkeys)
		}
	}
	var err error
	hasOld := false
	if len(rest) == 0 {
		return errShortMessage
	}
	switch {
	case kind != 'I' && (rest[0] == 'K' || rest[0] == 'O'):
		if rest, err = scanTuple(rest[1:], rel, &s.old); err != nil {
			return err
		}
		hasOld = true
	case kind == 'D':
		// Not a row without an id to skip: a malformed message.
		return fmt.Errorf("pgoutput: DELETE of %s without a key or old tuple", rel.qualified)
	}
	if kind != 'D' {
		if len(rest) == 0 || rest[0] != 'N' {
			return fmt.Errorf("pgoutput: %c of %s without a new tuple", kind, rel.qualified)
		}
		if _, err = scanTuple(rest[1:], rel, &s.rows); err != nil {
			return err
		}
	}
	switch kind {
	case 'D':
		if bad := s.unroutableDelete(rel); bad != nil {
			return bad.errDeleteUnroutable(s.p.cfg.Routing.File, s.p.cfg.Slot, s.tx.finalLSN, s.tx.xid)
		}
		return s.rowStub(rel, &s.old, !rel.isChild())
	case 'U':
		if hasOld {
			// Unchanged TOASTed values are only in the old tuple (PostgreSQL
			// logs the old key whenever a key column is TOASTed).
			for i := range s.rows.v {
				if s.rows.v[i].kind == 'u' {
					s.rows.v[i] = s.old.v[i]
				}
			}
			for i := range s.rows.keys {
				if s.rows.keys[i].kind == 'u' {
					s.rows.keys[i] = s.old.keys[i]
				}
			}
		}
		if err := s.rowStub(rel, &s.rows, false); err != nil {
			return err
		}
		if hasOld && s.keyChanged(rel) {
			// The key changed: the row left its old document (a child moved
			// to another parent, or a document's id changed). The old key
			// tuple carries only the replica identity: route the old
			// document's stub with the new row's other values.
			s.left = s.old
			for i := range s.left.v {
				if i != slotID && !s.left.v[i].present() {
					s.left.v[i] = s.rows.v[i]
				}
			}
			return s.rowStub(rel, &s.left, !rel.isChild())
		}
		return nil
	default:
		return s.rowStub(rel, &s.rows, false)
	}
}

// keyChanged reports whether an UPDATE's old tuple names another document
// than its new tuple.
func (s *stream) keyChanged(rel *relation) bool {
	if rel.nkeys > 0 {
		for i := range s.old.keys {
			o, n := s.old.keys[i], s.rows.keys[i]
			if o.present() && (o.kind != n.kind || !bytes.Equal(o.data, n.data)) {
				return true
			}
		}
		return false
	}
	return s.old.v[slotID].present() && !bytes.Equal(s.old.v[slotID].data, s.rows.v[slotID].data)
}

// unroutableDelete returns the relation whose replica identity explains why
// this DELETE's old tuple lacks a value its routing needs (nil if it has
// them all): rel itself, or a partition of rel (a DELETE published via the
// root carries the partition's old key). A value that is there was carried,
// whatever the Relation messages say.
func (s *stream) unroutableDelete(rel *relation) *relation {
	if s.lacks(rel) {
		return rel
	}
	for _, part := range s.lacking[rel.qualified] {
		if s.lacks(part) {
			return part
		}
	}
	return nil
}

// lacks reports whether the old tuple misses a column that rel's replica
// identity does not carry.
func (s *stream) lacks(rel *relation) bool {
	for _, fc := range rel.deleteMissing {
		slot := slotID
		if fc.field == "document_type_column" {
			slot = slotType
		}
		if !s.old.v[slot].present() {
			return true
		}
	}
	return false
}

// logRelation says once per Relation message what will become of the
// table's changes.
func (s *stream) logRelation(rel *relation) {
	log := s.p.log
	switch {
	case rel.noKey:
		log.Warn("published table is not in the routing file and has neither a replica identity key nor a primary key: its changes are skipped",
			"table", rel.qualified, "replica_identity", identityName(rel.identity))
	case rel.route == nil && !rel.skip && rel.gone:
		log.Warn("published relation is not in the routing file and no longer exists, so whether it was a partition of a routed table cannot be told: its changes (if any are published under its own name) go to the default topic",
			"relation", rel.qualified, "topic", rel.topic)
	case rel.route == nil && !rel.skip:
		log.Warn("published table is not in the routing file: its stubs go to the default topic with document_type = table name",
			"table", rel.root, "relation", rel.qualified, "topic", rel.topic)
	case len(rel.deleteMissing) > 0:
		var cols []string
		for _, fc := range rel.deleteMissing {
			cols = append(cols, fc.column)
		}
		log.Error("routed columns are not in the replica identity: a DELETE of this table will stop the publisher, and an UPDATE changing the document id cannot publish the old id's stub; run ALTER TABLE … REPLICA IDENTITY FULL",
			"table", rel.qualified, "columns", cols, "replica_identity", identityName(rel.identity), "identity_columns", rel.identityCols)
	}
	if rel.route != nil && rel.root != rel.qualified {
		log.Debug("partition routed by its root table", "partition", rel.qualified, "table", rel.root)
		s.parts.saw(rel.id, rel.root, rel.qualified)
		if s.lacking[rel.root] == nil {
			s.lacking[rel.root] = map[uint32]*relation{}
		}
		if len(rel.deleteMissing) > 0 {
			s.lacking[rel.root][rel.id] = rel
		} else {
			delete(s.lacking[rel.root], rel.id)
		}
	}
}

func (r *relation) isChild() bool { return r.route != nil && r.route.IsChild() }

// rowStub publishes the stub of a row's document. deleted forces
// is_deletion (a DELETE of a document row).
func (s *stream) rowStub(rel *relation, row *rowVals, deleted bool) error {
	p := s.p
	f := &s.fields
	*f = stubFields{}
	if rel.nkeys > 0 {
		for _, k := range row.keys {
			if k.kind == 'u' {
				return fmt.Errorf("pgoutput: %s at %s: a key column is an unchanged TOASTed value and the old key tuple is missing", rel.qualified, s.tx.finalLSN)
			}
		}
		var err error
		s.keyScratch, err = appendKeyID(s.keyScratch[:0], row.keys)
		if err != nil {
			s.refuse(rel, "key", err)
			return nil
		}
		f.ID = s.keyScratch
	} else {
		v := row.v[slotID]
		if v.kind == 'u' {
			return fmt.Errorf("pgoutput: %s at %s: the document id is an unchanged TOASTed value and the old key tuple is missing", rel.qualified, s.tx.finalLSN)
		}
		if !v.present() || len(v.data) == 0 {
			p.m.invalid.Inc()
			p.log.Warn("row without a document id skipped", "table", rel.qualified, "lsn", s.tx.finalLSN, "xid", s.tx.xid)
			return nil
		}
		f.ID = v.data
	}
	if err := checkID(f.ID); err != nil {
		s.refuse(rel, "utf8", err)
		return nil
	}
	f.DocType = rel.docType
	if f.DocType == nil {
		if v := row.v[slotType]; v.present() && len(v.data) > 0 {
			f.DocType = v.data
		} else {
			f.DocType = rel.fallbackType
		}
	}
	topic := rel.topic
	if len(rel.deletedSuffix) > 0 && bytes.HasSuffix(f.DocType, rel.deletedSuffix) {
		deleted = true
		if topic == "" {
			topic = p.cfg.Routing.topicFor(string(f.DocType[:len(f.DocType)-len(rel.deletedSuffix)]))
		}
	}
	if topic == "" {
		topic = p.cfg.Routing.topicFor(string(f.DocType))
	}
	if v := row.v[slotDeleted]; v.present() && len(v.data) > 0 && (v.data[0] == 't' || v.data[0] == 'T') {
		deleted = true
	}
	f.Domain = row.v[slotDomain].data
	f.Subtype = row.v[slotSubtype].data
	f.SourceName = rel.sourceName
	f.Source = stub.SourceSQL
	f.Deletion = deleted && !rel.isChild()
	f.Published, f.Original, f.PublishedText = s.now, s.now, s.nowText
	f.LSN, f.Ordinal, f.XID, f.Commit, f.CommitText = s.tx.finalLSN, s.ordinal, s.tx.xid, s.tx.commit, s.commitText
	return s.emit(topic, f.ID, f, nil)
}

// refuse drops a row whose document id cannot be published unchanged,
// loudly: an ERROR line naming the table, transaction and reason, and
// changefeed_cdc_refused_rows_total. The rest of the stream goes on.
func (s *stream) refuse(rel *relation, reason string, err error) {
	p := s.p
	p.m.refused.WithLabelValues(rel.root, reason).Inc()
	p.log.Error("row refused: its document id cannot be published unchanged; the document's consumers will not see this change",
		"table", rel.qualified, "lsn", s.tx.finalLSN, "xid", s.tx.xid, "reason", reason, "err", err)
}

// setNow sets the publish time of the stubs that follow.
func (s *stream) setNow(t time.Time) {
	s.now = t.UTC()
	// A fresh buffer, never reused: a stub being built while emit waits
	// (and ticks, and so calls setNow) still holds the previous one.
	s.nowText = appendTime(make([]byte, 0, 40), s.now)
}

// emit produces one record for the current transaction. When MaxInFlight
// records are unacknowledged it waits, still confirming and answering the
// server, so that a Kafka outage stalls decoding without losing the
// replication connection.
func (s *stream) emit(topic string, key []byte, f *stubFields, value []byte) error {
	p := s.p
	// Encode before any wait: f borrows buffers (the publish time text, the
	// decoded message) that a status tick during waitSlot may rewrite.
	o := p.pool.Get().(*outRecord)
	o.r = kgo.Record{Topic: topic, Key: append(o.r.Key[:0], key...), Value: o.r.Value[:0]}
	if f != nil {
		o.r.Value = appendStub(o.r.Value, f)
	} else {
		o.r.Value = append(o.r.Value, value...)
	}
	if p.inFlight.Add(1) > int64(p.cfg.MaxInFlight) {
		if err := s.waitSlot(); err != nil {
			p.inFlight.Add(-1)
			p.pool.Put(o)
			return err
		}
	}
	o.u = s.u
	s.u.Add()
	p.prod.PublishRecord(p.prodCtx, &o.r, o.done)
	return nil
}

func (s *stream) waitSlot() error {
	p := s.p
	defer func() {
		p.waiting.Store(false)
		// The server was not read meanwhile: its silence proves nothing.
		s.lastReceived = time.Now()
	}()
	for {
		// Set the flag before the check: an ack either sees the flag (and
		// wakes us) or happened before the check.
		p.waiting.Store(true)
		if p.inFlight.Load() <= int64(p.cfg.MaxInFlight) {
			return nil
		}
		select {
		case <-p.wake:
		case <-s.tickerC:
			// The server is not read while waiting, so its silence proves
			// nothing: a long Kafka outage must not end the session.
			s.lastReceived = time.Now()
			if err := s.tick(); err != nil {
				return err
			}
		case <-s.ctx.Done():
			return errStopping
		}
	}
}

// outRecord is a pooled Kafka record with its ack bookkeeping.
type outRecord struct {
	r    kgo.Record
	u    *ack.Unit[txPos]
	p    *Publisher
	done func(error)
}

func (o *outRecord) finish(err error) {
	p, u := o.p, o.u
	if p.cfg.PrintStubs != nil && err == nil {
		p.printStub(&o.r)
	}
	if err != nil {
		switch {
		case errors.Is(err, kgo.ErrClientClosed) || errors.Is(err, context.Canceled):
			// Shutting down with stubs unacknowledged (a Kafka outage): not
			// a refusal; shutdown said they will be published again.
		default:
			if ok, n := p.refusedLog.allow(time.Now()); ok {
				p.log.Error("Kafka refused a stub for good", "topic", o.r.Topic, "key", string(o.r.Key), "err", err, "suppressed_since_last", n)
			}
		}
	}
	o.u = nil
	if cap(o.r.Value) > 64<<10 {
		o.r.Value = nil
	}
	if cap(o.r.Key) > 4<<10 {
		o.r.Key = nil
	}
	if p.inFlight.Add(-1) <= int64(p.cfg.MaxInFlight) && p.waiting.Load() {
		select {
		case p.wake <- struct{}{}:
		default:
		}
	}
	p.pool.Put(o)
	u.Done(err)
}

// message handles a logical decoding message (pg_logical_emit_message).
func (s *stream) message(m []byte) error {
	var lm pglogrepl.LogicalDecodingMessage
	if err := decodeLib('M', &lm, m); err != nil {
		return fmt.Errorf("pgoutput message: %w", err)
	}
	switch lm.Prefix {
	case HeartbeatPrefix:
		return nil
	case MessagePrefix:
	default:
		return nil
	}
	p := s.p
	if s.inTx {
		s.ordinal++
		p.m.changes.Inc()
	}
	invalid := func(reason string, err error) error {
		p.m.invalid.Inc()
		p.log.Warn("invalid changefeed message skipped", "reason", reason, "err", err, "lsn", stub.LSN(lm.LSN),
			"xid", s.tx.xid, "content", truncate(lm.Content, 512))
		return nil
	}
	if !lm.Transactional || !s.inTx {
		return invalid("not transactional: use pg_logical_emit_message(true, 'changefeed', …)", nil)
	}
	if !utf8.Valid(lm.Content) {
		// encoding/json would replace the invalid bytes with U+FFFD, so two
		// ids could become one.
		return invalid("not valid UTF-8", nil)
	}
	st, err := stub.Unmarshal(lm.Content)
	if err != nil {
		return invalid("not a valid stub", err)
	}
	var extra struct {
		Topic string `json:"topic"`
	}
	_ = json.Unmarshal(lm.Content, &extra) // already parsed once: cannot fail
	topic := extra.Topic
	if topic == "" {
		topic = p.cfg.Routing.topicFor(st.DocumentType)
	} else if !p.topics[topic] {
		return invalid(fmt.Sprintf("topic %q is not one the routing knows (add it to topics: in the routing file)", topic), nil)
	}
	st.LSN, st.TxOrdinal, st.XID, st.CommitTimestamp = s.tx.finalLSN, s.ordinal, s.tx.xid, s.tx.commit
	st.PublishTimestamp = s.now
	if st.OriginalPublicationDatetime.IsZero() {
		st.OriginalPublicationDatetime = s.now
	}
	f := fieldsOf(st)
	return s.emit(topic, f.ID, &f, nil)
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "…"
	}
	return string(b)
}

// truncateEvent is the control-topic record for a TRUNCATE.
type truncateEvent struct {
	Event string `json:"event"`
	// Table is the routed table: for a partition published under its own
	// name, its root; Partition then names the partition truncated.
	Table           string    `json:"table"`
	Partition       string    `json:"partition,omitempty"`
	LSN             stub.LSN  `json:"lsn"`
	XID             uint32    `json:"xid"`
	CommitTimestamp time.Time `json:"commit_timestamp"`
	Cascade         bool      `json:"cascade"`
	RestartIdentity bool      `json:"restart_identity"`
}

func (s *stream) truncate(m []byte) error {
	if !s.inTx {
		return errors.New("pgoutput: TRUNCATE outside a transaction")
	}
	var tm pglogrepl.TruncateMessage
	if err := decodeLib('T', &tm, m); err != nil {
		return fmt.Errorf("pgoutput truncate: %w", err)
	}
	p := s.p
	for _, id := range tm.RelationIDs {
		rel := s.rels[id]
		if rel == nil {
			return fmt.Errorf("pgoutput: TRUNCATE of unknown relation %d", id)
		}
		if rel.skip {
			continue
		}
		s.ordinal++
		ev := truncateEvent{
			Event: "truncate", Table: rel.root, LSN: s.tx.finalLSN, XID: s.tx.xid, CommitTimestamp: s.tx.commit,
			Cascade:         tm.Option&pglogrepl.TruncateOptionCascade != 0,
			RestartIdentity: tm.Option&pglogrepl.TruncateOptionRestartIdentity != 0,
		}
		if rel.root != rel.qualified {
			ev.Partition = rel.qualified
		}
		value, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		p.m.truncates.WithLabelValues(rel.root).Inc()
		s.parts.forget[rel.root] = true
		p.log.Warn("TRUNCATE of a published table: no per-row stubs are published; a table-level event goes to the control topic, consumers must resync the table",
			"table", rel.root, "partition", ev.Partition, "lsn", s.tx.finalLSN, "xid", s.tx.xid, "control_topic", p.cfg.ControlTopic)
		if err := s.emit(p.cfg.ControlTopic, []byte(rel.root), nil, value); err != nil {
			return err
		}
	}
	return nil
}

// tick does the periodic work: fail on a produce error, confirm, heartbeat,
// sample lag.
func (s *stream) tick() error {
	p := s.p
	s.setNow(time.Now())
	s.nextTick = s.now.Add(p.cfg.StatusInterval)
	if err := s.tr.Err(); err != nil {
		return fmt.Errorf("%w: %w", ErrProduce, err)
	}
	if err := s.confirm(false); err != nil {
		return err
	}
	if silent := s.now.Sub(s.lastReceived); silent > silenceTimeout {
		return fmt.Errorf("%w: nothing received from the server for %s", errStreamEnded, silent.Round(time.Second))
	} else if silent > silenceTimeout/3 && s.now.Sub(s.lastReplyRequest) > silenceTimeout/6 {
		// Ask for a keepalive: an answer proves the connection alive.
		s.lastReplyRequest = s.now
		if err := s.sendStatus(s.sent, true); err != nil {
			return err
		}
	}
	if p.cfg.HeartbeatInterval > 0 && s.now.Sub(s.lastHeartbeat) >= p.cfg.HeartbeatInterval {
		s.lastHeartbeat = s.now
		ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
		_, err := s.db.Exec(ctx, "SELECT pg_logical_emit_message(false, $1, now()::text)", HeartbeatPrefix)
		cancel()
		if err != nil && s.ctx.Err() == nil {
			return fmt.Errorf("emit heartbeat: %w", err)
		}
	}
	if s.now.Sub(s.lastLag) >= p.cfg.LagInterval {
		s.lastLag = s.now
		ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
		var lag int64
		err := s.db.QueryRow(ctx, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint", p.Confirmed().String()).Scan(&lag)
		cancel()
		if err != nil && s.ctx.Err() == nil {
			return fmt.Errorf("sample lag: %w", err)
		}
		p.m.lagBytes.Set(float64(lag))
		ctx, cancel = context.WithTimeout(s.ctx, 10*time.Second)
		err = s.watch(ctx)
		cancel()
		if err != nil && s.ctx.Err() == nil {
			return err
		}
		if err := s.checkPartitions(); err != nil {
			return err
		}
	}
	p.m.pendingTx.Set(float64(s.tr.Units()))
	return nil
}

// checkPartitions reports, loudly, partitions of routed tables that were
// detached, dropped or truncated without a decoded event.
func (s *stream) checkPartitions() error {
	p := s.p
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	changes, err := s.parts.check(ctx, s.db)
	cancel()
	if err != nil {
		if s.ctx.Err() != nil {
			return nil
		}
		return err
	}
	for _, c := range changes {
		p.m.partitionChanges.WithLabelValues(c.root, c.change).Inc()
		p.log.Error("a partition of a routed table was detached, dropped or truncated: its rows left the table without per-row stubs (PostgreSQL does not decode this), so consumers still hold their documents; resync the table's documents in the consumers",
			"table", c.root, "partition", c.partition, "change", c.change)
	}
	return nil
}

// confirm checkpoints and confirms the acknowledged position if it advanced,
// and sends a status update when one is due (or force).
func (s *stream) confirm(force bool) error {
	p := s.p
	now := time.Now()
	pos := s.sent
	var commitTime time.Time
	if c, ok := s.tr.Confirmed(); ok && c.end > pos {
		pos, commitTime = c.end, c.commit
	}
	idle := !s.inTx && s.tr.Idle()
	fromIdle := false
	if idle && s.idlePos > pos && s.idlePos > s.selfWAL {
		pos, fromIdle = s.idlePos, true
	}
	switch {
	case idle:
		p.m.lagSeconds.Set(0)
	case !commitTime.IsZero():
		p.m.lagSeconds.Set(now.Sub(commitTime).Seconds())
	}
	advanced := pos > s.sent
	if advanced {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := p.writeCheckpoint(ctx, s.db, pos)
		if err == nil && fromIdle {
			var self string
			if err = s.db.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&self); err == nil {
				s.selfWAL, err = stub.ParseLSN(self)
			}
		}
		cancel()
		if err != nil {
			p.m.checkpointErrors.Inc()
			// Nothing is confirmed without a checkpoint: give up the
			// session (the reconnect path retries).
			return fmt.Errorf("%w: %w", errConfirmFailed, err)
		}
	}
	due := now.Sub(s.lastStatus) >= p.cfg.KeepaliveInterval
	// With nothing pending, ask the server for a keepalive: its WAL end is
	// what an idle slot may be confirmed to.
	askReply := idle && !fromIdle && now.Sub(s.lastReplyRequest) >= p.cfg.StatusInterval
	if !advanced && !due && !force && !askReply {
		return nil
	}
	if askReply {
		s.lastReplyRequest = now
	}
	if err := s.sendStatus(pos, askReply); err != nil {
		return err
	}
	if advanced {
		p.log.Debug("confirmed", "lsn", pos, "from_idle", fromIdle, "self_wal", s.selfWAL)
		s.sent = pos
		p.confirmed.Store(uint64(pos))
		p.m.confirmedLSN.Set(float64(pos))
	}
	return nil
}

// sendStatus sends a standby status update with write, flush and apply all
// set to pos. It does not use pglogrepl.SendStandbyStatusUpdate, which
// replaces a zero flush position with the write position.
func (s *stream) sendStatus(pos stub.LSN, replyRequested bool) error {
	b := s.statusBuf[:0]
	b = append(b, 'd', 0, 0, 0, 38, pglogrepl.StandbyStatusUpdateByteID)
	b = binary.BigEndian.AppendUint64(b, uint64(pos)) // write
	b = binary.BigEndian.AppendUint64(b, uint64(pos)) // flush
	b = binary.BigEndian.AppendUint64(b, uint64(pos)) // apply
	b = binary.BigEndian.AppendUint64(b, uint64(time.Now().UnixMicro()-pgEpoch*1_000_000))
	if replyRequested {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	if err := s.conn.Frontend().SendUnbufferedEncodedCopyData(b); err != nil {
		return fmt.Errorf("send standby status update: %w", err)
	}
	s.lastStatus = time.Now()
	return nil
}

// shutdown flushes the producer and confirms what Kafka acknowledged.
func (s *stream) shutdown() error {
	p := s.p
	p.log.Info("stopping: flushing producer and confirming", "in_flight", p.inFlight.Load())
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ShutdownTimeout)
	defer cancel()
	if err := p.prod.Flush(ctx); err != nil {
		p.log.Warn("producer not flushed: unacknowledged stubs will be published again after restart", "err", err)
	}
	_ = s.conn.Conn().SetReadDeadline(time.Time{})
	if err := s.tr.Err(); err != nil {
		return fmt.Errorf("%w: %w", ErrProduce, err)
	}
	s.ctx = ctx
	if err := s.confirm(true); err != nil {
		return fmt.Errorf("final confirmation: %w", err)
	}
	p.log.Info("stopped", "confirmed", p.Confirmed())
	return nil
}

func (p *Publisher) printStub(r *kgo.Record) {
	b := make([]byte, 0, len(r.Value)+64)
	b = append(b, `{"topic":`...)
	b = appendJSONString(b, r.Topic)
	b = append(b, `,"partition":`...)
	b = strconv.AppendInt(b, int64(r.Partition), 10)
	b = append(b, `,"offset":`...)
	b = strconv.AppendInt(b, r.Offset, 10)
	b = append(b, `,"value":`...)
	b = append(b, r.Value...)
	b = append(b, '}', '\n')
	p.printMu.Lock()
	_, _ = p.cfg.PrintStubs.Write(b)
	p.printMu.Unlock()
}
