package pillows

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/stub"
)

// Once runs fn at most once per (pillow, document, state read), for side
// effects that must not repeat when a stub is redelivered (the Cloudant
// example: one text message per change). d is the document as the pillow
// handed it to the processor.
//
// The document is named by its source and id (d.Source, d.SourceName,
// d.ID), as everywhere in this package: the same id, even at the same
// revision, in two Couch databases or in a Couch and a SQL source is two
// documents. The state is what was actually read (StateVersion), not the
// version of the stubs that caused the fetch: a SQL fetch can read a state
// newer than its stubs, and the later stubs of that state must not run the
// effect again.
//
// It records the state in changefeed.pillow_effects inside tx and then
// runs fn with the same tx, so the record and an effect written in PostgreSQL
// commit or roll back together: if fn fails or the caller rolls back, the
// state is not recorded and a redelivery runs fn again. ran is false when
// the state was already recorded (fn is not called). A concurrent Once for
// the same key waits on the row lock until the first transaction ends.
//
// An effect outside PostgreSQL (an HTTP call) cannot share the transaction:
// run it inside fn and commit right after; a crash between the effect and the
// commit repeats it once, so such effects should carry an idempotency key
// (pillow, d.Key(), StateVersion(d)) where the receiver supports one.
func Once(ctx context.Context, tx pgx.Tx, pillow string, d *doc.Document, fn func(pgx.Tx) error) (ran bool, err error) {
	version, err := StateVersion(d)
	if err != nil {
		return false, fmt.Errorf("once %s/%s: %w", pillow, d.Key(), err)
	}
	tag, err := tx.Exec(ctx, `
INSERT INTO changefeed.pillow_effects (pillow, data_source_type, data_source_name, document_id, version) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING`, pillow, string(d.Source), d.SourceName, d.ID, version)
	if err != nil {
		return false, fmt.Errorf("once %s/%s@%s: %w", pillow, d.Key(), version, err)
	}
	if tag.RowsAffected() == 0 {
		return false, nil
	}
	if err := fn(tx); err != nil {
		return false, err
	}
	return true, nil
}

// StateVersion names the state of d that was read:
//   - Couch: the revision fetched (the winner, which need not be the
//     stub's).
//   - SQL, live: the row version the store read (doc.Version.Row, the
//     writing transaction) and a digest of the body. The digest keeps two
//     states apart even if a transaction id is reused after wraparound;
//     the row version keeps A→B→A apart, which a digest alone would not.
//   - SQL, deleted: the version of the deletion's stubs, since an absent
//     row has no state of its own.
func StateVersion(d *doc.Document) (string, error) {
	switch {
	case d.Source == stub.SourceCouch || (d.Source == "" && !d.Version.Rev.IsZero()):
		return d.Version.Rev.String(), nil
	case d.Deleted:
		return "deleted@" + d.Version.SQL.String(), nil
	}
	b, err := json.Marshal(d.Body) // map keys sorted: one encoding per body
	if err != nil {
		return "", fmt.Errorf("digest of the body: %w", err)
	}
	sum := sha256.Sum256(b)
	return "row:" + d.Version.Row + "/" + hex.EncodeToString(sum[:12]), nil
}
