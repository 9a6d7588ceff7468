// Package pgclass says whose fault a PostgreSQL error is: the server's (or
// the way to it), which a caller retries as a whole later, or the input's —
// one row, one document — which a caller isolates and records while the
// rest goes on. The document store, the reporting sink and the pillows'
// errors table all classify with it, so one SQLSTATE means the same thing
// everywhere.
//
// By SQLSTATE class (https://www.postgresql.org/docs/15/errcodes-appendix.html):
//
//	class / code                                   fault
//	08 connection exception                        server (transient)
//	25006 read-only transaction (a standby)        server
//	28 invalid authorization, 3D000 no database    server (configuration: every row fails alike)
//	40 transaction rollback (serialization, deadlock) server
//	53 insufficient resources (disk, memory, conns) server
//	55 object not in prerequisite state (lock not available) server
//	57 operator intervention (shutdown, statement_timeout) server
//	58 system error (I/O), XX internal error        server
//	42P01, 42703, 42883, 3F000 (table, column, function, schema missing),
//	42501 insufficient privilege                   server (configuration: every row fails alike)
//	22 data exception, 23 integrity violation,
//	54 program limit (index row size, …), the rest of 42, 0A, P0 and every
//	other class                                    input (permanent for that row)
//
// Errors without a SQLSTATE: a failure to connect, a network error, a
// timeout, a connection cut in the middle of a response, is the server's; so
// is anything not recognised, so that an unknown failure pauses rather than
// fills an errors table (a caller that must never stall adds its own bound,
// as the pillows do).
package pgclass

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"

	"github.com/jackc/pgx/v5/pgconn"
)

// Transient reports whether err is a failure of PostgreSQL or of the way to
// it rather than of the statement's input. nil is not transient.
func Transient(err error) bool {
	if err == nil {
		return false
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return ServerCode(pe.Code)
	}
	return true
}

// Input reports whether err is PostgreSQL rejecting the statement's input:
// a SQLSTATE that is not ServerCode. A caller that sent several rows splits
// them to find the one at fault.
func Input(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && !ServerCode(pe.Code)
}

// ServerCode reports whether SQLSTATE code is the server's fault (see the
// package comment's table).
func ServerCode(code string) bool {
	if len(code) != 5 {
		return true
	}
	switch code {
	case "25006", // read_only_sql_transaction: connected to a standby
		"3D000", // invalid_catalog_name: the database is missing
		"3F000", // invalid_schema_name
		"42P01", // undefined_table
		"42703", // undefined_column
		"42883", // undefined_function (an extension not installed)
		"42501": // insufficient_privilege
		return true
	}
	switch code[:2] {
	case "08", "28", "40", "53", "55", "57", "58", "XX":
		return true
	}
	return false
}

// Network reports whether err, having no SQLSTATE, is a connection-level
// failure: used where an unrecognised error must not count as the server's.
func Network(err error) bool {
	var ce *pgconn.ConnectError
	var ne net.Error
	return errors.As(err, &ce) || errors.As(err, &ne) || pgconn.Timeout(err) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) || errors.Is(err, context.DeadlineExceeded)
}
