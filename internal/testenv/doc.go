// Package testenv is test-only infrastructure: helpers that start the real
// servers the integration tests talk to, as Docker containers through
// testcontainers-go, and remove them when the test ends.
//
//   - [Postgres]: PostgreSQL 15 with wal_level=logical (image changefeed/postgres:15).
//   - [Kafka]: kfake, a Kafka wire-protocol cluster in its own process
//     (image changefeed/kfake:dev, built from cmd/kfake-server).
//   - [Couch]: pouchdb-server 4.2.0, which speaks the CouchDB HTTP API
//     (image changefeed/pouchdb:4.2.0); set CHANGEFEED_TEST_COUCH_IMAGE to an
//     Apache CouchDB 3 image (for example couchdb:3) to run against CouchDB.
//
// The images are never pulled: .ci/images.sh builds them locally, and
// `bash scripts/test.sh` runs it before the tests. testcontainers-go needs two
// environment variables on the CI machines, both set by scripts/test.sh:
//
//	TESTCONTAINERS_RYUK_DISABLED=true     the reaper image cannot be pulled
//	TESTCONTAINERS_HOST_OVERRIDE=127.0.0.1  the VM has /.dockerenv; without
//	                                      this testcontainers dials the gateway
//
// Every server is published on a loopback host port chosen before the
// container is created, so that a stopped and restarted server keeps its
// address and clients can reconnect. Postgres and Couch keep their data across
// Stop/Start. kfake keeps everything in memory, so a Kafka outage is simulated
// with [Kafka.Pause], never by stopping it.
//
// Production code must not import this package.
package testenv
