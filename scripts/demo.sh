#!/usr/bin/env bash
# The README's demo command:
#
#   bash scripts/demo.sh            # runs until the demo has shown its results
#   bash scripts/demo.sh -follow    # keeps everything running; Ctrl-C stops it
#
# On this machine it starts a throwaway PostgreSQL 15 (wal_level=logical) and a
# CouchDB-API server (pouchdb-server) on loopback under .demo/, then runs
# `go run ./cmd/demo`, which embeds a Kafka-protocol cluster (kfake) in-process
# unless -kafka-brokers names a real one, starts the cdc-publisher, the
# couch-follower and a pillow, writes demo data and prints the stubs and the
# reporting table they produce. Extra arguments go to cmd/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
demo=$root/.demo
mkdir -p "$demo"

log() { printf '%s demo.sh: %s\n' "$(date +%T)" "$*" >&2; }

PG_BIN=/usr/lib/postgresql/15/bin
if [[ ! -x $PG_BIN/postgres ]]; then
	log "installing postgresql-15"
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15
fi
command -v npm >/dev/null || {
	log "installing npm"
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm
}

# A free loopback port, asked of the kernel.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
	node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }

pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	[[ -d $demo/pg ]] && su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$demo/pg' -m fast stop" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# PostgreSQL runs as the postgres user; a fresh cluster each run keeps the
# demo repeatable.
pg_port=$(free_port)
rm -rf "$demo/pg"
install -d -o postgres -g postgres "$demo/pg" "$demo/pgsock"
chmod 755 "$demo"
su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$demo/pg' -U postgres --auth=trust >/dev/null"
su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$demo/pg' -l '$demo/pg/server.log' -w -o \"-c wal_level=logical -c listen_addresses=127.0.0.1 -p $pg_port -k '$demo/pgsock' -c max_replication_slots=10 -c max_wal_senders=10\" start >/dev/null"
log "PostgreSQL 15 on 127.0.0.1:$pg_port"

if [[ ! -x $demo/npm/node_modules/.bin/pouchdb-server ]]; then
	log "installing pouchdb-server (once, about 90 s)"
	mkdir -p "$demo/npm"
	(cd "$demo/npm" && npm install --no-audit --no-fund --loglevel=error pouchdb-server@4.2.0 >/dev/null)
fi
couch_port=$(free_port)
mkdir -p "$demo/couch"
(cd "$demo/couch" && exec "$demo/npm/node_modules/.bin/pouchdb-server" --in-memory -o 127.0.0.1 -p "$couch_port" >"$demo/couch/server.out" 2>&1) &
pids+=($!)
for _ in $(seq 1 100); do
	curl -fsS "http://127.0.0.1:$couch_port/" >/dev/null 2>&1 && break
	sleep 0.1
done
log "CouchDB API (pouchdb-server) on 127.0.0.1:$couch_port"

go build -o "$demo/bin/" ./cmd/cdc-publisher ./cmd/couch-follower ./cmd/pillow ./cmd/demo
"$demo/bin/demo" -bin "$demo/bin" \
	-postgres-url "postgres://postgres@127.0.0.1:$pg_port/postgres?sslmode=disable" \
	-couch-url "http://127.0.0.1:$couch_port" "$@"
