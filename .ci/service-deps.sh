#!/usr/bin/env bash
# System pieces of the service tests (tests/service): Debian's chromium for the browser test and
# a throw-away PostgreSQL server on loopback for the store tests.
#
# Idempotent; never fails the build: whatever cannot be installed or started is reported and the
# matching tests skip with a reason. On success it prints, and writes to $ANOMALENS_SERVICE_ENV
# (default ${TMPDIR:-/tmp}/anomalens-service-env.sh), the line
#     export ANOMALENS_TEST_POSTGRES_URL=postgresql+psycopg://anomalens:...@127.0.0.1:PORT/anomalens_test
# Usage:  .ci/service-deps.sh && . "${TMPDIR:-/tmp}/anomalens-service-env.sh"
set -u
cd "$(dirname "$0")/.."
ENV_FILE="${ANOMALENS_SERVICE_ENV:-${TMPDIR:-/tmp}/anomalens-service-env.sh}"
PG_DIR="${ANOMALENS_PG_DIR:-/tmp/anomalens-pg}"
PG_PORT="${ANOMALENS_PG_PORT:-54329}"
PG_DB=anomalens_test
PG_USER=anomalens
PG_PASSWORD="${ANOMALENS_PG_PASSWORD:-anomalens-ci}"

log() { echo "service-deps: $*" >&2; }
: >"$ENV_FILE" 2>/dev/null || ENV_FILE=/dev/null

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"; else return 1; fi
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -n "$(pg_bin)" ] || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    log "installing ${missing[*]} with apt-get"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
      || ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null; then
      log "apt-get could not install ${missing[*]}; the tests that need them will skip"
    fi
  else
    log "no apt-get: ${missing[*]} not installed; the tests that need them will skip"
  fi
fi
[ -x /usr/bin/chromium ] && log "chromium: $(/usr/bin/chromium --version 2>/dev/null | head -n 1)"

BIN="$(pg_bin)"
if [ -z "$BIN" ]; then
  log "PostgreSQL not available; the PostgreSQL store tests will skip"
  exit 0
fi

# initdb and postgres refuse to run as root: use the postgres account then.
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres 2>/dev/null || true
  run_pg() { runuser -u postgres -- "$@"; }
  mkdir -p "$PG_DIR" && chown postgres "$PG_DIR"
else
  run_pg() { "$@"; }
  mkdir -p "$PG_DIR"
fi

if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
  log "initdb in $PG_DIR/data"
  pwfile="$PG_DIR/pw"
  printf '%s\n' "$PG_PASSWORD" >"$pwfile"
  [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
  if ! run_pg "$BIN/initdb" -D "$PG_DIR/data" -U postgres --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >"$PG_DIR/initdb.log" 2>&1; then
    log "initdb failed (see $PG_DIR/initdb.log); the PostgreSQL store tests will skip"
    exit 0
  fi
  rm -f "$pwfile"
fi

if ! run_pg "$BIN/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  if ! run_pg "$BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c fsync=off" start >/dev/null; then
    log "PostgreSQL did not start (see $PG_DIR/server.log); the PostgreSQL store tests will skip"
    exit 0
  fi
fi

psql_su() { run_pg "$BIN/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -tAq "$@"; }
if [ "$(psql_su -c "SELECT 1 FROM pg_roles WHERE rolname='$PG_USER'")" != 1 ]; then
  psql_su -c "CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD'" || { log "cannot create role"; exit 0; }
fi
if [ "$(psql_su -c "SELECT 1 FROM pg_database WHERE datname='$PG_DB'")" != 1 ]; then
  psql_su -c "CREATE DATABASE $PG_DB OWNER $PG_USER" || { log "cannot create database"; exit 0; }
fi

URL="postgresql+psycopg://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
echo "export ANOMALENS_TEST_POSTGRES_URL=$URL" | tee "$ENV_FILE"
