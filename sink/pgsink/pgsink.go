// Package pgsink writes documents into a PostgreSQL reporting table: one row
// per document, a configured column per body field. It is the sink every
// delivery guarantee of the pillows is proven on.
//
// The table (created by Bootstrap, or beforehand by a migration with the same
// shape):
//
//	doc_id           text PRIMARY KEY
//	<columns>        as configured
//	deleted          boolean NOT NULL   -- a tombstone: the columns are NULL
//	version_lsn      pg_lsn             -- SQL documents: commit LSN …
//	version_ordinal  bigint             -- … and ordinal in the transaction
//	version_rev      text               -- Couch documents: the revision …
//	version_rev_path text[]             -- … and its known path, leaf first
//	updated_at       timestamptz NOT NULL
//
// and a view <table>_live (same schema) with the rows that are not deleted:
// readers should use the view, or filter NOT deleted themselves.
//
// Guarantees: a batch is one INSERT … ON CONFLICT (doc_id) DO UPDATE …
// WHERE statement over arrays, so it is atomic and costs one round trip. A
// row is replaced only when the write is newer (see package sink): for SQL
// documents (version_lsn, version_ordinal) < the write's; for Couch documents
// the write's revision is not on the stored path. A deletion writes a
// tombstone row with its version, so a late older write cannot revive it; a
// newer write replaces the tombstone. Concurrent writers are safe: the
// condition is evaluated against the row as locked by the upsert, so the
// newest version wins whatever the commit order.
//
// Not guaranteed: a Couch revision unrelated to the stored one always
// replaces it (it is taken to be the database's current winner), so a slow
// writer holding a revision fetched before a conflict was resolved can
// overwrite the resolution; the next change of the document repairs it.
package pgsink

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/internal/pgclass"
	"github.com/changefeed/changefeed/internal/pgident"
	"github.com/changefeed/changefeed/sink"
)

// Column maps one body field to one column.
type Column struct {
	// Name of the column (quoted: case-sensitive).
	Name string `yaml:"name"`
	// Field is a dotted path in the document body ("form.case.owner_id"; a
	// numeric segment indexes an array). Empty means Name. A missing field
	// is NULL.
	Field string `yaml:"field"`
	// Type is one of text, integer, bigint, numeric, boolean, timestamptz,
	// jsonb. A value that cannot be converted is that document's error.
	Type string `yaml:"type"`
}

// Config says which table to write and how.
type Config struct {
	// Table is "table" or "schema.table" (quoted parts; the schema must
	// exist).
	Table   string   `yaml:"table"`
	Columns []Column `yaml:"columns"`
}

// reserved are the columns the sink itself keeps.
var reserved = []string{"doc_id", "deleted", "version_lsn", "version_ordinal", "version_rev", "version_rev_path", "updated_at"}

// Sink is a reporting-table sink. It is safe for concurrent use, and several
// Sinks (processes) may write one table.
type Sink struct {
	pool     *pgxpool.Pool
	cfg      Config
	log      *slog.Logger
	table    string // quoted
	view     string // quoted
	paths    [][]string
	convert  []func(any) (string, error)
	upsert   string
	nameText string
}

// New checks cfg and returns a sink writing through pool. Errors name the
// offending field. log may be nil.
func New(pool *pgxpool.Pool, cfg Config, log *slog.Logger) (*Sink, error) {
	if pool == nil {
		return nil, errors.New("pgsink: pool is nil")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ident, err := pgident.ParseTable(cfg.Table)
	if err != nil {
		return nil, fmt.Errorf("pgsink: table: %w", err)
	}
	view := slices.Clone(ident)
	view[len(view)-1] += "_live"
	s := &Sink{pool: pool, cfg: cfg, log: log, table: ident.Sanitize(), view: view.Sanitize(), nameText: "pgsink:" + cfg.Table}
	seen := map[string]bool{}
	for i, c := range cfg.Columns {
		field := func(f string) string { return fmt.Sprintf("pgsink: %s: columns[%d].%s", cfg.Table, i, f) }
		switch {
		case c.Name == "":
			return nil, fmt.Errorf("%s is empty", field("name"))
		case strings.ContainsRune(c.Name, 0):
			return nil, fmt.Errorf("%s: invalid name", field("name"))
		case slices.Contains(reserved, c.Name):
			return nil, fmt.Errorf("%s: %q is reserved by the sink (reserved: %s)", field("name"), c.Name, strings.Join(reserved, ", "))
		case seen[c.Name]:
			return nil, fmt.Errorf("%s: %q is configured twice", field("name"), c.Name)
		}
		seen[c.Name] = true
		conv, ok := columnTypes[c.Type]
		if !ok {
			return nil, fmt.Errorf("%s: %q is not one of text, integer, bigint, numeric, boolean, timestamptz, jsonb", field("type"), c.Type)
		}
		f := c.Field
		if f == "" {
			f = c.Name
		}
		path := strings.Split(f, ".")
		if slices.Contains(path, "") {
			return nil, fmt.Errorf("%s: %q has an empty path segment", field("field"), c.Field)
		}
		s.paths = append(s.paths, path)
		s.convert = append(s.convert, conv)
	}
	s.upsert = s.buildUpsert()
	return s, nil
}

func quote(name string) string { return pgx.Identifier{name}.Sanitize() }

// buildUpsert writes the batch statement: one array parameter per column,
// zipped by unnest, every value sent as text and cast by PostgreSQL.
func (s *Sink) buildUpsert() string {
	n := len(s.cfg.Columns)
	cols := []string{"doc_id"}
	sel := []string{"u.doc_id"}
	args := []string{"$1::text[]"}
	alias := []string{"doc_id"}
	set := []string{}
	for i, c := range s.cfg.Columns {
		a := "c" + strconv.Itoa(i+1)
		cols = append(cols, quote(c.Name))
		sel = append(sel, "u."+a+"::"+c.Type)
		args = append(args, "$"+strconv.Itoa(i+2)+"::text[]")
		alias = append(alias, a)
		set = append(set, quote(c.Name)+" = excluded."+quote(c.Name))
	}
	p := func(k int) string { return "$" + strconv.Itoa(n+1+k) }
	cols = append(cols, "deleted", "version_lsn", "version_ordinal", "version_rev", "version_rev_path", "updated_at")
	sel = append(sel, "u.deleted", "u.lsn::pg_lsn", "u.ord", "u.rev", "u.path::text[]", "now()")
	args = append(args, p(1)+"::boolean[]", p(2)+"::text[]", p(3)+"::bigint[]", p(4)+"::text[]", p(5)+"::text[]")
	alias = append(alias, "deleted", "lsn", "ord", "rev", "path")
	for _, c := range []string{"deleted", "version_lsn", "version_ordinal", "version_rev", "version_rev_path", "updated_at"} {
		set = append(set, c+" = excluded."+c)
	}
	// A NULL version_rev marks a SQL version. Mixed kinds (a row written
	// under the other kind) are always replaced.
	return fmt.Sprintf(`INSERT INTO %s AS t (%s)
SELECT %s
FROM unnest(%s) AS u(%s)
ON CONFLICT (doc_id) DO UPDATE SET %s
WHERE CASE WHEN excluded.version_rev IS NULL
	THEN t.version_lsn IS NULL OR (t.version_lsn, t.version_ordinal) < (excluded.version_lsn, excluded.version_ordinal)
	ELSE t.version_rev_path IS NULL OR NOT (excluded.version_rev = ANY (t.version_rev_path))
END`,
		s.table, strings.Join(cols, ", "), strings.Join(sel, ", "), strings.Join(args, ", "),
		strings.Join(alias, ", "), strings.Join(set, ", "))
}

// Name is "pgsink:<table>".
func (s *Sink) Name() string { return s.nameText }

// Bootstrap creates the table if it does not exist and the <table>_live view,
// and checks that an existing table has the configured columns with their
// types and a unique doc_id. Concurrent Bootstraps of one table are
// serialised by an advisory lock. A connection failure wraps
// doc.ErrTransient; a table of another shape is a plain error naming the
// column.
func (s *Sink) Bootstrap(ctx context.Context) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return s.transient("bootstrap", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit it is a no-op
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`, "changefeed/pgsink/"+s.table); err != nil {
		return s.transient("bootstrap", err)
	}
	defs := []string{"doc_id text PRIMARY KEY"}
	for _, c := range s.cfg.Columns {
		defs = append(defs, quote(c.Name)+" "+c.Type)
	}
	defs = append(defs,
		"deleted boolean NOT NULL DEFAULT false",
		"version_lsn pg_lsn", "version_ordinal bigint",
		"version_rev text", "version_rev_path text[]",
		"updated_at timestamptz NOT NULL DEFAULT now()")
	if _, err := tx.Exec(ctx, fmt.Sprintf("CREATE TABLE IF NOT EXISTS %s (\n\t%s\n)", s.table, strings.Join(defs, ",\n\t"))); err != nil {
		return s.bootstrapErr(err)
	}
	if err := s.checkShape(ctx, tx); err != nil {
		return err
	}
	cols := []string{"doc_id"}
	for _, c := range s.cfg.Columns {
		cols = append(cols, quote(c.Name))
	}
	cols = append(cols, "updated_at")
	if _, err := tx.Exec(ctx, fmt.Sprintf("CREATE OR REPLACE VIEW %s AS SELECT %s FROM %s WHERE NOT deleted",
		s.view, strings.Join(cols, ", "), s.table)); err != nil {
		return s.bootstrapErr(err)
	}
	if err := tx.Commit(ctx); err != nil {
		return s.transient("bootstrap", err)
	}
	return nil
}

// checkShape compares an existing table with the configuration.
func (s *Sink) checkShape(ctx context.Context, tx pgx.Tx) error {
	rows, err := tx.Query(ctx, `
		SELECT a.attname, format_type(a.atttypid, NULL)
		FROM pg_attribute a
		WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped`, s.table)
	if err != nil {
		return s.transient("bootstrap", err)
	}
	have := map[string]string{}
	var name, typ string
	if _, err := pgx.ForEachRow(rows, []any{&name, &typ}, func() error { have[name] = typ; return nil }); err != nil {
		return s.transient("bootstrap", err)
	}
	want := [][2]string{{"doc_id", "text"}}
	for _, c := range s.cfg.Columns {
		want = append(want, [2]string{c.Name, pgTypeName[c.Type]})
	}
	want = append(want, [][2]string{
		{"deleted", "boolean"}, {"version_lsn", "pg_lsn"}, {"version_ordinal", "bigint"},
		{"version_rev", "text"}, {"version_rev_path", "text[]"}, {"updated_at", "timestamp with time zone"},
	}...)
	for _, w := range want {
		switch got, ok := have[w[0]]; {
		case !ok:
			return fmt.Errorf("pgsink: table %s exists without column %q (%s)", s.cfg.Table, w[0], w[1])
		case got != w[1]:
			return fmt.Errorf("pgsink: table %s: column %q is %s, want %s", s.cfg.Table, w[0], got, w[1])
		}
	}
	var unique bool
	err = tx.QueryRow(ctx, `
		SELECT EXISTS (
			SELECT 1 FROM pg_index i
			JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
			WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnkeyatts = 1
			  AND i.indpred IS NULL AND a.attname = 'doc_id')`, s.table).Scan(&unique)
	if err != nil {
		return s.transient("bootstrap", err)
	}
	if !unique {
		return fmt.Errorf("pgsink: table %s: doc_id has no unique index (ON CONFLICT needs one)", s.cfg.Table)
	}
	return nil
}

func (s *Sink) bootstrapErr(err error) error {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return fmt.Errorf("pgsink: %s: bootstrap: %w", s.cfg.Table, err)
	}
	return s.transient("bootstrap", err)
}

// row is one document as statement parameters. Its pointers point into
// the batch's backing arrays (see Write), not at values of their own.
type row struct {
	id      string
	vals    []*string
	deleted bool
	lsn     *string
	ord     *int64
	rev     *string
	path    *string
}

// rowBuf holds the values of a batch's rows: one allocation per kind for
// the whole batch rather than several per document.
type rowBuf struct {
	vals []*string // len(docs) × columns
	text []string  // converted values and SQL versions
	ords []int64
}

func newRowBuf(docs, cols int) *rowBuf {
	return &rowBuf{
		vals: make([]*string, docs*cols),
		text: make([]string, 0, docs*(cols+1)),
		ords: make([]int64, 0, docs),
	}
}

// str stores v and returns a pointer to it. Pointers stay valid: text
// never grows beyond the capacity it was made with (newRowBuf counts one
// string per column and one per version); past it a new array is started.
func (b *rowBuf) str(v string) *string {
	if len(b.text) == cap(b.text) {
		b.text = make([]string, 0, max(16, cap(b.text)))
	}
	b.text = append(b.text, v)
	return &b.text[len(b.text)-1]
}

func (b *rowBuf) ord(v int64) *int64 {
	if len(b.ords) == cap(b.ords) {
		b.ords = make([]int64, 0, max(16, cap(b.ords)))
	}
	b.ords = append(b.ords, v)
	return &b.ords[len(b.ords)-1]
}

func (s *Sink) row(d *doc.Document, buf *rowBuf) (row, error) {
	n := len(s.paths)
	var vals []*string
	if len(buf.vals) >= n {
		vals, buf.vals = buf.vals[:n:n], buf.vals[n:]
	} else {
		vals = make([]*string, n)
	}
	r := row{id: d.ID, deleted: d.Deleted, vals: vals}
	if sink.IsCouch(d) {
		r.rev = buf.str(d.Version.Rev.String())
		r.path = buf.str(arrayLiteral(sink.RevPath(d.Version)))
	} else {
		r.lsn = buf.str(d.Version.SQL.CommitLSN.String())
		r.ord = buf.ord(int64(d.Version.SQL.Ordinal))
	}
	if d.Deleted {
		return r, nil
	}
	for i, p := range s.paths {
		v, ok := lookup(d.Body, p)
		if !ok || v == nil {
			continue
		}
		text, err := s.convert[i](v)
		if err != nil {
			clear(r.vals)
			return row{}, fmt.Errorf("pgsink: %s: column %q (field %q): %w", s.cfg.Table, s.cfg.Columns[i].Name, strings.Join(p, "."), err)
		}
		r.vals[i] = buf.str(text)
	}
	return r, nil
}

// arrayLiteral writes a PostgreSQL text[] literal, every element quoted.
func arrayLiteral(elems []string) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, e := range elems {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('"')
		for _, r := range e {
			if r == '"' || r == '\\' {
				b.WriteByte('\\')
			}
			b.WriteRune(r)
		}
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

// Write upserts docs in one statement. It returns nil (every document written
// or refused as not newer), an error wrapping doc.ErrTransient (nothing is
// known to be written; retry the batch), or doc.Errors (PostgreSQL rejected
// the listed documents themselves: a value a column cannot take, an id too
// long for the primary key; all others were written or refused).
func (s *Sink) Write(ctx context.Context, docs []*doc.Document) error {
	if len(docs) == 0 {
		return nil
	}
	docs = sink.Newest(docs)
	errs := doc.Errors{}
	rows := make([]row, 0, len(docs))
	buf := newRowBuf(len(docs), len(s.paths))
	for _, d := range docs {
		if strings.ContainsRune(d.ID, 0) {
			errs[d.ID] = fmt.Errorf("pgsink: %s: document id contains a NUL character", s.cfg.Table)
			continue
		}
		r, err := s.row(d, buf)
		if err != nil {
			errs[d.ID] = err
			continue
		}
		rows = append(rows, r)
	}
	// One lock order for every writer: concurrent batches sharing documents
	// wait for each other instead of deadlocking.
	slices.SortFunc(rows, func(a, b row) int { return strings.Compare(a.id, b.id) })

	written, err := s.write(ctx, rows, errs)
	if err != nil {
		return s.transient("write", err)
	}
	s.log.Debug("pgsink: batch written", "table", s.cfg.Table, "documents", len(rows),
		"written", written, "refused_not_newer", int64(len(rows))-written, "errors", len(errs))
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// exec runs the upsert for rows and returns how many rows it changed.
func (s *Sink) exec(ctx context.Context, rows []row) (int64, error) {
	if len(rows) == 0 {
		return 0, nil
	}
	n := len(s.paths)
	m := len(rows)
	// The arrays are passed as pgtype.FlatArray so that pgx encodes them
	// without reflection; the bytes sent are the same.
	ids := make([]string, m)
	all := make([]*string, (n+3)*m) // the columns, then lsn, rev, path
	col := func(i int) []*string { return all[i*m : (i+1)*m : (i+1)*m] }
	deleted := make([]bool, m)
	ord := make([]*int64, m)
	lsn, rev, path := col(n), col(n+1), col(n+2)
	for j, r := range rows {
		ids[j] = r.id
		for i, v := range r.vals {
			all[i*m+j] = v
		}
		deleted[j], lsn[j], ord[j], rev[j], path[j] = r.deleted, r.lsn, r.ord, r.rev, r.path
	}
	args := make([]any, 0, n+6)
	args = append(args, ids)
	for i := range n {
		args = append(args, pgtype.FlatArray[*string](col(i)))
	}
	args = append(args, deleted, pgtype.FlatArray[*string](lsn), pgtype.FlatArray[*int64](ord),
		pgtype.FlatArray[*string](rev), pgtype.FlatArray[*string](path))
	tag, err := s.pool.Exec(ctx, s.upsert, args...)
	if err != nil {
		return 0, err
	}
	return tag.RowsAffected(), nil
}

// write upserts rows. When PostgreSQL rejects the statement because of its
// input (see package pgclass: a value a column cannot take, a constraint, an
// id too long for the primary key's index — SQLSTATE 22, 23, 54, …), it
// splits the rows in halves and writes each, down to the single rows at
// fault, which go to errs: k bad rows among n cost about 2·k·log2(n)
// statements, and every other row is written. Each statement commits on
// its own; rewriting a row already written is a no-op. A failure of the
// server is returned as is.
func (s *Sink) write(ctx context.Context, rows []row, errs doc.Errors) (int64, error) {
	n, err := s.exec(ctx, rows)
	switch {
	case err == nil:
		return n, nil
	case !pgclass.Input(err) || ctx.Err() != nil:
		return 0, err
	case len(rows) == 1:
		errs[rows[0].id] = fmt.Errorf("pgsink: %s: %w", s.cfg.Table, err)
		return 0, nil
	}
	mid := len(rows) / 2
	a, err := s.write(ctx, rows[:mid], errs)
	if err != nil {
		return 0, err
	}
	b, err := s.write(ctx, rows[mid:], errs)
	return a + b, err
}

// transient wraps every failure that is no document's fault (package
// pgclass): connection lost or refused, timeouts, the server shutting down
// or out of resources, and also a table that is missing or not writable —
// the batch waits for it to be fixed rather than filling the error table.
func (s *Sink) transient(op string, err error) error {
	return fmt.Errorf("%w: pgsink: %s: %s: %w", doc.ErrTransient, s.cfg.Table, op, err)
}
