#!/usr/bin/env bash
# Builds the local images that the real-server tests (internal/testenv) run:
#
#   changefeed/postgres:15    PostgreSQL 15 from Debian        .ci/images/postgres
#   changefeed/kfake:dev      cmd/kfake-server, FROM scratch   .ci/images/kfake
#   changefeed/pouchdb:4.2.0  pouchdb-server on Debian nodejs  .ci/images/pouchdb
#
# There is no container registry on the CI machines, so nothing is pulled:
# Debian root filesystems are made by mmdebstrap from the host's apt mirror
# (read at run time from /etc/apt/sources.list.d, never written into the
# repository) and imported with `docker import`; pouchdb-server comes from
# the npm registry through the host's npm; kfake-server is built with the
# host's Go toolchain.
#
# An image is built only when `docker image inspect` finds it missing or its
# changefeed.source-hash label differs from the hash of its inputs, so a
# second run takes a second. The imported root filesystems are kept as images
# (changefeed/rootfs-*): editing a Dockerfile or entrypoint.sh rebuilds only
# the thin layer on top.
#
# Each rootfs is one mmdebstrap run with its packages included (25-40 s
# each, measured). A shared minbase does not pay off: mmdebstrap of the bare
# minbase alone took 44 s here, installing on top of it with `RUN apt-get`
# took 90 s + 50 s in ENVIRONMENT.md's measurement and needs the mirror from
# inside the build; sharing the downloaded .debs between the two runs
# through mmdebstrap's sync-in/sync-out hooks measured no gain (36 s both).
#
# Needs root (mmdebstrap), docker, mmdebstrap, go and npm; scripts/test.sh
# installs them. Environment:
#   CHANGEFEED_CI_CACHE  cache directory (default /var/tmp/changefeed-ci)
#
# mmdebstrap hooks are single-quoted on purpose: they expand "$1" (the chroot).
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/.."

readonly PG_IMAGE=changefeed/postgres:15
readonly PG_ROOTFS=changefeed/rootfs-postgres:15
readonly KFAKE_IMAGE=changefeed/kfake:dev
readonly POUCH_IMAGE=changefeed/pouchdb:4.2.0
readonly NODE_ROOTFS=changefeed/rootfs-node:bookworm
readonly POUCHDB_SERVER=pouchdb-server@4.2.0
readonly LABEL=changefeed.source-hash
CACHE=${CHANGEFEED_CI_CACHE:-/var/tmp/changefeed-ci}

log() { printf '%s images.sh: %s\n' "$(date +%T)" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# retry_once: a mirror or the registry occasionally fails one download.
retry_once() {
	"$@" || {
		log "failed, retrying once: $1"
		"$@"
	}
}

for tool in docker mmdebstrap go npm sha256sum flock; do
	command -v "$tool" >/dev/null || die "$tool is missing (bash scripts/test.sh installs it)"
done

mkdir -p "$CACHE"
# Engineers may run the tests concurrently; only one of them builds.
exec 9>"$CACHE/images.lock"
flock 9

# label_of IMAGE: its source-hash label, empty when the image is missing.
label_of() {
	docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$1" 2>/dev/null || true
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# short_hash: a short hash of stdin, for the source-hash labels.
short_hash() { sha256sum | cut -c1-16; }

image_id() { docker image inspect -f '{{.Id}}' "$1"; }

# docker_build IMAGE HASH CONTEXT [docker build args...]
docker_build() {
	local image=$1 hash=$2 context=$3
	shift 3
	local out
	# Output only on failure: the legacy builder's deprecation notice is noise.
	if ! out=$(docker build --quiet --label "$LABEL=$hash" --label changefeed.image=true -t "$image" "$@" "$context" 2>&1); then
		printf '%s\n' "$out" >&2
		die "docker build $image failed"
	fi
	# The image this one replaced is now dangling; drop it.
	docker image prune --force --filter label=changefeed.image=true >/dev/null
	log "built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%d MB", $1/1e6}'))"
}

# Slimming shared by both root filesystems: no documentation, man pages or
# translations; no full perl and no apt sources (nothing is installed after
# the build); no locale sources (C.UTF-8 is built into glibc).
readonly SLIM=(
	--dpkgopt='path-exclude=/usr/share/man/*'
	--dpkgopt='path-exclude=/usr/share/doc/*'
	--dpkgopt='path-include=/usr/share/doc/*/copyright'
	--dpkgopt='path-exclude=/usr/share/locale/*'
	--dpkgopt='path-exclude=/usr/share/info/*'
	--dpkgopt='path-exclude=/usr/share/lintian/*'
	--customize-hook='rm -rf "$1"/etc/apt/sources.list "$1"/etc/apt/sources.list.d/* "$1"/usr/share/i18n "$1"/usr/share/perl "$1"/usr/lib/*-linux-gnu/perl "$1"/usr/lib/*-linux-gnu/libperl.so*'
)

# Postgres also drops LLVM and the JIT (the entrypoint sets jit=off) and the
# cluster the package's postinst makes (the entrypoint runs initdb).
readonly PG_SLIM=(
	--customize-hook='rm -rf "$1"/usr/lib/postgresql/15/lib/bitcode "$1"/usr/lib/postgresql/15/lib/llvmjit* "$1"/usr/lib/*-linux-gnu/libLLVM* "$1"/usr/lib/*-linux-gnu/libz3* "$1"/var/lib/postgresql/15 "$1"/etc/postgresql/15'
)

# rootfs_hash PACKAGES [mmdebstrap args...]: what a rootfs is labelled with.
rootfs_hash() { printf '%s\n' "$@" "${SLIM[@]}" | short_hash; }

# ensure_rootfs IMAGE PACKAGES [mmdebstrap args...]: makes IMAGE a slim Debian
# bookworm minbase root filesystem with PACKAGES, unless it already is one
# built with the same arguments.
ensure_rootfs() {
	local image=$1 packages=$2
	shift 2
	local hash
	hash=$(rootfs_hash "$packages" "$@")
	[[ $(label_of "$image") != "$hash" ]] || return 0

	local mirror security
	# The mirror serves both the host and mmdebstrap; its name stays out of the repo.
	mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
	security=$(awk '/^URIs:/{u=$2} /^Suites:.*security/{print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
	if [[ -z $mirror ]]; then # one-line format
		mirror=$(awk '$1=="deb" && $3!~/security/{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
		security=$(awk '$1=="deb" && $3~/security/{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
	fi
	[[ -n $mirror ]] || die "no Debian mirror found in /etc/apt/sources.list.d/*.sources"
	local sources=("deb $mirror bookworm main" "deb $mirror bookworm-updates main")
	[[ -z $security ]] || sources+=("deb $security bookworm-security main")

	local tar="$CACHE/rootfs.tar"
	log "mmdebstrap minbase + $packages -> $image"
	retry_once mmdebstrap --variant=minbase --include="$packages" "${SLIM[@]}" "$@" \
		bookworm "$tar" "${sources[@]}"
	docker import --change "LABEL $LABEL=$hash" --message "mmdebstrap minbase + $packages" "$tar" "$image" >/dev/null
	rm -f "$tar"
}

build_postgres() {
	ensure_rootfs "$PG_ROOTFS" postgresql-15 "${PG_SLIM[@]}"
	local hash
	hash=$({
		cat .ci/images/postgres/Dockerfile .ci/images/postgres/entrypoint.sh
		image_id "$PG_ROOTFS"
	} | short_hash)
	[[ $(label_of "$PG_IMAGE") != "$hash" ]] || return 0
	docker_build "$PG_IMAGE" "$hash" .ci/images/postgres --build-arg "BASE=$PG_ROOTFS"
}

build_kfake() {
	local hash
	hash=$({
		find cmd/kfake-server -name '*.go' ! -name '*_test.go' -print0 | sort -z | xargs -0 cat
		cat go.mod go.sum .ci/images/kfake/Dockerfile
		go version
	} | short_hash)
	[[ $(label_of "$KFAKE_IMAGE") != "$hash" ]] || return 0
	local context
	context=$(mktemp -d)
	log "go build cmd/kfake-server"
	CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$context/kfake-server" ./cmd/kfake-server
	docker_build "$KFAKE_IMAGE" "$hash" "$context" -f .ci/images/kfake/Dockerfile
	rm -rf "$context"
}

# npm_dir is where pouchdb-server's node_modules live; it is the build context.
readonly npm_dir="$CACHE/npm/${POUCHDB_SERVER//@/-}"

# npm_install installs pouchdb-server on the host. --ignore-scripts: leveldown
# ships prebuilt N-API binaries that node-gyp-build finds at run time, and the
# optional sqlite3 would try to download or compile a binary.
npm_install() {
	local tmp="$npm_dir.tmp"
	rm -rf "$tmp"
	mkdir -p "$tmp"
	retry_once npm install --prefix "$tmp" --no-audit --no-fund --ignore-scripts --loglevel=error "$POUCHDB_SERVER"
	[[ -d $tmp/node_modules/leveldown/prebuilds/linux-x64 ]] || die "leveldown has no linux-x64 prebuild"
	rm -rf "$npm_dir"
	mv "$tmp" "$npm_dir"
}

pouch_hash() {
	{
		cat .ci/images/pouchdb/Dockerfile
		image_id "$NODE_ROOTFS" 2>/dev/null || true
	} | short_hash
}

pouch_current() {
	[[ $(label_of "$NODE_ROOTFS") == "$(rootfs_hash nodejs)" && $(label_of "$POUCH_IMAGE") == "$(pouch_hash)" ]]
}

build_pouchdb() {
	! pouch_current || return 0
	ensure_rootfs "$NODE_ROOTFS" nodejs
	docker_build "$POUCH_IMAGE" "$(pouch_hash)" "$npm_dir" -f .ci/images/pouchdb/Dockerfile --build-arg "BASE=$NODE_ROOTFS"
}

start=$SECONDS
# The npm download runs while the CPU- and disk-bound builds run.
npm_pid=
if ! pouch_current && [[ ! -x $npm_dir/node_modules/.bin/pouchdb-server ]]; then
	log "npm install $POUCHDB_SERVER (background)"
	npm_install >"$CACHE/npm.log" 2>&1 &
	npm_pid=$!
fi
build_postgres
build_kfake
if [[ -n $npm_pid ]]; then
	wait "$npm_pid" || {
		cat "$CACHE/npm.log" >&2
		die "npm install $POUCHDB_SERVER failed"
	}
fi
build_pouchdb
log "images ready in $((SECONDS - start))s: $PG_IMAGE $KFAKE_IMAGE $POUCH_IMAGE"
