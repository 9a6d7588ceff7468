package pgclass

import (
	"context"
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestClassification(t *testing.T) {
	pg := func(code string) error { return fmt.Errorf("write: %w", &pgconn.PgError{Code: code}) }
	tests := []struct {
		err              error
		transient, input bool
	}{
		{nil, false, false},
		{pg("54000"), false, true}, // index row size exceeds btree maximum
		{pg("54001"), false, true}, // statement too complex
		{pg("22P02"), false, true}, // invalid text representation
		{pg("23514"), false, true}, // check violation
		{pg("42804"), false, true}, // datatype mismatch
		{pg("0A000"), false, true}, // feature not supported
		{pg("08006"), true, false}, // connection failure
		{pg("40001"), true, false}, // serialization failure
		{pg("40P01"), true, false}, // deadlock detected
		{pg("53100"), true, false}, // disk full
		{pg("55P03"), true, false}, // lock not available
		{pg("57014"), true, false}, // statement timeout
		{pg("57P01"), true, false}, // admin shutdown
		{pg("58030"), true, false}, // I/O error
		{pg("XX000"), true, false}, // internal error
		{pg("25006"), true, false}, // read-only: a standby
		{pg("28P01"), true, false}, // password authentication failed
		{pg("42P01"), true, false}, // the table is missing: every row fails alike
		{pg("42501"), true, false}, // insufficient privilege
		{io.ErrUnexpectedEOF, true, false},
		{context.DeadlineExceeded, true, false},
		{errors.New("something else"), true, false},
	}
	for _, tt := range tests {
		if got := Transient(tt.err); got != tt.transient {
			t.Errorf("Transient(%v) = %v", tt.err, got)
		}
		if got := Input(tt.err); got != tt.input {
			t.Errorf("Input(%v) = %v", tt.err, got)
		}
	}
	if !Network(io.ErrUnexpectedEOF) || Network(errors.New("x")) || Network(pg("08006")) {
		t.Error("Network misclassifies")
	}
}
