package cdc

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/changefeed/changefeed/internal/testenv"
)

// TestLifecycle covers the slot and checkpoint lifecycle across restores,
// other clusters and operator decisions, on real PostgreSQL 15 servers.
func TestLifecycle(t *testing.T) {
	if testing.Short() {
		t.Skip("needs Docker")
	}
	pg := testenv.Postgres(t)
	t.Run("CheckpointOfAnotherCluster", func(t *testing.T) { testCheckpointOtherCluster(t, pg) })
	t.Run("CheckpointAheadOfWAL", func(t *testing.T) { testCheckpointAhead(t, pg) })
	t.Run("LegacyOrOtherTimelineCheckpoint", func(t *testing.T) { testLegacyCheckpoint(t, pg) })
	t.Run("RenameOfRoutedColumn", func(t *testing.T) { testRenameRoutedColumn(t, pg) })
	t.Run("SwappedTableNotInPublication", func(t *testing.T) { testSwappedTableUnpublished(t, pg) })
	t.Run("ColumnListWithoutRoutedColumn", func(t *testing.T) { testColumnList(t, pg) })
	t.Run("KafkaStalled", func(t *testing.T) { testKafkaStalled(t, pg) })
	t.Run("SlotLosesWAL", func(t *testing.T) { testSlotLosesWAL(t, pg) })
	t.Run("SynchronousCommitOff", func(t *testing.T) { testSyncCommitOff(t, pg) })
}

func (d *testDB) text(t *testing.T, sql string, args ...any) string {
	t.Helper()
	var s *string
	if err := d.conn(t).QueryRow(context.Background(), sql, args...).Scan(&s); err != nil {
		t.Fatalf("query %q: %v", sql, err)
	}
	if s == nil {
		return ""
	}
	return *s
}

// The database moved to another cluster (pg_dump/restore, a new server):
// changefeed.cdc_checkpoint came along, and the new cluster has a slot of
// the same name behind the copied LSN. Resuming at max(slot, checkpoint)
// would skip every change in between: the publisher must refuse, naming
// both system identifiers and the one acceptance that discards it.
func testCheckpointOtherCluster(t *testing.T, pgA *testenv.PG) {
	dbA := newDB(t, pgA, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, dbA, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	dbA.exec(t, "INSERT INTO cases VALUES ('a1', 'd', 'p', false, 'x')")
	cons := consume(t, kafka, "case-sql")
	cons.waitStubs(t, "case-sql", 1)
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	ckA := dbA.checkpoint(t)
	sysA := dbA.text(t, "SELECT system_identifier::text FROM changefeed.cdc_checkpoint WHERE slot_name = $1", dbA.name)
	if sysA == "" {
		t.Fatal("checkpoint has no system identifier")
	}

	pgB := testenv.Postgres(t)
	dbB := newDB(t, pgB, schema)
	if err := migrateAs(dbB.url); err != nil {
		t.Fatal(err)
	}
	// B was set up like A: publication and slot exist, the slot is behind.
	dbB.exec(t, "CREATE PUBLICATION "+dbB.name+" FOR TABLE cases, case_index, forms WITH (publish_via_partition_root = true)")
	dbB.exec(t, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", dbB.name)
	slotB := dbB.slotLSN(t)
	// Enough WAL on B that A's LSN is a valid position here too: only the
	// identity tells the two histories apart.
	for dbB.lsn(t, "SELECT pg_current_wal_lsn()::text") <= ckA {
		dbB.exec(t, "INSERT INTO cases SELECT 'b' || g, 'd', 'p', false, repeat('x', 1000) FROM generate_series(1, 2000) g ON CONFLICT DO NOTHING")
		dbB.exec(t, "DELETE FROM cases")
	}
	dbB.exec(t, "INSERT INTO changefeed.cdc_checkpoint (slot_name, confirmed_lsn, system_identifier, timeline) VALUES ($1, $2::text::pg_lsn, $3::numeric, 1)",
		dbB.name, ckA.String(), sysA)
	if slotB >= ckA {
		t.Fatalf("slot on B %s not behind A's checkpoint %s", slotB, ckA)
	}
	r2 := start(t, dbB, kafka, Config{Routing: testRouting(t)})
	err := r2.exited(t)
	sysB := dbB.text(t, "SELECT system_identifier::text FROM pg_control_system()")
	accept := GapAcceptance{Slot: dbB.name, Checkpoint: ckA}
	for _, want := range []string{"another PostgreSQL cluster", sysA, sysB, "backfill", "--allow-new-slot=" + accept.String()} {
		if !errorsIs(err, ErrPossibleGap) || !strings.Contains(err.Error(), want) {
			t.Fatalf("Run = %v, want ErrPossibleGap naming %q", err, want)
		}
	}
	if got := dbB.checkpoint(t); got != ckA {
		t.Fatalf("checkpoint changed by the refused start: %s", got)
	}
	// Accepting it adopts B's slot and records B's identity.
	r3 := start(t, dbB, kafka, Config{Routing: testRouting(t), AllowNewSlot: accept})
	r3.waitStreaming(t)
	if got := dbB.text(t, "SELECT system_identifier::text FROM changefeed.cdc_checkpoint WHERE slot_name = $1", dbB.name); got != sysB {
		t.Fatalf("checkpoint identity %s, want B's %s", got, sysB)
	}
}

// A restore from backup (or a failover to a server with a shorter history)
// leaves a checkpoint ahead of the server's WAL: refused. --allow-new-slot
// naming it accepts it once; the same setting left in place is refused on
// the next start, and one naming another gap never applies.
func testCheckpointAhead(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	ahead := db.lsn(t, "SELECT pg_current_wal_lsn()::text") + 1<<30
	db.exec(t, "UPDATE changefeed.cdc_checkpoint SET confirmed_lsn = $1::text::pg_lsn WHERE slot_name = $2", ahead.String(), db.name)

	r2 := start(t, db, kafka, Config{Routing: testRouting(t)})
	err := r2.exited(t)
	accept := GapAcceptance{Slot: db.name, Checkpoint: ahead}
	for _, want := range []string{"ahead of this server's WAL", ahead.String(), "--allow-new-slot=" + accept.String()} {
		if !errorsIs(err, ErrPossibleGap) || !strings.Contains(err.Error(), want) {
			t.Fatalf("Run = %v, want ErrPossibleGap naming %q", err, want)
		}
	}
	// An acceptance of another gap does not apply.
	other := GapAcceptance{Slot: db.name, Checkpoint: ahead - 8}
	r3 := start(t, db, kafka, Config{Routing: testRouting(t), AllowNewSlot: other})
	if err := r3.exited(t); !errorsIs(err, ErrPossibleGap) || !strings.Contains(err.Error(), "names another gap") {
		t.Fatalf("Run with %s = %v, want ErrPossibleGap saying it names another gap", other, err)
	}
	// The right one: the slot's position is adopted, streaming resumes.
	r4 := start(t, db, kafka, Config{Routing: testRouting(t), AllowNewSlot: accept})
	r4.waitStreaming(t)
	if got, slot := db.checkpoint(t), db.slotLSN(t); got > slot {
		t.Fatalf("checkpoint %s still ahead of the slot %s", got, slot)
	}
	if err := r4.stop(t); err != nil {
		t.Fatal(err)
	}
	// Left in the environment: refused, nothing started.
	r5 := start(t, db, kafka, Config{Routing: testRouting(t), AllowNewSlot: accept})
	if err := r5.exited(t); !errorsIs(err, ErrConfig) || !strings.Contains(err.Error(), "no gap to accept") {
		t.Fatalf("second start with %s = %v, want ErrConfig (no gap to accept)", accept, err)
	}
}

// A checkpoint written before the identity was recorded, or on an earlier
// timeline, is within this server's WAL: it is trusted, and this server's
// identity recorded.
func testLegacyCheckpoint(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	db.exec(t, "UPDATE changefeed.cdc_checkpoint SET system_identifier = NULL, timeline = NULL")
	r2 := start(t, db, kafka, Config{Routing: testRouting(t)})
	r2.waitStreaming(t)
	sys := db.text(t, "SELECT system_identifier::text FROM pg_control_system()")
	if got := db.text(t, "SELECT system_identifier::text || '/' || timeline FROM changefeed.cdc_checkpoint WHERE slot_name = $1", db.name); got != sys+"/1" {
		t.Fatalf("checkpoint identity %q, want %s/1", got, sys)
	}
	if err := r2.stop(t); err != nil {
		t.Fatal(err)
	}
	// Written on another timeline of this cluster (before a failover or a
	// point-in-time recovery) and inside this server's WAL: the row is in
	// this history, so is its LSN. Accepted with a warning.
	db.exec(t, "UPDATE changefeed.cdc_checkpoint SET timeline = 7")
	r3 := start(t, db, kafka, Config{Routing: testRouting(t)})
	r3.waitStreaming(t)
	if !strings.Contains(r3.logs.String(), "the timeline changed since the last checkpoint") {
		t.Error("no warning about the timeline change")
	}
	if got := db.text(t, "SELECT timeline::text FROM changefeed.cdc_checkpoint WHERE slot_name = $1", db.name); got != "1" {
		t.Fatalf("checkpoint timeline %s, want 1", got)
	}
}

const casesOnly = `
tables:
  - table: cases
    topic: case-sql
    data_source_name: case-sql
    document_type: CommCareCase
    id_column: case_id
    domain_column: %s
`

func casesRouting(t *testing.T, domainColumn string) *Routing {
	t.Helper()
	r, err := ParseRouting("cases.yaml", []byte(fmt.Sprintf(casesOnly, domainColumn)))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// A routed column renamed inside a transaction: the publisher stops naming
// the table, the column and the remedy, after confirming every transaction
// Kafka acknowledged before it. With the routing updated, it replays that
// transaction (its first change still of the old schema, mapped by
// position) and goes on: no crash loop, nothing lost.
func testRenameRoutedColumn(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, "CREATE TABLE cases (case_id text PRIMARY KEY, domain text, name text);")
	kafka := kafkaOf(testenv.Kafka(t))
	cons := consume(t, kafka, "case-sql")
	// Only a confirmation before the exit can move the slot.
	r := start(t, db, kafka, Config{Routing: casesRouting(t, "domain"), StatusInterval: time.Hour, KeepaliveInterval: time.Hour})
	r.waitStreaming(t)
	startLSN := db.slotLSN(t)
	db.exec(t, "INSERT INTO cases VALUES ('r1', 'd1', 'x')")
	first := cons.waitStubs(t, "case-sql", 1)[0]
	c := db.conn(t)
	// DDL that leaves the routing intact, inside a transaction: handled,
	// streaming goes on.
	txid(t, c, true, "INSERT INTO cases VALUES ('k1', 'dk', 'x')",
		"ALTER TABLE cases RENAME COLUMN name TO title",
		"ALTER TABLE cases ADD COLUMN extra int",
		"INSERT INTO cases VALUES ('k2', 'dk', 'x', 1)")
	cons.waitStubs(t, "case-sql", 3)
	first = cons.stubs(t, "case-sql")[2]
	txid(t, c, true, "INSERT INTO cases VALUES ('r2', 'd2', 'x')",
		"ALTER TABLE cases RENAME COLUMN domain TO project",
		"INSERT INTO cases VALUES ('r3', 'd3', 'x', 3)")
	err := r.exited(t)
	for _, want := range []string{"public.cases", `"domain"`, "domain_column", "Remedy", "routing file"} {
		if !errorsIs(err, ErrSchema) || !strings.Contains(err.Error(), want) {
			t.Fatalf("Run = %v, want ErrSchema naming %q", err, want)
		}
	}
	if got := db.slotLSN(t); got <= first.LSN || got == startLSN {
		t.Fatalf("slot at %s, want the acknowledged transaction (commit %s) confirmed before the exit", got, first.LSN)
	}
	if got, slot := db.checkpoint(t), db.slotLSN(t); got != slot {
		t.Fatalf("checkpoint %s, slot %s", got, slot)
	}
	// The operator renames the column in the routing too.
	r2 := start(t, db, kafka, Config{Routing: casesRouting(t, "project")})
	r2.waitStreaming(t)
	db.exec(t, "INSERT INTO cases VALUES ('r4', 'd4', 'x', 4)")
	testenv.Eventually(t, waitFor, func() string {
		got := map[string]string{}
		for _, s := range cons.stubs(t, "case-sql") {
			got[s.DocumentID] = s.Domain
		}
		return testenv.DiffStates(map[string]string{"r1": "d1", "k1": "dk", "k2": "dk", "r2": "d2", "r3": "d3", "r4": "d4"}, got)
	})
	if !strings.Contains(r2.logs.String(), "matched by position") {
		t.Error("no log line about the change of the older schema")
	}
	select {
	case err := <-r2.done:
		t.Fatalf("publisher exited: %v", err)
	default:
	}
}

// An online table swap (create the new table, rename it into place) leaves
// the routed table outside the publication: PostgreSQL never decodes its
// rows. The publisher must stop, naming the table and the remedy.
func testSwappedTableUnpublished(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, "CREATE TABLE cases (case_id text PRIMARY KEY, domain text, name text);")
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: casesRouting(t, "domain"), LagInterval: 200 * time.Millisecond})
	r.waitStreaming(t)
	db.exec(t, `CREATE TABLE cases_new (LIKE cases INCLUDING ALL);
ALTER TABLE cases RENAME TO cases_old;
ALTER TABLE cases_new RENAME TO cases;
INSERT INTO cases VALUES ('after-swap', 'd', 'x');`)
	err := r.exited(t)
	for _, want := range []string{"public.cases", "not in publication", "ALTER PUBLICATION", "ADD TABLE", "backfill"} {
		if !errorsIs(err, ErrSchema) || !strings.Contains(err.Error(), want) {
			t.Fatalf("Run = %v, want ErrSchema naming %q", err, want)
		}
	}
}

// A publication column list without a routed column is refused at start,
// with the reason; one that carries the routed columns is respected.
func testColumnList(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, "CREATE TABLE cases (case_id text PRIMARY KEY, domain text, name text);")
	db.exec(t, "CREATE PUBLICATION "+db.name+" FOR TABLE cases (case_id, name)")
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: casesRouting(t, "domain")})
	err := r.exited(t)
	for _, want := range []string{"column list", "public.cases", "domain (field domain_column)"} {
		if !errorsIs(err, ErrPrecondition) || !strings.Contains(err.Error(), want) {
			t.Fatalf("Run = %v, want ErrPrecondition naming %q", err, want)
		}
	}
	db.exec(t, "ALTER PUBLICATION "+db.name+" SET TABLE cases (case_id, domain)")
	r2 := start(t, db, kafka, Config{Routing: casesRouting(t, "domain")})
	r2.waitStreaming(t)
	cons := consume(t, kafka, "case-sql")
	db.exec(t, "INSERT INTO cases VALUES ('c1', 'd1', 'x')")
	if got := cons.waitStubs(t, "case-sql", 1)[0]; got.DocumentID != "c1" || got.Domain != "d1" {
		t.Fatalf("stub %+v", got)
	}
}

// While Kafka is stalled, transactions that publish nothing do not pile up
// in the ack tracker; and stopping with stubs unacknowledged does not log a
// line per stub.
func testKafkaStalled(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, "CREATE TABLE cases (case_id text PRIMARY KEY, domain text, name text);")
	k := testenv.Kafka(t)
	kafka := kafkaOf(k)
	r := start(t, db, kafka, Config{Routing: casesRouting(t, "domain"), ShutdownTimeout: 500 * time.Millisecond})
	r.waitStreaming(t)
	ctx := context.Background()
	if err := k.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Unpause(context.Background()) })
	db.exec(t, "INSERT INTO cases SELECT 's' || g, 'd', 'x' FROM generate_series(1, 300) g")
	// 3000 transactions that publish nothing (a message of another prefix).
	db.exec(t, "DO $$ BEGIN FOR i IN 1..3000 LOOP PERFORM pg_logical_emit_message(true, 'other', 'x'); COMMIT; END LOOP; END $$")
	testenv.Eventually(t, waitFor, func() string {
		if n := r.metric(t, "changefeed_cdc_transactions_total"); n < 3001 {
			return fmt.Sprintf("%v transactions decoded", n)
		}
		return ""
	})
	testenv.Eventually(t, waitFor, func() string {
		if n := r.metric(t, "changefeed_cdc_pending_transactions"); n != 1 {
			return fmt.Sprintf("%v transactions held, want 1 (the one waiting for Kafka)", n)
		}
		return ""
	})
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	// The producer is closed after Run returns: its 300 stubs fail then.
	testenv.Eventually(t, waitFor, func() string {
		if n := r.metric(t, "changefeed_produce_errors_total"); n < 300 {
			return fmt.Sprintf("%v stubs failed", n)
		}
		return ""
	})
	if n := strings.Count(r.logs.String(), `Kafka refused a stub`); n > 0 {
		t.Fatalf("%d error lines for stubs left unacknowledged at shutdown", n)
	}
}

// A slot about to lose WAL is reported (warning, wal_status and
// safe_wal_size metrics); once lost, the publisher stops as on any gap.
func testSlotLosesWAL(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, "CREATE TABLE cases (case_id text PRIMARY KEY, domain text, name text);")
	pg.Exec(t, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
	pg.Exec(t, "SELECT pg_reload_conf()")
	t.Cleanup(func() {
		pg.Exec(t, "ALTER SYSTEM RESET max_slot_wal_keep_size")
		pg.Exec(t, "SELECT pg_reload_conf()")
	})
	k := testenv.Kafka(t)
	kafka := kafkaOf(k)
	r := start(t, db, kafka, Config{Routing: casesRouting(t, "domain"), LagInterval: 100 * time.Millisecond})
	r.waitStreaming(t)
	testenv.Eventually(t, waitFor, func() string {
		if v := r.metric(t, "changefeed_cdc_slot_wal_status", "status", "reserved"); v != 1 {
			return fmt.Sprintf("wal_status reserved = %v", v)
		}
		if v := r.metric(t, "changefeed_cdc_slot_safe_wal_size_bytes"); v <= 0 {
			return fmt.Sprintf("safe_wal_size = %v", v)
		}
		return ""
	})
	if err := k.Pause(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Unpause(context.Background()) })
	// A stub Kafka does not acknowledge holds the slot; then WAL piles up.
	db.exec(t, "INSERT INTO cases VALUES ('held', 'd', 'x')")
	for range 4 {
		db.exec(t, "INSERT INTO cases SELECT 'w' || g, 'd', 'x' FROM generate_series(1, 10) g ON CONFLICT DO NOTHING")
		db.exec(t, "SELECT pg_switch_wal()")
	}
	testenv.Eventually(t, waitFor, func() string {
		if !strings.Contains(r.logs.String(), "about to lose WAL it needs") {
			return "no warning"
		}
		if v := r.metric(t, "changefeed_cdc_slot_wal_status", "status", "unreserved"); v != 1 {
			return fmt.Sprintf("wal_status unreserved = %v", v)
		}
		return ""
	})
	// The checkpointer removes the WAL: the slot is lost, its walsender
	// terminated. Once Kafka is back (the publisher first waits for its
	// stubs), the reconnect finds the slot lost.
	db.exec(t, "CHECKPOINT")
	if err := k.Unpause(context.Background()); err != nil {
		t.Fatal(err)
	}
	err := r.exited(t)
	if !errorsIs(err, ErrPossibleGap) || !strings.Contains(err.Error(), "wal_status lost") {
		t.Fatalf("Run = %v, want ErrPossibleGap (wal_status lost)", err)
	}
}

// With synchronous_commit off, the checkpoint writes are still durable.
func testSyncCommitOff(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, "CREATE TABLE cases (case_id text PRIMARY KEY, domain text, name text);")
	db.exec(t, "ALTER DATABASE "+db.name+" SET synchronous_commit = off")
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: casesRouting(t, "domain")})
	r.waitStreaming(t)
	var sc string
	if err := db.conn(t).QueryRow(context.Background(), "SHOW synchronous_commit").Scan(&sc); err != nil || sc != "off" {
		t.Fatalf("synchronous_commit = %q, %v", sc, err)
	}
	if !strings.Contains(r.logs.String(), "checkpoint writes use synchronous_commit = local") {
		t.Fatal("checkpoint writes not made durable")
	}
}
