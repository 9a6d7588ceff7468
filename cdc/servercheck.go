package cdc

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// minServerVersion is PostgreSQL 15: the start-up checks read row filters
// and column lists from pg_publication_tables, and pgoutput skips empty
// transactions, both new in 15.
const minServerVersion = 150000

// checkServerVersion refuses a server older than PostgreSQL 15 with a clear
// message instead of a failed catalog query later.
func checkServerVersion(num int, version string) error {
	if num < minServerVersion {
		return precondition("PostgreSQL %s is too old: cdc-publisher needs PostgreSQL 15 or later (publication row filters and column lists, pgoutput without empty transactions); upgrade the server", version)
	}
	return nil
}

func (p *Publisher) checkVersion(ctx context.Context, db *pgx.Conn) error {
	var num int
	var version string
	if err := db.QueryRow(ctx, "SELECT current_setting('server_version_num')::int, current_setting('server_version')").Scan(&num, &version); err != nil {
		return fmt.Errorf("read server version: %w", err)
	}
	return checkServerVersion(num, version)
}

// checkColumnLists respects a publication's column lists where they carry
// every column the routing reads, and refuses them where they do not:
// pgoutput would send the table without that column, and every stub would
// lack (or misroute by) its value.
func (p *Publisher) checkColumnLists(ctx context.Context, db *pgx.Conn) error {
	rows, err := db.Query(ctx, "SELECT schemaname::text, tablename::text, attnames::text[] FROM pg_publication_tables WHERE pubname = $1", p.cfg.Publication)
	if err != nil {
		return fmt.Errorf("read publication %s column lists: %w", p.cfg.Publication, err)
	}
	defer rows.Close()
	for rows.Next() {
		var schema, name string
		var cols []string
		if err := rows.Scan(&schema, &name, &cols); err != nil {
			return fmt.Errorf("read publication %s column lists: %w", p.cfg.Publication, err)
		}
		t := p.cfg.Routing.Table(schema, name)
		if t == nil {
			continue
		}
		var missing []string
		for _, fc := range t.columns() {
			if !slices.Contains(cols, fc.column) {
				missing = append(missing, fmt.Sprintf("%s (field %s)", fc.column, fc.field))
			}
		}
		if len(missing) > 0 {
			return precondition("publication %s has a column list on %s.%s without the routed column(s) %s: its stubs would lack them. "+
				"Remedy: add them to the column list (ALTER PUBLICATION %s SET TABLE … (columns)) or drop the column list",
				p.cfg.Publication, schema, name, strings.Join(missing, ", "), pgx.Identifier{p.cfg.Publication}.Sanitize())
		}
	}
	return rows.Err()
}
