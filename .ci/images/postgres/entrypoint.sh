#!/bin/sh
# Entrypoint of changefeed/postgres:15, a stand-in for the official image's
# interface: POSTGRES_USER (default postgres), POSTGRES_PASSWORD (required),
# POSTGRES_DB (default $POSTGRES_USER), and a command of the form
# `postgres -c key=value ...` whose arguments override the defaults below.
#
# The data directory lives in the container's own filesystem, so `docker stop`
# followed by `docker start` keeps the data; initialisation runs only once.
# The server is never started during initialisation, so "database system is
# ready to accept connections" is logged exactly once per start.
set -eu

: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PGDATA:=/var/lib/postgresql/data}"

# Accept the official image's `postgres -c k=v` form; anything else that is
# not an option (e.g. `bash`) is run as is, for debugging.
if [ "${1:-}" = postgres ]; then
	shift
fi
case "${1:-}" in
'' | -*) ;;
*) exec "$@" ;;
esac

as_postgres() {
	setpriv --reuid=postgres --regid=postgres --init-groups "$@"
}

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
	if [ -z "${POSTGRES_PASSWORD:-}" ]; then
		echo "entrypoint: POSTGRES_PASSWORD must be set" >&2
		exit 1
	fi
	pwfile=$(mktemp)
	printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
	chown postgres "$pwfile"
	# Local socket connections (docker exec psql) are trusted; TCP needs SCRAM.
	as_postgres initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
		--auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
	rm -f "$pwfile"

	cat >>"$PGDATA/postgresql.conf" <<-CONF
		# Added by changefeed's entrypoint.sh; command-line -c key=value wins.
		listen_addresses = '*'
		wal_level = logical
		max_replication_slots = 20
		max_wal_senders = 20
		# The image drops LLVM to stay small.
		jit = off
	CONF
	cat >>"$PGDATA/pg_hba.conf" <<-HBA
		# Added by changefeed's entrypoint.sh.
		host all all all scram-sha-256
		host replication all all scram-sha-256
	HBA

	if [ "$POSTGRES_DB" != postgres ]; then
		# Single-user mode creates the database without starting a server.
		db=$(printf '%s' "$POSTGRES_DB" | sed 's/"/""/g')
		out=$(printf 'CREATE DATABASE "%s";\n' "$db" | as_postgres postgres --single -D "$PGDATA" -c jit=off postgres 2>&1)
		case "$out" in
		*ERROR*)
			printf 'entrypoint: creating database failed:\n%s\n' "$out" >&2
			exit 1
			;;
		esac
	fi
	echo "entrypoint: initialised $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)" >&2
fi

# exec + setpriv: postgres becomes PID 1 and receives docker's stop signal.
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" "$@"
