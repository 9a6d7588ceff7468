package cdc

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// walStatuses are pg_replication_slots.wal_status values, exported as
// changefeed_cdc_slot_wal_status{status}.
var walStatuses = []string{"reserved", "extended", "unreserved", "lost"}

// slotWarnEvery bounds how often one slot health warning repeats.
const slotWarnEvery = time.Minute

// watch samples what can go wrong while streaming and that no message
// announces: the slot's WAL retention (wal_status, safe_wal_size), and routed
// tables that are not in the publication (created or recreated after it, as
// an online table swap does): their changes are never decoded, so the only
// safe answer is to stop and say so.
func (s *stream) watch(ctx context.Context) error {
	p := s.p
	var status *string
	var safe *int64
	var keep int64
	err := s.db.QueryRow(ctx, `
SELECT wal_status, safe_wal_size, pg_size_bytes(current_setting('max_slot_wal_keep_size'))
FROM pg_replication_slots WHERE slot_name = $1`, p.cfg.Slot).Scan(&status, &safe, &keep)
	if err != nil {
		return fmt.Errorf("sample slot %s: %w", p.cfg.Slot, err)
	}
	for _, st := range walStatuses {
		v := 0.0
		if status != nil && *status == st {
			v = 1
		}
		p.m.slotWALStatus.WithLabelValues(st).Set(v)
	}
	if safe != nil {
		p.m.slotSafeWALSize.Set(float64(*safe))
	} else {
		// NULL: no max_slot_wal_keep_size (nothing is ever removed), or lost.
		p.m.slotSafeWALSize.Set(-1)
	}
	now := time.Now()
	warn := now.Sub(s.lastSlotWarn) >= slotWarnEvery
	switch {
	case status != nil && (*status == "unreserved" || *status == "lost"):
		if warn {
			s.lastSlotWarn = now
			p.log.Warn("replication slot is about to lose WAL it needs (wal_status "+*status+"): changes will be missing once it is removed; "+
				"let the publisher catch up (is Kafka reachable?) or raise max_slot_wal_keep_size",
				"slot", p.cfg.Slot, "wal_status", *status, "safe_wal_size", deref(safe), "max_slot_wal_keep_size", keep)
		}
	case safe != nil && keep > 0 && *safe < keep/2 && s.lastSafe >= 0 && *safe < s.lastSafe:
		if warn {
			s.lastSlotWarn = now
			p.log.Warn("replication slot's safe_wal_size is falling: past max_slot_wal_keep_size PostgreSQL removes WAL the slot needs",
				"slot", p.cfg.Slot, "safe_wal_size", *safe, "max_slot_wal_keep_size", keep)
		}
	}
	if safe != nil {
		s.lastSafe = *safe
	} else {
		s.lastSafe = -1
	}
	return s.checkPublished(ctx)
}

// checkPublished stops the stream when a routed table exists but is not in
// the publication.
func (s *stream) checkPublished(ctx context.Context) error {
	p := s.p
	if len(p.cfg.Routing.Tables) == 0 {
		return nil
	}
	schemas := make([]string, len(p.cfg.Routing.Tables))
	names := make([]string, len(p.cfg.Routing.Tables))
	for i, t := range p.cfg.Routing.Tables {
		schemas[i], names[i] = t.Schema, t.Name
	}
	rows, err := s.db.Query(ctx, `
SELECT t.schema, t.name, c.oid IS NOT NULL,
       c.oid IS NOT NULL AND (p.puballtables
         OR EXISTS (SELECT 1 FROM pg_publication_namespace n WHERE n.pnpubid = p.oid AND n.pnnspid = c.relnamespace)
         OR EXISTS (SELECT 1 FROM pg_publication_rel r WHERE r.prpubid = p.oid AND r.prrelid = c.oid)
         -- a partition is published through an ancestor (none listed
         -- for a table that is not a partition)
         OR EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_partition_ancestors(c.oid) a ON a.relid = r.prrelid
                    WHERE r.prpubid = p.oid))
FROM unnest($2::text[], $3::text[]) AS t(schema, name)
CROSS JOIN pg_publication p
LEFT JOIN pg_class c ON c.oid = to_regclass(quote_ident(t.schema) || '.' || quote_ident(t.name))
WHERE p.pubname = $1`, p.cfg.Publication, schemas, names)
	if err != nil {
		return fmt.Errorf("check publication %s: %w", p.cfg.Publication, err)
	}
	defer rows.Close()
	found := false
	for rows.Next() {
		found = true
		var schema, name string
		var exists, published bool
		if err := rows.Scan(&schema, &name, &exists, &published); err != nil {
			return fmt.Errorf("check publication %s: %w", p.cfg.Publication, err)
		}
		q := schema + "." + name
		switch {
		case !exists:
			if s.missingWarned[q].IsZero() || time.Since(s.missingWarned[q]) >= slotWarnEvery {
				s.missingWarned[q] = time.Now()
				p.log.Warn("routed table does not exist (dropped, or in the middle of a swap); once it exists again it must be in the publication",
					"table", q, "publication", p.cfg.Publication)
			}
		case !published:
			return fmt.Errorf("%w: routed table %s is not in publication %s (created or recreated after it, e.g. by a rename swap or DROP and CREATE): "+
				"PostgreSQL does not decode its changes, so none of them can be published. Remedy: ALTER PUBLICATION %s ADD TABLE %s, "+
				"then backfill the rows written to it since it was created (they were never decoded)",
				ErrSchema, q, p.cfg.Publication, pgx.Identifier{p.cfg.Publication}.Sanitize(), pgx.Identifier{schema, name}.Sanitize())
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("check publication %s: %w", p.cfg.Publication, err)
	}
	if !found {
		return fmt.Errorf("%w: publication %s was dropped while streaming: recreate it (restart the publisher) and backfill what was written meanwhile", ErrSchema, p.cfg.Publication)
	}
	return nil
}

// logLimiter lets one line through per interval and counts the rest, so
// that thousands of identical failures (every buffered stub failing at
// shutdown during a Kafka outage) log a few lines, not thousands.
type logLimiter struct {
	mu         sync.Mutex
	every      time.Duration
	last       time.Time
	suppressed int
}

// allow reports whether to log now, and how many lines were suppressed
// since the last one logged.
func (l *logLimiter) allow(now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < l.every {
		l.suppressed++
		return false, 0
	}
	n := l.suppressed
	l.last, l.suppressed = now, 0
	return true, n
}
