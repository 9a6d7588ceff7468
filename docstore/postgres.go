package docstore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/stub"
)

// PostgresTable says where the documents of one data_source_name live: one
// row per document, the whole row becoming the body (to_jsonb(row)).
type PostgresTable struct {
	// Source is the stubs' data_source_name.
	Source string `yaml:"source"`
	// Table is "table" or "schema.table"; each part is quoted as an
	// identifier, so it is case-sensitive and must not itself contain a dot.
	Table string `yaml:"table"`
	// IDColumn holds the document id. It may be of any type whose text form
	// is the stubs' document_id (text, uuid, bigint, …); ids are cast to its
	// type so that its index serves the lookup.
	IDColumn string `yaml:"id_column"`
	// TypeColumn and DomainColumn, when set, give the document's type and
	// domain; otherwise the stub's are used.
	TypeColumn   string `yaml:"type_column"`
	DomainColumn string `yaml:"domain_column"`
	// DeletedColumn, when set, is a boolean column: a row where it is true is
	// a deleted document (a soft delete).
	DeletedColumn string `yaml:"deleted_column"`
}

// Postgres fetches SQL documents from configured tables, one query per table
// per batch.
type Postgres struct {
	pool   *pgxpool.Pool
	tables map[string]*pgTable
}

type pgTable struct {
	cfg   PostgresTable
	ident string // the table, quoted

	mu    sync.Mutex
	query string // built on first use, once the id column's type is known
}

// NewPostgres returns a store reading tables through pool. It checks the
// configuration only; tables are looked up on first use, so a store can be
// built before the application's migrations ran.
func NewPostgres(pool *pgxpool.Pool, tables []PostgresTable) (*Postgres, error) {
	if pool == nil {
		return nil, errors.New("docstore: postgres: pool is nil")
	}
	s := &Postgres{pool: pool, tables: make(map[string]*pgTable, len(tables))}
	for i, t := range tables {
		field := func(name string) string { return fmt.Sprintf("docstore: postgres: tables[%d].%s", i, name) }
		switch {
		case t.Source == "":
			return nil, fmt.Errorf("%s is empty", field("source"))
		case s.tables[t.Source] != nil:
			return nil, fmt.Errorf("%s: %q is configured twice", field("source"), t.Source)
		case t.IDColumn == "":
			return nil, fmt.Errorf("%s is empty", field("id_column"))
		}
		ident, err := parseTable(t.Table)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", field("table"), err)
		}
		s.tables[t.Source] = &pgTable{cfg: t, ident: ident.Sanitize()}
	}
	return s, nil
}

// parseTable splits "schema.table" into identifier parts.
func parseTable(s string) (pgx.Identifier, error) {
	if s == "" {
		return nil, errors.New("is empty")
	}
	parts := strings.Split(s, ".")
	if len(parts) > 2 {
		return nil, fmt.Errorf("%q: want table or schema.table", s)
	}
	for _, p := range parts {
		if p == "" || strings.ContainsRune(p, 0) {
			return nil, fmt.Errorf("%q: empty or invalid name part", s)
		}
	}
	return pgx.Identifier(parts), nil
}

// pgWant is one document the batch asks for.
type pgWant struct {
	id, source string
	stub       *stub.Stub // the stub of the highest version
	version    stub.SQLVersion
}

type pgRow struct {
	body        []byte
	typ, domain *string
	softDeleted bool
}

// Fetch returns one document per distinct (data_source_name, document id)
// among stubs, in order of first appearance. A missing row is a document
// with Deleted set. Version.SQL is the highest stub version of that document
// in the batch. Stubs that are not SQL stubs or name an unconfigured source
// are returned as doc.Errors alongside the other documents.
func (s *Postgres) Fetch(ctx context.Context, stubs []*stub.Stub) ([]*doc.Document, error) {
	var order []*pgWant
	byKey := make(map[string]*pgWant, len(stubs))
	for _, st := range stubs {
		key := st.DataSourceName + "\x00" + st.DocumentID
		w := byKey[key]
		if w == nil {
			w = &pgWant{id: st.DocumentID, source: st.DataSourceName, stub: st, version: st.SQLVersion()}
			byKey[key] = w
			order = append(order, w)
		} else if v := st.SQLVersion(); v.Compare(w.version) > 0 {
			w.stub, w.version = st, v
		}
	}

	failed := map[*pgWant]error{}
	var tables []*pgTable
	groups := map[*pgTable][]*pgWant{}
	for _, w := range order {
		t := s.tables[w.source]
		switch {
		case w.stub.DataSourceType != stub.SourceSQL:
			failed[w] = fmt.Errorf("docstore: postgres: stub of data_source_type %q", w.stub.DataSourceType)
			continue
		case t == nil:
			failed[w] = fmt.Errorf("docstore: postgres: no table configured for data_source_name %q", w.source)
			continue
		}
		if groups[t] == nil {
			tables = append(tables, t)
		}
		groups[t] = append(groups[t], w)
	}

	found := make(map[*pgWant]*pgRow, len(order))
	for _, t := range tables {
		ws := groups[t]
		ids := make([]string, len(ws))
		for i, w := range ws {
			ids[i] = w.id
		}
		rows, err := t.fetch(ctx, s.pool, ids)
		if pgDataError(err) {
			// An id the id column cannot hold (say "x" for a bigint)
			// fails the whole query: find it by asking one at a time.
			rows, err = t.fetchEach(ctx, s.pool, ws, failed)
		}
		if err != nil {
			return nil, err
		}
		for i, r := range rows {
			found[ws[i]] = r
		}
	}

	docs := make([]*doc.Document, 0, len(order))
	for _, w := range order {
		if failed[w] != nil {
			continue
		}
		d := &doc.Document{
			ID: w.id, Type: w.stub.DocumentType, Domain: w.stub.Domain,
			Source: stub.SourceSQL, SourceName: w.source,
			Version: doc.Version{SQL: w.version},
		}
		r := found[w]
		switch {
		case r == nil:
			d.Deleted = true
		default:
			if r.typ != nil && *r.typ != "" {
				d.Type = *r.typ
			}
			if r.domain != nil && *r.domain != "" {
				d.Domain = *r.domain
			}
			if r.softDeleted {
				d.Deleted = true
				break
			}
			body, err := decodeBody(r.body)
			if err != nil {
				failed[w] = fmt.Errorf("docstore: postgres: %s: %w", s.tables[w.source].cfg.Table, err)
				continue
			}
			d.Body = body
		}
		docs = append(docs, d)
	}
	if len(failed) > 0 {
		errs := make(doc.Errors, len(failed))
		for w, err := range failed {
			errs[w.id] = err
		}
		return docs, errs
	}
	return docs, nil
}

// fetch reads the rows of ids, keyed by the index in ids.
func (t *pgTable) fetch(ctx context.Context, pool *pgxpool.Pool, ids []string) (map[int]*pgRow, error) {
	q, err := t.prepare(ctx, pool)
	if err != nil {
		return nil, err
	}
	rows, err := pool.Query(ctx, q, ids)
	if err != nil {
		return nil, t.wrap(err)
	}
	out := make(map[int]*pgRow, len(ids))
	for rows.Next() {
		var ord int64
		r := &pgRow{}
		if err := rows.Scan(&ord, &r.body, &r.typ, &r.domain, &r.softDeleted); err != nil {
			rows.Close()
			return nil, t.wrap(err)
		}
		if i := int(ord) - 1; i >= 0 && i < len(ids) && out[i] == nil {
			out[i] = r // a non-unique id column: the first row wins
		}
	}
	if err := rows.Err(); err != nil {
		return nil, t.wrap(err)
	}
	return out, nil
}

// fetchEach is fetch one document at a time, recording those whose id
// PostgreSQL rejects in failed.
func (t *pgTable) fetchEach(ctx context.Context, pool *pgxpool.Pool, ws []*pgWant, failed map[*pgWant]error) (map[int]*pgRow, error) {
	out := make(map[int]*pgRow, len(ws))
	for i, w := range ws {
		rows, err := t.fetch(ctx, pool, []string{w.id})
		switch {
		case pgDataError(err):
			failed[w] = fmt.Errorf("id %q: %w", w.id, err)
		case err != nil:
			return nil, err
		case rows[0] != nil:
			out[i] = rows[0]
		}
	}
	return out, nil
}

func (t *pgTable) wrap(err error) error {
	if pgDataError(err) {
		return fmt.Errorf("docstore: postgres: %s: %w", t.cfg.Table, err)
	}
	return transient("docstore: postgres: "+t.cfg.Table, err)
}

// prepare builds the table's query once the id column's type is known.
func (t *pgTable) prepare(ctx context.Context, pool *pgxpool.Pool) (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.query != "" {
		return t.query, nil
	}
	c := t.cfg
	cols := []string{c.IDColumn}
	for _, n := range []string{c.TypeColumn, c.DomainColumn, c.DeletedColumn} {
		if n != "" {
			cols = append(cols, n)
		}
	}
	rows, err := pool.Query(ctx, `
		SELECT a.attname, format_type(a.atttypid, NULL)
		FROM pg_attribute a
		WHERE a.attrelid = to_regclass($1) AND a.attname = ANY($2) AND a.attnum > 0 AND NOT a.attisdropped`,
		t.ident, cols)
	if err != nil {
		return "", transient("docstore: postgres: look up "+c.Table, err)
	}
	types, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([2]string, error) {
		var nt [2]string
		err := r.Scan(&nt[0], &nt[1])
		return nt, err
	})
	if err != nil {
		return "", transient("docstore: postgres: look up "+c.Table, err)
	}
	typeOf := map[string]string{}
	for _, nt := range types {
		typeOf[nt[0]] = nt[1]
	}
	for _, n := range cols {
		if typeOf[n] == "" {
			// Not the documents' fault: the table may yet be created.
			return "", transient("docstore: postgres", fmt.Errorf("table %s has no column %q (or does not exist)", c.Table, n))
		}
	}
	col := func(name, cast, zero string) string {
		if name == "" {
			return zero
		}
		return "changefeed_row." + pgx.Identifier{name}.Sanitize() + "::" + cast
	}
	deleted := "false"
	if c.DeletedColumn != "" {
		deleted = "coalesce(" + col(c.DeletedColumn, "boolean", "") + ", false)"
	}
	// The join against the numbered ids maps each row back to the exact id
	// string asked for, whatever the id column's type; the cast of the ids
	// (not of the column) keeps the column's index usable.
	t.query = fmt.Sprintf(`SELECT changefeed_key.ord, to_jsonb(changefeed_row), %s, %s, %s
FROM unnest($1::text[]) WITH ORDINALITY AS changefeed_key(id, ord)
JOIN %s AS changefeed_row ON changefeed_row.%s = changefeed_key.id::%s`,
		col(c.TypeColumn, "text", "NULL::text"), col(c.DomainColumn, "text", "NULL::text"), deleted,
		t.ident, pgx.Identifier{c.IDColumn}.Sanitize(), typeOf[c.IDColumn])
	return t.query, nil
}

// decodeBody decodes a JSON object keeping numbers exact.
func decodeBody(b []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("decode body: %w", err)
	}
	return m, nil
}
