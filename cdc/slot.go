package cdc

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/changefeed/changefeed/stub"
)

// cluster is the identity of the server's WAL history, from
// IDENTIFY_SYSTEM: an LSN means something only together with it.
type cluster struct {
	systemID string
	timeline int32
}

func identifySystem(ctx context.Context, repl *pgconn.PgConn) (cluster, error) {
	r, err := pglogrepl.IdentifySystem(ctx, repl)
	if err != nil {
		return cluster{}, fmt.Errorf("identify system: %w", err)
	}
	return cluster{systemID: r.SystemID, timeline: r.Timeline}, nil
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

// checkpoint is a row of changefeed.cdc_checkpoint. systemID and timeline
// are nil in a row written before they were recorded.
type checkpoint struct {
	lsn      stub.LSN
	systemID *string
	timeline *int32
}

func (p *Publisher) readCheckpoint(ctx context.Context, db *pgx.Conn) (checkpoint, bool, error) {
	var ck checkpoint
	var lsn string
	err := db.QueryRow(ctx, "SELECT confirmed_lsn::text, system_identifier::text, timeline FROM changefeed.cdc_checkpoint WHERE slot_name = $1", p.cfg.Slot).
		Scan(&lsn, &ck.systemID, &ck.timeline)
	if errors.Is(err, pgx.ErrNoRows) {
		return ck, false, nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && (pgErr.Code == "42P01" || pgErr.Code == "42703") {
		return ck, false, precondition("table changefeed.cdc_checkpoint does not exist or is out of date: run `cdc-publisher migrate` or start without --no-migrate")
	}
	if err != nil {
		return ck, false, fmt.Errorf("read checkpoint: %w", err)
	}
	ck.lsn, err = stub.ParseLSN(lsn)
	return ck, true, err
}

// writeCheckpoint records lsn as confirmed, with the cluster and timeline
// it belongs to. The connection commits it durably even where the server
// runs with synchronous_commit = off (see Publisher.session): a checkpoint
// lost in a crash while the slot kept its position would look like a gap.
func (p *Publisher) writeCheckpoint(ctx context.Context, db *pgx.Conn, lsn stub.LSN) error {
	_, err := db.Exec(ctx, `
INSERT INTO changefeed.cdc_checkpoint (slot_name, confirmed_lsn, system_identifier, timeline, updated_at)
VALUES ($1, $2::text::pg_lsn, $3::text::numeric, $4, now())
ON CONFLICT (slot_name) DO UPDATE SET confirmed_lsn = EXCLUDED.confirmed_lsn, system_identifier = EXCLUDED.system_identifier,
    timeline = EXCLUDED.timeline, updated_at = now()`, p.cfg.Slot, lsn.String(), p.cluster.systemID, p.cluster.timeline)
	if err != nil {
		return fmt.Errorf("write checkpoint %s: %w", lsn, err)
	}
	return nil
}

// gapError is the refusal to start over a possible gap: it says why, and
// names the one --allow-new-slot value that accepts this gap (and no other).
func (p *Publisher) gapError(ckpt stub.LSN, format string, args ...any) error {
	accept := GapAcceptance{Slot: p.cfg.Slot, Checkpoint: ckpt}
	msg := fmt.Sprintf(format, args...)
	given := ""
	if a := p.cfg.AllowNewSlot; !a.IsZero() && a != accept {
		given = fmt.Sprintf(" (the given --allow-new-slot=%s names another gap, so it does not apply)", a)
	}
	return fmt.Errorf("%w: %s. Remedy: backfill the consumers from the source tables (changes after checkpoint %s may never have been published), "+
		"then start once with --allow-new-slot=%s (CHANGEFEED_ALLOW_NEW_SLOT) to accept exactly this gap; remove it afterwards: a later start refuses it%s",
		ErrPossibleGap, msg, ckpt, accept, given)
}

// accepts reports whether the configured acceptance names the gap at the
// checkpoint ckpt, and marks it used.
func (p *Publisher) accepts(ckpt stub.LSN) bool {
	if p.cfg.AllowNewSlot != (GapAcceptance{Slot: p.cfg.Slot, Checkpoint: ckpt}) {
		return false
	}
	p.gapAccepted = true
	return true
}

// unneededAcceptance refuses an --allow-new-slot that no gap needs: left in
// the environment, it would accept a future gap without anyone looking.
// Once it has accepted its gap, later sessions of this process ignore it.
func (p *Publisher) unneededAcceptance(ckpt stub.LSN, hasCkpt bool) error {
	if p.cfg.AllowNewSlot.IsZero() || p.gapAccepted {
		return nil
	}
	at := "no checkpoint"
	if hasCkpt {
		at = "checkpoint " + ckpt.String()
	}
	return fmt.Errorf("%w: --allow-new-slot=%s is set but slot %s has no gap to accept (%s, slot consistent with it): "+
		"it was meant for one start only (already used?); remove it (CHANGEFEED_ALLOW_NEW_SLOT)", ErrConfig, p.cfg.AllowNewSlot, p.cfg.Slot, at)
}

// historyGap checks that the checkpoint belongs to this server's WAL
// history. It returns a reason to refuse ("" when the checkpoint holds).
func (p *Publisher) historyGap(ctx context.Context, db *pgx.Conn, ck checkpoint) (string, error) {
	if ck.systemID != nil && *ck.systemID != p.cluster.systemID {
		return fmt.Sprintf("changefeed.cdc_checkpoint for slot %s was written on another PostgreSQL cluster (system identifier %s; this server's is %s): "+
			"the database was restored from or moved to another server, and the checkpoint's LSN %s means nothing in this server's WAL",
			p.cfg.Slot, *ck.systemID, p.cluster.systemID, ck.lsn), nil
	}
	var cur string
	if err := db.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&cur); err != nil {
		return "", fmt.Errorf("read pg_current_wal_lsn: %w", err)
	}
	curLSN, err := stub.ParseLSN(cur)
	if err != nil {
		return "", err
	}
	if ck.lsn > curLSN {
		return fmt.Sprintf("the checkpoint %s of slot %s is ahead of this server's WAL (pg_current_wal_lsn %s): "+
			"the server was restored from a backup, or failed over to one with a shorter history, and resuming there would skip changes",
			ck.lsn, p.cfg.Slot, curLSN), nil
	}
	switch {
	case ck.systemID == nil:
		p.log.Info("checkpoint predates recording its cluster: recording this server's system identifier and timeline (the checkpoint is within this server's WAL)",
			"slot", p.cfg.Slot, "checkpoint", ck.lsn, "system_identifier", p.cluster.systemID, "timeline", p.cluster.timeline)
	case ck.timeline == nil || *ck.timeline != p.cluster.timeline:
		// The row is in this server's WAL history and its LSN was written
		// before the row itself, so the LSN is on this history too.
		p.log.Warn("the timeline changed since the last checkpoint (failover or point-in-time recovery); the checkpoint is within this server's WAL, resuming",
			"slot", p.cfg.Slot, "checkpoint", ck.lsn, "checkpoint_timeline", deref(ck.timeline), "timeline", p.cluster.timeline)
	}
	return "", nil
}

// prepareSlot reconciles the slot with the checkpoint and returns the LSN to
// start streaming from. It creates the slot on a first start, refuses a
// possible gap unless AllowNewSlot names it, and waits while the slot is
// active in another process. p.cluster must be set.
func (p *Publisher) prepareSlot(ctx context.Context, db *pgx.Conn) (stub.LSN, error) {
	var waitStart, lastLog time.Time
	for {
		s, err := p.readSlot(ctx, db)
		if err != nil {
			return 0, err
		}
		ck, hasCkpt, err := p.readCheckpoint(ctx, db)
		if err != nil {
			return 0, err
		}
		discarded := false
		if hasCkpt {
			reason, err := p.historyGap(ctx, db, ck)
			if err != nil {
				return 0, err
			}
			if reason != "" {
				if !p.accepts(ck.lsn) {
					return 0, p.gapError(ck.lsn, "%s", reason)
				}
				p.log.Warn("discarding a checkpoint of another history (--allow-new-slot): changes after it may be missing", "slot", p.cfg.Slot,
					"checkpoint", ck.lsn, "reason", reason)
				hasCkpt, discarded = false, true
			}
		}
		if !s.exists {
			if hasCkpt {
				if !p.accepts(ck.lsn) {
					return 0, p.gapError(ck.lsn, "replication slot %s does not exist, but changefeed.cdc_checkpoint says changes up to %s were confirmed to it; "+
						"it was dropped or lost (failover?), so changes after %s may never be published", p.cfg.Slot, ck.lsn, ck.lsn)
				}
			} else if !discarded {
				if err := p.unneededAcceptance(ck.lsn, false); err != nil {
					return 0, err
				}
			}
			return p.createSlot(ctx, db, ck.lsn, hasCkpt || discarded)
		}
		switch {
		case s.slotType != "logical":
			return 0, precondition("slot %s is a %s slot, not a logical one; choose another --slot", p.cfg.Slot, s.slotType)
		case s.plugin != "pgoutput":
			return 0, precondition("slot %s uses the output plugin %q, not pgoutput; choose another --slot or drop it", p.cfg.Slot, s.plugin)
		case s.walStatus != nil && *s.walStatus == "lost":
			// Exit 3 like every possible gap: the slot cannot be resumed.
			return 0, p.gapError(ck.lsn, "slot %s has wal_status lost: PostgreSQL removed WAL it still needed (max_slot_wal_keep_size), so changes are missing; "+
				"drop it first (SELECT pg_drop_replication_slot('%s'))", p.cfg.Slot, p.cfg.Slot)
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
			// slot and writing the checkpoint, or a discarded checkpoint:
			// adopt the slot's position.
			if !discarded {
				if err := p.unneededAcceptance(0, false); err != nil {
					return 0, err
				}
			}
			if err := p.writeCheckpoint(ctx, db, slotLSN); err != nil {
				return 0, err
			}
			p.log.Info("adopting existing slot", "slot", p.cfg.Slot, "confirmed_flush_lsn", slotLSN)
			return slotLSN, nil
		case slotLSN > ck.lsn:
			if !p.accepts(ck.lsn) {
				return 0, p.gapError(ck.lsn, "slot %s has confirmed_flush_lsn %s, ahead of the checkpoint %s in changefeed.cdc_checkpoint: "+
					"something other than this publisher confirmed changes between %s and %s, which may never have been published",
					p.cfg.Slot, slotLSN, ck.lsn, ck.lsn, slotLSN)
			}
			p.log.Warn("accepting a slot ahead of the checkpoint (--allow-new-slot): changes in between may be missing",
				"slot", p.cfg.Slot, "checkpoint", ck.lsn, "confirmed_flush_lsn", slotLSN)
			if err := p.writeCheckpoint(ctx, db, slotLSN); err != nil {
				return 0, err
			}
			return slotLSN, nil
		default:
			if err := p.unneededAcceptance(ck.lsn, true); err != nil {
				return 0, err
			}
			if ck.systemID == nil || deref(ck.timeline) != p.cluster.timeline {
				// Record the cluster and timeline the checkpoint was
				// verified against.
				if err := p.writeCheckpoint(ctx, db, ck.lsn); err != nil {
					return 0, err
				}
			}
			// The checkpoint is written before the slot is confirmed, so it
			// may be ahead; everything up to it was acknowledged by Kafka.
			start := max(slotLSN, ck.lsn)
			p.log.Info("resuming slot", "slot", p.cfg.Slot, "confirmed_flush_lsn", slotLSN, "checkpoint", ck.lsn, "start", start)
			return start, nil
		}
	}
}

func (p *Publisher) createSlot(ctx context.Context, db *pgx.Conn, ckpt stub.LSN, hadCkpt bool) (stub.LSN, error) {
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
	if hadCkpt {
		p.log.Warn("created a fresh replication slot although a checkpoint existed (--allow-new-slot): changes between the checkpoint and the new slot may be missing",
			"slot", p.cfg.Slot, "checkpoint", ckpt, "new_slot_lsn", lsn)
	} else {
		p.log.Info("replication slot created", "slot", p.cfg.Slot, "lsn", lsn)
	}
	return lsn, nil
}
