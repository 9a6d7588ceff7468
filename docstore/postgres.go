package docstore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/internal/pgident"
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

	mu   sync.Mutex
	plan *pgPlan // built on first use; rebuilt when the table's columns change
}

// pgPlan is how a table's documents are read: the query, and how each of
// its body columns turns into a body value.
type pgPlan struct {
	query string
	relid uint32 // the table's oid
	sig   string // its columns, in sigExpr's form, when the query was built
	cols  []pgCol
}

// pgCol is one column of the table, a field of the body.
type pgCol struct {
	name string
	kind colKind
}

// colKind says how a column is read. The body must be what to_jsonb(row)
// gives (a JSON object of to_jsonb of each column), decoded with
// json.Number: the common column types are sent as their text form and
// turned into that value in Go, which is far cheaper for PostgreSQL and for
// the pillow than building, printing and parsing jsonb; every other type is
// sent as to_jsonb(column) and decoded, so its JSON form is PostgreSQL's
// own.
type colKind uint8

const (
	// kindString: text, varchar and uuid, whose to_jsonb is a JSON string
	// of their text form.
	kindString colKind = iota
	// kindInteger: smallint, integer, bigint, a JSON number of their text
	// form.
	kindInteger
	// kindNumeric: a JSON number of its text form, except NaN and
	// ±Infinity, which to_jsonb makes strings.
	kindNumeric
	// kindBool: a JSON boolean.
	kindBool
	// kindJSONB: jsonb, whose to_jsonb is itself: sent as its text and
	// decoded.
	kindJSONB
	// kindJSON: anything else, sent as to_jsonb(column) and decoded.
	kindJSON
)

// kindOf maps the built-in types read natively (by oid: a domain over one
// of them has its own oid and goes through to_jsonb, as do arrays,
// floating point, dates and times, json, composite, bpchar and enums).
func kindOf(typ uint32) colKind {
	switch typ {
	case 25, 1043, 2950: // text, varchar, uuid
		return kindString
	case 20, 21, 23: // int8, int2, int4
		return kindInteger
	case 1700: // numeric
		return kindNumeric
	case 16: // bool
		return kindBool
	case 3802: // jsonb
		return kindJSONB
	}
	return kindJSON
}

// sigExpr is a signature of a table's columns (names, types, order), over
// pg_attribute rows aliased a. The fetch query compares it with the one
// seen when the query was built, so that a column added, dropped, renamed
// or retyped since rebuilds the query: bodies always hold the columns the
// row has, as to_jsonb(row) would.
const sigExpr = `coalesce(string_agg(octet_length(a.attname::text)::text || ':' || a.attname::text || ':' || a.atttypid::text, ',' ORDER BY a.attnum), '')`

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
		ident, err := pgident.ParseTable(t.Table)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", field("table"), err)
		}
		s.tables[t.Source] = &pgTable{cfg: t, ident: ident.Sanitize()}
	}
	return s, nil
}

// pgWant is one document the batch asks for.
type pgWant struct {
	id, source string
	stub       *stub.Stub // the stub of the highest version
	version    stub.SQLVersion
}

type pgRow struct {
	body        map[string]any
	bodyErr     error // the body could not be decoded
	typ, domain *string
	softDeleted bool
	rowVersion  string // xmin: the transaction that wrote the row read
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
			d.Version.Row = r.rowVersion
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
			if r.bodyErr != nil {
				failed[w] = fmt.Errorf("docstore: postgres: %s: %w", s.tables[w.source].cfg.Table, r.bodyErr)
				continue
			}
			d.Body = r.body
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
	for attempt := 1; ; attempt++ {
		p, err := t.prepare(ctx, pool)
		if err != nil {
			return nil, err
		}
		out, current, err := t.read(ctx, pool, p, ids)
		if err == nil && current && len(ids) > 0 && len(out) == 0 {
			// Missing rows become tombstones: make sure the server is
			// not a standby, which no returned row has told.
			err = checkPrimary(ctx, pool)
		}
		if errors.Is(err, ErrStandby) {
			return nil, transient("docstore: postgres: "+t.cfg.Table, err)
		}
		if err == nil && current {
			return out, nil
		}
		if pgDataError(err) {
			return nil, t.wrap(err) // an id's fault, not the query's
		}
		// The table changed since the query was built (columns added,
		// dropped, renamed or retyped), or the query failed for another
		// reason: build it again, from the table as it is now.
		t.invalidate(p)
		var pe *pgconn.PgError
		schemaErr := errors.As(err, &pe) && (strings.HasPrefix(pe.Code, "42") || strings.HasPrefix(pe.Code, "0A"))
		switch {
		case err != nil && !schemaErr:
			return nil, t.wrap(err)
		case attempt == 3 && err != nil:
			return nil, t.wrap(err)
		case attempt == 3:
			return nil, transient("docstore: postgres", fmt.Errorf("table %s: its columns keep changing", t.cfg.Table))
		}
	}
}

// read runs p's query. current is false when the table's columns are no
// longer those p was built for (the rows are then to be discarded).
func (t *pgTable) read(ctx context.Context, pool *pgxpool.Pool, p *pgPlan, ids []string) (out map[int]*pgRow, current bool, err error) {
	rows, err := pool.Query(ctx, p.query, ids, p.relid, p.sig)
	if err != nil {
		return nil, false, err
	}
	defer rows.Close()
	out = make(map[int]*pgRow, len(ids))
	const fixed = 7 // ord, type, domain, deleted, current, row version, standby
	var (
		ord                     int64
		typ, domain, rowVersion *string
		softDeleted, standby    bool
	)
	current = true
	dest := make([]any, fixed+len(p.cols))
	dest[0], dest[1], dest[2], dest[3], dest[4], dest[5], dest[6] = &ord, &typ, &domain, &softDeleted, &current, &rowVersion, &standby
	for rows.Next() {
		typ, domain, rowVersion = nil, nil, nil
		if err := rows.Scan(dest...); err != nil {
			return nil, false, err
		}
		if !current {
			return nil, false, nil
		}
		if standby {
			return nil, false, ErrStandby
		}
		i := int(ord) - 1
		if i < 0 || i >= len(ids) || out[i] != nil {
			continue // a non-unique id column: the first row wins
		}
		r := &pgRow{typ: typ, domain: domain, softDeleted: softDeleted}
		if rowVersion != nil {
			r.rowVersion = *rowVersion
		}
		if !softDeleted {
			r.body, r.bodyErr = decodeRow(p.cols, rows.RawValues()[fixed:])
		}
		out[i] = r
	}
	if err := rows.Err(); err != nil {
		return nil, false, err
	}
	return out, current, nil
}

// ErrStandby means the store's server is a standby (pg_is_in_recovery): a
// row missing there may be replication lag rather than a deletion, and a
// tombstone written for it would delete a live document from the sinks. The
// store refuses to read from a standby (wrapped in doc.ErrTransient: the
// batch waits, nothing is skipped); point it at the primary.
var ErrStandby = errors.New("the server is a standby (pg_is_in_recovery() is true): a missing row may be replication lag, not a deletion; point the document store at the primary")

// checkPrimary returns ErrStandby when the server is a standby.
func checkPrimary(ctx context.Context, pool *pgxpool.Pool) error {
	var standby bool
	if err := pool.QueryRow(ctx, `SELECT pg_is_in_recovery()`).Scan(&standby); err != nil {
		return err
	}
	if standby {
		return ErrStandby
	}
	return nil
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

// invalidate drops p, if it is still the table's plan, so that the next
// fetch builds the query again.
func (t *pgTable) invalidate(p *pgPlan) {
	t.mu.Lock()
	if t.plan == p {
		t.plan = nil
	}
	t.mu.Unlock()
}

// prepare builds the table's query once its columns are known.
func (t *pgTable) prepare(ctx context.Context, pool *pgxpool.Pool) (*pgPlan, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.plan != nil {
		return t.plan, nil
	}
	c := t.cfg
	// One statement, so that the columns and their signature agree.
	rows, err := pool.Query(ctx, `
		WITH a AS (
			SELECT a.attrelid, a.attnum, a.attname, a.atttypid
			FROM pg_attribute a
			WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped)
		SELECT a.attrelid::oid, a.attname::text, a.atttypid::oid, format_type(a.atttypid, NULL),
			(SELECT `+sigExpr+` FROM a),
			(SELECT c.relkind::text FROM pg_class c WHERE c.oid = a.attrelid)
		FROM a ORDER BY a.attnum`,
		t.ident)
	if err != nil {
		return nil, transient("docstore: postgres: look up "+c.Table, err)
	}
	type column struct {
		relid, typ                   uint32
		name, typeName, sig, relkind string
	}
	cols, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (column, error) {
		var c column
		err := r.Scan(&c.relid, &c.name, &c.typ, &c.typeName, &c.sig, &c.relkind)
		return c, err
	})
	if err != nil {
		return nil, transient("docstore: postgres: look up "+c.Table, err)
	}
	p := &pgPlan{}
	typeOf := map[string]string{}
	var exprs []string
	// xmin names the row version read (the transaction that wrote it); a
	// view or foreign table has none.
	rowVersion := "NULL::text"
	for _, col := range cols {
		switch col.relkind {
		case "r", "p", "m":
			rowVersion = "changefeed_row.xmin::text"
		}
		p.relid, p.sig = col.relid, col.sig
		typeOf[col.name] = col.typeName
		k := kindOf(col.typ)
		p.cols = append(p.cols, pgCol{name: col.name, kind: k})
		ref := "changefeed_row." + pgx.Identifier{col.name}.Sanitize()
		if k == kindJSON {
			exprs = append(exprs, "to_jsonb("+ref+")::text")
		} else {
			exprs = append(exprs, ref+"::text")
		}
	}
	for _, n := range []string{c.IDColumn, c.TypeColumn, c.DomainColumn, c.DeletedColumn} {
		if n != "" && typeOf[n] == "" {
			// Not the documents' fault: the table may yet be created.
			return nil, transient("docstore: postgres", fmt.Errorf("table %s has no column %q (or does not exist)", c.Table, n))
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
	// (not of the column) keeps the column's index usable. The subquery
	// (run once per query) says whether the table still has the columns
	// the query was built for.
	p.query = fmt.Sprintf(`SELECT changefeed_key.ord, %s, %s, %s,
	(SELECT %s FROM pg_attribute a WHERE a.attrelid = $2::oid AND a.attnum > 0 AND NOT a.attisdropped) = $3,
	%s,
	pg_is_in_recovery(),
	%s
FROM unnest($1::text[]) WITH ORDINALITY AS changefeed_key(id, ord)
JOIN %s AS changefeed_row ON changefeed_row.%s = changefeed_key.id::%s`,
		col(c.TypeColumn, "text", "NULL::text"), col(c.DomainColumn, "text", "NULL::text"), deleted,
		sigExpr, rowVersion, strings.Join(exprs, ",\n\t"),
		t.ident, pgx.Identifier{c.IDColumn}.Sanitize(), typeOf[c.IDColumn])
	t.plan = p
	return p, nil
}

// decodeRow builds a body from the text of its columns (nil: NULL), as
// to_jsonb(row) decoded with json.Number would have it.
func decodeRow(cols []pgCol, vals [][]byte) (map[string]any, error) {
	body := make(map[string]any, len(cols))
	for i, c := range cols {
		v := vals[i]
		if v == nil {
			body[c.name] = nil
			continue
		}
		switch c.kind {
		case kindString:
			body[c.name] = jsonString(v)
		case kindInteger:
			body[c.name] = json.Number(v)
		case kindNumeric:
			if bytes.ContainsAny(v, "Nn") { // NaN, Infinity, -Infinity
				body[c.name] = string(v)
			} else {
				body[c.name] = json.Number(v)
			}
		case kindBool:
			body[c.name] = len(v) > 0 && v[0] == 't'
		default:
			x, err := decodeValue(v)
			if err != nil {
				return nil, fmt.Errorf("decode body: column %q: %w", c.name, err)
			}
			body[c.name] = x
		}
	}
	return body, nil
}

// jsonString is the string encoding/json decodes from the JSON string
// to_jsonb makes of text b: b itself, except that each byte that is not
// valid UTF-8 (a SQL_ASCII database can hold such text) becomes U+FFFD.
func jsonString(b []byte) string {
	if utf8.Valid(b) {
		return string(b)
	}
	var sb strings.Builder
	for len(b) > 0 {
		r, n := utf8.DecodeRune(b)
		if r == utf8.RuneError && n == 1 {
			sb.WriteRune(utf8.RuneError)
		} else {
			sb.Write(b[:n])
		}
		b = b[n:]
	}
	return sb.String()
}

// decodeValue decodes one JSON value keeping numbers exact.
func decodeValue(b []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	return v, nil
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
