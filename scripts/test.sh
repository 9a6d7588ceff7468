#!/usr/bin/env bash
# The project's test command:
#
#   bash scripts/test.sh                      # every package
#   bash scripts/test.sh ./internal/testenv/... -run Postgres -v
#
# Arguments go to `go test`. When the first one is not a flag, the arguments
# name the packages, and gofmt and go vet check those packages only; otherwise
# everything (./...) is checked and tested.
#
# Works on a fresh CI machine (Debian 12, root, no container registry): it
# installs docker.io, mmdebstrap and npm when missing, starts dockerd when
# `docker info` fails, builds the test images (.ci/images.sh, skipped when
# they are current) and then runs gofmt, go vet and go test. Every step is
# idempotent, and each phase prints its duration.
set -euo pipefail
cd "$(dirname "$0")/.."

# testcontainers-go settings for these machines (see internal/testenv):
# the reaper image cannot be pulled, and /.dockerenv exists in the VM, which
# would make testcontainers dial the gateway instead of loopback.
export TESTCONTAINERS_RYUK_DISABLED=true
export TESTCONTAINERS_HOST_OVERRIDE=127.0.0.1

readonly DOCKERD_LOG=/var/log/changefeed-dockerd.log
readonly DOCKERD_LOCK=/tmp/changefeed-dockerd.lock
readonly DOCKERD_DEADLINE=60 # seconds

log() { printf '%s test.sh: %s\n' "$(date +%T)" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# need_root: installing packages and starting dockerd need root; a machine
# that already has both works for anyone in the docker group.
need_root() {
	[[ $(id -u) -eq 0 ]] || die "$1 needs root"
}

# phase NAME COMMAND...: runs COMMAND and reports how long it took.
phase() {
	local name=$1 start=$SECONDS
	shift
	log "== $name"
	"$@"
	log "== $name: done in $((SECONDS - start))s"
}

apt_install() {
	# DPkg::Lock::Timeout: wait for a concurrent apt instead of failing.
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 "$@"
}

install_packages() {
	local missing=()
	command -v dockerd >/dev/null || missing+=(docker.io)
	command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
	command -v npm >/dev/null || missing+=(npm)
	if [[ ${#missing[@]} -eq 0 ]]; then
		log "docker, mmdebstrap and npm are installed"
		return
	fi
	need_root "installing ${missing[*]}"
	log "installing ${missing[*]}"
	apt-get update -q -o DPkg::Lock::Timeout=300 || apt-get update -q -o DPkg::Lock::Timeout=300
	# Debian's docker-clean hook can delete downloaded .debs while apt
	# upgrades other packages in the same run ("failed to read archive"); a
	# second run finds what is left to do.
	apt_install "${missing[@]}" || {
		log "apt-get install failed, retrying once"
		apt_install "${missing[@]}"
	}
}

start_dockerd() {
	if docker info >/dev/null 2>&1; then
		log "docker engine is running"
		return
	fi
	# One engine only: two concurrent test runs must not both start one.
	exec 8>"$DOCKERD_LOCK"
	flock 8
	if ! docker info >/dev/null 2>&1; then
		need_root "starting dockerd"
		log "starting dockerd (log: $DOCKERD_LOG)"
		# setsid: the engine outlives this script and its process group.
		setsid /usr/sbin/dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
		local deadline=$((SECONDS + DOCKERD_DEADLINE))
		until docker info >/dev/null 2>&1; do
			((SECONDS < deadline)) || die "dockerd not ready after ${DOCKERD_DEADLINE}s; see $DOCKERD_LOG"
			# Short pause between polls of the engine.
			sleep 0.2
		done
	fi
	flock -u 8
	exec 8>&-
}

check_gofmt() {
	local dirs=(.)
	if [[ ${#packages[@]} -gt 0 ]]; then
		mapfile -t dirs < <(go list -f '{{.Dir}}' "${packages[@]}")
	fi
	local unformatted
	unformatted=$(gofmt -l "${dirs[@]}")
	if [[ -n $unformatted ]]; then
		printf '%s\n' "$unformatted" >&2
		die "gofmt: the files above need formatting (gofmt -w)"
	fi
}

# Split the arguments: leading non-flag arguments are packages.
packages=()
if [[ $# -gt 0 && $1 != -* ]]; then
	for arg in "$@"; do
		[[ $arg != -* ]] || break
		packages+=("$arg")
	done
fi
vet_targets=("${packages[@]:-./...}")

command -v go >/dev/null || die "go is not installed"
total=$SECONDS
phase "install packages" install_packages
phase "docker engine" start_dockerd
phase "images" bash .ci/images.sh
phase "gofmt" check_gofmt
phase "go vet" go vet "${vet_targets[@]}"
if [[ ${#packages[@]} -gt 0 ]]; then
	phase "go test" go test -count=1 -timeout 20m "$@"
else
	phase "go test" go test -count=1 -timeout 20m ./... "$@"
fi
log "all passed in $((SECONDS - total))s"
