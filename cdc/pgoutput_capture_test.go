package cdc

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/changefeed/changefeed/internal/testenv"
)

var writeFuzzCorpus = flag.Bool("write-fuzz-corpus", false,
	"TestPgoutputCapturedWorkload: write the captured messages to testdata/fuzz/FuzzPgoutput")

// captureSchema is the integration tests' schema plus what makes
// PostgreSQL send the remaining message shapes: an out-of-line value left
// unchanged (a 'u' column), a composite key, a user-defined type (a Type
// message) and a table without a key.
const captureSchema = schema + `
CREATE TABLE docs (id text PRIMARY KEY, domain text, body text);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));
CREATE TYPE mood AS ENUM ('ok', 'sad');
CREATE TABLE moods (id int PRIMARY KEY, m mood);
CREATE TABLE nokey (v text);
`

// captureWorkload writes every change the publisher reads, one
// transaction per statement unless grouped.
var captureWorkload = [][]string{
	{`INSERT INTO cases VALUES ('c1', 'd', 'patient', false, 'one'), ('c2', 'd', 'patient', false, 'two')`,
		`INSERT INTO case_index (case_id, domain, referenced_id) VALUES ('c1', 'd', 'c2')`,
		`INSERT INTO forms VALUES ('f1', 'd', 'XFormInstance', 'http://x')`},
	{`UPDATE cases SET name = 'uno' WHERE case_id = 'c1'`},
	{`UPDATE cases SET case_id = 'c1b' WHERE case_id = 'c1'`},
	{`UPDATE cases SET deleted = true WHERE case_id = 'c2'`},
	{`UPDATE case_index SET case_id = 'c2'`},
	{`UPDATE forms SET doc_type = 'XFormInstance-Deleted'`},
	{`DELETE FROM case_index`},
	{`DELETE FROM cases WHERE case_id = 'c2'`},
	{`INSERT INTO docs SELECT 'big', 'd', string_agg(md5(i::text), '') FROM generate_series(1, 300) i`},
	{`UPDATE docs SET domain = 'd2'`},
	{`INSERT INTO pairs VALUES (1, 'x', 'v'), (2, 'y', NULL)`, `UPDATE pairs SET b = 'z' WHERE a = 1`, `DELETE FROM pairs WHERE a = 2`},
	{`INSERT INTO moods VALUES (1, 'ok')`, `INSERT INTO nokey VALUES ('k')`},
	{`INSERT INTO cases VALUES ('c3', 'd', 't', false, NULL)`,
		`SELECT pg_logical_emit_message(true, 'changefeed', '{"document_id":"m1","data_source_type":"sql","data_source_name":"n","document_type":"CommCareCase"}')`,
		`SELECT pg_logical_emit_message(true, 'other', 'x')`},
	{`SELECT pg_logical_emit_message(false, 'changefeed_heartbeat', now()::text)`},
	{`TRUNCATE pairs, moods`},
	{`TRUNCATE forms RESTART IDENTITY CASCADE`},
}

const captureEnd = "fuzz_capture_end"

// TestPgoutputCapturedWorkload runs the test workload on PostgreSQL 15,
// reads the slot as the publisher does (pgoutput, proto_version 1) and
// runs FuzzPgoutput's comparison on what the server sent, one transaction
// at a time with the relations before it. With -write-fuzz-corpus the
// transactions become FuzzPgoutput's seed corpus.
func TestPgoutputCapturedWorkload(t *testing.T) {
	if testing.Short() {
		t.Skip("needs Docker")
	}
	pg := testenv.Postgres(t)
	db := newDB(t, pg, captureSchema)
	db.exec(t, "CREATE PUBLICATION "+db.name+" FOR ALL TABLES")
	db.exec(t, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", db.name)

	c := db.conn(t)
	ctx := context.Background()
	for _, stmts := range captureWorkload {
		txid(t, c, true, stmts...)
	}
	txid(t, c, false, `INSERT INTO cases VALUES ('rolled-back', 'd', 't', false, NULL)`)
	if _, err := c.Exec(ctx, "SELECT pg_logical_emit_message(false, $1, '')", captureEnd); err != nil {
		t.Fatal(err)
	}

	msgs := captureSlot(t, db)
	seeds := transactions(msgs)
	shapes := map[string]bool{}
	for _, m := range msgs {
		shapes[shapeOf(m)] = true
	}
	for _, want := range []string{"B", "C", "R", "Y", "I", "U", "U K", "U O", "U u", "D K", "D O", "T", "M"} {
		if !shapes[want] {
			t.Errorf("the workload sent no %q message (got %v)", want, shapes)
		}
	}
	for i, seed := range seeds {
		t.Run(strconv.Itoa(i), func(t *testing.T) { checkPgoutput(t, seed) })
	}
	if *writeFuzzCorpus {
		dir := filepath.Join("testdata", "fuzz", "FuzzPgoutput")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, seed := range seeds {
			body := fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(seed)))
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("pg15-workload-%02d", i)), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("wrote %d seeds to %s", len(seeds), dir)
	}
}

// captureSlot streams the slot from its start to the end marker and
// returns the XLogData payloads.
func captureSlot(t *testing.T, db *testDB) [][]byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg, err := pgconn.ParseConfig(db.url)
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["replication"] = "database"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	err = pglogrepl.StartReplication(ctx, conn, db.name, 0, pglogrepl.StartReplicationOptions{
		Mode:       pglogrepl.LogicalReplication,
		PluginArgs: []string{"proto_version '1'", "publication_names '" + db.name + "'", "messages 'true'"},
	})
	if err != nil {
		t.Fatal(err)
	}
	var msgs [][]byte
	for {
		raw, err := conn.ReceiveMessage(ctx)
		if err != nil {
			t.Fatalf("after %d messages: %v", len(msgs), err)
		}
		cd, ok := raw.(*pgproto3.CopyData)
		if !ok || len(cd.Data) == 0 || cd.Data[0] != pglogrepl.XLogDataByteID {
			continue // keepalives need no answer within the test's time
		}
		x, err := pglogrepl.ParseXLogData(cd.Data[1:])
		if err != nil {
			t.Fatal(err)
		}
		m := append([]byte(nil), x.WALData...)
		if m[0] == 'M' {
			var lm pglogrepl.LogicalDecodingMessage
			if err := lm.Decode(m[1:]); err == nil && lm.Prefix == captureEnd {
				return msgs
			}
		}
		msgs = append(msgs, m)
	}
}

// transactions cuts the stream into fuzz inputs: each transaction (or
// message outside one), preceded by every Relation and Type message sent
// before it, as a publisher that connected then would have them.
func transactions(msgs [][]byte) [][]byte {
	var seeds [][]byte
	rels := map[string][]byte{}
	var order []string
	var tx [][]byte
	for _, m := range msgs {
		switch m[0] {
		case 'R', 'Y':
			key := string(m[:5])
			if _, ok := rels[key]; !ok {
				order = append(order, key)
			}
			rels[key] = m
			continue
		}
		tx = append(tx, m)
		if m[0] == 'C' || m[0] == 'M' && m[1] == 0 && len(tx) == 1 {
			var seed [][]byte
			for _, k := range order {
				seed = append(seed, rels[k])
			}
			seeds = append(seeds, joinMessages(append(seed, tx...)...))
			tx = nil
		}
	}
	return seeds
}

// shapeOf names a message's kind, and for a row change its old tuple and
// whether it has an unchanged out-of-line value.
func shapeOf(m []byte) string {
	switch m[0] {
	case 'U', 'D':
		if len(m) > 5 && (m[5] == 'K' || m[5] == 'O') {
			return string(m[0]) + " " + string(m[5])
		}
		if m[0] == 'U' && len(m) > 8 && containsUnchanged(m[6:]) {
			return "U u"
		}
	}
	return string(m[:1])
}

// containsUnchanged walks a new tuple for a 'u' column.
func containsUnchanged(tup []byte) bool {
	n := int(tup[0])<<8 | int(tup[1])
	p := 2
	for range n {
		if p >= len(tup) {
			return false
		}
		switch tup[p] {
		case 'u':
			return true
		case 't', 'b':
			p += 5 + (int(tup[p+1])<<24 | int(tup[p+2])<<16 | int(tup[p+3])<<8 | int(tup[p+4]))
		default:
			p++
		}
	}
	return false
}
