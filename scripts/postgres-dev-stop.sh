#!/usr/bin/env bash
# Stop the private PostgreSQL cluster started by scripts/postgres-dev.sh.
#
# Only the server recorded in the data directory's postmaster.pid is stopped (after checking that the pid
# still belongs to postgres): `pg_ctl stop -m fast` as the server's OS user, SIGKILL if it is still alive
# after 30 s; no pkill/killall by name.
#
# Env: PRISM_PG_DIR (default /tmp/prism-postgres) - must match postgres-dev.sh.
#      PRISM_PG_PURGE=1  also delete $PRISM_PG_DIR (the data with it).
set -uo pipefail

D="${PRISM_PG_DIR:-/tmp/prism-postgres}"
DATA="$D/data"

log() { echo "postgres-dev-stop: $*" >&2; }

pid_of_server() {
    local pid exe
    [ -s "$DATA/postmaster.pid" ] || return 1
    pid="$(head -n 1 "$DATA/postmaster.pid" | tr -dc '0-9')"
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"; exe="${exe##*/}"
    [ "${exe% (deleted)}" = postgres ] || return 1
    echo "$pid"
}

# running PID: the process exists and is not a zombie (the server is a daemon: whoever reaps it may be slow).
running() { [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]; }

if [ ! -d "$D" ]; then
    log "nothing to do ($D does not exist)"
    exit 0
fi

if pid="$(pid_of_server)"; then
    BIN="${PRISM_PG_BIN:-$(dirname "$(readlink -f "/proc/$pid/exe")")}"
    log "stopping the server (pid $pid)"
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$(stat -c %U "$DATA")" -- "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 30 stop >/dev/null
    else
        "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 30 stop >/dev/null
    fi
    for i in $(seq 1 50); do running "$pid" || break; sleep 0.1; done   # pg_ctl returns as the pid file goes
    if running "$pid"; then
        log "still alive, sending SIGKILL to pid $pid"
        kill -KILL "$pid" 2>/dev/null || true
    fi
else
    log "postgres: not running"
fi

if [ "${PRISM_PG_PURGE:-0}" = 1 ]; then
    rm -rf "$D"
    log "purged $D"
fi
log "stopped"
exit 0
