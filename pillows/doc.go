// Package pillows runs pillows: Kafka consumer-group workers that read
// change stubs, deduplicate them, fetch the documents they name from a
// document store, and hand them to processors (sinks and custom code).
// It is CommCare HQ's pillowtop on franz-go.
//
// # Consuming
//
// Every pillow is one consumer group (cooperative-sticky), and a group serves
// one pillow: Run refuses two pillows in one group, which would split its
// partitions. Several processes running the same pillow share its
// partitions through rebalancing.
//
// # What a pillow reads
//
// A record is decoded and validated in one place (decodeStub): a record
// that is not a valid stub, or a SQL stub without a commit LSN (its version
// would be 0/0 and the document would never update after its first
// write), is published as read to the dead-letter topic, with the reason,
// before the batch's offset is marked. Filter never drops a deletion of a
// document the sinks may hold (see Filter.Match). Each
// assigned partition has one goroutine, so one document's stubs (same key,
// same partition) are handled one batch after another, in order.
//
// # When an offset is committed, and why nothing is lost
//
// A partition's worker takes up to Batching.MaxStubs records (or what came
// within Batching.MaxWait), collapses them to the highest version per
// document, fetches the documents in bulk and runs every processor. Only
// when that batch is fully handled — every document written, or its failure
// durably recorded in changefeed.pillow_errors — is the batch's last record
// marked (kgo.AutoCommitMarks). Marks are committed every CommitInterval, when
// partitions are revoked (after their workers finished the batch in hand),
// and at shutdown (after the batches in hand are finished). So a committed
// offset never passes a stub whose document was not handled, and a crash at
// any point only makes the next owner process the last batches again, which
// the sinks' version checks turn into no-ops.
//
// Partitions that are lost (the session expired: another member may own
// them already) commit nothing: their workers are told first that they no
// longer own the partition, and every later mark is refused. franz-go's
// MarkCommitRecords would accept a mark for any partition; this package
// checks ownership itself.
//
// A transient failure (a store, sink or the errors table unreachable:
// errors wrapping doc.ErrTransient, or connection errors) pauses fetching of
// the partition and retries the whole batch with exponential backoff. The
// offset does not move and no error rows are written, so nothing piles up
// and nothing is skipped during an outage.
//
// A committed offset that retention already deleted is a gap: the client
// is configured never to reset it (kgo.NoResetOffset), and Run returns a
// *CheckpointGoneError naming the pillow and partition; a reindex is needed.
// A new group (no committed offset) starts at the beginning of the log.
//
// # Deduplication
//
// Delivery is at least once. Within a batch, stubs of one document collapse
// to the highest version (SQL: stub.SQLVersion; Couch: the latest in the
// partition). A bounded per-partition memory of the highest version processed
// per document skips stubs already handled before any fetch (SQL: version
// at or below; Couch: the exact same (id, rev) only, because a Couch revision
// of lower generation can become the winner). Every write still carries its
// version and sinks refuse stale ones, which is what guarantees that no sink
// goes back to an older state; the memory only saves work.
//
// # Errors
//
// A document that fails (processor or store error, or a panic, recovered and
// attributed to that document) is recorded in changefeed.pillow_errors and
// the others go on. A document is its source and id (data_source_type,
// data_source_name, document_id, as doc.Document.Key), everywhere in this
// package: one pillow can read the same id from two sources (HQ's Couch→SQL
// migration keeps ids), and each copy has its own error row, which only that
// copy's success clears. Whether old rows may exist is asked of the table
// whenever this process has not recorded a failure itself: another process
// (a partition's previous owner) may have. Processors and stores report
// failures by id (doc.Errors); when a call held one id from several sources,
// its failing copy is found by calling again one document at a time. A retry
// loop per pillow re-processes due rows, refetching the document, with
// backoff Retry.BackoffUnit·n² (HQ: 5·n² minutes); after Retry.MaxAttempts
// the row is marked dead and its stub published to the dead-letter topic.
//
// # What this package does not do
//
// It does not order documents across partitions, and it does not make side
// effects outside a sink idempotent by itself: use Once for effects that
// must happen once per state of a document. Sinks hold one row per id; how
// they order the copies of one id from two sources is package sink's rule
// (the SQL copy wins).
//
// A destination that is unreachable when Run starts (Bootstrap fails
// transiently) is waited for with the transient backoff; Run returns only
// for errors it cannot wait out.
package pillows
