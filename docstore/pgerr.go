package docstore

import (
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/changefeed/changefeed/doc"
)

// pgDataError reports whether err is PostgreSQL rejecting a value (SQLSTATE
// class 22, data exception): the fault of one input, not of the server.
func pgDataError(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && len(pe.Code) == 5 && pe.Code[:2] == "22"
}

// transient wraps err as doc.ErrTransient: every failure that is not a
// document's own fault is the store's, and is retried as a whole.
func transient(what string, err error) error {
	return fmt.Errorf("%w: %s: %w", doc.ErrTransient, what, err)
}
