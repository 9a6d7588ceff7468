// Package couchsource follows CouchDB _changes feeds and publishes one stub
// per change to Kafka, with the same stubs and producer guarantees as the
// WAL publisher, so that consumers do not care where a document lives.
//
// # What a _changes feed promises, and what the follower does about it
//
// A feed delivers each change at least once, may rewind (replay some or all
// changes, up to from the beginning), does not promise time order, may skip
// intermediate revisions of a document updated several times (it lists each
// document once, at its latest change), and its seq is an opaque token
// ("12-g1AAAA…" on CouchDB 2/3, an integer elsewhere). The follower never
// parses a seq to order changes: it stores seqs and sends them back as given.
//
// # Stubs
//
// One stub per change row: data_source_type "couch", data_source_name the
// database, document_rev the winning revision (the document's _rev as
// include_docs returns it), seq the row's seq, document_type/domain/subtype
// from the document's fields as the Routing names them, is_deletion when
// the row says deleted or the doc_type ends in "-Deleted". A DELETE leaves
// a tombstone without fields, so a deletion without doc_type is routed by
// the revision before it while compaction has not removed it (else it goes
// to the default topic as "Unknown", counted). Design documents are skipped
// by default; their changes still advance the checkpoint.
//
// # When a seq is checkpointed, and why nothing is lost in between
//
// Each change read is a unit of an ack.Tracker, in feed order; its stub is
// produced to Kafka (idempotent producer, acks=all, key = document id) and
// the unit resolves when Kafka acknowledges it. The checkpoint of a database
// is the seq of a change such that it and every change before it in feed
// order are acknowledged: the position just below the oldest unacknowledged
// change, never the newest acknowledged one (acks arrive out of order across
// partitions). It is written to PostgreSQL (changefeed.couch_checkpoint,
// keyed by source and database, with the database's identity) every
// CheckpointEvery acknowledged changes, at least every CheckpointInterval
// while it moves, and at shutdown after the producer's flush.
//
// So at any moment every change after the stored seq is either acknowledged
// or still to be read again: a crash, a kill -9 or a lost connection resumes
// from the stored seq, and the changes since are published again
// (duplicates, which consumers drop by revision), never skipped. While
// Kafka is down nothing is acknowledged and the checkpoint does not move;
// while checkpoint writes fail, reading pauses.
//
// The stored checkpoint never moves backwards: when the feed replays
// changes from before it (a server-side rewind), the follower keeps
// publishing them but does not store their seqs until the feed is past the
// stored one. This is the one place a seq is compared, by its numeric
// prefix, and only to withhold a write; servers whose seqs have no numeric
// prefix get no such guard.
//
// # Resets
//
// A database deleted and recreated, or restored, is not the database the
// checkpoint was taken from. The follower detects it by the database's
// identity (a marker document it writes, see identity.go: servers report no
// usable identity of their own), by a stored seq the server rejects, or by
// an integer seq beyond the database's update_seq. It then logs, counts
// (changefeed_couch_rewinds_total) and replays the database from seq 0:
// duplicates rather than losses. A database that disappears (404) is an
// error that is retried with backoff while readiness fails.
//
// # Faults
//
// A server that is down, slow, answers 5xx, an HTML page or a truncated
// line is retried with exponential backoff from the last change read; the
// checkpoint does not move meanwhile. A 429 or 503 with Retry-After waits as
// asked. A feed that stays connected but silent (no rows, no heartbeat
// newlines) fails its read deadline, a few heartbeats long, and is
// reconnected; when continuous feeds stay silent from their first byte (a
// proxy that buffers responses), the follower falls back to longpoll, whose
// every request it bounds itself (some servers ignore the timeout
// parameter). Authentication failures (401, 403) stop the follower with
// ErrAuth. Credentials never appear in logs or errors (Masker).
//
// # Memory
//
// include_docs returns whole documents and CouchDB has no field projection
// on _changes. The follower's HTTP transport projects the response while it
// streams: each row's document is reduced to the few fields a stub needs
// (doc_type, the domain and subtype fields of the routing), and the rest is
// skipped without being kept. Memory does not depend on document size;
// stubs in flight are bounded by the producer's buffer.
package couchsource
