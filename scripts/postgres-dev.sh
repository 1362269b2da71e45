#!/usr/bin/env bash
# postgres-dev.sh - install (idempotently) Debian's PostgreSQL and start a PRIVATE cluster for a
# Dagster instance on dagster-postgres (README, "Operating it for a team"), without systemd, then create
# the role and database the instance uses and print the connection settings.
#
# The cluster lives under $PRISM_PG_DIR (data, unix socket, log) and listens on loopback only, on its own
# port, so it never collides with a system PostgreSQL. As root, Debian's `postgresql` is installed when
# missing and the server runs as the `postgres` OS user (postgres refuses to run as root); as another user
# PostgreSQL must be installed already and the server runs as that user. Running it again while the
# cluster is up changes nothing. The role may create databases (the tests make one per test).
# Stop it with scripts/postgres-dev-stop.sh.
#
# Optional env knobs:
#   PRISM_PG_DIR=/tmp/prism-postgres   working directory (data/, run/ (the socket), log/, env.sh)
#   PRISM_PG_HOST=127.0.0.1            the address it listens on
#   PRISM_PG_PORT=5433                 its port
#   PRISM_PG_USER=dagster PRISM_PG_PASSWORD=dagster PRISM_PG_DB=dagster   the instance's role and database
#   PRISM_PG_BIN=<newest /usr/lib/postgresql/*/bin>   the server's binaries
#   PRISM_PG_TIMEOUT=60                seconds to wait for the server to accept connections
set -euo pipefail

D="${PRISM_PG_DIR:-/tmp/prism-postgres}"
HOST="${PRISM_PG_HOST:-127.0.0.1}"
PORT="${PRISM_PG_PORT:-5433}"
ROLE="${PRISM_PG_USER:-dagster}"
PASSWORD="${PRISM_PG_PASSWORD:-dagster}"
DB="${PRISM_PG_DB:-dagster}"
TIMEOUT="${PRISM_PG_TIMEOUT:-60}"
DATA="$D/data"
SOCK="$D/run"
LOG="$D/log/postgresql.log"

log() { echo "postgres-dev: $*" >&2; }
die() {
    echo "postgres-dev: ERROR: $*" >&2
    if [ -f "$LOG" ]; then
        echo "---- $LOG: last lines ----" >&2
        tail -n 15 "$LOG" >&2
    fi
    exit 1
}

case "$ROLE$DB" in *[!A-Za-z0-9_]*) die "PRISM_PG_USER and PRISM_PG_DB: letters, digits and _ only" ;; esac
case "$PASSWORD" in *"'"*) die "PRISM_PG_PASSWORD must not contain a single quote" ;; esac

# ---------------------------------------------------------------- install ---
find_bin() {
    if [ -n "${PRISM_PG_BIN:-}" ]; then echo "$PRISM_PG_BIN"; return; fi
    # Debian keeps the server's binaries per major version, off PATH.
    find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1
}
BIN="$(find_bin)"
if [ -z "$BIN" ] || [ ! -x "$BIN/postgres" ]; then
    [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed (as root this script installs Debian's postgresql)"
    log "installing postgresql from apt"
    # Keep the package's maintainer scripts from starting the system cluster (no systemd here).
    added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    ok=0
    for attempt in 1 2 3; do
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; then
            ok=1; break
        fi
        log "apt attempt $attempt failed; retrying in 5 s"; sleep 5
    done
    if [ "$added_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    [ "$ok" = 1 ] || die "apt-get install of postgresql failed"
    BIN="$(find_bin)"
    [ -n "$BIN" ] && [ -x "$BIN/postgres" ] || die "postgresql installed, but no server binary under /usr/lib/postgresql"
fi

# The server's OS user: postgres as root (the package creates it), else whoever runs this.
if [ "$(id -u)" = 0 ]; then
    OWNER=postgres
    id "$OWNER" >/dev/null 2>&1 || die "no OS user '$OWNER' to run the server as"
    as_owner() { runuser -u "$OWNER" -- "$@"; }
else
    OWNER="$(id -un)"
    as_owner() { "$@"; }
fi

# alive: the data directory's postmaster.pid names a live postgres process (guards against pid reuse).
alive() {
    local pid exe
    [ -s "$DATA/postmaster.pid" ] || return 1
    pid="$(head -n 1 "$DATA/postmaster.pid" | tr -dc '0-9')"
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"; exe="${exe##*/}"
    [ "${exe% (deleted)}" = postgres ]
}
ready() { "$BIN/pg_isready" -q -h "$HOST" -p "$PORT" -d postgres -t 2; }
psql_admin() {   # as the cluster's superuser over its unix socket
    as_owner "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U "$OWNER" -d postgres -Atc "$1"
}

if alive && ready; then
    log "already running ($DATA, $HOST:$PORT)"
else
    if alive; then die "a server of $DATA is running but does not answer on $HOST:$PORT (another PRISM_PG_PORT?)"; fi
    mkdir -p "$D" "$D/log" "$SOCK"
    chmod 755 "$D"
    chown "$OWNER" "$D/log" "$SOCK"
    if [ ! -s "$DATA/PG_VERSION" ]; then
        rm -rf "$DATA"
        mkdir -p "$DATA"; chown "$OWNER" "$DATA"; chmod 700 "$DATA"
        # The superuser authenticates by OS user on the socket; everyone else by password over TCP.
        as_owner "$BIN/initdb" -D "$DATA" -U "$OWNER" -E UTF8 --no-locale --auth-local=peer \
            --auth-host=scram-sha-256 >"$D/log/initdb.log" 2>&1 || die "initdb failed (see $D/log/initdb.log)"
    fi
    rm -f "$DATA/postmaster.pid"   # a stale one from a killed server
    # Loopback only, its own port and socket directory: a system PostgreSQL keeps 5432 and /var/run/postgresql.
    as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t "$TIMEOUT" \
        -o "-c listen_addresses=$HOST -c port=$PORT -c unix_socket_directories=$SOCK" start >/dev/null \
        || die "pg_ctl start failed"
    deadline=$(( $(date +%s) + TIMEOUT ))
    until ready; do
        [ "$(date +%s)" -lt "$deadline" ] || die "PostgreSQL did not accept connections on $HOST:$PORT within ${TIMEOUT}s"
        sleep 0.2
    done
    log "started $("$BIN/postgres" --version) on $HOST:$PORT (data $DATA, log $LOG)"
fi

# ------------------------------------------------------ role and database ---
if [ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
    psql_admin "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" || die "cannot create role $ROLE"
    log "created role $ROLE"
fi
if ! PGPASSWORD="$PASSWORD" "$BIN/psql" -X -h "$HOST" -p "$PORT" -U "$ROLE" -d postgres -Atc 'SELECT 1' >/dev/null 2>&1; then
    psql_admin "ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" || die "cannot set the password of role $ROLE"
    log "set the password of role $ROLE"
fi
if [ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    psql_admin "CREATE DATABASE $DB OWNER $ROLE" || die "cannot create database $DB"
    log "created database $DB"
fi
PGPASSWORD="$PASSWORD" "$BIN/psql" -X -h "$HOST" -p "$PORT" -U "$ROLE" -d "$DB" -Atc 'SELECT 1' >/dev/null \
    || die "cannot connect to database $DB as $ROLE on $HOST:$PORT"

cat > "$D/env.sh" <<EOF
export PRISM_PG_HOST=$HOST PRISM_PG_PORT=$PORT PRISM_PG_USER=$ROLE PRISM_PG_DB=$DB
export PRISM_PG_PASSWORD='$PASSWORD' DAGSTER_PG_PASSWORD='$PASSWORD'
EOF
chmod 600 "$D/env.sh"
cat <<EOF
PostgreSQL ready for a Dagster instance (dagster-postgres); in dagster.yaml:
  storage:
    postgres:
      postgres_db:
        hostname: $HOST
        port: $PORT
        db_name: $DB
        username: $ROLE
        password: {env: DAGSTER_PG_PASSWORD}
with DAGSTER_PG_PASSWORD='$PASSWORD' (or: source $D/env.sh)
EOF
