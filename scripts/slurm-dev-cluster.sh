#!/usr/bin/env bash
# slurm-dev-cluster.sh - install (idempotently), configure and start a REAL
# single-node SLURM cluster (munged + slurmctld + slurmd, and for accounting
# slurmdbd on its own MariaDB) on Debian 12 as root, without systemd and without cgroups, then wait until the node is idle (and,
# by default, until a trivial smoke-test batch job has COMPLETED).
# Exits non-zero with a clear message (and log tails) otherwise.
#
# Everything (configs, munge key/socket, state, spool, logs, pid files) lives
# under $SLURM_CI_DIR. /etc/slurm/slurm.conf (and gres.conf) are symlinked to
# it so that plain `sbatch`/`squeue`/`scontrol`/`sacct -c` work without
# SLURM_CONF (set SLURM_CI_LINK_ETC=0 to skip; then `source $SLURM_CI_DIR/env.sh`).
#
# Optional env knobs:
#   SLURM_CI_DIR=/tmp/prism-slurm   working directory (pid files live here too)
#   SLURM_CI_CPUS=<n>            CPUs to advertise (default: real count from
#                                `slurmd -C`). If different from the real count,
#                                SlurmdParameters=config_overrides is set so the
#                                node is not marked INVAL/drained.
#   SLURM_CI_GPUS=0              >0: declare that many FAKE gpus (gres/gpu backed
#                                by symlinks to /dev/null) so --gres=gpu:N,
#                                --gpus=N jobs get scheduled; CUDA_VISIBLE_DEVICES
#                                is set in the job as on a real GPU node.
#   SLURM_CI_SHARDS=0            >0: also that many gres/shard per fake GPU, so
#                                --gres=shard:N jobs share a GPU (runs_per_gpu).
#   SLURM_CI_PARTITION=debug     partition name (the only, default partition)
#   SLURM_CI_CTLD_PORT=6817 SLURM_CI_SLURMD_PORT=6818
#   SLURM_CI_MIN_JOB_AGE=3600    seconds a finished job stays in `scontrol show job`
#   SLURM_CI_TIMEOUT=60          seconds to wait for the node to become idle
#   SLURM_CI_RESET=0             1: wipe saved controller state (old job records)
#   SLURM_CI_LINK_ETC=1          symlink /etc/slurm/{slurm,gres}.conf to our config
#   SLURM_CI_SMOKE=1             run one trivial sbatch job and require COMPLETED
#   SLURM_CI_KEEP_ON_FAIL=0      1: leave daemons running if startup fails
#   SLURM_CI_ACCOUNTING=1        1: slurmdbd on a private MariaDB (its data under
#                                $SLURM_CI_DIR/mysql), so `sacct` answers with elapsed
#                                time, AllocTRES, MaxRSS, TotalCPU; 0: no accounting
#   SLURM_CI_DB_PORT=6833 SLURM_CI_DBD_PORT=6819   MariaDB's and slurmdbd's ports (loopback)
set -euo pipefail

D="${SLURM_CI_DIR:-/tmp/prism-slurm}"
PART="${SLURM_CI_PARTITION:-debug}"
CTLD_PORT="${SLURM_CI_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_CI_SLURMD_PORT:-6818}"
GPUS="${SLURM_CI_GPUS:-0}"
SHARDS="${SLURM_CI_SHARDS:-0}"
MIN_JOB_AGE="${SLURM_CI_MIN_JOB_AGE:-3600}"
TIMEOUT="${SLURM_CI_TIMEOUT:-60}"
LINK_ETC="${SLURM_CI_LINK_ETC:-1}"
ACCOUNTING="${SLURM_CI_ACCOUNTING:-1}"
DB_PORT="${SLURM_CI_DB_PORT:-6833}"
DBD_PORT="${SLURM_CI_DBD_PORT:-6819}"
HOST="$(hostname -s)"
CONF="$D/etc/slurm.conf"
MSOCK="$D/munge/munge.socket"
export SLURM_CONF="$CONF"

log() { echo "slurm-dev-cluster: $*" >&2; }

# alive NAME PIDFILE: pidfile names a live process whose executable's basename
# starts with NAME (slurmd -> /usr/sbin/slurmd-wlm etc.); guards against pid reuse.
alive() {
    local pid exe
    [ -s "$2" ] || return 1
    pid="$(tr -dc '0-9' < "$2")"
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"; exe="${exe##*/}"
    case "$exe" in "$1"*) return 0 ;; esac
    return 1
}

# Stop only daemons recorded in OUR pid files (never by name).
stop_ours() {
    local name pf pid i
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        pf="$D/$name.pid"; [ "$name" = munged ] && pf="$D/munge/munged.pid"
        [ "$name" = mariadbd ] && pf="$D/mysql/mariadbd.pid"
        if alive "$name" "$pf"; then
            pid="$(tr -dc '0-9' < "$pf")"
            kill -TERM "$pid" 2>/dev/null || true
            for i in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
            [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pf"
    done
}

STARTED=0
die() {
    set +e      # never abort the error report itself (grep without match etc.)
    echo "slurm-dev-cluster: ERROR: $*" >&2
    for f in "$D/log/slurmctld.log" "$D/log/slurmd.log" "$D/log/slurmdbd.log" "$D/log/mariadb.log" \
            "$D/munge/munged.log"; do
        [ -f "$f" ] || continue
        echo "---- $f: last fatal/error lines ----" >&2
        grep -E 'fatal|[Ee]rror' "$f" | grep -vE 'pmix|MPI:|state file|NOTE:' | tail -n 5 >&2
        echo "---- $f: last lines ----" >&2
        tail -n 10 "$f" >&2
    done
    echo "slurm-dev-cluster: ERROR: $*" >&2
    if [ "$STARTED" = 1 ] && [ "${SLURM_CI_KEEP_ON_FAIL:-0}" != 1 ]; then
        echo "slurm-dev-cluster: stopping the daemons this run started" >&2
        stop_ours
    fi
    exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root"

# ---------------------------------------------------------------- install ---
PACKAGES="slurmctld slurmd slurm-client munge"
BINARIES="munged munge unmunge slurmctld slurmd sbatch sinfo"
if [ "$ACCOUNTING" = 1 ]; then
    PACKAGES="$PACKAGES slurmdbd mariadb-server"
    BINARIES="$BINARIES slurmdbd mariadbd mariadb-install-db sacctmgr"
fi
need_install=0
for b in $BINARIES; do
    command -v "$b" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
    log "installing $PACKAGES from apt"
    # Keep the packages' maintainer scripts from starting munge/slurm services
    # (no systemd here; we start our own daemons below).
    added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    ok=0
    for attempt in 1 2 3; do
        # shellcheck disable=SC2086
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null; then
            ok=1; break
        fi
        log "apt attempt $attempt failed; retrying in 5 s"; sleep 5
    done
    if [ "$added_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    [ "$ok" = 1 ] || die "apt-get install of $PACKAGES failed"
fi
log "$(slurmd -V)"

node_state() { timeout 3 sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }

accounting_alive() {
    [ "$ACCOUNTING" != 1 ] || { alive mariadbd "$D/mysql/mariadbd.pid" && alive slurmdbd "$D/slurmdbd.pid"; }
}
if alive munged "$D/munge/munged.pid" && alive slurmctld "$D/slurmctld.pid" \
        && alive slurmd "$D/slurmd.pid" && accounting_alive \
        && grep -q "^# accounting=$ACCOUNTING\$" "$CONF" 2>/dev/null; then
    log "our daemons are already running (pid files in $D); checking node state"
else
    stop_ours          # half-started leftovers of a previous run, if any
    if [ "${SLURM_CI_RESET:-0}" = 1 ]; then rm -rf "$D/state" "$D/spool"; fi

    # ------------------------------------------------------------ layout ---
    mkdir -p "$D/etc" "$D/state" "$D/spool" "$D/log" "$D/munge"
    chmod 755 "$D" "$D/etc" "$D/log" "$D/munge"   # munge socket dir must be a+x
    chmod 700 "$D/state" "$D/spool"

    # ------------------------------------------------------------- munge ---
    # Private munged: own key, socket, pid file, log. Slurm finds the socket via
    # AuthInfo=socket=... below. Runs as root; no --force needed.
    KEY="$D/munge/munge.key"
    [ -s "$KEY" ] || dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none
    chown root:root "$KEY"; chmod 400 "$KEY"
    rm -f "$MSOCK" "$MSOCK.lock"
    STARTED=1
    munged --key-file="$KEY" --socket="$MSOCK" --pid-file="$D/munge/munged.pid" \
        --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed" \
        || die "munged failed to start"
    munge -S "$MSOCK" -n </dev/null | unmunge -S "$MSOCK" >/dev/null \
        || die "munge credential round-trip failed"

    # -------------------------------------------------------- accounting ---
    # slurmdbd on a private MariaDB (data, socket, pid file and log under $D), reached on loopback ports.
    ACCOUNTING_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    if [ "$ACCOUNTING" = 1 ]; then
        DB="$D/mysql"; mkdir -p "$DB"
        if [ ! -d "$DB/data/mysql" ]; then
            mariadb-install-db --user=root --datadir="$DB/data" --auth-root-authentication-method=socket \
                >"$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $D/log/mariadb-install.log)"
        fi
        mariadbd --user=root --datadir="$DB/data" --socket="$DB/mariadb.sock" --pid-file="$DB/mariadbd.pid" \
            --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$D/log/mariadb.log" \
            --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --skip-log-bin >/dev/null 2>&1 &
        for i in $(seq 1 300); do
            mariadb -S "$DB/mariadb.sock" -e 'select 1' >/dev/null 2>&1 && break
            [ "$i" = 300 ] && die "MariaDB did not answer on $DB/mariadb.sock within 30 s"
            sleep 0.1
        done
        DB_PASS_FILE="$DB/slurm.pass"
        [ -s "$DB_PASS_FILE" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$DB_PASS_FILE")
        DB_PASS="$(cat "$DB_PASS_FILE")"
        mariadb -S "$DB/mariadb.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "cannot create MariaDB user slurm"
        # slurmdbd reads slurmdbd.conf beside SLURM_CONF; it holds a password: root only.
        (umask 077; cat > "$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MSOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$D/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
        )
        slurmdbd || die "slurmdbd failed to start"
        # gres/gpu and gres/shard in AllocTRES (GPU-hours); MaxRSS and TotalCPU from /proc every 2 s.
        ACCOUNTING_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MSOCK
AccountingStorageTRES=gres/gpu,gres/shard
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2"
    fi

    # ------------------------------------------------------ slurm config ---
    # Real hardware, e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1
    # CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    HW="$(slurmd -C | head -n1)"
    hw() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$HW"; }
    REAL_CPUS="$(hw CPUs)"; MEM="$(hw RealMemory)"
    [ -n "$REAL_CPUS" ] && [ -n "$MEM" ] || die "cannot parse 'slurmd -C' output: $HW"
    CPUS="${SLURM_CI_CPUS:-$REAL_CPUS}"
    if [ "$CPUS" = "$REAL_CPUS" ]; then
        NODE_HW="CPUs=$CPUS Boards=$(hw Boards) SocketsPerBoard=$(hw SocketsPerBoard) CoresPerSocket=$(hw CoresPerSocket) ThreadsPerCore=$(hw ThreadsPerCore)"
        OVERRIDES=""
    else
        NODE_HW="CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1"
        OVERRIDES="SlurmdParameters=config_overrides"
    fi

    GRES_LINE=""; NODE_GRES=""
    rm -rf "$D/fakegpu"; rm -f "$D/etc/gres.conf"
    if [ "$GPUS" -gt 0 ]; then
        # Slurm 22.05 drops File-less gpus ("Removing file-less GPU"), rejects a
        # File that is not a char/block device and the same path twice ("gpu
        # duplicate device file name"). Distinct symlinks to /dev/null pass.
        GRES_LINE="GresTypes=gpu"
        NODE_GRES="Gres=gpu:$GPUS"
        mkdir -p "$D/fakegpu"
        files=""
        for i in $(seq 0 $((GPUS - 1))); do
            ln -s /dev/null "$D/fakegpu/nvidia$i"
            files="${files:+$files,}$D/fakegpu/nvidia$i"
        done
        echo "NodeName=$HOST Name=gpu File=$files" > "$D/etc/gres.conf"
        if [ "$SHARDS" -gt 0 ]; then
            # gres/shard: SHARDS slices of each GPU, so that many jobs can share one GPU (runs_per_gpu).
            GRES_LINE="GresTypes=gpu,shard"
            NODE_GRES="Gres=gpu:$GPUS,shard:$((GPUS * SHARDS))"
            for i in $(seq 0 $((GPUS - 1))); do
                echo "NodeName=$HOST Name=shard Count=$SHARDS File=$D/fakegpu/nvidia$i" >> "$D/etc/gres.conf"
            done
        fi
    fi

    cat > "$CONF" <<EOF
# Generated by scripts/slurm-dev-cluster.sh: single-node CI cluster, no systemd, no cgroups.
# accounting=$ACCOUNTING
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MSOCK
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
EnforcePartLimits=ALL
$ACCOUNTING_LINES
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
MinJobAge=$MIN_JOB_AGE
InactiveLimit=0
KillWait=5
Waittime=0
SlurmdTimeout=300
MailProg=/bin/true
$OVERRIDES
$GRES_LINE
NodeName=$HOST NodeHostname=$HOST NodeAddr=127.0.0.1 $NODE_HW RealMemory=$MEM $NODE_GRES State=UNKNOWN
PartitionName=$PART Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    echo "export SLURM_CONF=$CONF" > "$D/env.sh"

    if [ "$LINK_ETC" = 1 ]; then
        mkdir -p /etc/slurm
        for f in slurm.conf gres.conf; do
            tgt=/etc/slurm/$f
            if [ -e "$tgt" ] && [ ! -L "$tgt" ]; then mv "$tgt" "$tgt.orig.$(date +%s)"; fi
            if [ -e "$D/etc/$f" ]; then ln -sfn "$D/etc/$f" "$tgt"
            elif [ -L "$tgt" ]; then rm -f "$tgt"; fi
        done
    fi

    # ----------------------------------------------------------- daemons ---
    if [ "$ACCOUNTING" = 1 ]; then  # sacctmgr reads slurm.conf: the cluster is registered once it is written
        dbd_deadline=$(( $(date +%s) + 30 ))
        until timeout 5 sacctmgr -n list cluster >"$D/log/sacctmgr.err" 2>&1; do
            [ "$(date +%s)" -lt "$dbd_deadline" ] \
                || die "slurmdbd did not answer within 30 s: $(tail -n 3 "$D/log/sacctmgr.err")"
            sleep 0.2
        done
        timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx ci \
            || timeout 10 sacctmgr -i add cluster ci >/dev/null || die "sacctmgr add cluster ci failed"
    fi
    # Both daemonize and write their pid files; -N pins the node name.
    slurmctld -f "$CONF" || die "slurmctld failed to start"
    slurmd -f "$CONF" -N "$HOST" || die "slurmd failed to start"
fi

# ------------------------------------------------------------ wait idle ---
deadline=$(( $(date +%s) + TIMEOUT ))
pidfile_deadline=$(( $(date +%s) + 10 ))
state=""
while :; do
    # Both daemons fork before they finish initialising (e.g. a busy port is
    # fatal only after the fork) and write their pid file from the child, so
    # check on every turn: pid file written but process gone => died.
    for n in slurmctld slurmd; do
        if [ -s "$D/$n.pid" ]; then
            alive "$n" "$D/$n.pid" || die "$n died during startup (see its log below)"
        elif [ "$(date +%s)" -ge "$pidfile_deadline" ]; then
            die "$n wrote no pid file ($D/$n.pid) within 10 s"
        fi
    done
    state="$(node_state || true)"
    case "$state" in
        idle) break ;;
        mixed|allocated|completing)      # only possible with recovered/running jobs
            log "note: node is $state (jobs from before are running)"; break ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] \
        || die "node $HOST not idle after ${TIMEOUT}s (state: '${state:-no answer}')"
    sleep 0.2
done
log "node $HOST is $state"

# ------------------------------------------------------------ smoke job ---
# Prove a real batch job runs end to end. Also absorbs slurmctld's one-off
# ~3 s delay before its first scheduling pass after a (re)start.
if [ "${SLURM_CI_SMOKE:-1}" = 1 ]; then
    jid="$(sbatch --parsable -J prism-slurm-smoke -D "$D" -o /dev/null -e "$D/log/smoke.err" \
        --wrap 'true' 2>"$D/log/smoke-submit.err")" \
        || die "smoke job submission failed: $(cat "$D/log/smoke-submit.err")"
    while :; do
        js="$(scontrol show job -o "$jid" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)"
        case "$js" in
            COMPLETED) break ;;
            FAILED|CANCELLED|TIMEOUT|NODE_FAIL|BOOT_FAIL|OUT_OF_MEMORY|DEADLINE)
                die "smoke job $jid ended $js ($(scontrol show job -o "$jid" | grep -o 'Reason=[^ ]*'))" ;;
        esac
        [ "$(date +%s)" -lt "$deadline" ] || die "smoke job $jid not finished after ${TIMEOUT}s (state: ${js:-unknown})"
        sleep 0.1
    done
    log "smoke job $jid COMPLETED"
fi
log "cluster ready: partition $PART on node $HOST (SLURM_CONF=$CONF)"
sinfo
