#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by scripts/slurm-dev-cluster.sh.
#
# Only processes recorded in the pid files under $SLURM_CI_DIR are signalled
# (after checking that the pid still belongs to the expected program); no
# pkill/killall by name. Jobs still queued/running are cancelled first (via
# scancel against our own controller) so that no slurmstepd/job processes are
# left behind.
#
# Env: SLURM_CI_DIR (default /tmp/prism-slurm) - must match slurm-dev-cluster.sh.
#      SLURM_CI_PURGE=1  also delete $SLURM_CI_DIR and our /etc/slurm symlinks.
set -uo pipefail

D="${SLURM_CI_DIR:-/tmp/prism-slurm}"
export SLURM_CONF="$D/etc/slurm.conf"

log() { echo "slurm-dev-cluster-stop: $*" >&2; }

# pid_of NAME PIDFILE -> prints pid if the pidfile names a live process whose
# executable basename starts with NAME (guards against pid reuse).
pid_of() {
    local name="$1" pidfile="$2" pid exe
    [ -s "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' < "$pidfile")"
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
    exe="${exe##*/}"; exe="${exe% (deleted)}"
    case "$exe" in "$name"*) echo "$pid"; return 0 ;; esac
    return 1
}

# stop_pids NAME:PIDFILE... : SIGTERM all given daemons at once, wait up to
# 15 s for them to exit, SIGKILL leftovers, remove their pid files.
stop_pids() {
    local spec name pidfile pid i pids=() names=() files=()
    for spec in "$@"; do
        name="${spec%%:*}"; pidfile="${spec#*:}"
        if pid="$(pid_of "$name" "$pidfile")"; then
            log "$name: sending SIGTERM to pid $pid"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid"); names+=("$name")
        else
            log "$name: not running"
        fi
        files+=("$pidfile")
    done
    for i in $(seq 1 150); do
        local left=0
        for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && left=1; done
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if [ -d "/proc/${pids[$i]}" ]; then
            log "${names[$i]}: still alive after 15 s, sending SIGKILL to pid ${pids[$i]}"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
    done
    rm -f "${files[@]}"
}

if [ ! -d "$D" ]; then
    log "nothing to do ($D does not exist)"
    exit 0
fi

# 1. Cancel leftover jobs while the controller is still up (partition is ours).
if pid_of slurmctld "$D/slurmctld.pid" >/dev/null && [ -f "$SLURM_CONF" ]; then
    part="$(sed -n 's/^PartitionName=\([^ ]*\).*/\1/p' "$SLURM_CONF" | head -n1)"
    if [ -n "$part" ] && [ -n "$(timeout 10 squeue -h -p "$part" -o %i 2>/dev/null)" ]; then
        log "cancelling remaining jobs in partition $part"
        timeout 10 scancel -p "$part" 2>/dev/null || true
        for i in $(seq 1 150); do        # up to ~15 s for jobs to finish completing
            [ -z "$(timeout 5 squeue -h -p "$part" -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
fi

# 2. Daemons: slurmd + slurmctld together, then slurmdbd and its MariaDB, then munged (they authenticate via it).
stop_pids "slurmd:$D/slurmd.pid" "slurmctld:$D/slurmctld.pid"
stop_pids "slurmdbd:$D/slurmdbd.pid"
stop_pids "mariadbd:$D/mysql/mariadbd.pid"
stop_pids "munged:$D/munge/munged.pid"

if [ "${SLURM_CI_PURGE:-0}" = 1 ]; then
    for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
        if [ -L "$f" ] && [ "$(readlink "$f")" = "$D/etc/${f##*/}" ]; then rm -f "$f"; fi
    done
    rm -rf "$D"
    log "purged $D"
fi
log "stopped"
exit 0
