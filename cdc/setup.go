package cdc

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

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
		p.log.Info("tables added to publication", "publication", p.cfg.Publication, "tables", add)
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

type slotInfo struct {
	exists    bool
	plugin    string
	slotType  string
	database  string
	active    bool
	activePID *int32
	walStatus *string
	confirmed *string
}

func (p *Publisher) readSlot(ctx context.Context, db *pgx.Conn) (slotInfo, error) {
	var s slotInfo
	err := db.QueryRow(ctx, `
SELECT plugin::text, slot_type, database::text, active, active_pid, wal_status, confirmed_flush_lsn::text
FROM pg_replication_slots WHERE slot_name = $1`, p.cfg.Slot).
		Scan(&s.plugin, &s.slotType, &s.database, &s.active, &s.activePID, &s.walStatus, &s.confirmed)
	if errors.Is(err, pgx.ErrNoRows) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("read slot %s: %w", p.cfg.Slot, err)
	}
	s.exists = true
	return s, nil
}

func (p *Publisher) readCheckpoint(ctx context.Context, db *pgx.Conn) (stub.LSN, bool, error) {
	var lsn string
	err := db.QueryRow(ctx, "SELECT confirmed_lsn::text FROM changefeed.cdc_checkpoint WHERE slot_name = $1", p.cfg.Slot).Scan(&lsn)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, false, nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
		return 0, false, precondition("table changefeed.cdc_checkpoint does not exist: run `cdc-publisher migrate` or start without --no-migrate")
	}
	if err != nil {
		return 0, false, fmt.Errorf("read checkpoint: %w", err)
	}
	v, err := stub.ParseLSN(lsn)
	return v, true, err
}

func (p *Publisher) writeCheckpoint(ctx context.Context, db *pgx.Conn, lsn stub.LSN) error {
	_, err := db.Exec(ctx, `
INSERT INTO changefeed.cdc_checkpoint (slot_name, confirmed_lsn, updated_at) VALUES ($1, $2::text::pg_lsn, now())
ON CONFLICT (slot_name) DO UPDATE SET confirmed_lsn = EXCLUDED.confirmed_lsn, updated_at = now()`, p.cfg.Slot, lsn.String())
	if err != nil {
		return fmt.Errorf("write checkpoint %s: %w", lsn, err)
	}
	return nil
}

// prepareSlot reconciles the slot with the checkpoint and returns the LSN to
// start streaming from. It creates the slot on a first start, refuses a
// possible gap unless AllowNewSlot, and waits while the slot is active in
// another process.
func (p *Publisher) prepareSlot(ctx context.Context, db *pgx.Conn) (stub.LSN, error) {
	var waitStart, lastLog time.Time
	for {
		s, err := p.readSlot(ctx, db)
		if err != nil {
			return 0, err
		}
		ckpt, hasCkpt, err := p.readCheckpoint(ctx, db)
		if err != nil {
			return 0, err
		}
		if !s.exists {
			if hasCkpt && !p.cfg.AllowNewSlot {
				return 0, fmt.Errorf("%w: replication slot %s does not exist, but changefeed.cdc_checkpoint says changes up to %s were confirmed to it; "+
					"it was dropped or lost (failover?), so changes after %s may never be published. "+
					"Remedy: resync the consumers from the source tables, then start once with --allow-new-slot (CHANGEFEED_ALLOW_NEW_SLOT=true) to create a fresh slot",
					ErrPossibleGap, p.cfg.Slot, ckpt, ckpt)
			}
			return p.createSlot(ctx, db, ckpt, hasCkpt)
		}
		switch {
		case s.slotType != "logical":
			return 0, precondition("slot %s is a %s slot, not a logical one; choose another --slot", p.cfg.Slot, s.slotType)
		case s.plugin != "pgoutput":
			return 0, precondition("slot %s uses the output plugin %q, not pgoutput; choose another --slot or drop it", p.cfg.Slot, s.plugin)
		case s.walStatus != nil && *s.walStatus == "lost":
			return 0, precondition("slot %s has wal_status lost: PostgreSQL removed WAL it still needed (max_slot_wal_keep_size?), changes are missing. "+
				"Remedy: drop the slot (SELECT pg_drop_replication_slot('%s')), resync consumers, start with --allow-new-slot", p.cfg.Slot, p.cfg.Slot)
		}
		var dbName string
		if err := db.QueryRow(ctx, "SELECT current_database()").Scan(&dbName); err != nil {
			return 0, fmt.Errorf("read database name: %w", err)
		}
		if s.database != dbName {
			return 0, precondition("slot %s belongs to database %q, not %q; choose another --slot", p.cfg.Slot, s.database, dbName)
		}
		if s.active {
			if p.cfg.SlotWaitTimeout < 0 {
				return 0, fmt.Errorf("%w: slot %s is streamed by process %d (another cdc-publisher?)", ErrSlotBusy, p.cfg.Slot, deref(s.activePID))
			}
			now := time.Now()
			if waitStart.IsZero() {
				waitStart = now
				p.state.Store(int32(StateWaitingForSlot))
			}
			if p.cfg.SlotWaitTimeout > 0 && now.Sub(waitStart) > p.cfg.SlotWaitTimeout {
				return 0, fmt.Errorf("%w: slot %s is still streamed by process %d after %s", ErrSlotBusy, p.cfg.Slot, deref(s.activePID), p.cfg.SlotWaitTimeout)
			}
			if now.Sub(lastLog) >= 10*time.Second {
				lastLog = now
				p.log.Warn("replication slot is active in another process (another cdc-publisher?); waiting for it to be released, confirming nothing meanwhile",
					"slot", p.cfg.Slot, "active_pid", deref(s.activePID), "waiting", now.Sub(waitStart).Round(time.Second))
			}
			if !sleep(ctx, 500*time.Millisecond) {
				return 0, ctx.Err()
			}
			continue
		}
		slotLSN, err := stub.ParseLSN(deref(s.confirmed))
		if err != nil {
			return 0, fmt.Errorf("slot %s confirmed_flush_lsn: %w", p.cfg.Slot, err)
		}
		switch {
		case !hasCkpt:
			// A slot created by an operator, or a crash between creating the
			// slot and writing the checkpoint: adopt the slot's position.
			if err := p.writeCheckpoint(ctx, db, slotLSN); err != nil {
				return 0, err
			}
			p.log.Info("adopting existing slot", "slot", p.cfg.Slot, "confirmed_flush_lsn", slotLSN)
			return slotLSN, nil
		case slotLSN > ckpt:
			if !p.cfg.AllowNewSlot {
				return 0, fmt.Errorf("%w: slot %s has confirmed_flush_lsn %s, ahead of the checkpoint %s in changefeed.cdc_checkpoint: "+
					"something other than this publisher confirmed changes between %s and %s, which may never have been published. "+
					"Remedy: resync the consumers, then start once with --allow-new-slot (CHANGEFEED_ALLOW_NEW_SLOT=true) to accept the slot's position",
					ErrPossibleGap, p.cfg.Slot, slotLSN, ckpt, ckpt, slotLSN)
			}
			p.log.Warn("accepting a slot ahead of the checkpoint (--allow-new-slot): changes in between may be missing",
				"slot", p.cfg.Slot, "checkpoint", ckpt, "confirmed_flush_lsn", slotLSN)
			if err := p.writeCheckpoint(ctx, db, slotLSN); err != nil {
				return 0, err
			}
			return slotLSN, nil
		default:
			// The checkpoint is written before the slot is confirmed, so it
			// may be ahead; everything up to it was acknowledged by Kafka.
			start := max(slotLSN, ckpt)
			p.log.Info("resuming slot", "slot", p.cfg.Slot, "confirmed_flush_lsn", slotLSN, "checkpoint", ckpt, "start", start)
			return start, nil
		}
	}
}

func (p *Publisher) createSlot(ctx context.Context, db *pgx.Conn, ckpt stub.LSN, hasCkpt bool) (stub.LSN, error) {
	var lsnText string
	err := db.QueryRow(ctx, "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", p.cfg.Slot).Scan(&lsnText)
	if err != nil {
		return 0, fmt.Errorf("create replication slot %s: %w", p.cfg.Slot, err)
	}
	lsn, err := stub.ParseLSN(lsnText)
	if err != nil {
		return 0, err
	}
	if err := p.writeCheckpoint(ctx, db, lsn); err != nil {
		return 0, err
	}
	if hasCkpt {
		p.log.Warn("created a fresh replication slot although a checkpoint existed (--allow-new-slot): changes between the checkpoint and the new slot may be missing",
			"slot", p.cfg.Slot, "checkpoint", ckpt, "new_slot_lsn", lsn)
	} else {
		p.log.Info("replication slot created", "slot", p.cfg.Slot, "lsn", lsn)
	}
	return lsn, nil
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
