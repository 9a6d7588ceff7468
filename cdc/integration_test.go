package cdc

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/stub"
)

const schema = `
CREATE TABLE cases (case_id text PRIMARY KEY, domain text, type text, deleted boolean NOT NULL DEFAULT false, name text);
CREATE TABLE case_index (id serial PRIMARY KEY, case_id text NOT NULL, domain text, referenced_id text);
ALTER TABLE case_index REPLICA IDENTITY FULL;
CREATE TABLE forms (form_id text PRIMARY KEY, domain text, doc_type text NOT NULL, xmlns text);
ALTER TABLE forms REPLICA IDENTITY FULL;
CREATE TABLE unpublished (id serial PRIMARY KEY, v text);
`

const testRoutingYAML = `
topics: [custom]
tables:
  - table: cases
    topic: case-sql
    data_source_name: case-sql
    document_type: CommCareCase
    id_column: case_id
    domain_column: domain
    subtype_column: type
    deletion: {column: deleted}
  - table: case_index
    data_source_name: case-sql
    document_type: CommCareCase
    domain_column: domain
    parent: {id_column: case_id}
  - table: forms
    data_source_name: form-sql
    document_type_column: doc_type
    id_column: form_id
    domain_column: domain
    subtype_column: xmlns
    deletion: {doc_type_suffix: -Deleted}
`

func testRouting(t *testing.T) *Routing {
	t.Helper()
	r, err := ParseRouting("test-routing.yaml", []byte(testRoutingYAML))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestPublisher runs the publisher in-process against real PostgreSQL 15 and
// kfake containers. Subtests share the PostgreSQL server (one database, slot
// and publication each) and start their own Kafka.
func TestPublisher(t *testing.T) {
	if testing.Short() {
		t.Skip("needs Docker")
	}
	pg := testenv.Postgres(t)

	t.Run("MixedWorkload", func(t *testing.T) { testMixedWorkload(t, pg) })
	t.Run("InterleavedTransactions", func(t *testing.T) { testInterleaved(t, pg) })
	t.Run("PublishFromAnywhere", func(t *testing.T) { testPublishFromAnywhere(t, pg) })
	t.Run("Truncate", func(t *testing.T) { testTruncate(t, pg) })
	t.Run("IdleSlotAdvances", func(t *testing.T) { testIdleSlot(t, pg) })
	t.Run("ShutdownConfirmsAcked", func(t *testing.T) { testShutdown(t, pg) })
	t.Run("SlotDroppedWhileStopped", func(t *testing.T) { testSlotDropped(t, pg) })
	t.Run("SlotAheadOfCheckpoint", func(t *testing.T) { testSlotAhead(t, pg) })
	t.Run("ReconnectAfterBackendTerminated", func(t *testing.T) { testReconnect(t, pg) })
	t.Run("SecondPublisherWaits", func(t *testing.T) { testSecondPublisher(t, pg) })
	t.Run("StartupChecks", func(t *testing.T) { testStartupChecks(t, pg) })
	t.Run("KafkaOutage", func(t *testing.T) { testKafkaOutage(t, pg) })
	t.Run("Heartbeat", func(t *testing.T) { testHeartbeat(t, pg) })
	t.Run("UnmappedTableToMeta", func(t *testing.T) { testUnmapped(t, pg) })
}

func kafkaOf(k *testenv.KafkaServer) kafkaconn.Config {
	return kafkaconn.Config{Brokers: k.Brokers()}
}

// txid runs fn in a transaction and returns its xid (as stubs carry it).
func txid(t *testing.T, c *pgx.Conn, commit bool, stmts ...string) uint32 {
	t.Helper()
	ctx := context.Background()
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var xid int64
	if err := tx.QueryRow(ctx, "SELECT txid_current()").Scan(&xid); err != nil {
		t.Fatal(err)
	}
	for _, s := range stmts {
		if _, err := tx.Exec(ctx, s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
	if commit {
		err = tx.Commit(ctx)
	} else {
		err = tx.Rollback(ctx)
	}
	if err != nil {
		t.Fatal(err)
	}
	return uint32(xid)
}

func maxLSN(ss []*stub.Stub) stub.LSN {
	var m stub.LSN
	for _, s := range ss {
		m = max(m, s.LSN)
	}
	return m
}

// walIn runs stmts in a committed transaction and returns the WAL insert
// position just before its commit record.
func walIn(t *testing.T, c *pgx.Conn, stmts ...string) stub.LSN {
	t.Helper()
	ctx := context.Background()
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range stmts {
		if _, err := tx.Exec(ctx, s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
	var l string
	if err := tx.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&l); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	v, err := stub.ParseLSN(l)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func testMixedWorkload(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql", "form-sql", "meta")
	c := db.conn(t)

	type want struct {
		id      string
		deleted bool
		domain  string
		subtype string
		docType string
		source  string
		topic   string
	}
	var txs []struct {
		xid   uint32
		wants []want
	}
	add := func(xid uint32, w ...want) {
		txs = append(txs, struct {
			xid   uint32
			wants []want
		}{xid, w})
	}
	add(txid(t, c, true, `INSERT INTO cases VALUES ('c1', 'd1', 'person', false, 'one')`),
		want{"c1", false, "d1", "person", "CommCareCase", "case-sql", "case-sql"})
	// Multi-row transaction with a child row.
	add(txid(t, c, true,
		`INSERT INTO cases VALUES ('c2', 'd1', 'household', false, 'two')`,
		`INSERT INTO case_index (case_id, domain, referenced_id) VALUES ('c1', 'd1', 'c2')`,
		`INSERT INTO forms VALUES ('f1', 'd2', 'XFormInstance', 'http://x')`,
	),
		want{"c2", false, "d1", "household", "CommCareCase", "case-sql", "case-sql"},
		want{"c1", false, "d1", "", "CommCareCase", "case-sql", "case-sql"},
		want{"f1", false, "d2", "http://x", "XFormInstance", "form-sql", "form-sql"},
	)
	// Rolled back: nothing.
	txid(t, c, false, `INSERT INTO cases VALUES ('rolled-back', 'd1', 'person', false, 'x')`,
		`UPDATE cases SET name = 'rolled back' WHERE case_id = 'c1'`)
	add(txid(t, c, true, `UPDATE cases SET name = 'uno' WHERE case_id = 'c1'`),
		want{"c1", false, "d1", "person", "CommCareCase", "case-sql", "case-sql"})
	add(txid(t, c, true, `UPDATE cases SET deleted = true WHERE case_id = 'c1'`),
		want{"c1", true, "d1", "person", "CommCareCase", "case-sql", "case-sql"})
	add(txid(t, c, true, `UPDATE forms SET doc_type = 'XFormInstance-Deleted' WHERE form_id = 'f1'`),
		want{"f1", true, "d2", "http://x", "XFormInstance-Deleted", "form-sql", "form-sql"})
	// A DELETE carries only the key (domain and type are outside it).
	add(txid(t, c, true, `DELETE FROM cases WHERE case_id = 'c2'`),
		want{"c2", true, "", "", "CommCareCase", "case-sql", "case-sql"})
	// A hard DELETE of a table routed by its type column: REPLICA IDENTITY
	// FULL (required at start) gives the deletion its type, so it lands on
	// the document's own topic.
	add(txid(t, c, true, `DELETE FROM forms WHERE form_id = 'f1'`),
		want{"f1", true, "d2", "http://x", "XFormInstance-Deleted", "form-sql", "form-sql"})
	// A child row deleted: its parent changed, it is not deleted.
	add(txid(t, c, true, `DELETE FROM case_index`),
		want{"c1", false, "d1", "", "CommCareCase", "case-sql", "case-sql"})
	// Many rows in one transaction.
	var many []want
	var stmts []string
	for i := range 50 {
		id := fmt.Sprintf("m%02d", i)
		stmts = append(stmts, fmt.Sprintf(`INSERT INTO cases VALUES ('%s', 'd3', 'bulk', false, 'x')`, id))
		many = append(many, want{id, false, "d3", "bulk", "CommCareCase", "case-sql", "case-sql"})
	}
	add(txid(t, c, true, stmts...), many...)
	// Writes to an unpublished table: nothing.
	txid(t, c, true, `INSERT INTO unpublished (v) VALUES ('x')`)

	total := 0
	for _, tx := range txs {
		total += len(tx.wants)
	}
	byTopic := map[string]int{}
	for _, tx := range txs {
		for _, w := range tx.wants {
			byTopic[w.topic]++
		}
	}
	for topic, n := range byTopic {
		cons.waitStubs(t, topic, n)
	}
	// Let anything extra arrive before counting: the slot passes the last
	// transaction only once all of it is acknowledged.
	last := maxLSN(cons.stubs(t, ""))
	eventually(t, "confirmed past the workload", func() error {
		if got := db.slotLSN(t); got <= last {
			return fmt.Errorf("slot at %s, want > %s", got, last)
		}
		return nil
	})
	got := cons.stubs(t, "")
	if len(got) != total {
		for _, s := range got {
			t.Logf("stub %s xid %d lsn %s", s.DocumentID, s.XID, s.LSN)
		}
		t.Fatalf("got %d stubs, want %d", len(got), total)
	}
	byXID := map[uint32][]*stub.Stub{}
	for _, s := range got {
		byXID[s.XID] = append(byXID[s.XID], s)
	}
	var prevLSN stub.LSN
	for _, tx := range txs {
		ss := byXID[tx.xid]
		if len(ss) != len(tx.wants) {
			t.Fatalf("xid %d: %d stubs, want %d", tx.xid, len(ss), len(tx.wants))
		}
		// Stubs of one transaction share its commit LSN; ordinals follow
		// the statements (Kafka order across partitions is not kept, so sort).
		slices.SortFunc(ss, func(a, b *stub.Stub) int { return a.SQLVersion().Compare(b.SQLVersion()) })
		for i, s := range ss {
			w := tx.wants[i]
			if s.LSN != ss[0].LSN || s.LSN <= prevLSN {
				t.Errorf("xid %d stub %s: lsn %s (first %s, previous tx %s)", tx.xid, s.DocumentID, s.LSN, ss[0].LSN, prevLSN)
			}
			if s.TxOrdinal != uint32(i+1) {
				t.Errorf("xid %d stub %s: ordinal %d, want %d", tx.xid, s.DocumentID, s.TxOrdinal, i+1)
			}
			if s.DocumentID != w.id || s.IsDeletion != w.deleted || s.Domain != w.domain || s.DocumentSubtype != w.subtype ||
				s.DocumentType != w.docType || s.DataSourceName != w.source || s.DataSourceType != stub.SourceSQL {
				t.Errorf("xid %d stub %d = %+v, want %+v", tx.xid, i, s, w)
			}
			if s.CommitTimestamp.IsZero() || s.PublishTimestamp.IsZero() || s.PublishTimestamp.Before(s.CommitTimestamp) {
				t.Errorf("xid %d stub %s: timestamps commit %v publish %v", tx.xid, s.DocumentID, s.CommitTimestamp, s.PublishTimestamp)
			}
		}
		prevLSN = ss[0].LSN
	}
	for _, s := range got {
		if s.DocumentID == "rolled-back" {
			t.Errorf("rolled-back change published: %+v", s)
		}
	}
	// Slot first: the checkpoint only grows and is written first.
	if sl := db.slotLSN(t); db.checkpoint(t) < sl {
		t.Errorf("checkpoint %s behind the slot %s", db.checkpoint(t), sl)
	}
	if v := r.metric(t, "changefeed_stubs_published_total", "topic", "case-sql"); int(v) != byTopic["case-sql"] {
		t.Errorf("published metric case-sql = %v, want %d", v, byTopic["case-sql"])
	}
	if v := r.metric(t, "changefeed_cdc_confirmed_lsn"); stub.LSN(v) <= last {
		t.Errorf("confirmed LSN metric %v < %s", v, last)
	}
}

// T1 writes the case row first, T2 writes a child row of the same case and
// commits first, T1 commits last: T1's stub must carry the newer version.
func testInterleaved(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema+`INSERT INTO cases VALUES ('c1', 'd', 'person', false, 'x');`)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql")

	ctx := context.Background()
	c1, c2 := db.conn(t), db.conn(t)
	t1, err := c1.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var xid1, xid2 int64
	if err := t1.QueryRow(ctx, "SELECT txid_current()").Scan(&xid1); err != nil {
		t.Fatal(err)
	}
	if _, err := t1.Exec(ctx, "UPDATE cases SET name = 't1' WHERE case_id = 'c1'"); err != nil {
		t.Fatal(err)
	}
	t2, err := c2.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := t2.QueryRow(ctx, "SELECT txid_current()").Scan(&xid2); err != nil {
		t.Fatal(err)
	}
	if _, err := t2.Exec(ctx, "INSERT INTO case_index (case_id, domain, referenced_id) VALUES ('c1', 'd', 'c9')"); err != nil {
		t.Fatal(err)
	}
	if err := t2.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := t1.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	got := cons.waitStubs(t, "case-sql", 2)
	if len(got) != 2 {
		t.Fatalf("got %d stubs", len(got))
	}
	// One document, one key, one partition: Kafka order is commit order.
	first, second := got[0], got[1]
	if first.XID != uint32(xid2) || second.XID != uint32(xid1) {
		t.Fatalf("order: xids %d then %d, want T2 (%d) then T1 (%d)", first.XID, second.XID, xid2, xid1)
	}
	if second.SQLVersion().Compare(first.SQLVersion()) <= 0 {
		t.Fatalf("T1's version %s is not newer than T2's %s", second.SQLVersion(), first.SQLVersion())
	}
}

func testPublishFromAnywhere(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "form-sql", "custom", "meta", "case-sql")
	c := db.conn(t)

	emit := func(body string) string {
		return fmt.Sprintf("SELECT pg_logical_emit_message(true, 'changefeed', '%s')", body)
	}
	valid := `{"document_id":"f9","data_source_type":"sql","data_source_name":"app","document_type":"XFormInstance","domain":"d","lsn":"0/1"}`
	xidValid := txid(t, c, true, `INSERT INTO cases VALUES ('c1', 'd', 'p', false, 'x')`, emit(valid))
	txid(t, c, false, emit(`{"document_id":"rolled-back","data_source_type":"sql","data_source_name":"app","document_type":"XFormInstance"}`))
	txid(t, c, true, emit(`{"document_id":"","data_source_type":"sql"}`))                                                               // invalid: empty id
	txid(t, c, true, emit(`not json`))                                                                                                  // invalid: not JSON
	txid(t, c, true, emit(`{"document_id":"u1","data_source_type":"sql","data_source_name":"app","document_type":"X","topic":"nope"}`)) // unknown topic
	txid(t, c, true, `SELECT pg_logical_emit_message(false, 'changefeed', '`+valid+`')`)                                                // not transactional
	txid(t, c, true, `SELECT pg_logical_emit_message(true, 'other_prefix', 'ignored')`)
	xidTopic := txid(t, c, true, emit(`{"document_id":"w1","data_source_type":"sql","data_source_name":"app","document_type":"Widget","topic":"custom"}`))
	xidMeta := txid(t, c, true, emit(`{"document_id":"w2","data_source_type":"sql","data_source_name":"app","document_type":"Widget"}`))

	forms := cons.waitStubs(t, "form-sql", 1)
	custom := cons.waitStubs(t, "custom", 1)
	meta := cons.waitStubs(t, "meta", 1)
	cases := cons.waitStubs(t, "case-sql", 1)
	eventually(t, "invalid messages counted", func() error {
		if v := r.metric(t, "changefeed_cdc_invalid_messages_total"); v != 4 {
			return fmt.Errorf("invalid = %v, want 4", v)
		}
		return nil
	})
	last := maxLSN(cons.stubs(t, ""))
	eventually(t, "confirmed", func() error {
		if got := db.slotLSN(t); got <= last {
			return fmt.Errorf("slot at %s", got)
		}
		return nil
	})
	if n := len(cons.records()); n != 4 {
		t.Fatalf("%d records, want 4: %v", n, cons.stubs(t, ""))
	}
	f := forms[0]
	if f.DocumentID != "f9" || f.XID != xidValid || f.LSN != cases[0].LSN || f.LSN == 1 || f.TxOrdinal != 2 || cases[0].TxOrdinal != 1 || f.CommitTimestamp.IsZero() {
		t.Errorf("emitted stub not stamped with its transaction: %+v (case stub %+v)", f, cases[0])
	}
	if custom[0].DocumentID != "w1" || custom[0].XID != xidTopic {
		t.Errorf("custom topic stub = %+v", custom[0])
	}
	if meta[0].DocumentID != "w2" || meta[0].XID != xidMeta {
		t.Errorf("meta stub = %+v", meta[0])
	}
	for _, rec := range cons.records() {
		if strings.Contains(string(rec.Value), `"topic"`) {
			t.Errorf("topic field forwarded: %s", rec.Value)
		}
	}
}

func testTruncate(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema+`INSERT INTO cases VALUES ('c1', 'd', 'p', false, 'x');`)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, DefaultControlTopic)
	c := db.conn(t)
	xid := txid(t, c, true, "TRUNCATE cases")
	var recs []*kgoRecord
	eventually(t, "truncate event", func() error {
		recs = recordsOf(cons)
		if len(recs) == 0 {
			return fmt.Errorf("no record")
		}
		return nil
	})
	var ev struct {
		Event string   `json:"event"`
		Table string   `json:"table"`
		LSN   stub.LSN `json:"lsn"`
		XID   uint32   `json:"xid"`
	}
	if err := json.Unmarshal(recs[0].Value, &ev); err != nil {
		t.Fatal(err)
	}
	if ev.Event != "truncate" || ev.Table != "public.cases" || ev.XID != xid || ev.LSN == 0 || recs[0].Key != "public.cases" {
		t.Fatalf("event = %+v key %s", ev, recs[0].Key)
	}
	if v := r.metric(t, "changefeed_cdc_truncates_total", "table", "public.cases"); v != 1 {
		t.Fatalf("truncates metric = %v", v)
	}
	if !strings.Contains(r.logs.String(), "TRUNCATE of a published table") {
		t.Fatal("no warning logged")
	}
}

type kgoRecord struct {
	Key   string
	Value []byte
}

func recordsOf(c *consumer) []*kgoRecord {
	var out []*kgoRecord
	for _, r := range c.records() {
		out = append(out, &kgoRecord{Key: string(r.Key), Value: r.Value})
	}
	return out
}

// Writes only to an unpublished table still move the slot: nothing is in
// flight, so the keepalive's WAL end is confirmed and no WAL is retained.
func testIdleSlot(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	before := db.slotLSN(t)
	for i := range 20 {
		db.exec(t, "INSERT INTO unpublished (v) VALUES ($1)", fmt.Sprint(i))
	}
	written := walIn(t, db.conn(t), "INSERT INTO unpublished (v) VALUES ('last')")
	if written <= before {
		t.Fatalf("no WAL written: %s <= %s", written, before)
	}
	eventually(t, "slot advances over unpublished writes", func() error {
		if got := db.slotLSN(t); got < written {
			return fmt.Errorf("confirmed_flush_lsn %s < %s", got, written)
		}
		return nil
	})
	if sl := db.slotLSN(t); db.checkpoint(t) < sl {
		ck := db.checkpoint(t)
		t.Fatalf("checkpoint %s behind slot %s", ck, sl)
	}
	// And it settles: our own checkpoint writes do not keep it busy.
	settled := db.lsn(t, "SELECT pg_current_wal_lsn()::text")
	time.Sleep(time.Second) // observe a quiet period (not waiting for a condition)
	if now := db.lsn(t, "SELECT pg_current_wal_lsn()::text"); now-settled > 1024 {
		t.Errorf("WAL keeps growing while idle: %s -> %s", settled, now)
	}
}

func testShutdown(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	// A long status interval: only the shutdown confirms.
	r := start(t, db, kafka, Config{Routing: testRouting(t), StatusInterval: time.Hour, KeepaliveInterval: time.Hour})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql")
	startLSN := db.slotLSN(t)
	for i := range 10 {
		db.exec(t, "INSERT INTO cases VALUES ($1, 'd', 'p', false, 'x')", fmt.Sprintf("s%d", i))
	}
	cons.waitStubs(t, "case-sql", 10)
	last := cons.stubs(t, "case-sql")
	var maxCommit stub.LSN
	for _, s := range last {
		maxCommit = max(maxCommit, s.LSN)
	}
	if got := db.slotLSN(t); got != startLSN {
		t.Fatalf("slot moved before shutdown: %s -> %s", startLSN, got)
	}
	if err := r.stop(t); err != nil {
		t.Fatalf("Run after cancel = %v, want nil", err)
	}
	slot, ck := db.slotLSN(t), db.checkpoint(t)
	if slot <= maxCommit || ck != slot || r.p.Confirmed() != slot {
		t.Fatalf("after shutdown: slot %s checkpoint %s confirmed %s, last commit %s", slot, ck, r.p.Confirmed(), maxCommit)
	}
}

func testSlotDropped(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql")
	db.exec(t, "INSERT INTO cases VALUES ('before', 'd', 'p', false, 'x')")
	cons.waitStubs(t, "case-sql", 1)
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	ck := db.checkpoint(t)
	db.exec(t, "SELECT pg_drop_replication_slot($1)", db.name)
	db.exec(t, "INSERT INTO cases VALUES ('lost', 'd', 'p', false, 'x')")

	r2 := start(t, db, kafka, Config{Routing: testRouting(t)})
	err := r2.exited(t)
	if !errorsIs(err, ErrPossibleGap) || !strings.Contains(err.Error(), ck.String()) || !strings.Contains(err.Error(), "--allow-new-slot="+db.name+"@"+ck.String()) {
		t.Fatalf("Run = %v, want ErrPossibleGap naming the checkpoint %s and the flag", err, ck)
	}
	var n int
	if err := db.conn(t).QueryRow(context.Background(), "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", db.name).Scan(&n); err != nil || n != 0 {
		t.Fatalf("a slot was created without the flag (%d, %v)", n, err)
	}
	db.exec(t, "INSERT INTO cases VALUES ('after', 'd', 'p', false, 'x')")

	// With the flag: a fresh slot, publishing from now on.
	r3 := start(t, db, kafka, Config{Routing: testRouting(t), AllowNewSlot: GapAcceptance{Slot: db.name, Checkpoint: ck}})
	r3.waitStreaming(t)
	if !strings.Contains(r3.logs.String(), "created a fresh replication slot although a checkpoint existed") {
		t.Error("no warning about the fresh slot")
	}
	db.exec(t, "INSERT INTO cases VALUES ('fresh', 'd', 'p', false, 'x')")
	got := cons.waitStubs(t, "case-sql", 2)
	for _, s := range got {
		if s.DocumentID == "lost" || s.DocumentID == "after" {
			t.Errorf("stub %s published from before the fresh slot", s.DocumentID)
		}
	}
}

func testSlotAhead(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	// Someone else consumes the slot while the publisher is stopped.
	db.exec(t, "INSERT INTO cases VALUES ('skipped', 'd', 'p', false, 'x')")
	db.exec(t, "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())", db.name)
	ck, slot := db.checkpoint(t), db.slotLSN(t)
	if slot <= ck {
		t.Fatalf("slot %s not ahead of checkpoint %s", slot, ck)
	}
	r2 := start(t, db, kafka, Config{Routing: testRouting(t)})
	err := r2.exited(t)
	if !errorsIs(err, ErrPossibleGap) || !strings.Contains(err.Error(), ck.String()) || !strings.Contains(err.Error(), slot.String()) {
		t.Fatalf("Run = %v, want ErrPossibleGap naming %s and %s", err, ck, slot)
	}
	r3 := start(t, db, kafka, Config{Routing: testRouting(t), AllowNewSlot: GapAcceptance{Slot: db.name, Checkpoint: ck}})
	r3.waitStreaming(t)
	if got := db.checkpoint(t); got < slot {
		t.Fatalf("checkpoint %s not moved to the accepted slot position %s", got, slot)
	}
}

func testReconnect(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql")
	db.exec(t, "INSERT INTO cases VALUES ('r1', 'd', 'p', false, 'x')")
	cons.waitStubs(t, "case-sql", 1)
	db.exec(t, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1", db.name)
	db.exec(t, "INSERT INTO cases VALUES ('r2', 'd', 'p', false, 'x')")
	eventually(t, "reconnected", func() error {
		if v := r.metric(t, "changefeed_cdc_reconnects_total"); v < 1 {
			return fmt.Errorf("reconnects = %v", v)
		}
		return nil
	})
	got := cons.waitStubs(t, "case-sql", 2)
	ids := map[string]bool{}
	for _, s := range got {
		ids[s.DocumentID] = true
	}
	if !ids["r2"] {
		t.Fatalf("r2 not published after reconnect: %v", ids)
	}
}

func testSecondPublisher(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)

	// Not waiting: an error at once.
	r2 := start(t, db, kafka, Config{Routing: testRouting(t), SlotWaitTimeout: -1})
	if err := r2.exited(t); !errorsIs(err, ErrSlotBusy) {
		t.Fatalf("second publisher: %v, want ErrSlotBusy", err)
	}
	// Waiting: it logs, stays out of the slot, and takes over once the
	// first stops.
	r3 := start(t, db, kafka, Config{Routing: testRouting(t)})
	eventually(t, "second publisher waiting", func() error {
		if s := r3.p.State(); s != StateWaitingForSlot {
			return fmt.Errorf("state %s", s)
		}
		return nil
	})
	if !strings.Contains(r3.logs.String(), "replication slot is active in another process") {
		t.Error("no log line while waiting")
	}
	if r3.p.Confirmed() != 0 {
		t.Errorf("waiting publisher confirmed %s", r3.p.Confirmed())
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	r3.waitStreaming(t)
}

func testStartupChecks(t *testing.T, pg *testenv.PG) {
	kafka := kafkaOf(testenv.Kafka(t))
	tests := []struct {
		name    string
		schema  string
		routing string
		user    string // run as this role (password "pw")
		want    []string
	}{
		{
			name:   "missing table",
			schema: "CREATE TABLE other (id int PRIMARY KEY);",
			routing: `
tables:
  - {table: cases, document_type: C, id_column: case_id}`,
			want: []string{"routing file r.yaml", "table public.cases", "does not exist"},
		},
		{
			name:   "no primary key",
			schema: "CREATE TABLE cases (case_id text, domain text);",
			routing: `
tables:
  - {table: cases, document_type: C, id_column: case_id}`,
			want: []string{"public.cases", "no primary key", "REPLICA IDENTITY FULL"},
		},
		{
			name:   "missing column",
			schema: "CREATE TABLE cases (case_id text PRIMARY KEY);",
			routing: `
tables:
  - {table: cases, document_type: C, id_column: case_id, domain_column: dom}`,
			want: []string{"routing file r.yaml", "table public.cases", "field domain_column", `"dom"`},
		},
		{
			name:   "child parent column outside replica identity",
			schema: "CREATE TABLE case_index (id int PRIMARY KEY, case_id text);",
			routing: `
tables:
  - {table: case_index, document_type: C, parent: {id_column: case_id}}`,
			want: []string{"table public.case_index", "field parent.id_column", "replica identity", "REPLICA IDENTITY FULL"},
		},
		{
			name:   "document type column outside replica identity",
			schema: "CREATE TABLE forms (form_id text PRIMARY KEY, doc_type text NOT NULL);",
			routing: `
tables:
  - {table: forms, document_type_column: doc_type, id_column: form_id}`,
			want: []string{"table public.forms", "field document_type_column", `"doc_type"`, "REPLICA IDENTITY FULL"},
		},
		{
			name:   "role without REPLICATION",
			schema: "CREATE TABLE cases (case_id text PRIMARY KEY); CREATE ROLE norepl LOGIN PASSWORD 'pw'; GRANT ALL ON SCHEMA public TO norepl;",
			routing: `
tables:
  - {table: cases, document_type: C, id_column: case_id}`,
			user: "norepl",
			want: []string{`role "norepl"`, "REPLICATION", "ALTER ROLE"},
		},
	}
	for i, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			db := newDB(t, pg, tt.schema)
			if tt.user != "" {
				t.Cleanup(func() {
					db.exec(t, "DROP OWNED BY "+tt.user)
					pg.Exec(t, "DROP ROLE IF EXISTS "+tt.user)
				})
			}
			routing, err := ParseRouting("r.yaml", []byte(tt.routing))
			if err != nil {
				t.Fatal(err)
			}
			cfg := Config{Routing: routing}
			if tt.user != "" {
				cfg.PostgresURL = strings.Replace(db.url, "postgres:postgres@", tt.user+":pw@", 1)
				// The role cannot create changefeed's schema: migrate as admin.
				if err := migrateAs(db.url); err != nil {
					t.Fatal(err)
				}
			}
			r := start(t, db, kafka, cfg)
			err = r.exited(t)
			if !errorsIs(err, ErrPrecondition) {
				t.Fatalf("test %d: Run = %v, want ErrPrecondition", i, err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if strings.Contains(err.Error(), ":pw@") || strings.Contains(r.logs.String(), ":pw@") {
				t.Error("password in output")
			}
			var n int
			if err := db.conn(t).QueryRow(context.Background(), "SELECT count(*) FROM pg_publication").Scan(&n); err != nil || n != 0 {
				t.Errorf("publication created despite the failed check (%d, %v)", n, err)
			}
		})
	}
}

// While Kafka is paused, stubs stay in flight: nothing new is confirmed
// (though keepalives keep arriving), readiness fails, the publisher stays up;
// after it resumes, everything arrives and is confirmed.
func testKafkaOutage(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	k := testenv.Kafka(t)
	kafka := kafkaOf(k)
	r := start(t, db, kafka, Config{Routing: testRouting(t), MaxInFlight: 5})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql")
	db.exec(t, "INSERT INTO cases VALUES ('warm', 'd', 'p', false, 'x')")
	warm := cons.waitStubs(t, "case-sql", 1)[0]
	eventually(t, "warm-up confirmed", func() error {
		if got := db.slotLSN(t); got <= warm.LSN {
			return fmt.Errorf("slot at %s", got)
		}
		return nil
	})
	ctx := context.Background()
	if err := k.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	paused := true
	t.Cleanup(func() {
		if paused {
			_ = k.Unpause(context.Background())
		}
	})
	c := db.conn(t)
	// The slot may still move over WAL written before the outage, but never
	// past the commit of the first transaction whose stub is unacknowledged:
	// bound is the WAL position just before that commit record.
	bound := walIn(t, c, "INSERT INTO cases VALUES ('o0', 'd', 'p', false, 'x')")
	// More changes than MaxInFlight: decoding must pause, not fail. The
	// unpublished writes make keepalives arrive while stubs are in flight.
	for i := 1; i < 12; i++ {
		txid(t, c, true, fmt.Sprintf("INSERT INTO cases VALUES ('o%d', 'd', 'p', false, 'x')", i),
			"INSERT INTO unpublished (v) VALUES ('wal')")
	}
	// Observe the outage for a while.
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if got := db.slotLSN(t); got > bound {
			t.Fatalf("slot confirmed %s during the Kafka outage, past the unacknowledged commit after %s", got, bound)
		}
		if got := db.checkpoint(t); got > bound {
			t.Fatalf("checkpoint %s during the Kafka outage, past the unacknowledged commit after %s", got, bound)
		}
	}
	if code := readyz(r); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz = %d during the Kafka outage", code)
	}
	if v := r.metric(t, "changefeed_cdc_stubs_in_flight"); v < 1 {
		t.Errorf("in-flight metric %v during the outage", v)
	}
	select {
	case err := <-r.done:
		t.Fatalf("publisher exited during the outage: %v", err)
	default:
	}
	if err := k.Unpause(ctx); err != nil {
		t.Fatal(err)
	}
	paused = false
	got := cons.waitStubs(t, "case-sql", 13)
	ids := map[string]bool{}
	for _, s := range got {
		ids[s.DocumentID] = true
	}
	for i := range 12 {
		if !ids[fmt.Sprintf("o%d", i)] {
			t.Errorf("o%d lost", i)
		}
	}
	last := maxLSN(got)
	eventually(t, "confirmed after the outage", func() error {
		if got := db.slotLSN(t); got <= last {
			return fmt.Errorf("slot at %s", got)
		}
		return nil
	})
	if code := readyz(r); code != http.StatusOK {
		t.Errorf("/readyz = %d after the outage", code)
	}
}

func readyz(r *running) int {
	rec := httptest.NewRecorder()
	r.p.Handler(r.reg).ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	return rec.Code
}

// With a heartbeat, a database with no writes at all still sees its slot
// advance; heartbeats publish nothing.
func testHeartbeat(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t), HeartbeatInterval: 200 * time.Millisecond})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql", "meta", DefaultControlTopic)
	prev := db.slotLSN(t)
	for i := range 3 {
		eventually(t, fmt.Sprintf("slot advance %d", i), func() error {
			got := db.slotLSN(t)
			if got <= prev {
				return fmt.Errorf("slot at %s", got)
			}
			prev = got
			return nil
		})
	}
	if n := len(cons.records()); n != 0 {
		t.Errorf("%d records from heartbeats", n)
	}
	if v := r.metric(t, "changefeed_cdc_invalid_messages_total"); v != 0 {
		t.Errorf("invalid messages %v", v)
	}
	rec := httptest.NewRecorder()
	r.p.Handler(r.reg).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, m := range []string{"changefeed_cdc_confirmed_lsn", "changefeed_cdc_lag_bytes", "changefeed_cdc_lag_seconds", "changefeed_cdc_stubs_in_flight"} {
		if !strings.Contains(rec.Body.String(), m) {
			t.Errorf("/metrics lacks %s", m)
		}
	}
}

// A publication that already exists keeps its extra tables; their rows go to
// the default topic (meta), document_type the table, id the key.
func testUnmapped(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema+`
CREATE TABLE widgets (a int, b text, PRIMARY KEY (a, b));
CREATE TABLE gadgets (id text PRIMARY KEY);`)
	db.exec(t, "CREATE PUBLICATION "+pgx.Identifier{db.name}.Sanitize()+" FOR TABLE widgets, gadgets")
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "meta", "case-sql")
	// The routed tables were added to the existing publication.
	db.exec(t, "INSERT INTO cases VALUES ('c1', 'd', 'p', false, 'x')")
	db.exec(t, "INSERT INTO widgets VALUES (7, 'x/y')")
	db.exec(t, "INSERT INTO gadgets VALUES ('g1')")
	cons.waitStubs(t, "case-sql", 1)
	meta := cons.waitStubs(t, "meta", 2)
	got := map[string]string{}
	for _, s := range meta {
		got[s.DocumentType] = s.DocumentID
	}
	if got["widgets"] != "7/x%2Fy" || got["gadgets"] != "g1" {
		t.Fatalf("meta stubs = %v", got)
	}
	if !strings.Contains(r.logs.String(), "not in the routing file") {
		t.Error("no warning about unrouted tables")
	}
}
