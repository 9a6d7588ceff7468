// Package pgident parses table names from configuration into pgx
// identifiers, so they are always quoted when put into SQL, never spliced.
package pgident

import (
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// ParseTable splits "table" or "schema.table" into identifier parts. The
// error says what is wrong without the caller's field name, which the
// caller adds.
func ParseTable(s string) (pgx.Identifier, error) {
	if s == "" {
		return nil, errors.New("is empty")
	}
	parts := strings.Split(s, ".")
	if len(parts) > 2 {
		return nil, fmt.Errorf("%q: want table or schema.table", s)
	}
	for _, p := range parts {
		if p == "" || strings.ContainsRune(p, 0) {
			return nil, fmt.Errorf("%q: empty or invalid name part", s)
		}
	}
	return pgx.Identifier(parts), nil
}
