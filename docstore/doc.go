// Package docstore fetches the full documents that change stubs name, in
// bulk, from the stores they live in: PostgreSQL tables (Postgres) and
// CouchDB databases (Couch).
//
// What a store guarantees:
//   - Fetch returns one document per distinct (data_source_name, document id)
//     of the batch, in the order of first appearance, holding the state the
//     store has at the time of the fetch — never older than the stubs'.
//   - A document the store no longer has is returned with Deleted set (not an
//     error), so that sinks delete it.
//   - A failure of the store itself (unreachable, timed out, overloaded,
//     refused credentials, a table or database missing at the SQL level)
//     wraps doc.ErrTransient: nothing is returned and the caller retries the
//     whole batch later. A failure that belongs to some documents only (a
//     stub naming an unconfigured source, an id the id column cannot hold, a
//     CouchDB database that does not exist) is returned as doc.Errors
//     together with the documents that were fetched.
//   - Postgres reads only from a primary. A row missing on a standby may be
//     replication lag, and the tombstone written for it would delete a live
//     document, so every fetch checks pg_is_in_recovery() (a column of the
//     query; a separate query when no row came back) and a standby fails
//     with ErrStandby, wrapped in doc.ErrTransient: the batch waits until
//     the store points at a primary again (after a failover, say).
//
// What it does not guarantee: the version a SQL document carries is the
// highest stub version of the batch, not the version of the state read (a
// table row has no LSN); the state read can be newer. That is safe for
// sinks: a later stub of the newer change carries its own, higher version,
// and its fetch returns that state or a newer one. What was read is named by
// Version.Row, the row's xmin (the transaction that wrote it; empty for a
// view), which pillows.Once uses to run an effect once per state read.
//
// JSON numbers in bodies are json.Number, never float64, so that a bigint id
// or a numeric amount survives exactly.
package docstore
