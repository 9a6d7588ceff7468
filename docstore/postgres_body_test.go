package docstore

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/stub"
)

// toJSONBBodies is the definition of a SQL document's body: to_jsonb(row)
// decoded with json.Number, by id.
func toJSONBBodies(t *testing.T, pool *pgxpool.Pool, table, idCol string) map[string]map[string]any {
	t.Helper()
	rows, err := pool.Query(context.Background(), fmt.Sprintf(`SELECT r.%s::text, to_jsonb(r)::text FROM %s r`, idCol, table))
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]map[string]any{}
	for rows.Next() {
		var id string
		var b []byte
		if err := rows.Scan(&id, &b); err != nil {
			t.Fatal(err)
		}
		m, err := decodeBody(b)
		if err != nil {
			t.Fatal(err)
		}
		out[id] = m
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// checkBodies fetches every row of table and compares each body with
// to_jsonb(row).
func checkBodies(t *testing.T, s *Postgres, pool *pgxpool.Pool, source, table, idCol string) {
	t.Helper()
	want := toJSONBBodies(t, pool, table, idCol)
	var stubs []*stub.Stub
	for id := range want {
		stubs = append(stubs, sqlStub(source, id, 1, 0))
	}
	docs, err := s.Fetch(t.Context(), stubs)
	if err != nil {
		t.Fatal(err)
	}
	if len(docs) != len(want) {
		t.Fatalf("Fetch returned %d documents, want %d", len(docs), len(want))
	}
	for _, d := range docs {
		if d.Deleted || !reflect.DeepEqual(d.Body, want[d.ID]) {
			var diffs []string
			for k, w := range want[d.ID] {
				if g, ok := d.Body[k]; !ok || !reflect.DeepEqual(g, w) {
					diffs = append(diffs, fmt.Sprintf("%s: got %#v, want %#v", k, g, w))
				}
			}
			for k, g := range d.Body {
				if _, ok := want[d.ID][k]; !ok {
					diffs = append(diffs, fmt.Sprintf("%s: got %#v, not in to_jsonb", k, g))
				}
			}
			t.Fatalf("document %s (deleted=%v) differs from to_jsonb(row):\n%s", d.ID, d.Deleted, strings.Join(diffs, "\n"))
		}
	}
}

// TestPostgresBodyIsToJSONB checks, type by type, that a body is exactly
// to_jsonb(row) decoded with json.Number, whichever way each column is read.
func TestPostgresBodyIsToJSONB(t *testing.T) {
	pg := testenv.Postgres(t)
	pool := newPool(t, pg.URL(), nil)
	pg.Exec(t, `CREATE TYPE mood AS ENUM ('sad', 'happy')`)
	pg.Exec(t, `CREATE TYPE pair AS (a int, b text)`)
	pg.Exec(t, `CREATE DOMAIN posint AS int CHECK (VALUE > 0)`)
	pg.Exec(t, `CREATE DOMAIN shorttext AS text`)
	pg.Exec(t, `CREATE TABLE typed (
		id text PRIMARY KEY, vc varchar(200), bp char(5), nm name, u uuid,
		i2 smallint, i4 integer, i8 bigint, num numeric, num2 numeric(10,3),
		f4 real, f8 double precision, b boolean,
		d date, ts timestamp, tstz timestamptz, tm time, iv interval,
		j json, jb jsonb, arr int[], tarr text[], e mood, p pair, dom posint, dtext shorttext,
		by bytea, ip inet, "Mixed Case" text, "quo""te" int)`)
	pg.Exec(t, `INSERT INTO typed VALUES
		('r1', 'varchar', 'ab', 'aname', '6f1c2c8e-5d3a-4c8e-9b0a-3f5f6c7d8e9f',
		 -32768, 2147483647, 9223372036854775807, 12345678901234567890.123456789012, 1.5,
		 1.5, 0.1, true,
		 '2024-02-29', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.5+02', '10:11:12', '1 day 2 hours',
		 '{"b": 1, "a": [1, 2.50, "x"], "b": 2}', '{"n": 1e3, "s": "t", "o": {"x": null}}', '{1,NULL,3}', '{"a","b c",NULL}',
		 'happy', ROW(1, 'x'), 7, 'dom', '\xdeadbeef', '10.0.0.1/8', 'mc', 1),
		('r2', '', '', '', NULL,
		 0, -1, -9223372036854775808, 'NaN', -0.000,
		 'Infinity', '-Infinity', false,
		 'infinity', '-infinity', 'infinity', NULL, NULL,
		 'null', '"str"', '{}', '{}', 'sad', ROW(NULL, NULL), NULL, NULL, '', NULL, NULL, NULL),
		('r3', E'tab\there "q" back\\slash \u00e9 \U0001F600 \u2028 \x01', NULL, NULL, NULL,
		 NULL, NULL, NULL, 'Infinity', NULL,
		 'NaN', 1e300, NULL,
		 NULL, NULL, NULL, NULL, NULL,
		 '[1, {"a": 1.0}]', '12345678901234567890.5', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
		('r4', NULL, NULL, NULL, NULL, NULL, NULL, NULL, '-Infinity', 1e-2, 1e20, -1e-20, NULL,
		 NULL, NULL, NULL, NULL, NULL, NULL, 'true', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
		('r5', NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0.000000000000000000000000000001, 100, -0.0, 123456789.123456789, NULL,
		 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)`)
	s, err := NewPostgres(pool, []PostgresTable{{Source: "typed", Table: "typed", IDColumn: "id"}})
	if err != nil {
		t.Fatal(err)
	}
	checkBodies(t, s, pool, "typed", "typed", "id")

	// A few values spelled out, so that the check does not rest on
	// to_jsonb alone.
	docs, err := s.Fetch(t.Context(), []*stub.Stub{sqlStub("typed", "r1", 1, 0), sqlStub("typed", "r2", 1, 0)})
	if err != nil {
		t.Fatal(err)
	}
	r1, r2 := docs[0].Body, docs[1].Body
	for k, want := range map[string]any{
		"i8": json.Number("9223372036854775807"), "num": json.Number("12345678901234567890.123456789012"),
		"num2": json.Number("1.500"), "b": true, "u": "6f1c2c8e-5d3a-4c8e-9b0a-3f5f6c7d8e9f", "dom": json.Number("7"),
		"arr": []any{json.Number("1"), nil, json.Number("3")}, "e": "happy", "Mixed Case": "mc", `quo"te`: json.Number("1"),
	} {
		if !reflect.DeepEqual(r1[k], want) {
			t.Errorf("r1[%q] = %#v, want %#v", k, r1[k], want)
		}
	}
	for k, want := range map[string]any{"num": "NaN", "num2": json.Number("0.000"), "b": false, "u": nil, "vc": "", "j": nil, "jb": "str"} {
		if v, ok := r2[k]; !ok || !reflect.DeepEqual(v, want) {
			t.Errorf("r2[%q] = %#v, want %#v", k, v, want)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	t.Run("NonUTF8Text", func(t *testing.T) {
		// A SQL_ASCII database stores bytes as given; decoding to_jsonb's
		// text made each invalid byte U+FFFD.
		pg.Exec(t, `CREATE DATABASE ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0`)
		pool := newPool(t, strings.Replace(pg.URL(), "/changefeed?", "/ascii?", 1), nil)
		for _, q := range []string{
			`CREATE TABLE bytes (id text PRIMARY KEY, v text, vc varchar)`,
			`INSERT INTO bytes VALUES ('a', E'ok\xff\xfe\xe2\x82 end', E'\xc3'), ('b', E'caf\xc3\xa9', 'plain')`,
		} {
			if _, err := pool.Exec(t.Context(), q); err != nil {
				t.Fatal(err)
			}
		}
		s, err := NewPostgres(pool, []PostgresTable{{Source: "bytes", Table: "bytes", IDColumn: "id"}})
		if err != nil {
			t.Fatal(err)
		}
		checkBodies(t, s, pool, "bytes", "bytes", "id")
	})
}

// TestPostgresColumnsChange: bodies follow the table's columns as they are
// at the fetch, as to_jsonb(row) does, without an error.
func TestPostgresColumnsChange(t *testing.T) {
	pg := testenv.Postgres(t)
	pool := newPool(t, pg.URL(), nil)
	pg.Exec(t, `CREATE TABLE evolving (id bigint PRIMARY KEY, a text, b int)`)
	pg.Exec(t, `INSERT INTO evolving VALUES (1, 'one', 1), (2, 'two', 2)`)
	s, err := NewPostgres(pool, []PostgresTable{{Source: "ev", Table: "evolving", IDColumn: "id"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, change := range []string{
		``,
		`ALTER TABLE evolving ADD COLUMN c jsonb DEFAULT '{"k": 1}'`,
		`ALTER TABLE evolving DROP COLUMN a`,
		`ALTER TABLE evolving RENAME COLUMN b TO bee`,
		`ALTER TABLE evolving ALTER COLUMN bee TYPE text`,
		`ALTER TABLE evolving ALTER COLUMN bee TYPE numeric USING bee::numeric / 4`,
		`ALTER TABLE evolving ADD COLUMN a text DEFAULT 'again'`,
		`ALTER TABLE evolving DROP COLUMN c, ADD COLUMN c boolean DEFAULT true`,
	} {
		if change != "" {
			pg.Exec(t, change)
		}
		checkBodies(t, s, pool, "ev", "evolving", "id")
	}
	// Dropped and created again, under another shape.
	pg.Exec(t, `DROP TABLE evolving`)
	pg.Exec(t, `CREATE TABLE evolving (x text, id text PRIMARY KEY)`)
	pg.Exec(t, `INSERT INTO evolving VALUES ('x1', '1')`)
	checkBodies(t, s, pool, "ev", "evolving", "id")
}
