// Package e2e holds end-to-end tests that build the real binaries
// (cdc-publisher, couch-follower, pillow), run them as child processes against
// real servers started with testcontainers-go (PostgreSQL 15, kfake in its own
// container, pouchdb-server; see internal/testenv), and break things at the
// worst moment: kill -9 mid-stream, Kafka paused with stubs in flight, CouchDB
// or a sink's database stopped, offsets deleted by retention.
//
// Every test counts what arrived against what was committed: no committed
// change may be missing, and duplicates may only be what the design allows
// (changes after the last confirmed LSN, seq or offset). Tests poll with a
// deadline instead of sleeping for a condition; a sleep here is the length of
// a scenario (an outage, the moment of a kill), never a wait.
//
// Test files are grouped by component: cdc_*.go and cdcfault_*.go (the
// publisher; harness in internal/faultenv), couch_*.go, pillow_*.go.
package e2e
