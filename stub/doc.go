// Package stub defines the change stub: the small message that names a changed
// document without carrying it, and the versions that order a document's stubs.
//
// The JSON field names are CommCare HQ's ChangeMeta names so that existing
// consumers read stubs unchanged. A stub is keyed in Kafka by its document id, so
// one document's stubs stay in one partition, in publication order.
//
// Versions:
//   - SQL documents are ordered totally by (commit LSN, ordinal within the
//     transaction). The commit LSN, not the LSN of the change itself, is what
//     orders two transactions: a transaction that wrote earlier but committed
//     later holds the final state (see SQLVersion).
//   - Couch documents carry a revision. Revisions are compared by equality and,
//     where the revision history is known, by ancestry. Generation-then-hash only
//     ranks concurrent leaves (it is how CouchDB picks a winner); it is not a
//     time order, because a deleted winning branch can leave a winner of lower
//     generation.
//   - A Couch seq is opaque: it is stored and sent back as given, never parsed
//     for ordering.
package stub
