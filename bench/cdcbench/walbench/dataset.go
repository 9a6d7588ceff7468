// Package walbench generates a replayable stretch of write-ahead log and
// measures the floor of logical decoding over it.
//
// A dataset is a table, a publication, a base logical slot (pgoutput) created
// before the table's changes were written, and the LSN range of those changes.
// The base slot is never streamed: every measured run streams a copy of it
// (pg_copy_logical_replication_slot), so every run — the floor, the
// publisher, another tool run side by side — decodes exactly the same WAL.
// The base slot holds that WAL on disk until the dataset is dropped.
//
// The range is (StartLSN, EndLSN]: StartLSN is the base slot's
// confirmed_flush_lsn; EndLSN is taken inside the dataset's last transaction,
// just before its COMMIT, so the first commit at or after EndLSN is the
// dataset's last one, and a slot whose confirmed_flush_lsn reaches EndLSN has
// confirmed every change of the dataset.
package walbench

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
)

// metaTable records prepared datasets so that later runs (and other tools)
// find their slot and range.
const metaTable = "cdcbench_datasets"

// Dataset is a prepared, replayable stretch of WAL.
type Dataset struct {
	Name        string
	Table       string
	Publication string
	// Slot is the base slot. Stream copies of it, never the slot itself.
	Slot string
	// StartLSN is the base slot's confirmed_flush_lsn: decoding starts after it.
	StartLSN pglogrepl.LSN
	// EndLSN lies inside the last transaction, before its commit record.
	EndLSN pglogrepl.LSN
	// LastCommitEnd is the end of the last transaction's commit record, known
	// once a floor run has seen it (0 until then). A publisher that confirmed
	// it has confirmed the whole dataset.
	LastCommitEnd pglogrepl.LSN
	Changes       int64 // row changes (inserts + updates + deletes)
	Txs           int64
	TxRows        int // rows per transaction; Changes for a single transaction
}

// WALBytes is the size of the WAL the dataset spans.
func (d Dataset) WALBytes() int64 {
	end := d.LastCommitEnd
	if end == 0 {
		end = d.EndLSN
	}
	return int64(end) - int64(d.StartLSN)
}

// GenOptions shape the generated changes.
type GenOptions struct {
	// Name is the dataset name, [a-z0-9_]; it names the table, the
	// publication and the base slot (cdcbench_<name>).
	Name string
	// Changes is the number of row changes to write.
	Changes int
	// TxRows is the number of row changes per transaction. 0 or >= Changes
	// writes a single transaction.
	TxRows int
	// UpdatePct and DeletePct are the shares (0-100) of updates and deletes
	// in each transaction; the rest are inserts.
	UpdatePct, DeletePct int
	// PayloadBytes pads each row's JSON column, to make rows look like
	// application rows rather than bare keys.
	PayloadBytes int
	// Progress, if set, is called after each committed transaction.
	Progress func(changes int64)
}

var nameRE = regexp.MustCompile(`^[a-z0-9_]{1,40}$`)

// Names returns the table, publication and base slot names of a dataset.
func Names(name string) (table, publication, slot string) {
	return "cdcbench_" + name, "cdcbench_" + name, "cdcbench_base_" + name
}

// Prepare creates the dataset's table, publication and base slot, then writes
// its changes. A dataset of the same name must not exist (see Drop).
func Prepare(ctx context.Context, conn *pgx.Conn, o GenOptions) (Dataset, error) {
	if !nameRE.MatchString(o.Name) {
		return Dataset{}, fmt.Errorf("dataset name %q: want ^[a-z0-9_]{1,40}$", o.Name)
	}
	if o.Changes <= 0 {
		return Dataset{}, errors.New("changes must be positive")
	}
	if o.TxRows <= 0 || o.TxRows > o.Changes {
		o.TxRows = o.Changes
	}
	if o.UpdatePct < 0 || o.DeletePct < 0 || o.UpdatePct+o.DeletePct > 90 {
		return Dataset{}, errors.New("update and delete shares must be >= 0 and leave at least 10% inserts")
	}
	if err := ensureMeta(ctx, conn); err != nil {
		return Dataset{}, err
	}
	table, pub, slot := Names(o.Name)
	d := Dataset{Name: o.Name, Table: table, Publication: pub, Slot: slot, TxRows: o.TxRows}
	qt := pgx.Identifier{table}.Sanitize()

	// The table and publication must exist before the slot's start point:
	// pgoutput reads them from the catalog as of each change.
	if _, err := conn.Exec(ctx, `CREATE TABLE `+qt+` (
		id text PRIMARY KEY,
		domain text NOT NULL,
		type text NOT NULL,
		owner_id text NOT NULL,
		name text,
		closed boolean NOT NULL DEFAULT false,
		deleted boolean NOT NULL DEFAULT false,
		modified_on timestamptz NOT NULL,
		server_modified_on timestamptz NOT NULL DEFAULT now(),
		case_json jsonb NOT NULL)`); err != nil {
		return Dataset{}, fmt.Errorf("create table %s: %w", table, err)
	}
	if _, err := conn.Exec(ctx, `CREATE PUBLICATION `+pgx.Identifier{pub}.Sanitize()+` FOR TABLE `+qt); err != nil {
		return Dataset{}, fmt.Errorf("create publication %s: %w", pub, err)
	}
	var start string
	if err := conn.QueryRow(ctx, `SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')`, slot).Scan(&start); err != nil {
		return Dataset{}, fmt.Errorf("create slot %s: %w", slot, err)
	}
	var err error
	if d.StartLSN, err = pglogrepl.ParseLSN(start); err != nil {
		return Dataset{}, err
	}

	ins := `INSERT INTO ` + qt + ` (id, domain, type, owner_id, name, modified_on, case_json)
		SELECT 'case-' || lpad(g::text, 12, '0'), 'domain-' || (g % 50), 'type-' || (g % 7), md5(g::text),
		       'name ' || g, now(), jsonb_build_object('n', g, 'pad', repeat('x', $3::int))
		FROM generate_series($1::bigint, $2::bigint) g`
	upd := `UPDATE ` + qt + ` SET name = name || '.', closed = NOT closed, modified_on = now()
		WHERE id = ANY (ARRAY(SELECT 'case-' || lpad(g::text, 12, '0') FROM generate_series($1::bigint, $2::bigint) g))`
	del := `DELETE FROM ` + qt + `
		WHERE id = ANY (ARRAY(SELECT 'case-' || lpad(g::text, 12, '0') FROM generate_series($1::bigint, $2::bigint) g))`

	var inserted, deleted int64 // rows 1..inserted exist except 1..deleted
	for written := 0; written < o.Changes; {
		rows := min(o.TxRows, o.Changes-written)
		nUpd, nDel := rows*o.UpdatePct/100, rows*o.DeletePct/100
		live := inserted - deleted
		nUpd = int(min(int64(nUpd), live))
		nDel = int(min(int64(nDel), live-int64(nUpd)))
		nIns := rows - nUpd - nDel
		last := written+rows == o.Changes

		tx, err := conn.Begin(ctx)
		if err != nil {
			return Dataset{}, err
		}
		if nIns > 0 {
			if err := execN(ctx, tx, int64(nIns), ins, inserted+1, inserted+int64(nIns), o.PayloadBytes); err != nil {
				return Dataset{}, err
			}
			inserted += int64(nIns)
		}
		if nUpd > 0 {
			// A block of live rows chosen from the transaction number, so
			// updates spread over the table without touching a row twice.
			live := inserted - deleted
			off := deleted + 1 + (d.Txs*7919)%max(live-int64(nUpd)+1, 1)
			if err := execN(ctx, tx, int64(nUpd), upd, off, off+int64(nUpd)-1); err != nil {
				return Dataset{}, err
			}
		}
		if nDel > 0 {
			if err := execN(ctx, tx, int64(nDel), del, deleted+1, deleted+int64(nDel)); err != nil {
				return Dataset{}, err
			}
			deleted += int64(nDel)
		}
		if last {
			var end string
			if err := tx.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&end); err != nil {
				return Dataset{}, err
			}
			if d.EndLSN, err = pglogrepl.ParseLSN(end); err != nil {
				return Dataset{}, err
			}
		}
		if err := tx.Commit(ctx); err != nil {
			return Dataset{}, fmt.Errorf("commit: %w", err)
		}
		written += rows
		d.Txs++
		d.Changes += int64(rows)
		if o.Progress != nil {
			o.Progress(d.Changes)
		}
	}

	if _, err := conn.Exec(ctx, `INSERT INTO `+metaTable+`
		(name, tbl, publication, slot, start_lsn, end_lsn, changes, txs, tx_rows)
		VALUES ($1, $2, $3, $4, $5::pg_lsn, $6::pg_lsn, $7, $8, $9)`,
		d.Name, d.Table, d.Publication, d.Slot, d.StartLSN.String(), d.EndLSN.String(), d.Changes, d.Txs, d.TxRows); err != nil {
		return Dataset{}, fmt.Errorf("record dataset: %w", err)
	}
	return d, nil
}

func execN(ctx context.Context, tx pgx.Tx, want int64, sql string, args ...any) error {
	tag, err := tx.Exec(ctx, sql, args...)
	if err != nil {
		return err
	}
	if tag.RowsAffected() != want {
		return fmt.Errorf("%s: %d rows, want %d", strings.Fields(sql)[0], tag.RowsAffected(), want)
	}
	return nil
}

func ensureMeta(ctx context.Context, conn *pgx.Conn) error {
	_, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+metaTable+` (
		name text PRIMARY KEY,
		tbl text NOT NULL,
		publication text NOT NULL,
		slot text NOT NULL,
		start_lsn pg_lsn NOT NULL,
		end_lsn pg_lsn NOT NULL,
		last_commit_end pg_lsn,
		changes bigint NOT NULL,
		txs bigint NOT NULL,
		tx_rows integer NOT NULL,
		created_at timestamptz NOT NULL DEFAULT now())`)
	if err != nil {
		return fmt.Errorf("create %s: %w", metaTable, err)
	}
	return nil
}

// ErrNoDataset is returned by Load for a dataset that was never prepared.
var ErrNoDataset = errors.New("dataset not prepared")

// Load reads a prepared dataset and checks that its base slot still exists.
func Load(ctx context.Context, conn *pgx.Conn, name string) (Dataset, error) {
	if err := ensureMeta(ctx, conn); err != nil {
		return Dataset{}, err
	}
	d := Dataset{Name: name}
	var start, end, lastEnd string
	err := conn.QueryRow(ctx, `SELECT tbl, publication, slot, start_lsn::text, end_lsn::text,
		coalesce(last_commit_end::text, '0/0'), changes, txs, tx_rows FROM `+metaTable+` WHERE name = $1`, name).
		Scan(&d.Table, &d.Publication, &d.Slot, &start, &end, &lastEnd, &d.Changes, &d.Txs, &d.TxRows)
	if errors.Is(err, pgx.ErrNoRows) {
		return Dataset{}, fmt.Errorf("%w: %s", ErrNoDataset, name)
	}
	if err != nil {
		return Dataset{}, fmt.Errorf("load dataset %s: %w", name, err)
	}
	if d.StartLSN, err = pglogrepl.ParseLSN(start); err != nil {
		return Dataset{}, err
	}
	if d.EndLSN, err = pglogrepl.ParseLSN(end); err != nil {
		return Dataset{}, err
	}
	if d.LastCommitEnd, err = pglogrepl.ParseLSN(lastEnd); err != nil {
		return Dataset{}, err
	}
	var ok bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)`, d.Slot).Scan(&ok); err != nil {
		return Dataset{}, err
	}
	if !ok {
		return Dataset{}, fmt.Errorf("dataset %s: base slot %s is missing; drop and prepare again", name, d.Slot)
	}
	return d, nil
}

// RecordLastCommitEnd stores the end of the dataset's last commit record.
func RecordLastCommitEnd(ctx context.Context, conn *pgx.Conn, name string, lsn pglogrepl.LSN) error {
	_, err := conn.Exec(ctx, `UPDATE `+metaTable+` SET last_commit_end = $2::pg_lsn WHERE name = $1`, name, lsn.String())
	return err
}

// Drop removes a dataset: its slots (base and leftover copies), publication,
// table and record. Missing pieces are skipped.
func Drop(ctx context.Context, conn *pgx.Conn, name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("dataset name %q: want ^[a-z0-9_]{1,40}$", name)
	}
	if err := ensureMeta(ctx, conn); err != nil {
		return err
	}
	table, pub, slot := Names(name)
	if _, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
		WHERE slot_name = $1 OR slot_name LIKE $2`, slot, CopyPrefix(name)+"%"); err != nil {
		return fmt.Errorf("drop slots: %w", err)
	}
	for _, sql := range []string{
		`DROP PUBLICATION IF EXISTS ` + pgx.Identifier{pub}.Sanitize(),
		`DROP TABLE IF EXISTS ` + pgx.Identifier{table}.Sanitize(),
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			return err
		}
	}
	_, err := conn.Exec(ctx, `DELETE FROM `+metaTable+` WHERE name = $1`, name)
	return err
}

// CopyPrefix is the prefix of the slots CopySlot names for a dataset.
func CopyPrefix(name string) string { return "cdcbench_run_" + name + "_" }

// CopySlot copies the dataset's base slot to a new persistent slot named
// CopyPrefix(name)+suffix and returns its name. The copy starts where the
// base slot does, so streaming it replays the whole dataset.
func CopySlot(ctx context.Context, conn *pgx.Conn, d Dataset, suffix string) (string, error) {
	dst := CopyPrefix(d.Name) + suffix
	if len(dst) > 63 {
		return "", fmt.Errorf("slot name %s is longer than 63 bytes", dst)
	}
	if _, err := conn.Exec(ctx, `SELECT pg_copy_logical_replication_slot($1, $2, false)`, d.Slot, dst); err != nil {
		return "", fmt.Errorf("copy slot %s to %s: %w", d.Slot, dst, err)
	}
	return dst, nil
}

// DropSlot drops a slot, waiting up to 10 s for a consumer to release it.
func DropSlot(ctx context.Context, conn *pgx.Conn, slot string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		var active *bool
		err := conn.QueryRow(ctx, `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&active)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return err
		}
		if active != nil && !*active {
			_, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, slot)
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("slot %s still active after 10s", slot)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
