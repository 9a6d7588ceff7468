package cdc

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
)

// resolveSchemaChange handles a Relation message that does not fit the
// routing (cause wraps ErrSchema): a routed column is missing from it.
//
// Two cases. The column was renamed after this change and the routing
// already names the new name (a restart after the operator updated the
// routing, replaying changes written before the rename): the message
// describes the older schema. When the table has never had a column dropped,
// the message's columns are exactly the first columns of today's table, in
// attribute order, so they are mapped to today's names by position (types
// checked). Otherwise the routing no longer holds: a loud error naming the
// table, the column and the remedy. The stream confirms the acknowledged
// prefix before it stops (see stream.run), so the restart after the fix
// begins at this transaction, not at the last periodic confirmation.
func (s *stream) resolveSchemaChange(m *pglogrepl.RelationMessage, cause error) (*relation, error) {
	if !errors.Is(cause, ErrSchema) {
		return nil, cause
	}
	remedy := func(extra string) error {
		return fmt.Errorf("%w (in the transaction of xid %d, commit LSN %s%s). Remedy: if the column was renamed, put its new name in the routing file; "+
			"if it was dropped, restore it or remove it from the routing; then restart. Everything Kafka acknowledged before this transaction is confirmed",
			cause, s.tx.xid, s.tx.finalLSN, extra)
	}
	type col struct {
		name    string
		typ     uint32
		dropped bool
	}
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	defer cancel()
	rows, err := s.db.Query(ctx, `
SELECT attname::text, atttypid::int8, attisdropped FROM pg_attribute
WHERE attrelid = $1 AND attnum > 0 AND attgenerated = '' ORDER BY attnum`, int64(m.RelationID))
	if err != nil {
		return nil, remedy(fmt.Sprintf("; reading the table's columns failed: %v", err))
	}
	var cur []col
	anyDropped := false
	for rows.Next() {
		var c col
		var typ int64
		if err := rows.Scan(&c.name, &typ, &c.dropped); err != nil {
			rows.Close()
			return nil, remedy(fmt.Sprintf("; reading the table's columns failed: %v", err))
		}
		c.typ = uint32(typ)
		anyDropped = anyDropped || c.dropped
		cur = append(cur, c)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, remedy(fmt.Sprintf("; reading the table's columns failed: %v", err))
	}
	switch {
	case len(cur) == 0:
		return nil, remedy("; the table no longer exists")
	case anyDropped:
		return nil, remedy("; the table has had columns dropped, so columns of an older schema cannot be matched to today's by position")
	case len(m.Columns) > len(cur):
		return nil, remedy("; the table has fewer columns today than this change carries")
	}
	mapped := *m
	mapped.Columns = make([]*pglogrepl.RelationMessageColumn, len(m.Columns))
	var renamed []string
	for i, c := range m.Columns {
		if c.DataType != cur[i].typ {
			return nil, remedy(fmt.Sprintf("; column %d (%q) has another type today (%q), so it cannot be matched by position", i+1, c.Name, cur[i].name))
		}
		cc := *c
		if cc.Name != cur[i].name {
			renamed = append(renamed, cc.Name+" → "+cur[i].name)
			cc.Name = cur[i].name
		}
		mapped.Columns[i] = &cc
	}
	rel, err := newRelation(ctx, &mapped, s.p.cfg.Routing, s.cat)
	if err != nil || len(renamed) == 0 {
		return nil, remedy("")
	}
	s.p.log.Info("a change of an earlier schema of a routed table: columns renamed since are matched by position",
		"table", rel.qualified, "renamed", renamed, "lsn", s.tx.finalLSN, "xid", s.tx.xid)
	return rel, nil
}
