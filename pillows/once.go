package pillows

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// Once runs fn at most once per (pillow, document, version), for side
// effects that must not repeat when a stub is redelivered (the Cloudant
// example: one text message per change).
//
// It records the version in changefeed.pillow_effects inside tx and then
// runs fn with the same tx, so the record and an effect written in PostgreSQL
// commit or roll back together: if fn fails or the caller rolls back, the
// version is not recorded and a redelivery runs fn again. ran is false when
// the version was already recorded (fn is not called). A concurrent Once for
// the same key waits on the row lock until the first transaction ends.
//
// An effect outside PostgreSQL (an HTTP call) cannot share the transaction:
// run it inside fn and commit right after; a crash between the effect and the
// commit repeats it once, so such effects should carry an idempotency key
// (pillow, document, version) where the receiver supports one.
func Once(ctx context.Context, tx pgx.Tx, pillow, docID, version string, fn func(pgx.Tx) error) (ran bool, err error) {
	tag, err := tx.Exec(ctx, `
INSERT INTO changefeed.pillow_effects (pillow, document_id, version) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING`, pillow, docID, version)
	if err != nil {
		return false, fmt.Errorf("once %s/%s@%s: %w", pillow, docID, version, err)
	}
	if tag.RowsAffected() == 0 {
		return false, nil
	}
	if err := fn(tx); err != nil {
		return false, err
	}
	return true, nil
}
