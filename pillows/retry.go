package pillows

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/stub"
)

// retryBatch is how many due rows one retry transaction takes.
const retryBatch = 50

// retryLoop re-processes due rows of the errors table (HQ's
// retry_errors): it refetches each document, runs the failed processor
// again, deletes the row on success, reschedules it with backoff
// BackoffUnit·n² on failure, and after MaxAttempts marks it dead and
// publishes its stub to the dead-letter topic. Rows are claimed with
// FOR UPDATE SKIP LOCKED, so several processes of one pillow never retry
// the same row at once.
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

func (pr *pillowRun) retryDue(ctx context.Context) (int, error) {
	o := pr.r.o
	tx, err := o.Errors.pool.Begin(ctx)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // no-op after commit
	rows, err := tx.Query(ctx, `SELECT `+errorColumns+`
FROM changefeed.pillow_errors
WHERE pillow = $1 AND NOT dead AND next_attempt <= now()
ORDER BY next_attempt
LIMIT $2
FOR UPDATE SKIP LOCKED`, pr.p.Name, retryBatch)
	if err != nil {
		return 0, err
	}
	due, err := pgx.CollectRows(rows, scanErrorRow)
	if err != nil {
		return 0, err
	}
	if len(due) == 0 {
		gen := pr.eng.mayHaveErrors.generation()
		if any, err := o.Errors.any(ctx, pr.p.Name); err == nil && !any {
			pr.eng.mayHaveErrors.clearIf(gen)
		}
		return 0, nil
	}
	for _, row := range due {
		var only map[string]bool
		if row.Processor != "" {
			only = map[string]bool{row.Processor: true}
		}
		out, err := pr.eng.round(ctx, []*stub.Stub{row.Stub}, only)
		if err != nil {
			// Transient: not an attempt; the whole transaction is
			// rolled back and the rows stay due.
			return 0, err
		}
		if len(out.failures) == 0 {
			if _, err := tx.Exec(ctx, `DELETE FROM changefeed.pillow_errors WHERE id = $1`, row.ID); err != nil {
				return 0, err
			}
			o.Metrics.retries.WithLabelValues(pr.p.Name, "resolved").Inc()
			pr.log.Info("error resolved on retry", "data_source_type", row.DataSourceType, "data_source_name", row.DataSourceName, "document_id", row.DocumentID, "processor", row.Processor, "attempts", row.Attempts+1)
			continue
		}
		ferr := out.failures[0].Err
		attempts := row.Attempts + 1
		dead := attempts >= pr.p.Retry.MaxAttempts
		if dead {
			if err := pr.deadLetter(ctx, row, attempts, ferr); err != nil {
				return 0, fmt.Errorf("dead letter %s/%s/%s: %w", row.DataSourceType, row.DataSourceName, row.DocumentID, err)
			}
			o.Metrics.retries.WithLabelValues(pr.p.Name, "dead").Inc()
			pr.log.Error("document failed for good: marked dead and sent to the dead-letter topic",
				"data_source_type", row.DataSourceType, "data_source_name", row.DataSourceName, "document_id", row.DocumentID, "processor", row.Processor, "attempts", attempts, "topic", pr.p.Retry.DeadLetterTopic, "err", ferr)
		} else {
			o.Metrics.retries.WithLabelValues(pr.p.Name, "failed").Inc()
		}
		if _, err := tx.Exec(ctx, `
UPDATE changefeed.pillow_errors
SET attempts = $2, next_attempt = now() + $3::interval, dead = $4,
    error_type = $5, error_message = $6, updated_at = now()
WHERE id = $1`, row.ID, attempts, pr.p.Retry.Backoff(attempts), dead, errorType(ferr), truncate(ferr.Error(), 4000)); err != nil {
			return 0, err
		}
	}
	return len(due), tx.Commit(ctx)
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
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return dl.DeadLetter(dctx, pr.p.Retry.DeadLetterTopic, rec)
}
