package cdc

import (
	"context"
	"strings"
	"testing"

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
	t.Run("LegacyCheckpointGetsIdentity", func(t *testing.T) { testLegacyCheckpoint(t, pg) })
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

// A checkpoint written before the identity was recorded is within this
// server's WAL: it is trusted, and its identity recorded.
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
}
