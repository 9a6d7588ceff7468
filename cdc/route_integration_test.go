package cdc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/stub"
)

// TestRoutingOnline checks routing against what the server describes while
// streaming (issue 10, items 2, 3, 4, 6 and 7) on real PostgreSQL 15 and
// Kafka containers.
func TestRoutingOnline(t *testing.T) {
	if testing.Short() {
		t.Skip("needs Docker")
	}
	pg := testenv.Postgres(t)

	t.Run("TableSwapUnderLoad", func(t *testing.T) { testTableSwap(t, pg) })
	t.Run("ReplicaIdentityChangedMidStream", func(t *testing.T) { testIdentityChanged(t, pg) })
	t.Run("PartitionsViaExistingLeafPublication", func(t *testing.T) { testPartitionsLeafPublication(t, pg) })
	t.Run("PartitionsViaCreatedPublication", func(t *testing.T) { testPartitionsCreatedPublication(t, pg) })
	t.Run("RoutedPartitionRefused", func(t *testing.T) { testRoutedPartitionRefused(t, pg) })
	t.Run("PartitionReplicaIdentity", func(t *testing.T) { testPartitionIdentity(t, pg) })
	t.Run("PublicationNotCoveringRefused", func(t *testing.T) { testPublicationNotCovering(t, pg) })
	t.Run("CompositeKeys", func(t *testing.T) { testCompositeKeys(t, pg) })
	t.Run("InvalidUTF8IDRefused", func(t *testing.T) { testInvalidUTF8(t, pg) })
}

// ledger records the committed writes of a workload: (document id, xid).
type ledger struct {
	mu     sync.Mutex
	writes map[string][]uint32
	failed int
}

func (l *ledger) add(id string, xid uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.writes[id] = append(l.writes[id], xid)
}

func (l *ledger) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, x := range l.writes {
		n += len(x)
	}
	return n
}

// caseWorkload upserts cases by name ("cases", whatever table it is at that
// moment) from two connections until stop is closed or each has done
// maxOps, recording every committed write.
func caseWorkload(t *testing.T, db *testDB, l *ledger, stop <-chan struct{}, maxOps int) *sync.WaitGroup {
	var wg sync.WaitGroup
	for w := range 2 {
		c := db.conn(t)
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			for i := range maxOps {
				select {
				case <-stop:
					return
				default:
				}
				// Half new documents, half updates of earlier ones.
				id := fmt.Sprintf("w%d-%d", w, i)
				if i%2 == 1 {
					id = fmt.Sprintf("w%d-%d", w, i/4)
				}
				var xid int64
				err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
					if err := tx.QueryRow(ctx, "SELECT txid_current()").Scan(&xid); err != nil {
						return err
					}
					_, err := tx.Exec(ctx, `INSERT INTO cases (case_id, domain, type, name) VALUES ($1, 'd', 'p', $2)
ON CONFLICT (case_id) DO UPDATE SET name = EXCLUDED.name`, id, fmt.Sprint(i))
					return err
				})
				if err != nil {
					// Not committed: not in the ledger (a statement may fail
					// while the table is being swapped).
					l.mu.Lock()
					l.failed++
					l.mu.Unlock()
					continue
				}
				l.add(id, uint32(xid))
			}
		}()
	}
	return &wg
}

// An online table swap under a running workload: a rename pair, then a drop
// and recreate with another column order, each with the documented
// procedure (the new table joins the publication in the swap's own
// transaction). Every committed write reaches case-sql with its
// transaction's xid; nothing reaches meta.
func testTableSwap(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql", "meta")
	pub := pgx.Identifier{db.name}.Sanitize()

	l := &ledger{writes: map[string][]uint32{}}
	stop := make(chan struct{})
	wg := caseWorkload(t, db, l, stop, 3000)
	t.Cleanup(func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	})
	waitWrites := func(n int) {
		testenv.Eventually(t, waitFor, func() string {
			if got := l.count(); got < n {
				return fmt.Sprintf("%d committed writes, want %d", got, n)
			}
			return ""
		})
	}
	waitWrites(100)

	// 1. Rename pair: copy, then swap under a lock in one transaction.
	db.exec(t, "CREATE TABLE cases_new (LIKE cases INCLUDING ALL)")
	db.exec(t, `BEGIN;
LOCK TABLE cases IN ACCESS EXCLUSIVE MODE;
INSERT INTO cases_new SELECT * FROM cases;
ALTER TABLE cases RENAME TO cases_old;
ALTER TABLE cases_new RENAME TO cases;
ALTER PUBLICATION `+pub+` ADD TABLE cases;
COMMIT;`)
	n := l.count()
	waitWrites(n + 100)

	// 2. Drop and recreate, columns in another order.
	db.exec(t, `BEGIN;
LOCK TABLE cases IN ACCESS EXCLUSIVE MODE;
CREATE TABLE cases_copy AS SELECT * FROM cases;
DROP TABLE cases;
CREATE TABLE cases (name text, deleted boolean NOT NULL DEFAULT false, type text, domain text, case_id text PRIMARY KEY);
ALTER PUBLICATION `+pub+` ADD TABLE cases;
INSERT INTO cases (case_id, domain, type, deleted, name) SELECT case_id, domain, type, deleted, name FROM cases_copy;
DROP TABLE cases_copy;
COMMIT;`)
	n = l.count()
	waitWrites(n + 100)
	close(stop)
	wg.Wait()
	db.exec(t, "DROP TABLE cases_old")

	want := map[string]bool{}
	l.mu.Lock()
	for id, xids := range l.writes {
		for _, x := range xids {
			want[fmt.Sprintf("%s@%d", id, x)] = true
		}
	}
	total, failed := len(want), l.failed
	l.mu.Unlock()
	t.Logf("ledger: %d committed writes, %d statements failed during the swaps", total, failed)
	testenv.Eventually(t, waitFor, func() string {
		got := map[string]bool{}
		for _, s := range cons.stubs(t, "case-sql") {
			got[fmt.Sprintf("%s@%d", s.DocumentID, s.XID)] = true
		}
		missing := 0
		first := ""
		for k := range want {
			if !got[k] {
				missing++
				first = k
			}
		}
		if missing > 0 {
			return fmt.Sprintf("%d of %d committed writes have no stub on case-sql (e.g. %s)", missing, total, first)
		}
		return ""
	})
	if meta := cons.stubs(t, "meta"); len(meta) > 0 {
		t.Fatalf("%d stubs on meta that belong to case-sql, first %+v", len(meta), meta[0])
	}
	if s := r.p.State(); s != StateStreaming {
		t.Fatalf("publisher state %s after the swaps", s)
	}
}

// forms routes its document type from a column: a DELETE must carry it. After
// REPLICA IDENTITY goes from FULL to DEFAULT mid-stream, a DELETE stops the
// publisher with the remedy instead of sending the deletion to meta.
func testIdentityChanged(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "form-sql", "meta")
	db.exec(t, "INSERT INTO forms VALUES ('f1', 'd', 'XFormInstance', 'x'), ('f2', 'd', 'XFormInstance', 'x')")
	cons.waitStubs(t, "form-sql", 2)

	db.exec(t, "ALTER TABLE forms REPLICA IDENTITY DEFAULT")
	db.exec(t, "DELETE FROM forms WHERE form_id = 'f1'")
	err := r.exited(t)
	if !errors.Is(err, ErrSchema) {
		t.Fatalf("Run = %v, want ErrSchema", err)
	}
	for _, w := range []string{"table public.forms", "doc_type (field document_type_column)", "REPLICA IDENTITY DEFAULT", `ALTER TABLE "public"."forms" REPLICA IDENTITY FULL`, "pg_replication_slot_advance('" + db.name + "'"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q lacks %q", err, w)
		}
	}
	if !strings.Contains(r.logs.String(), "a DELETE of this table will stop the publisher") {
		t.Error("the Relation message's check logged nothing")
	}
	if meta := cons.stubs(t, "meta"); len(meta) > 0 {
		t.Fatalf("deletion misrouted to meta: %+v", meta[0])
	}
	for _, s := range cons.stubs(t, "form-sql") {
		if s.IsDeletion {
			t.Fatalf("deletion published without its document type: %+v", s)
		}
	}

	// The remedy: FULL again, move the slot past the DELETE already written,
	// and accept that gap as the next start prints it.
	db.exec(t, "ALTER TABLE forms REPLICA IDENTITY FULL")
	db.exec(t, "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())", db.name)
	r1 := start(t, db, kafka, Config{Routing: testRouting(t)})
	err = r1.exited(t)
	accept := GapAcceptance{Slot: db.name, Checkpoint: db.checkpoint(t)}
	if !errors.Is(err, ErrPossibleGap) || !strings.Contains(err.Error(), "--allow-new-slot="+accept.String()) {
		t.Fatalf("Run after moving the slot = %v", err)
	}
	r2 := start(t, db, kafka, Config{Routing: testRouting(t), AllowNewSlot: accept})
	r2.waitStreaming(t)
	db.exec(t, "DELETE FROM forms WHERE form_id = 'f2'")
	testenv.Eventually(t, waitFor, func() string {
		for _, s := range cons.stubs(t, "form-sql") {
			if s.DocumentID == "f2" && s.IsDeletion && s.DocumentType == "XFormInstance" {
				return ""
			}
		}
		return "no deletion stub of f2 on form-sql"
	})
}

const partSchema = `
CREATE TABLE parted (case_id text, k int, domain text, PRIMARY KEY (case_id, k)) PARTITION BY RANGE (k);
CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10);
CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (10) TO (20);
`

const partRouting = `
tables:
  - table: parted
    topic: case-sql
    document_type: CommCareCase
    id_column: case_id
    domain_column: domain
`

func parseRouting(t *testing.T, y string) *Routing {
	t.Helper()
	r, err := ParseRouting("r.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// A publication created beforehand with publish_via_partition_root = false
// publishes partitions under their own names: the publisher accepts it (it
// covers the routed table), routes the partitions' changes by their root,
// and turns a TRUNCATE of one partition into the root's control event.
func testPartitionsLeafPublication(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, partSchema+`INSERT INTO parted VALUES ('c0', 1, 'd');`)
	db.exec(t, "CREATE PUBLICATION "+pgx.Identifier{db.name}.Sanitize()+" FOR TABLE parted WITH (publish_via_partition_root = false)")
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: parseRouting(t, partRouting)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql", "meta", DefaultControlTopic)
	db.exec(t, "INSERT INTO parted VALUES ('c1', 1, 'd'), ('c2', 11, 'd')")
	db.exec(t, "DELETE FROM parted WHERE case_id = 'c0'")
	got := cons.waitStubs(t, "case-sql", 3)
	ids := map[string]bool{}
	for _, s := range got {
		ids[fmt.Sprintf("%s/%s/%v", s.DocumentID, s.DataSourceName, s.IsDeletion)] = true
	}
	for _, w := range []string{"c1/parted/false", "c2/parted/false", "c0/parted/true"} {
		if !ids[w] {
			t.Errorf("no stub %s on case-sql: %v", w, ids)
		}
	}
	db.exec(t, "TRUNCATE parted_1")
	var ev truncateEvent
	testenv.Eventually(t, waitFor, func() string {
		for _, rec := range cons.records() {
			if rec.Topic == DefaultControlTopic {
				if err := json.Unmarshal(rec.Value, &ev); err != nil {
					return err.Error()
				}
				return ""
			}
		}
		return "no control event"
	})
	if ev.Event != "truncate" || ev.Table != "public.parted" || ev.Partition != "public.parted_1" {
		t.Fatalf("truncate event = %+v", ev)
	}
	if meta := cons.stubs(t, "meta"); len(meta) > 0 {
		t.Fatalf("partition stubs on meta: %+v", meta[0])
	}
	logs := r.logs.String()
	for _, w := range []string{"publish_via_partition_root = false", "existing publication covers the routed tables"} {
		if !strings.Contains(logs, w) {
			t.Errorf("logs lack %q", w)
		}
	}
}

// The publisher's own publication publishes partitions via their root.
func testPartitionsCreatedPublication(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, partSchema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: parseRouting(t, partRouting)})
	r.waitStreaming(t)
	var viaRoot bool
	if err := db.conn(t).QueryRow(context.Background(), "SELECT pubviaroot FROM pg_publication WHERE pubname = $1", db.name).Scan(&viaRoot); err != nil || !viaRoot {
		t.Fatalf("pubviaroot = %v, %v", viaRoot, err)
	}
	cons := consume(t, kafka, "case-sql", "meta")
	db.exec(t, "INSERT INTO parted VALUES ('c1', 1, 'd'), ('c2', 11, 'd')")
	// Moving a row to another partition is a DELETE and an INSERT of the
	// root: a deletion stub, then a newer stub of the live document.
	db.exec(t, "UPDATE parted SET k = 12 WHERE case_id = 'c1'")
	got := cons.waitStubs(t, "case-sql", 4)
	newest := map[string]*stub.Stub{}
	for _, s := range got {
		if s.DataSourceName != "parted" {
			t.Errorf("stub %+v", s)
		}
		if n := newest[s.DocumentID]; n == nil || n.LSN < s.LSN || (n.LSN == s.LSN && n.TxOrdinal < s.TxOrdinal) {
			newest[s.DocumentID] = s
		}
	}
	if len(newest) != 2 || newest["c1"].IsDeletion || newest["c2"].IsDeletion {
		t.Errorf("newest stubs %+v", newest)
	}
	if strings.Contains(r.logs.String(), "not in the routing file") {
		t.Error("a partition was taken for an unrouted table")
	}
	if meta := cons.stubs(t, "meta"); len(meta) > 0 {
		t.Fatalf("partition stubs on meta: %+v", meta[0])
	}

	// Published via the root, a partition's TRUNCATE is not decoded at all,
	// and DETACH and DROP never are: the publisher notices them while
	// streaming and says so loudly.
	db.exec(t, "CREATE TABLE parted_3 PARTITION OF parted FOR VALUES FROM (20) TO (30)")
	db.exec(t, "INSERT INTO parted VALUES ('c3', 21, 'd')")
	cons.waitStubs(t, "case-sql", 5)
	db.exec(t, "TRUNCATE parted_1")
	db.exec(t, "ALTER TABLE parted DETACH PARTITION parted_2")
	db.exec(t, "DROP TABLE parted_3")
	testenv.Eventually(t, waitFor, func() string {
		tr := r.metric(t, "changefeed_cdc_partition_changes_total", "table", "public.parted", "change", "truncated_or_rewritten")
		gone := r.metric(t, "changefeed_cdc_partition_changes_total", "table", "public.parted", "change", "detached_or_dropped")
		if tr != 1 || gone != 2 {
			return fmt.Sprintf("partition changes: truncated %v, detached or dropped %v", tr, gone)
		}
		return ""
	})
	logs := r.logs.String()
	for _, w := range []string{`"partition":"public.parted_1","change":"truncated_or_rewritten"`, `"partition":"public.parted_2","change":"detached_or_dropped"`, `"partition":"public.parted_3","change":"detached_or_dropped"`} {
		if !strings.Contains(logs, w) {
			t.Errorf("logs lack %s", w)
		}
	}
}

// A routed partition would never be seen under its own name (the root's
// name is published): refused with the remedy.
func testRoutedPartitionRefused(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, partSchema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: parseRouting(t, strings.ReplaceAll(partRouting, "table: parted", "table: parted_1"))})
	err := r.exited(t)
	if !errors.Is(err, ErrPrecondition) || !strings.Contains(err.Error(), "partition of public.parted") || !strings.Contains(err.Error(), "route public.parted instead") {
		t.Fatalf("Run = %v", err)
	}
}

// A DELETE via the root carries the partition's replica identity, and
// partitions do not inherit REPLICA IDENTITY FULL: a partition that lacks
// the document type column is refused at start, and one created so
// mid-stream stops the publisher at its first DELETE instead of misrouting
// the deletion to meta.
func testPartitionIdentity(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, `
CREATE TABLE pforms (form_id text, k int, doc_type text NOT NULL, PRIMARY KEY (form_id, k)) PARTITION BY RANGE (k);
ALTER TABLE pforms REPLICA IDENTITY FULL;
CREATE TABLE pforms_1 PARTITION OF pforms FOR VALUES FROM (0) TO (10);`)
	routing := parseRouting(t, `
tables:
  - {table: pforms, document_type_column: doc_type, id_column: form_id}
`)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: routing})
	err := r.exited(t)
	if !errors.Is(err, ErrPrecondition) || !strings.Contains(err.Error(), "partition public.pforms_1") || !strings.Contains(err.Error(), `ALTER TABLE "public"."pforms_1" REPLICA IDENTITY FULL`) {
		t.Fatalf("Run = %v", err)
	}

	db.exec(t, "ALTER TABLE pforms_1 REPLICA IDENTITY FULL")
	r = start(t, db, kafka, Config{Routing: routing})
	r.waitStreaming(t)
	cons := consume(t, kafka, "form-sql", "meta")
	db.exec(t, "INSERT INTO pforms VALUES ('f1', 1, 'XFormInstance')")
	db.exec(t, "DELETE FROM pforms WHERE form_id = 'f1'")
	testenv.Eventually(t, waitFor, func() string {
		for _, s := range cons.stubs(t, "form-sql") {
			if s.DocumentID == "f1" && s.IsDeletion && s.DocumentType == "XFormInstance" {
				return ""
			}
		}
		return "no deletion stub of f1 on form-sql"
	})

	db.exec(t, "CREATE TABLE pforms_2 PARTITION OF pforms FOR VALUES FROM (10) TO (20)")
	db.exec(t, "INSERT INTO pforms VALUES ('f2', 11, 'XFormInstance')")
	db.exec(t, "DELETE FROM pforms WHERE form_id = 'f2'")
	err = r.exited(t)
	if !errors.Is(err, ErrSchema) || !strings.Contains(err.Error(), "public.pforms_2 (a partition of public.pforms)") || !strings.Contains(err.Error(), "doc_type") {
		t.Fatalf("Run = %v", err)
	}
	if meta := cons.stubs(t, "meta"); len(meta) > 0 {
		t.Fatalf("deletion misrouted to meta: %+v", meta[0])
	}
}

// A pre-existing publication that lacks a routed table, and that the
// publisher's role cannot change, is refused with the SQL to run.
func testPublicationNotCovering(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema+`
CREATE ROLE cdc_route_notowner LOGIN REPLICATION PASSWORD 'pw';
GRANT USAGE ON SCHEMA public TO cdc_route_notowner;`)
	t.Cleanup(func() {
		db.exec(t, "DROP OWNED BY cdc_route_notowner")
		pg.Exec(t, "DROP ROLE IF EXISTS cdc_route_notowner")
	})
	db.exec(t, "CREATE PUBLICATION "+pgx.Identifier{db.name}.Sanitize()+" FOR TABLE cases, case_index")
	if err := migrateAs(db.url); err != nil {
		t.Fatal(err)
	}
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t), PostgresURL: strings.Replace(db.url, "postgres:postgres@", "cdc_route_notowner:pw@", 1)})
	err := r.exited(t)
	if !errors.Is(err, ErrPrecondition) || !strings.Contains(err.Error(), `does not publish the routed tables "public"."forms"`) ||
		!strings.Contains(err.Error(), "ALTER PUBLICATION "+pgx.Identifier{db.name}.Sanitize()+` ADD TABLE "public"."forms"`) {
		t.Fatalf("Run = %v", err)
	}
}

// Unrouted tables go to meta named by their primary key: composite keys are
// percent-encoded per part, REPLICA IDENTITY FULL still uses the primary key,
// a key-changing UPDATE publishes a deletion of the old id, and an unchanged
// TOASTed key part is taken from the old key tuple.
func testCompositeKeys(t *testing.T, pg *testenv.PG) {
	db := newDB(t, pg, schema+`
CREATE TABLE widgets (a text, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE gadgets (id text PRIMARY KEY, v text);
ALTER TABLE gadgets REPLICA IDENTITY FULL;
CREATE TABLE toasty (k text, big text, v text, PRIMARY KEY (k, big));
ALTER TABLE toasty ALTER COLUMN big SET STORAGE EXTERNAL;`)
	db.exec(t, "CREATE PUBLICATION "+pgx.Identifier{db.name}.Sanitize()+" FOR TABLE widgets, gadgets, toasty")
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "meta")
	big := strings.Repeat("x", 2500)
	c := db.conn(t)
	xidSlash := txid(t, c, true, "INSERT INTO widgets VALUES ('a/b', 'c', '1'), ('a', 'b/c', '2'), ('50%', '%2F', '3')")
	xidGadget := txid(t, c, true, "INSERT INTO gadgets VALUES ('g1', 'x')", "UPDATE gadgets SET v = 'y' WHERE id = 'g1'")
	xidMove := txid(t, c, true, "UPDATE widgets SET b = 'd' WHERE a = 'a' AND b = 'b/c'")
	xidToast := txid(t, c, true, "INSERT INTO toasty VALUES ('k1', '"+big+"', 'a')", "UPDATE toasty SET v = 'b'")
	got := cons.waitStubs(t, "meta", 9)
	byXID := map[uint32][]string{}
	for _, s := range got {
		byXID[s.XID] = append(byXID[s.XID], fmt.Sprintf("%s %s del=%v", s.DocumentType, s.DocumentID, s.IsDeletion))
	}
	check := func(what string, xid uint32, want ...string) {
		t.Helper()
		// Stubs of one transaction may sit on several partitions.
		slices.Sort(byXID[xid])
		slices.Sort(want)
		if g := strings.Join(byXID[xid], " | "); g != strings.Join(want, " | ") {
			t.Errorf("%s: stubs %q, want %q", what, g, strings.Join(want, " | "))
		}
	}
	check("slashes in key parts", xidSlash, "widgets a%2Fb/c del=false", "widgets a/b%2Fc del=false", "widgets 50%25/%252F del=false")
	check("REPLICA IDENTITY FULL uses the primary key", xidGadget, "gadgets g1 del=false", "gadgets g1 del=false")
	check("key-changing UPDATE", xidMove, "widgets a/d del=false", "widgets a/b%2Fc del=true")
	check("unchanged TOASTed key part", xidToast, "toasty k1/"+big+" del=false", "toasty k1/"+big+" del=false")
}

// A database in SQL_ASCII may hold ids that are not UTF-8; JSON would turn
// both of these into "x\ufffd". They are refused loudly; the stream goes on.
func testInvalidUTF8(t *testing.T, pg *testenv.PG) {
	name := "cdc_route_sql_ascii"
	pg.Exec(t, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
	pg.Exec(t, "CREATE DATABASE "+name+" ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
	u, err := url.Parse(pg.URL())
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	db := &testDB{name: name, url: u.String()}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if c, err := pgx.Connect(ctx, pg.URL()); err == nil {
			defer c.Close(ctx)
			_, _ = c.Exec(ctx, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", name)
			_, _ = c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
		}
	})
	db.exec(t, schema)
	kafka := kafkaOf(testenv.Kafka(t))
	r := start(t, db, kafka, Config{Routing: testRouting(t)})
	r.waitStreaming(t)
	cons := consume(t, kafka, "case-sql")
	db.exec(t, `INSERT INTO cases (case_id, domain) VALUES (E'x\xff', 'd'), (E'x\xfe', 'd')`)
	db.exec(t, `SELECT pg_logical_emit_message(true, 'changefeed', E'{"document_id":"y\xff","data_source_type":"sql","data_source_name":"app","document_type":"CommCareCase"}')`)
	db.exec(t, `INSERT INTO cases (case_id, domain) VALUES ('ok', 'd')`)
	got := cons.waitStubs(t, "case-sql", 1)
	for _, s := range got {
		if s.DocumentID != "ok" {
			t.Fatalf("stub with id %q published", s.DocumentID)
		}
	}
	testenv.Eventually(t, waitFor, func() string {
		if v := r.metric(t, "changefeed_cdc_refused_rows_total", "table", "public.cases", "reason", "utf8"); v != 2 {
			return fmt.Sprintf("refused rows = %v", v)
		}
		return ""
	})
	if !strings.Contains(r.logs.String(), "row refused") {
		t.Error("no ERROR line for the refused rows")
	}
	if v := r.metric(t, "changefeed_cdc_invalid_messages_total"); v != 1 {
		t.Errorf("invalid messages = %v (the emitted stub with a non-UTF-8 id)", v)
	}
	// Nothing else than "ok" arrived: the stream went on past the refused rows.
	if n := len(cons.stubs(t, "case-sql")); n != 1 {
		t.Fatalf("%d stubs", n)
	}
}
