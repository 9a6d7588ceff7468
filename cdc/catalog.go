package cdc

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// pgCatalog reads relInfo from the current catalog over the stream's
// ordinary connection.
type pgCatalog struct{ db *pgx.Conn }

// describe returns the root of oid's partition tree (oid itself when it is
// not a partition) and its primary key columns. A relation dropped since the
// change was written is reported as not existing.
func (c pgCatalog) describe(ctx context.Context, oid uint32) (relInfo, error) {
	var info relInfo
	err := c.db.QueryRow(ctx, `
SELECT rn.nspname::text, rc.relname::text,
       ARRAY(SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = c.oid AND i.indisprimary)
FROM pg_class c
JOIN pg_class rc ON rc.oid = COALESCE(pg_partition_root(c.oid), c.oid)
JOIN pg_namespace rn ON rn.oid = rc.relnamespace
WHERE c.oid = $1`, oid).Scan(&info.rootSchema, &info.rootName, &info.primaryKey)
	if errors.Is(err, pgx.ErrNoRows) {
		return info, nil
	}
	if err != nil {
		return info, fmt.Errorf("read catalog: %w", err)
	}
	info.exists = true
	return info, nil
}
