package cdc

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// partitionWatch notices what the replication stream does not carry for a
// routed partitioned table: a partition detached or dropped (DDL, never
// decoded), and a partition truncated on its own, which pgoutput does not
// publish at all when the publication publishes via the root
// (publish_via_partition_root = true: only a TRUNCATE of the root is sent).
// Either way rows leave the table without per-row stubs, so consumers hold
// documents that no longer exist.
//
// It compares snapshots of the leaf partitions (and their relfilenode, which
// every TRUNCATE replaces) taken while streaming. It cannot see what
// happened while the publisher was stopped, and a table rewrite (VACUUM
// FULL, CLUSTER) looks like a TRUNCATE.
type partitionWatch struct {
	publication string
	roots       []string // routed tables, quoted
	last        map[uint32]partState
	// forget names roots whose TRUNCATE was decoded (and published): their
	// next snapshot is taken without reporting.
	forget map[string]bool
}

type partState struct {
	root, name string
	filenode   uint32
}

// partitionChange is one partition that left its table or was truncated.
type partitionChange struct {
	root, partition string
	change          string // "detached_or_dropped" or "truncated_or_rewritten"
}

func newPartitionWatch(r *Routing, publication string) *partitionWatch {
	w := &partitionWatch{publication: publication, forget: map[string]bool{}}
	for i := range r.Tables {
		t := &r.Tables[i]
		w.roots = append(w.roots, pgx.Identifier{t.Schema, t.Name}.Sanitize())
	}
	return w
}

// saw records a partition the stream described (pgoutput sends a Relation
// message for the partition a change came from, even via the root), so that
// a partition created and dropped between two snapshots is noticed too. Its
// relfilenode is unknown until the next snapshot.
func (w *partitionWatch) saw(oid uint32, root, name string) {
	if w.last == nil {
		w.last = map[uint32]partState{}
	}
	if _, ok := w.last[oid]; !ok {
		w.last[oid] = partState{root: root, name: name}
	}
}

// check takes a snapshot and returns what changed since the previous one
// (nothing on the first call).
func (w *partitionWatch) check(ctx context.Context, db *pgx.Conn) ([]partitionChange, error) {
	if len(w.roots) == 0 {
		return nil, nil
	}
	rows, err := db.Query(ctx, `
SELECT rn.nspname || '.' || rc.relname, c.oid, n.nspname || '.' || c.relname, c.relfilenode,
       COALESCE((SELECT pubviaroot FROM pg_publication WHERE pubname = $2), true)
FROM unnest($1::text[]) AS r(name)
JOIN pg_class rc ON rc.oid = to_regclass(r.name) AND rc.relkind = 'p'
JOIN pg_namespace rn ON rn.oid = rc.relnamespace
CROSS JOIN LATERAL pg_partition_tree(rc.oid) pt
JOIN pg_class c ON c.oid = pt.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE pt.isleaf AND pt.level > 0`, w.roots, w.publication)
	if err != nil {
		return nil, fmt.Errorf("read partitions: %w", err)
	}
	now := map[uint32]partState{}
	viaRoot := true
	for rows.Next() {
		var oid uint32
		var st partState
		if err := rows.Scan(&st.root, &oid, &st.name, &st.filenode, &viaRoot); err != nil {
			return nil, fmt.Errorf("read partitions: %w", err)
		}
		now[oid] = st
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read partitions: %w", err)
	}
	prev, forget := w.last, w.forget
	w.last, w.forget = now, map[string]bool{}
	if prev == nil {
		return nil, nil
	}
	var out []partitionChange
	for oid, old := range prev {
		if forget[old.root] {
			continue
		}
		cur, ok := now[oid]
		switch {
		case !ok:
			out = append(out, partitionChange{old.root, old.name, "detached_or_dropped"})
		case old.filenode != 0 && cur.filenode != old.filenode && viaRoot:
			// Without publish_via_partition_root the partition's TRUNCATE is
			// decoded and published under its root (see stream.truncate).
			out = append(out, partitionChange{old.root, old.name, "truncated_or_rewritten"})
		}
	}
	return out, nil
}

// checkPartitionIdentities refuses a routed partitioned table one of whose
// partitions cannot carry, on DELETE, a column the routing needs: a DELETE
// carries the partition's replica identity, whatever the root's (and
// partitions do not inherit REPLICA IDENTITY FULL).
func checkPartitionIdentities(ctx context.Context, db *pgx.Conn, file string, t *TableRoute) error {
	rows, err := db.Query(ctx, `
SELECT n.nspname::text, c.relname::text, c.relreplident::text,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               AND (c.relreplident = 'f' OR EXISTS (
                 SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND a.attnum = ANY (i.indkey)
                   AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident)))))
FROM pg_partition_tree(to_regclass($1)) pt
JOIN pg_class c ON c.oid = pt.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE pt.isleaf AND pt.level > 0
ORDER BY 1, 2`, pgx.Identifier{t.Schema, t.Name}.Sanitize())
	if err != nil {
		return fmt.Errorf("read partitions of %s: %w", t.QualifiedName(), err)
	}
	type part struct {
		schema, name, ident string
		identity            []string
	}
	var parts []part
	for rows.Next() {
		var p part
		if err := rows.Scan(&p.schema, &p.name, &p.ident, &p.identity); err != nil {
			return fmt.Errorf("read partitions of %s: %w", t.QualifiedName(), err)
		}
		parts = append(parts, p)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read partitions of %s: %w", t.QualifiedName(), err)
	}
	need := []fieldColumn{{"id_column", t.docIDColumn()}}
	if t.IsChild() {
		need[0].field = "parent.id_column"
	}
	if t.DocumentTypeColumn != "" {
		need = append(need, fieldColumn{"document_type_column", t.DocumentTypeColumn})
	}
	for _, p := range parts {
		for _, fc := range need {
			if !slices.Contains(p.identity, fc.column) {
				return precondition("routing file %s: table %s: field %s: column %q is not in the replica identity of its partition %s (REPLICA IDENTITY %s: %s), so a DELETE there would not carry it (partitions do not inherit REPLICA IDENTITY); run ALTER TABLE %s REPLICA IDENTITY FULL",
					file, t.QualifiedName(), fc.field, fc.column, p.schema+"."+p.name, identityName(p.ident[0]), strings.Join(p.identity, ", "), pgx.Identifier{p.schema, p.name}.Sanitize())
			}
		}
	}
	return nil
}
