package pillows

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/stub"
)

// retryBatch is how many due rows one claim takes.
const retryBatch = 50

// leaseIOs is the lease of a claimed row, in Timeouts.IO: longer than one
// row's round (a fetch, the processors, the outcome), so that another
// process retries the row only if this one died with it.
const leaseIOs = 10

// transientStreak is how many rows of one claim may fail transiently in a
// row, nothing having succeeded, before the rest is released: the store or
// a sink is down, and waiting out a timeout per row would only delay the
// next tick.
const transientStreak = 3

// retryLoop re-processes due rows of the errors table (HQ's
// retry_errors): it refetches each document, runs the failed processor
// again, deletes the row on success, reschedules it with backoff
// BackoffUnit·n² on failure, and after MaxAttempts publishes its stub to the
// dead-letter topic and marks it dead.
//
// Rows are handled one by one, without a transaction held across I/O: a
// short statement claims due rows (FOR UPDATE SKIP LOCKED, then their
// next_attempt moves a lease ahead, so other processes of the pillow skip
// them and a crash leaves them due again after the lease), the locks are
// released, and each row's outcome is written on its own once its I/O is
// done, only if no failure was recorded for it meanwhile (updated_at). So
// one row's failure never undoes another's outcome, a dead mark is written
// after its dead letter was accepted and nothing rolls it back (a crash
// between the two publishes the dead letter again: at least once), and a
// row that fails transiently does not hold up the others.
//
// A transient failure of a row counts as an attempt only when other rounds
// of the pillow succeeded during the claim (the store and sinks work, so
// the document is at fault); otherwise the row is due again at the next
// tick, unchanged, and an outage consumes no attempts.
func (pr *pillowRun) retryLoop(ctx context.Context) {
	t := time.NewTicker(pr.p.Retry.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for range 20 { // bounded: the rest waits for the next tick
			n, err := pr.retryDue(ctx)
			if err != nil {
				if ctx.Err() == nil {
					pr.log.Warn("retrying errors failed; will try again", "err", err)
				}
				break
			}
			if n < retryBatch {
				break
			}
		}
	}
}

// retryDue claims due rows and retries each. It returns how many rows it
// claimed, and an error when it stopped early (the rest is due again).
func (pr *pillowRun) retryDue(ctx context.Context) (int, error) {
	o := pr.r.o
	io := pr.p.Timeouts.IO
	gen := pr.eng.mayHaveErrors.generation()
	due, err := pr.claim(ctx)
	if err != nil {
		return 0, err
	}
	if len(due) == 0 {
		actx, cancel := context.WithTimeout(ctx, io)
		any, err := o.Errors.any(actx, pr.p.Name)
		cancel()
		if err == nil && !any {
			pr.eng.mayHaveErrors.clearIf(gen)
		}
		return 0, nil
	}
	type pending struct {
		row ErrorRow
		err error
	}
	var transient []pending
	var release []int64
	succeeded, streak := false, 0
	for i, row := range due {
		if ctx.Err() != nil || (!succeeded && streak >= transientStreak) {
			for _, r := range due[i:] {
				release = append(release, r.ID)
			}
			break
		}
		var only map[string]bool
		if row.Processor != "" {
			only = map[string]bool{row.Processor: true}
		}
		out, err := pr.eng.round(ctx, []*stub.Stub{row.Stub}, only)
		if err != nil {
			if ctx.Err() != nil {
				release = append(release, row.ID)
				continue
			}
			transient = append(transient, pending{row, err})
			streak++
			continue
		}
		succeeded, streak = true, 0
		if len(out.failures) == 0 {
			pr.resolved(ctx, row)
			continue
		}
		pr.failed(ctx, row, out.failures[0].Err)
	}
	var postponed []ErrorRow
	for _, p := range transient {
		// Others worked since this row's last recorded failure: the
		// document is at fault. (At most one attempt is counted wrongly
		// when an outage starts right after such a success.)
		if ctx.Err() == nil && (succeeded || pr.eng.lastSuccess().After(p.row.UpdatedAt)) {
			pr.failed(ctx, p.row, fmt.Errorf("keeps failing as if its store or a sink were down while they work for other documents: %w", p.err))
			continue
		}
		postponed = append(postponed, p.row)
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), io)
	defer cancel()
	if len(release) > 0 {
		// Not tried: due again at the next tick.
		if _, err := o.Errors.pool.Exec(rctx, `UPDATE changefeed.pillow_errors SET next_attempt = now() WHERE id = ANY($1)`, release); err != nil {
			pr.log.Warn("releasing claimed error rows failed; they are due again when their lease ends", "rows", len(release), "err", err)
		}
	}
	for _, row := range postponed {
		// Not an attempt (the store or a sink is down for everyone), but
		// not retried at every tick either: the backoff of its attempts.
		if _, err := o.Errors.pool.Exec(rctx, `UPDATE changefeed.pillow_errors SET next_attempt = now() + $2::interval WHERE id = $1`,
			row.ID, pr.p.Retry.Backoff(row.Attempts)); err != nil {
			pr.log.Warn("postponing an error row failed; it is due again when its lease ends", "document_id", row.DocumentID, "err", err)
		}
	}
	if len(postponed) > 0 {
		return len(due), fmt.Errorf("%d row(s) failed transiently while nothing else succeeded; not counted as attempts: %w", len(postponed), transient[0].err)
	}
	return len(due), nil
}

// claim takes up to retryBatch due rows of the pillow and moves their
// next_attempt a lease ahead, in one statement whose row locks last only
// as long as it does.
func (pr *pillowRun) claim(ctx context.Context) ([]ErrorRow, error) {
	io := pr.p.Timeouts.IO
	cctx, cancel := context.WithTimeout(ctx, io)
	defer cancel()
	rows, err := pr.r.o.Errors.pool.Query(cctx, `
UPDATE changefeed.pillow_errors e
SET next_attempt = now() + $3::interval
FROM (SELECT id AS claim_id FROM changefeed.pillow_errors
      WHERE pillow = $1 AND NOT dead AND next_attempt <= now()
      ORDER BY next_attempt
      LIMIT $2
      FOR UPDATE SKIP LOCKED) c
WHERE e.id = c.claim_id
RETURNING `+errorColumns, pr.p.Name, retryBatch, leaseIOs*io)
	if err != nil {
		return nil, err
	}
	due, err := pgx.CollectRows(rows, scanErrorRow)
	if err != nil {
		return nil, err
	}
	slices.SortFunc(due, func(a, b ErrorRow) int { return cmp.Compare(a.ID, b.ID) })
	return due, nil
}

// resolved deletes a row whose document was processed, unless a failure
// was recorded for it meanwhile.
func (pr *pillowRun) resolved(ctx context.Context, row ErrorRow) {
	rctx, cancel := context.WithTimeout(ctx, pr.p.Timeouts.IO)
	defer cancel()
	tag, err := pr.r.o.Errors.pool.Exec(rctx, `DELETE FROM changefeed.pillow_errors WHERE id = $1 AND updated_at = $2`, row.ID, row.UpdatedAt)
	if err != nil {
		pr.log.Warn("error resolved on retry but its row could not be deleted; it is retried again when its lease ends", "document_id", row.DocumentID, "err", err)
		return
	}
	pr.r.o.Metrics.retries.WithLabelValues(pr.p.Name, "resolved").Inc()
	pr.log.Info("error resolved on retry", "data_source_type", row.DataSourceType, "data_source_name", row.DataSourceName, "document_id", row.DocumentID, "processor", row.Processor, "attempts", row.Attempts+1, "row_changed_meanwhile", tag.RowsAffected() == 0)
}

// failed counts an attempt of row that failed with ferr: it reschedules the
// row, or after MaxAttempts publishes the dead letter and then marks the row
// dead. A dead letter that cannot be published leaves the row as it is
// (due again when its lease ends): a row is never dead without its dead
// letter.
func (pr *pillowRun) failed(ctx context.Context, row ErrorRow, ferr error) {
	o := pr.r.o
	attempts := row.Attempts + 1
	dead := attempts >= pr.p.Retry.MaxAttempts
	if dead {
		if err := pr.deadLetter(ctx, row, attempts, ferr); err != nil {
			pr.log.Warn("dead letter not published; the row is retried when its lease ends", "document_id", row.DocumentID, "err", err)
			return
		}
	}
	rctx, cancel := context.WithTimeout(ctx, pr.p.Timeouts.IO)
	defer cancel()
	tag, err := o.Errors.pool.Exec(rctx, `
UPDATE changefeed.pillow_errors
SET attempts = $3, next_attempt = now() + $4::interval, dead = $5,
    error_type = $6, error_message = $7, updated_at = now()
WHERE id = $1 AND updated_at = $2`, row.ID, row.UpdatedAt, attempts, pr.p.Retry.Backoff(attempts), dead, errorType(ferr), truncate(ferr.Error(), 4000))
	if err != nil {
		pr.log.Warn("retry outcome not recorded; the row is retried when its lease ends", "document_id", row.DocumentID, "err", err)
		return
	}
	if tag.RowsAffected() == 0 {
		// A newer failure was recorded (or the document was processed)
		// meanwhile: that outcome stands.
		return
	}
	if dead {
		o.Metrics.retries.WithLabelValues(pr.p.Name, "dead").Inc()
		pr.log.Error("document failed for good: sent to the dead-letter topic and marked dead",
			"data_source_type", row.DataSourceType, "data_source_name", row.DataSourceName, "document_id", row.DocumentID, "processor", row.Processor, "attempts", attempts, "topic", pr.p.Retry.DeadLetterTopic, "err", ferr)
		return
	}
	o.Metrics.retries.WithLabelValues(pr.p.Name, "failed").Inc()
}

func (pr *pillowRun) deadLetter(ctx context.Context, row ErrorRow, attempts int, ferr error) error {
	dl := pr.r.o.DeadLetters
	if dl == nil {
		return nil
	}
	value, err := json.Marshal(row.Stub)
	if err != nil {
		return err
	}
	rec := &kgo.Record{
		Key:   []byte(row.DocumentID),
		Value: value,
		Headers: []kgo.RecordHeader{
			{Key: "pillow", Value: []byte(pr.p.Name)},
			{Key: "processor", Value: []byte(row.Processor)},
			{Key: "data_source_type", Value: []byte(row.DataSourceType)},
			{Key: "data_source_name", Value: []byte(row.DataSourceName)},
			{Key: "version", Value: []byte(row.Version)},
			{Key: "error_type", Value: []byte(errorType(ferr))},
			{Key: "error_message", Value: []byte(truncate(ferr.Error(), 4000))},
			{Key: "attempts", Value: []byte(strconv.Itoa(attempts))},
		},
	}
	dctx, cancel := context.WithTimeout(ctx, pr.p.Timeouts.IO)
	defer cancel()
	return dl.DeadLetter(dctx, pr.p.Retry.DeadLetterTopic, rec)
}
