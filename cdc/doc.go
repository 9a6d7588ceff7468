// Package cdc is the cdc-publisher: it streams a PostgreSQL logical
// replication slot (pgoutput) and publishes one stub per changed document to
// Kafka, in commit order, keyed by document id.
//
// # What it guarantees
//
// Every committed change of a published table, and only committed changes,
// reaches Kafka at least once. Rolled-back transactions are never decoded by
// PostgreSQL, so they produce nothing. A stub's version is the commit LSN of
// its transaction and its ordinal within it (see stub.SQLVersion), so two
// transactions touching one document are ordered by when they committed, not
// by when they wrote.
//
// # When an LSN is confirmed
//
// The slot's confirmed_flush_lsn is the point PostgreSQL may discard WAL up
// to, and where decoding restarts after any disconnection. The publisher moves
// it with these rules:
//
//  1. Every transaction is a unit of an ack.Tracker: opened at BEGIN, one
//     message counted per stub produced, closed at COMMIT with the
//     transaction's end LSN. Kafka acknowledgements resolve messages in any
//     order; the tracker's confirmed position is the end of the newest
//     transaction such that it and every earlier transaction are fully
//     acknowledged.
//  2. Periodically (Config.StatusInterval) and at shutdown, if that position
//     advanced, the publisher first UPSERTs it into
//     changefeed.cdc_checkpoint (committed, hence durable), and only then
//     sends a standby status update whose write, flush and apply positions
//     are all set explicitly to it. So the checkpoint is always >= the slot's
//     confirmed_flush_lsn.
//  3. Keepalives never confirm anything while a transaction is open or a
//     stub is unacknowledged. Only when the tracker is idle may the
//     keepalive's WAL end be confirmed (checkpoint first, as above), so that
//     a slot whose published tables are quiet retains no WAL (except, until
//     the next write, the few hundred bytes of the publisher's own last
//     checkpoint write: confirming those would write another checkpoint,
//     forever). When idle the publisher asks the server for a keepalive on
//     every status interval. An optional heartbeat (pg_logical_emit_message
//     on an interval) adds WAL on a database that has none.
//
// Status updates always set write, flush and apply to the confirmed
// position explicitly (pglogrepl's helper would replace a zero flush with
// the write position), at least every Config.KeepaliveInterval, and at once
// when the server asks.
//
// Between two confirmations nothing is lost: changes after the confirmed
// position are still in the slot, and a crash at any point replays them from
// there. The price is duplicates: stubs published after the last
// confirmation are published again after a restart. Consumers deduplicate by
// version.
//
// # The checkpoint as a witness
//
// A slot that is missing while a checkpoint row exists (dropped, lost in a
// failover), whose confirmed_flush_lsn is ahead of the checkpoint, or whose
// wal_status is lost may have skipped changes. So may a checkpoint that does
// not belong to this server's WAL history: each row records the cluster's
// system_identifier and timeline (IDENTIFY_SYSTEM), and a row of another
// cluster, or one ahead of pg_current_wal_lsn() (a restore, a failover to a
// shorter history), is not trusted. The publisher then refuses to start
// (ErrPossibleGap) and names the positions and the one Config.AllowNewSlot
// value (slot@checkpoint LSN) that accepts exactly this gap: creating a
// fresh slot, taking the slot's position, or discarding the checkpoint. An
// AllowNewSlot that no gap needs is refused (ErrConfig), so one left set
// cannot accept a later gap. A timeline change with the checkpoint inside
// this server's WAL is logged and accepted: the row is in this history, and
// its LSN was written before it. The checkpoint is written with
// synchronous_commit at least local, so a server crash cannot leave the
// slot ahead of it.
//
// # Routing
//
// Each table of the routing file (see Routing and testdata/routing.yaml)
// names its topic, document type, id, domain and subtype columns, how a
// deletion shows, or, for a child table, the column naming its parent
// document. The publisher creates the publication with the routed tables
// (publish_via_partition_root = true) when it is missing, adds routed tables
// an existing one does not cover (membership read from pg_publication_rel
// and pg_publication_namespace), and never removes tables. changefeed's own
// schema is never published.
//
// Routing is resolved from every pgoutput Relation message, by the schema,
// name and columns it carries, never from OIDs remembered at start: a table
// renamed, swapped or recreated mid-stream is routed by what the server
// describes at that point of the WAL (a table renamed into place must join
// the publication in the same transaction; see the README). A relation the
// routing does not name is looked up in the catalog: a partition published
// under its own name (publish_via_partition_root = false) is routed by its
// root. The replica identity is re-checked on every Relation message: a
// DELETE that lacks the document (or parent) id or the document type column
// returns ErrSchema naming the remedy, never a stub on the wrong topic. Via
// the root, a DELETE carries its partition's replica identity: partitions
// are checked at start, and a partition whose own Relation message lacks a
// needed column makes a DELETE of the root without that value an error too.
//
// Rows of published tables that the routing does not name go to the default
// topic (meta) with document_type = table (root) name and the primary key as
// document id (under REPLICA IDENTITY FULL too; a table without a primary
// key or replica identity key is skipped with a warning). A composite key's
// parts are percent-encoded ('%' as %25, '/' as %2F) and joined with '/',
// so distinct keys stay distinct documents. An UPDATE that changes a
// document's id publishes a stub for the old id too (a deletion, or the old
// parent's stub for a child row); unchanged TOASTed key values are taken
// from the old key tuple. An id that is not valid UTF-8 would not survive
// JSON: the row is refused (ERROR, changefeed_cdc_refused_rows_total) and
// the stream goes on.
//
// A publication column list that lacks a routed column is refused at
// start; one that carries them is respected.
//
// While streaming, a routed table that exists but is not in the publication
// (created or recreated after it, e.g. by an online swap of renames) is
// never decoded by PostgreSQL: the publisher stops (ErrSchema) naming it and
// the remedy (add it, backfill), checked every Config.LagInterval. A
// Relation message without a routed column (renamed or dropped) stops it
// likewise, naming table, column and remedy; once the routing names the new
// column, Relation messages of the older schema still being replayed are
// matched by position when the table never had a column dropped.
//
// # What it does not guarantee
//
//   - Exactly once: see duplicates above.
//   - TRUNCATE is not expanded into per-row stubs: it publishes one
//     table-level event on Config.ControlTopic, logs a warning and counts
//     changefeed_cdc_truncates_total. PostgreSQL decodes neither DETACH nor
//     DROP of a partition, nor (via the root) a TRUNCATE of one partition:
//     while streaming, the publisher compares the partitions of routed
//     tables every Config.LagInterval and logs an ERROR and counts
//     changefeed_cdc_partition_changes_total for each; what happens while it
//     is stopped goes unseen.
//   - DROP TABLE publishes no deletions.
//   - A DELETE carries only the replica identity: columns outside it (domain,
//     subtype) are empty in deletion stubs unless the table has REPLICA
//     IDENTITY FULL. The document id (or the parent id of a child table) must
//     be in the replica identity; that is checked at start.
//
// # Failures
//
// Before returning any error a restart would not cure, the publisher flushes
// the producer (bounded by Config.ShutdownTimeout) and confirms the
// acknowledged prefix (rule 1 above), so the restart after the fix resumes
// at the failing transaction. Stubs still unacknowledged when the producer
// closes are not logged one by one (they are published again after the
// restart); refusals are logged at most once per 10 seconds with a count.
//
// A record Kafka refuses for good stops the publisher with an error (the slot
// replays from the confirmed LSN on restart); a stub too large for its topic
// is the exception: package publish records it to the oversized topic and
// reports it delivered, so that it is confirmed past. Kafka unreachable: the producer
// retries forever, nothing new is confirmed, readiness fails, the process
// stays up; the number of unacknowledged stubs is bounded
// (Config.MaxInFlight), so memory is too. PostgreSQL connection lost: the
// publisher waits for Kafka to acknowledge what was produced, reconnects with
// backoff and resumes from the confirmed position.
//
// # Publish from anywhere
//
// pg_logical_emit_message(true, 'changefeed', '<stub json>') inside an
// application transaction publishes that stub in commit order, stamped with
// the transaction's commit LSN, ordinal, xid and commit time, only if the
// transaction commits. The JSON is a stub (HQ ChangeMeta names) validated
// with stub.Unmarshal; an optional "topic" field picks the topic (it must be
// one the routing knows), otherwise the topic follows document_type. An
// invalid message is logged, counted (changefeed_cdc_invalid_messages_total)
// and skipped.
package cdc
