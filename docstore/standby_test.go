package docstore

import (
	"errors"
	"testing"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/stub"
)

// A store whose server is a standby refuses to answer: a row missing there
// may be replication lag, and the tombstone the pillow would write for it
// would delete a live document from every sink. Before, a lagging replica's
// "not found" became a deletion.
//
// A real standby needs a second server fed by streaming replication; the
// test instead makes pg_is_in_recovery() answer true on a primary, with a
// function of that name in a schema searched before pg_catalog. The store
// must ask the server, and act on the answer, with a row found and with
// none.
func TestPostgresRefusesStandby(t *testing.T) {
	pg := testenv.Postgres(t)
	ctx := t.Context()
	pg.Exec(t, `CREATE TABLE cases (id text PRIMARY KEY, name text)`)
	pg.Exec(t, `INSERT INTO cases VALUES ('live', 'here')`)
	pg.Exec(t, `CREATE SCHEMA fake`)
	pg.Exec(t, `CREATE FUNCTION fake.pg_is_in_recovery() RETURNS boolean LANGUAGE sql AS 'SELECT true'`)
	pool := newPool(t, pg.URL()+"&search_path=fake,pg_catalog,public", nil)
	s, err := NewPostgres(pool, []PostgresTable{{Source: "cases", Table: "public.cases", IDColumn: "id"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, ids := range [][]string{{"live", "lagging"}, {"lagging"}} {
		var stubs []*stub.Stub
		for _, id := range ids {
			stubs = append(stubs, sqlStub("cases", id, 10, 1))
		}
		docs, err := s.Fetch(ctx, stubs)
		if !errors.Is(err, ErrStandby) || !errors.Is(err, doc.ErrTransient) {
			t.Fatalf("fetch %v from a standby: docs %v, err %v; want ErrStandby, transient", ids, docs, err)
		}
	}

	pg.Exec(t, `CREATE OR REPLACE FUNCTION fake.pg_is_in_recovery() RETURNS boolean LANGUAGE sql AS 'SELECT false'`)
	docs, err := s.Fetch(ctx, []*stub.Stub{sqlStub("cases", "live", 10, 1), sqlStub("cases", "gone", 10, 1)})
	if err != nil || len(docs) != 2 || docs[0].Deleted || !docs[1].Deleted {
		t.Fatalf("fetch from the primary: %v %v", docs, err)
	}
}
