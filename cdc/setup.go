package cdc

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/changefeed/changefeed/stub"
)

func precondition(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrPrecondition, fmt.Sprintf(format, args...))
}

// checkServer runs the start-up checks that need no slot: wal_level, the
// REPLICATION attribute, and every routed table (exists, has a replica
// identity carrying its document id, has the routed columns).
func (p *Publisher) checkServer(ctx context.Context, db *pgx.Conn) error {
	var walLevel string
	if err := db.QueryRow(ctx, "SELECT current_setting('wal_level')").Scan(&walLevel); err != nil {
		return fmt.Errorf("read wal_level: %w", err)
	}
	if walLevel != "logical" {
		return precondition("wal_level is %q; logical replication needs wal_level = logical (set it in postgresql.conf and restart PostgreSQL)", walLevel)
	}
	var user string
	var repl, super bool
	if err := db.QueryRow(ctx, "SELECT current_user, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&user, &repl, &super); err != nil {
		return fmt.Errorf("read role attributes: %w", err)
	}
	if !repl && !super {
		return precondition("role %q lacks the REPLICATION attribute needed to stream a slot; run: ALTER ROLE %s WITH REPLICATION",
			user, pgx.Identifier{user}.Sanitize())
	}
	for i := range p.cfg.Routing.Tables {
		if err := p.checkTable(ctx, db, &p.cfg.Routing.Tables[i]); err != nil {
			return err
		}
	}
	return nil
}

func (p *Publisher) checkTable(ctx context.Context, db *pgx.Conn, t *TableRoute) error {
	file := p.cfg.Routing.File
	quoted := pgx.Identifier{t.Schema, t.Name}.Sanitize()
	var (
		oid      *uint32
		kind     string
		ident    string
		cols     []string
		identity []string
	)
	err := db.QueryRow(ctx, `
SELECT c.oid, c.relkind::text, c.relreplident::text,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       ARRAY(SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = c.oid
               AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident)))
FROM pg_class c WHERE c.oid = to_regclass($1)`, quoted).Scan(&oid, &kind, &ident, &cols, &identity)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && oid == nil) {
		return precondition("routing file %s: table %s: field table: the table does not exist", file, t.QualifiedName())
	}
	if err != nil {
		return fmt.Errorf("inspect table %s: %w", t.QualifiedName(), err)
	}
	if kind != "r" && kind != "p" {
		return precondition("routing file %s: table %s: field table: not a table (relkind %s)", file, t.QualifiedName(), kind)
	}
	for _, fc := range t.columns() {
		if !slices.Contains(cols, fc.column) {
			return precondition("routing file %s: table %s: field %s: column %q does not exist", file, t.QualifiedName(), fc.field, fc.column)
		}
	}
	switch {
	case ident == "n":
		return precondition("table %s has REPLICA IDENTITY NOTHING: once published, its UPDATEs and DELETEs would fail; run ALTER TABLE %s REPLICA IDENTITY DEFAULT (with a primary key) or FULL",
			t.QualifiedName(), quoted)
	case ident == "d" && len(identity) == 0:
		return precondition("table %s has no primary key: once published, its UPDATEs and DELETEs would fail; add a primary key or run ALTER TABLE %s REPLICA IDENTITY FULL",
			t.QualifiedName(), quoted)
	case ident == "i" && len(identity) == 0:
		return precondition("table %s has REPLICA IDENTITY USING INDEX but the index was not found", t.QualifiedName())
	case ident == "f":
		identity = cols
	}
	idCol := t.docIDColumn()
	if !slices.Contains(identity, idCol) {
		field := "id_column"
		what := "the document id"
		if t.IsChild() {
			field, what = "parent.id_column", "the parent document id"
		}
		return precondition("routing file %s: table %s: field %s: column %q (%s) is not in the table's replica identity (%s), so a DELETE would not carry it; run ALTER TABLE %s REPLICA IDENTITY FULL",
			file, t.QualifiedName(), field, idCol, what, strings.Join(identity, ", "), quoted)
	}
	// A DELETE carries only the replica identity. Without the type column a
	// deletion stub would carry the wrong document_type and could land on
	// another topic than the document's other stubs: its consumers would
	// never see the deletion.
	if tc := t.DocumentTypeColumn; tc != "" && !slices.Contains(identity, tc) {
		return precondition("routing file %s: table %s: field document_type_column: column %q is not in the table's replica identity (%s), so a DELETE would not carry the document type and its stub would be misrouted; run ALTER TABLE %s REPLICA IDENTITY FULL",
			file, t.QualifiedName(), tc, strings.Join(identity, ", "), quoted)
	}
	if kind == "p" {
		if err := checkPartitionIdentities(ctx, db, file, t); err != nil {
			return err
		}
	}
	var missing []string
	for _, fc := range t.columns() {
		if !slices.Contains(identity, fc.column) && fc.field != "deletion.column" {
			missing = append(missing, fc.column)
		}
	}
	if len(missing) > 0 && !t.IsChild() {
		p.log.Info("deletion stubs will lack columns outside the replica identity (REPLICA IDENTITY FULL would carry them)",
			"table", t.QualifiedName(), "columns", missing)
	}
	return nil
}

// ensurePublication creates the publication with the routed tables when it
// is missing, and adds routed tables it lacks. It never removes tables.
func (p *Publisher) ensurePublication(ctx context.Context, db *pgx.Conn) error {
	pub := pgx.Identifier{p.cfg.Publication}.Sanitize()
	var tables []string
	for i := range p.cfg.Routing.Tables {
		t := &p.cfg.Routing.Tables[i]
		tables = append(tables, pgx.Identifier{t.Schema, t.Name}.Sanitize())
	}
	var ins, upd, del, trunc, all bool
	err := db.QueryRow(ctx, "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, puballtables FROM pg_publication WHERE pubname = $1",
		p.cfg.Publication).Scan(&ins, &upd, &del, &trunc, &all)
	if errors.Is(err, pgx.ErrNoRows) {
		sql := "CREATE PUBLICATION " + pub
		if len(tables) > 0 {
			sql += " FOR TABLE " + strings.Join(tables, ", ")
		}
		sql += " WITH (publish = 'insert, update, delete, truncate', publish_via_partition_root = true)"
		if _, err := db.Exec(ctx, sql); err != nil {
			return fmt.Errorf("create publication %s: %w (the role must own the tables, or create the publication beforehand)", p.cfg.Publication, err)
		}
		p.log.Info("publication created", "publication", p.cfg.Publication, "tables", len(tables))
		// Go on with the checks below (a routed partition is refused).
		ins, upd, del, trunc, all, err = true, true, true, true, false, nil
	}
	if err != nil {
		return fmt.Errorf("read publication %s: %w", p.cfg.Publication, err)
	}
	if !ins || !upd || !del {
		return precondition("publication %s does not publish every insert, update and delete; run ALTER PUBLICATION %s SET (publish = 'insert, update, delete, truncate')",
			p.cfg.Publication, pub)
	}
	if !trunc {
		p.log.Warn("publication does not publish TRUNCATE: a TRUNCATE of a published table will go unnoticed", "publication", p.cfg.Publication)
	}
	var viaRoot bool
	if err := db.QueryRow(ctx, "SELECT pubviaroot FROM pg_publication WHERE pubname = $1", p.cfg.Publication).Scan(&viaRoot); err != nil {
		return fmt.Errorf("read publication %s: %w", p.cfg.Publication, err)
	}
	// Membership is read from pg_publication_rel and pg_publication_namespace,
	// not pg_publication_tables: with publish_via_partition_root = false that
	// view lists a partitioned table's partitions instead of the table, and
	// adding the table again would fail (42710) on every start.
	rows, err := db.Query(ctx, `
SELECT t.i::int, c.relkind::text, c.relispartition,
       COALESCE((SELECT rn.nspname || '.' || rc.relname FROM pg_class rc JOIN pg_namespace rn ON rn.oid = rc.relnamespace
                 WHERE rc.oid = pg_partition_root(c.oid)), ''),
       EXISTS (SELECT 1 FROM pg_publication_rel pr WHERE pr.prpubid = p.oid AND pr.prrelid = c.oid)
         OR EXISTS (SELECT 1 FROM pg_publication_namespace pn WHERE pn.pnpubid = p.oid AND pn.pnnspid = c.relnamespace),
       EXISTS (SELECT 1 FROM pg_publication_rel pr WHERE pr.prpubid = p.oid AND pr.prrelid = c.oid AND pr.prqual IS NOT NULL)
FROM pg_publication p, unnest($2::text[]) WITH ORDINALITY AS t(name, i)
JOIN pg_class c ON c.oid = to_regclass(t.name)
WHERE p.pubname = $1`, p.cfg.Publication, tables)
	if err != nil {
		return fmt.Errorf("read publication %s tables: %w", p.cfg.Publication, err)
	}
	covered := make([]bool, len(tables))
	var partitioned []string
	for rows.Next() {
		var (
			i                             int
			kind, root                    string
			isPartition, member, filtered bool
		)
		if err := rows.Scan(&i, &kind, &isPartition, &root, &member, &filtered); err != nil {
			return fmt.Errorf("read publication %s tables: %w", p.cfg.Publication, err)
		}
		t := &p.cfg.Routing.Tables[i-1]
		covered[i-1] = member || all
		if filtered {
			return precondition("publication %s has a row filter on %s: filtered rows would never be published; remove the WHERE clause", p.cfg.Publication, t.QualifiedName())
		}
		if isPartition && viaRoot {
			// Its changes are published as changes of the root, which the
			// routing would not recognise.
			return precondition("routing file %s: table %s: field table: it is a partition of %s, and publication %s publishes partitions as their root (publish_via_partition_root = true); route %s instead",
				p.cfg.Routing.File, t.QualifiedName(), root, p.cfg.Publication, root)
		}
		if kind == "p" {
			partitioned = append(partitioned, t.QualifiedName())
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read publication %s tables: %w", p.cfg.Publication, err)
	}
	if all {
		// The checkpoint table is then published too: each checkpoint write
		// is decoded and confirmed, so the slot never goes idle. Harmless,
		// but worth a dedicated publication.
		p.log.Warn("publication is FOR ALL TABLES: changefeed's own checkpoint writes are decoded as well; prefer a publication of the routed tables (let the publisher create it)",
			"publication", p.cfg.Publication)
	}
	var add []string
	for i := range p.cfg.Routing.Tables {
		if !covered[i] {
			add = append(add, tables[i])
		}
	}
	if len(add) > 0 {
		if _, err := db.Exec(ctx, "ALTER PUBLICATION "+pub+" ADD TABLE "+strings.Join(add, ", ")); err != nil {
			if isTransient(err) {
				return fmt.Errorf("add tables to publication %s: %w", p.cfg.Publication, err)
			}
			return precondition("publication %s does not publish the routed tables %s and adding them failed: %v; run ALTER PUBLICATION %s ADD TABLE %s as the tables' owner",
				p.cfg.Publication, strings.Join(add, ", "), err, pub, strings.Join(add, ", "))
		}
		// PostgreSQL decodes a table's changes only from the moment it is in
		// the publication: rows written before were never published.
		p.log.Warn("tables added to publication: rows written to them before now were never published; backfill them unless the tables are new (a table recreated or swapped in while the publisher ran is one to backfill)",
			"publication", p.cfg.Publication, "tables", add)
	} else {
		p.log.Info("existing publication covers the routed tables", "publication", p.cfg.Publication,
			"publish_via_partition_root", viaRoot, "tables", len(p.cfg.Routing.Tables))
	}
	if !viaRoot && len(partitioned) > 0 {
		p.log.Warn("publication publishes partitions under their own names (publish_via_partition_root = false): their changes are routed by their root table as the catalog names it when the partition is first seen; ALTER PUBLICATION … SET (publish_via_partition_root = true) routes them by the WAL's own catalog",
			"publication", p.cfg.Publication, "tables", partitioned)
	}
	return nil
}

func (p *Publisher) startReplication(ctx context.Context, conn *pgconn.PgConn, start stub.LSN) error {
	// Names are validated against ^[a-z0-9_]{1,63}$, so they are safe in
	// the command (the replication protocol takes no parameters).
	err := pglogrepl.StartReplication(ctx, conn, p.cfg.Slot, pglogrepl.LSN(start), pglogrepl.StartReplicationOptions{
		Mode: pglogrepl.LogicalReplication,
		PluginArgs: []string{
			"proto_version '1'",
			"publication_names '" + p.cfg.Publication + "'",
			"messages 'true'",
		},
	})
	if err != nil {
		return fmt.Errorf("start replication on slot %s at %s: %w", p.cfg.Slot, start, err)
	}
	return nil
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}
