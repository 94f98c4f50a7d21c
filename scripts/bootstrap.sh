#!/usr/bin/env bash
# Idempotent installer behind `make deps`: system packages for the local stack
# (Redis, PostgreSQL 15) and the project's virtualenv. Safe to run on every `make`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PG_BIN=/usr/lib/postgresql/15/bin
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.installed"

log() { printf 'bootstrap: %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root for: $* (no sudo found)" >&2
        exit 1
    fi
}

system_packages_missing() {
    local tool
    # promtool and prometheus (Debian's prometheus package): the chart's alert rules and
    # dashboard are checked with them (tests/k8s); wrk drives the gateway over HTTP
    # (loadtest/bench_http.py)
    for tool in redis-server redis-cli redis-benchmark promtool prometheus wrk; do
        command -v "$tool" >/dev/null 2>&1 || return 0
    done
    [ -x "$PG_BIN/initdb" ] || return 0
    return 1
}

if system_packages_missing; then
    log "installing redis-server, redis-tools, postgresql, prometheus, wrk (apt)"
    # The packages' own system services are not used (devstack runs its own
    # processes on other ports); if they auto-start on 6379/5432 that is harmless.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        redis-server redis-tools postgresql prometheus wrk
    if system_packages_missing; then
        log "apt finished but redis, promtool, prometheus, wrk or $PG_BIN/initdb is still missing" >&2
        exit 1
    fi
else
    log "system packages present"
fi

# Debian's python3 ships venv's ensurepip separately.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    log "installing python3-venv (apt)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
fi

if [ ! -f pyproject.toml ]; then
    log "pyproject.toml not found in $ROOT" >&2
    exit 1
fi

# Re-install whenever pyproject.toml changed since the last successful install.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    log "installing the project into $VENV (editable, extras dev+loadtest)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[dev,loadtest]'
    touch "$STAMP"
else
    log "virtualenv up to date"
fi
