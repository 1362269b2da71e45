"""The SLURM launcher: each DPO partition as one sbatch job, watched to its end, cancelled with its run.

Owns the job script (every #SBATCH value validated, shell lines shlex-quoted), submission, watching
(`scontrol`, then `sacct`; asking again while SLURM gives no answer), the mapping of final states to success
or a `dg.Failure` with a hint, and `scancel` when the Dagster run is terminated. A job outlives a Dagster
process that goes away; its record in the run directory (`slurm_job.json`) lets the next launch follow it.
SLURM is reached locally or over one multiplexed SSH connection, with the run directory shared or mirrored
(`remote_runs_dir`).
"""

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path, PurePosixPath

import dagster as dg
from dagster_pipes import decode_env_var, encode_env_var
from pydantic import Field

from prism_assets.training.run_folder import (
    JOB_RECORD,
    JOB_SCRIPT,
    PIPES_MESSAGES_FILE,
    job_stderr,
    job_stdout,
    record_cost,
)
from resources.launcher import RunLauncher, tail

REQUEUE_EXIT_CODE = 99  # the trainer saved a checkpoint on SLURM's warning signal: requeue the job
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}
TRANSIENT_STATES = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}  # worth a retry: not the code's fault
HINTS = {
    "TIMEOUT": "the job hit its time limit: raise time_limit (with requeue on, the trainer checkpoints and the job "
    "requeues itself signal_before_end_s before the limit; a TIMEOUT means that was too short to save)",
    "OUT_OF_MEMORY": "the job ran out of memory: raise mem (or lower batch_size / max_length)",
    "NODE_FAIL": "a node failed: transient, the partition is retried",
    "PREEMPTED": "the job was preempted: transient, the partition is retried",
    "BOOT_FAIL": "the node failed to boot: transient, the partition is retried",
    "CANCELLED": "the job was cancelled outside this run (scancel?)",
    "FAILED": "the trainer failed: read the job's stderr below",
}
# What sbatch option values may contain: no whitespace, quotes, '#', '$' or newlines.
SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:,=@+/-]+")
TIME_LIMIT = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}|\d+")
MEMORY = re.compile(r"\d+[KMGT]?")


class SlurmUnreachable(RuntimeError):
    """SLURM gave no answer (its controller busy or restarting, the SSH link down): worth asking again."""


class MissingCommand(RuntimeError):
    """A command the launcher runs (SLURM's, or ssh and scp) is not on PATH: not worth asking again."""


def run_command(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, with a command missing from PATH named as such (not a FileNotFoundError of no file)."""
    try:
        return subprocess.run(command, **kwargs)
    except FileNotFoundError:
        if command[0] in ("ssh", "scp"):
            hint = "install OpenSSH's client, or leave PRISM_SLURM_SSH_HOST unset where SLURM's commands are"
        else:
            hint = (
                "DPO_LAUNCHER=slurm runs SLURM's commands (sbatch, squeue, scontrol, sacct, scancel) on this host: "
                "run where they are, or reach a login node over SSH (PRISM_SLURM_SSH_HOST)"
            )
        raise MissingCommand(f"`{command[0]}` is not on PATH: {hint}") from None


def _validated(name: str, value: str, pattern: re.Pattern = SAFE_VALUE) -> str:
    if not pattern.fullmatch(str(value)):
        raise ValueError(f"SLURM setting {name}={value!r} is not allowed (expected {pattern.pattern})")
    return str(value)


def time_limit_seconds(limit: str) -> int:
    """sbatch --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = limit.rpartition("-") if "-" in limit else ("0", "", limit)
    parts = [int(p) for p in rest.split(":")]
    if "-" in limit:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def terminated(context: dg.AssetExecutionContext) -> bool:
    """Whether the Dagster run was terminated (UI, CLI), as opposed to its process going away (restart, crash).
    When the instance cannot tell, no: a job left running costs less than hours of GPU time cancelled."""
    try:
        run = context.instance.get_run_by_id(context.run.run_id)
    except Exception:
        return False
    return run is not None and run.status in (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)


def _seconds(value: str) -> float:
    """sacct's [D-][HH:]MM:SS[.mmm] (TotalCPU, Elapsed) in seconds."""
    days, _, clock = value.rpartition("-")
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total + 86400 * int(days or 0)


def _timestamp(value: str) -> float | None:
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value).timestamp()
    return None  # "Unknown", "None"


# sacct's fields job_cost reads
COST_FIELDS = (
    "JobID",
    "ElapsedRaw",
    "Submit",
    "Eligible",
    "Start",
    "End",
    "AllocCPUS",
    "AllocTRES",
    "TotalCPU",
    "MaxRSS",
)


def job_cost(rows: list[dict[str, str]], shards_per_gpu: int | None) -> dict[str, float]:
    """What a job cost, from its `sacct -D` rows (every allocation of a requeued job, and their steps): elapsed
    time, queue wait, GPU-hours (GPUs of AllocTRES, or its gres/shard as a fraction of a GPU), peak memory of any
    step, and the share of the allocated CPU time the job used."""
    allocations = [row for row in rows if "." not in row["JobID"]]
    elapsed = sum(float(row["ElapsedRaw"] or 0) for row in allocations)
    waits = [
        max(0.0, start - (_timestamp(row["Eligible"]) or _timestamp(row["Submit"]) or start))
        for row in allocations
        if (start := _timestamp(row["Start"])) is not None
    ]
    gpu_hours = 0.0
    for row in allocations:
        tres = dict(item.split("=", 1) for item in row["AllocTRES"].split(",") if "=" in item)
        gpus = float(tres.get("gres/gpu", 0))
        if not gpus and shards_per_gpu and "gres/shard" in tres:
            gpus = float(tres["gres/shard"]) / shards_per_gpu
        gpu_hours += gpus * float(row["ElapsedRaw"] or 0) / 3600
    cpu_allocated = sum(float(row["ElapsedRaw"] or 0) * float(row["AllocCPUS"] or 0) for row in allocations)
    rss = [float(row["MaxRSS"].rstrip("M")) for row in rows if row["MaxRSS"]]
    return {
        "elapsed_s": elapsed,
        "queue_wait_s": sum(waits),
        "gpu_hours": gpu_hours,
        "max_rss_mb": max(rss, default=0.0),
        "cpu_efficiency": sum(_seconds(row["TotalCPU"]) for row in allocations) / cpu_allocated
        if cpu_allocated
        else 0.0,
        "allocations": len(allocations),
    }


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def parse_scontrol(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints one line of Key=Value pairs (values may hold spaces only in a few fields)."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


class SlurmCommands:
    """Runs SLURM's CLI locally, or over SSH when `ssh_host` is set (one multiplexed connection)."""

    def __init__(
        self,
        ssh_host=None,
        ssh_user=None,
        ssh_port=22,
        ssh_identity_file=None,
        ssh_known_hosts_file=None,
        ssh_strict_host_keys=True,
        ssh_control_dir="/tmp/prism-ssh",
        timeout_s=60.0,
    ):
        self.ssh_host, self.ssh_user, self.ssh_port = ssh_host, ssh_user, ssh_port
        self.ssh_identity_file, self.ssh_known_hosts_file = ssh_identity_file, ssh_known_hosts_file
        self.ssh_strict_host_keys, self.ssh_control_dir, self.timeout_s = (
            ssh_strict_host_keys,
            ssh_control_dir,
            timeout_s,
        )

    def ssh_options(self, port_flag: str) -> list[str]:
        """Options shared by ssh (`-p PORT`) and scp (`-P PORT`): one multiplexed master, strict host keys."""
        control = Path(self.ssh_control_dir)
        control.mkdir(mode=0o700, parents=True, exist_ok=True)
        options = [
            "-o",
            "BatchMode=yes",
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={control}/%C",
            "-o",
            "ControlPersist=300",
            "-o",
            f"StrictHostKeyChecking={'yes' if self.ssh_strict_host_keys else 'accept-new'}",
            port_flag,
            str(self.ssh_port),
        ]
        if self.ssh_known_hosts_file:
            options += ["-o", f"UserKnownHostsFile={self.ssh_known_hosts_file}"]
        if self.ssh_identity_file:
            options += ["-i", self.ssh_identity_file, "-o", "IdentitiesOnly=yes"]
        return options

    def ssh_prefix(self) -> list[str]:
        return ["ssh", *self.ssh_options("-p"), self.target(), "--"]

    def scp_options(self) -> list[str]:
        return [*self.ssh_options("-P"), "-q"]

    def target(self) -> str:
        return f"{self.ssh_user}@{self.ssh_host}" if self.ssh_user else str(self.ssh_host)

    def upload(self, files: list[Path], remote_dir: str) -> None:
        self.run(["mkdir", "-p", remote_dir])
        done = run_command(
            ["scp", *self.scp_options(), *map(str, files), f"{self.target()}:{remote_dir}/"],
            capture_output=True,
            text=True,
            timeout=self.timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"copying {len(files)} files to {self.ssh_host}:{remote_dir} failed: {done.stderr.strip()}"
            )

    def read_from(self, remote_path: str, offset: int) -> bytes:
        """The bytes of a remote file from `offset` on (nothing if it does not exist yet)."""
        command = f"test -f {shlex.quote(remote_path)} && tail -c +{offset + 1} {shlex.quote(remote_path)} || true"
        try:
            done = run_command([*self.ssh_prefix(), command], capture_output=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmUnreachable(
                f"reading {self.ssh_host}:{remote_path} gave no answer in {self.timeout_s:.0f} s"
            ) from None
        if done.returncode != 0:
            raise SlurmUnreachable(
                f"reading {self.ssh_host}:{remote_path} failed: {done.stderr.decode(errors='replace').strip()}"
            )
        return done.stdout

    def run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        command = [*self.ssh_prefix(), shlex.join(args)] if self.ssh_host else args
        done = run_command(command, capture_output=True, text=True, timeout=self.timeout_s)
        if check and done.returncode != 0:
            where = f" on {self.ssh_host}" if self.ssh_host else ""
            raise RuntimeError(
                f"`{shlex.join(args)}`{where} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )
        return done


class SlurmLauncher(RunLauncher):
    """Submits each run as an sbatch job. Every value is validated before anything is submitted."""

    partition: str | None = Field(default=None, description="sbatch --partition")
    account: str | None = Field(default=None, description="sbatch --account")
    qos: str | None = Field(default=None, description="sbatch --qos")
    time_limit: str = Field(default="02:00:00", description="sbatch --time (M, H:M:S, D-H:M:S)")
    cpus_per_task: int = Field(default=4, ge=1, description="sbatch --cpus-per-task")
    mem: str | None = Field(default="32G", description="sbatch --mem (empty: the partition's default)")
    gpus: int = Field(default=1, ge=0, description="GPUs per job")
    gpu_request: str = Field(default="gres", description="'gres': --gres=gpu[:type]:N; 'gpus': --gpus=[type:]N")
    gpu_type: str | None = Field(default=None, description="the GPU type in the request (a100, h100, …)")
    # GPU packing: K runs share one GPU through SLURM's gres/shard (the cluster defines `shards_per_gpu`
    # shards on each GPU; a run then requests shards_per_gpu / runs_per_gpu of them). 1: a whole GPU each.
    runs_per_gpu: int = Field(
        default=1, ge=1, description="runs packed onto one GPU through gres/shard (1: a GPU each)"
    )
    shards_per_gpu: int | None = Field(
        default=None, ge=1, description="the gres/shard count the cluster defines per GPU"
    )
    constraint: str | None = Field(default=None, description="sbatch --constraint")
    extra_sbatch_args: list[str] = Field(default=[], description="more --long-options, space-separated")
    setup_lines: list[str] = Field(
        default=[],
        description="shell lines before the trainer, ';;'-separated (module load …;;source venv/bin/activate)",
    )
    job_name_prefix: str = Field(
        default="prism-dpo", description="the jobs' names begin with this (how orphans are found)"
    )
    requeue: bool = Field(
        default=True,
        description="--requeue and a checkpoint on the warning signal; false: a node failure ends the job",
    )
    signal_before_end_s: int = Field(
        default=120, ge=1, description="SIGUSR1 this long before the time limit: checkpoint"
    )
    poll_initial_s: float = Field(default=1.0, gt=0, description="the first wait between two looks at a job")
    poll_max_s: float = Field(default=30.0, gt=0, description="the longest wait between two looks (×1.5 each time)")
    queue_wait_budget_s: float = Field(default=7 * 86400, gt=0, description="how long a job may wait in the queue")
    time_budget_factor: float = Field(default=3.0, gt=0, description="a job is watched at most factor × time_limit")
    unreachable_budget_s: float = Field(
        default=600.0, gt=0, description="how long to ask again while SLURM gives no answer (controller, SSH)"
    )
    preempted_grace_s: float = Field(
        default=300.0, ge=0, description="with requeue: how long a PREEMPTED job may take to be PENDING again"
    )
    accounting_wait_s: float = Field(
        default=30.0, ge=0, description="how long a finished job's accounting record may take to reach sacct"
    )
    # A job no Dagster run follows (its process went away) is adopted when its partition is launched again; once
    # the `slurm_orphans` sensor has seen it unwatched this many seconds, it cancels it. None: only listed.
    orphan_grace_s: float | None = Field(
        default=None, ge=0, description="cancel a job no Dagster run follows after this long (unset: only list it)"
    )
    ssh_host: str | None = Field(
        default=None, description="submit on this login node over SSH (unset: SLURM is local)"
    )
    ssh_user: str | None = Field(default=None, description="the SSH user")
    ssh_port: int = Field(default=22, ge=1, le=65535, description="the SSH port")
    ssh_identity_file: str | None = Field(
        default=None, description="an SSH key file (credentials come only from settings or ssh-agent)"
    )
    ssh_known_hosts_file: str | None = Field(default=None, description="the known_hosts file for the login node")
    ssh_strict_host_keys: bool = Field(default=True, description="refuse a login node whose host key is unknown")
    ssh_control_dir: str = Field(
        default="/tmp/prism-ssh", description="where the multiplexed SSH connection's socket lives"
    )
    # Where run directories live on the cluster when the Dagster host does not see its filesystem (SSH mode):
    # inputs are copied there, the Pipes messages and the job's stdout/stderr are tailed over SSH, outputs
    # copied back. Unset: the run directory is on a filesystem both sides share, at the same path.
    remote_runs_dir: str | None = Field(
        default=None,
        description="SSH mode without a shared filesystem: run folders live here on the cluster, mirrored",
    )

    @property
    def commands(self) -> SlurmCommands:
        return SlurmCommands(
            self.ssh_host,
            self.ssh_user,
            self.ssh_port,
            self.ssh_identity_file,
            self.ssh_known_hosts_file,
            self.ssh_strict_host_keys,
            self.ssh_control_dir,
        )

    def shards_per_run(self) -> int:
        """The gres/shard count one run requests so that runs_per_gpu of them fit on one GPU."""
        k, shards = int(self.runs_per_gpu), self.shards_per_gpu
        if self.gpus != 1 or self.gpu_type:
            raise ValueError(
                f"runs_per_gpu={k} packs runs of one untyped GPU each (gres/shard has no type); "
                f"got gpus={self.gpus}, gpu_type={self.gpu_type!r}"
            )
        if not shards or shards % k:
            raise ValueError(
                f"runs_per_gpu={k} needs shards_per_gpu: the gres/shard count the cluster defines on each "
                f"GPU (gres.conf Name=shard), a multiple of {k}; got {shards!r}"
            )
        return shards // k

    def sbatch_options(self, run_dir: Path, job_name: str) -> list[str]:
        _validated("run_dir", str(run_dir))
        if self.gpu_request not in ("gres", "gpus"):
            raise ValueError(f"SLURM setting gpu_request={self.gpu_request!r}: expected 'gres' or 'gpus'")
        options = [
            f"--job-name={_validated('job_name', job_name)}",
            f"--output={run_dir}/{job_stdout('%j')}",
            f"--error={run_dir}/{job_stderr('%j')}",
            "--open-mode=append",
            f"--time={_validated('time_limit', self.time_limit, TIME_LIMIT)}",
            f"--cpus-per-task={int(self.cpus_per_task)}",
        ]
        for flag, value in (
            ("partition", self.partition),
            ("account", self.account),
            ("qos", self.qos),
            ("constraint", self.constraint),
        ):
            if value:
                options.append(f"--{flag}={_validated(flag, value)}")
        if self.mem:
            options.append(f"--mem={_validated('mem', self.mem, MEMORY)}")
        if self.runs_per_gpu > 1:
            options.append(f"--gres=shard:{self.shards_per_run()}")
        elif self.gpus:
            kind = f"{_validated('gpu_type', self.gpu_type)}:" if self.gpu_type else ""
            options.append(
                f"--gres=gpu:{kind}{int(self.gpus)}"
                if self.gpu_request == "gres"
                else f"--gpus={kind}{int(self.gpus)}"
            )
        if self.requeue:
            options += ["--requeue", f"--signal=B:USR1@{int(self.signal_before_end_s)}"]
        else:  # SLURM's default (JobRequeue=1) would requeue a batch job after a node failure all the same
            options.append("--no-requeue")
        for arg in self.extra_sbatch_args:
            if not arg.startswith("--"):
                raise ValueError(f"extra sbatch argument {arg!r} must be a --long-option")
            options.append(_validated("extra_sbatch_args", arg))
        return options

    def job_script(self, command: list[str], run_dir: Path, env: dict[str, str], job_name: str, cwd: str) -> str:
        lines = [
            "#!/bin/bash",
            *(f"#SBATCH {option}" for option in self.sbatch_options(run_dir, job_name)),
            "set -uo pipefail",
            *self.setup_lines,
            f"cd {shlex.quote(cwd)}",
        ]
        lines += [
            f"export {name}={shlex.quote(value)}"
            for name, value in env.items()
            if re.fullmatch(r"[A-Z_][A-Z0-9_]*", name)
        ]
        # The batch shell receives SLURM's warning signal (B:USR1) and passes it to the trainer, which saves a
        # checkpoint and exits REQUEUE_EXIT_CODE; the job then puts itself back in the queue and resumes.
        lines += [
            f"{shlex.join(command)} &",
            "child=$!",
            "trap 'kill -USR1 $child 2>/dev/null' USR1",
            "trap 'kill -TERM $child 2>/dev/null' TERM",
            # A trapped signal interrupts `wait` (status 128+n); wait again until the trainer is gone, then
            # read its own exit status (bash keeps it for `wait PID`).
            "while kill -0 $child 2>/dev/null; do wait $child; done",
            "wait $child; code=$?",
            # A requeue SLURM refuses fails the job (it saved only a checkpoint), rather than ending it COMPLETED.
            f'if [ $code -eq {REQUEUE_EXIT_CODE} ]; then scontrol requeue "$SLURM_JOB_ID" || exit 1; exit 0; fi',
            "exit $code",
        ]
        return "\n".join(lines) + "\n"

    def submit(self, script_path: Path) -> str:
        done = self.commands.run(["sbatch", "--parsable", str(script_path)], check=False)
        if done.returncode != 0:
            raise dg.Failure(
                f"sbatch rejected the job ({script_path}): {done.stderr.strip() or done.stdout.strip()}",
                allow_retries=False,
            )
        return done.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> dict[str, str]:
        """The job's scontrol record; once the controller forgot the job, its accounting record. SlurmUnreachable
        when SLURM gave no answer (asked again by `watch`), RuntimeError when it answered that the job is unknown."""
        try:
            done = self.commands.run(["scontrol", "show", "job", "-o", job_id], check=False)
            if done.returncode == 0 and "JobState=" in done.stdout:
                return parse_scontrol(done.stdout)
            accounting = self.commands.run(
                ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,JobName"], check=False
            )
        except subprocess.TimeoutExpired as error:
            raise SlurmUnreachable(f"`{shlex.join(error.cmd)}` gave no answer in {error.timeout:.0f} s") from None
        if accounting.returncode == 0 and accounting.stdout.strip():
            state, exit_code, name = accounting.stdout.strip().splitlines()[0].split("|")
            return {"JobState": state.split()[0], "ExitCode": exit_code, "JobName": name, "Reason": "from sacct"}
        if "Invalid job id" not in done.stderr:
            raise SlurmUnreachable(
                f"`scontrol show job -o {job_id}` failed ({done.returncode}): "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        raise RuntimeError(f"SLURM knows no job {job_id}: {done.stderr.strip()} {accounting.stderr.strip()}")

    def cost(self, context, job_id: str, run_dir: Path) -> dict[str, float] | None:
        """The finished job's cost from SLURM's accounting, added to the run directory's COST_FILE (the assets
        show it as cost_* metadata); None where the cluster keeps no accounting. Accounting reaches slurmdbd a moment
        after the job ends: asked again for up to accounting_wait_s until every allocation has ended."""
        deadline = time.monotonic() + self.accounting_wait_s
        while True:
            try:
                done = self.commands.run(
                    ["sacct", "-j", job_id, "-D", "-n", "-P", "--units=M", "-o", ",".join(COST_FIELDS)], check=False
                )
            except subprocess.TimeoutExpired:
                done = None
            if done is not None and done.returncode != 0 and "accounting storage is disabled" in done.stderr:
                context.log.info(f"SLURM keeps no accounting here: no cost recorded for job {job_id}")
                return None
            rows = [
                dict(zip(COST_FIELDS, line.split("|")))
                for line in (done.stdout.splitlines() if done is not None and done.returncode == 0 else [])
                if line.count("|") == len(COST_FIELDS) - 1
            ]
            allocations = [row for row in rows if "." not in row["JobID"]]
            ended = bool(allocations) and all(_timestamp(row["End"]) for row in allocations)
            ran = any(float(row["ElapsedRaw"] or 0) for row in allocations)
            # the steps' MaxRSS arrives last; a job cancelled before it started has no steps
            if ended and (any(row["MaxRSS"] for row in rows) or not ran) or time.monotonic() > deadline:
                break
            time.sleep(1)
        if not ended:
            context.log.warning(f"SLURM accounting has no finished record of job {job_id}: no cost recorded")
            return None
        cost = job_cost(rows, self.shards_per_gpu)
        record_cost(run_dir, {"job_id": job_id, **cost})
        return cost

    def context_injector(self, run_dir: Path) -> dg.PipesContextInjector:
        # A remote job cannot read a context file on the Dagster host: the context travels in its environment.
        return dg.PipesEnvContextInjector() if self.remote_runs_dir else super().context_injector(run_dir)

    def remote_dir(self, run_dir: Path) -> str | None:
        if not self.remote_runs_dir:
            return None
        if not self.ssh_host:
            raise ValueError("SLURM setting remote_runs_dir needs ssh_host (a remote cluster is reached over SSH)")
        return str(PurePosixPath(self.remote_runs_dir) / run_dir.parent.name / run_dir.name)

    def execute(self, context, command, run_dir, env, outputs=()):
        job_name = self.job_name(run_dir)
        script = run_dir / JOB_SCRIPT
        try:
            remote = self.remote_dir(run_dir)
            if remote:  # the job sees the mirrored run directory: its paths, its messages file
                env = {
                    **env,
                    "DAGSTER_PIPES_MESSAGES": encode_env_var(
                        {**decode_env_var(env["DAGSTER_PIPES_MESSAGES"]), "path": f"{remote}/{PIPES_MESSAGES_FILE}"}
                    ),
                }
                command = [arg.replace(str(run_dir), remote) for arg in command]
            job_dir = Path(remote) if remote else run_dir
            script.write_text(self.job_script(command, job_dir, env, job_name, remote or str(Path.cwd())))
        except ValueError as error:  # a setting that must not reach sbatch: refused, never retried
            raise dg.Failure(str(error), allow_retries=False) from None
        if remote:  # made afresh, as the local run directory is: no earlier attempt's messages, outputs or checkpoints
            self.commands.run(["rm", "-rf", "--", remote])
            self.commands.upload(
                [p for p in sorted(run_dir.iterdir()) if p.is_file() and p.name != PIPES_MESSAGES_FILE], remote
            )
        job_id = self.submit(job_dir / JOB_SCRIPT)
        context.log.info(
            f"submitted SLURM job {job_id} ({job_name}); script {job_dir / JOB_SCRIPT}"
            + (f" on {self.ssh_host}" if self.ssh_host else "")
        )
        self.follow(context, job_id, run_dir, outputs)

    def job_name(self, run_dir: Path) -> str:
        """One name per run directory (the run's identity and seed): how a job is found again."""
        return f"{self.job_name_prefix}-{run_dir.parent.name}-{run_dir.name}"

    def live_job(self, context, run_dir):
        """The run directory's job that is queued, running or finished successfully: the one its record names
        (`slurm_job.json`, written at submission) or, should a process have gone away between sbatch and the
        record, one that SLURM's queue holds under the run directory's job name."""
        name = self.job_name(run_dir)
        try:
            queued = self.commands.run(["squeue", "--noheader", f"--name={name}", "--format=%i"], check=False)
            record = json.loads((run_dir / JOB_RECORD).read_text()) if (run_dir / JOB_RECORD).exists() else {}
            candidates = [*queued.stdout.split(), *([record["job_id"]] if record.get("job_id") else [])]
            for job_id in dict.fromkeys(candidates):
                try:
                    info = self.job_state(job_id)
                except RuntimeError:  # forgotten by SLURM (no accounting): nothing to follow
                    continue
                if info.get("JobName", name) != name:  # an id SLURM has given to another job since
                    continue
                state, exit_code = info["JobState"], info.get("ExitCode", "0:0")
                if state not in TERMINAL_STATES or (state == "COMPLETED" and exit_code.startswith("0:")):
                    context.log.info(f"SLURM job {job_id} of {run_dir} is {state}: following it, not submitting")
                    return job_id
        except (SlurmUnreachable, subprocess.TimeoutExpired) as error:
            raise dg.Failure(
                f"cannot tell whether {run_dir} has a SLURM job already, SLURM gave no answer: {error}",
                allow_retries=True,
            ) from None
        except (OSError, ValueError) as error:
            context.log.warning(f"{run_dir / JOB_RECORD} cannot be read ({error}): looking in the queue only")
        return None

    def follow(self, context, job, run_dir, outputs=()):
        """Watch `job` to its end; scancel it when the Dagster run is terminated, leave it running when the Dagster
        process merely goes away (a restart, a crash): launching the partition again follows it."""
        remote = self.remote_dir(run_dir)
        # Which Dagster run, in which process, follows the job now: once both are gone it is an orphan (`orphans`).
        record = {"job_id": job, "job_name": self.job_name(run_dir), "dagster_run_id": context.run.run_id}
        (run_dir / JOB_RECORD).write_text(json.dumps({**record, "host": socket.gethostname(), "pid": os.getpid()}))
        context.add_output_metadata({"slurm_job_id": job})
        with contextlib.suppress(Exception):  # a tag shows the job in the UI's run list; not worth failing for
            context.instance.add_run_tags(context.run.run_id, {"prism/slurm_job_id": job})
        try:
            final = self.watch(context, job, run_dir, remote)
        except BaseException as error:
            if not isinstance(error, Exception) and not terminated(context):
                message = (
                    f"the Dagster process is going away: SLURM job {job} keeps running; launching this partition "
                    f"again follows it (`scancel {job}` stops it)"
                )
                context.log.warning(message)
                # Not retried here: this process is ending. The next launch of the partition follows the job.
                raise dg.Failure(message, allow_retries=False) from error
            context.log.warning(f"cancelling SLURM job {job}")
            try:
                self.commands.run(["scancel", job], check=False)
            except Exception as cancel_error:  # SLURM unreachable: keep the error that got us here
                context.log.error(f"could not cancel SLURM job {job} ({cancel_error}): run `scancel {job}`")
            if isinstance(error, Exception):
                raise
            raise dg.Failure(f"the run was terminated: SLURM job {job} cancelled", allow_retries=False) from error
        if remote:
            self.fetch(remote, run_dir, job, outputs)
        try:
            self.cost(context, job, run_dir)
        except Exception as error:  # what the job cost is worth recording, never worth failing the run for
            context.log.warning(f"the cost of SLURM job {job} is not recorded: {error}")
        state, exit_code = final["JobState"], final.get("ExitCode", "?")
        if state == "COMPLETED" and exit_code.startswith("0:"):
            return
        stderr = tail(run_dir / job_stderr(job))
        raise dg.Failure(
            description=f"SLURM job {job} ended {state} (exit code {exit_code}, "
            f"reason {final.get('Reason', '?')}). "
            f"Hint: {HINTS.get(state, 'see the job stderr')}.\nstderr ends:\n{stderr}",
            metadata={
                "slurm_job_id": job,
                "slurm_state": state,
                "exit_code": exit_code,
                "run_dir": dg.MetadataValue.path(str(run_dir)),
            },
            allow_retries=state in TRANSIENT_STATES,
        )

    def orphans(self, instance: dg.DagsterInstance, runs_dir: Path) -> list[dict]:
        """This project's SLURM jobs (named job_name_prefix-…) that are queued or running while no Dagster run follows
        them, each with why: the Dagster run their record names has ended, or its process on this host is gone (a
        kill -9 leaves the run STARTED), or no record names the job (a process went away between sbatch and the
        record). Launching the job's partition again adopts it."""
        records: dict[str, tuple[Path, dict]] = {}
        for path in Path(runs_dir).glob(f"*/*/{JOB_RECORD}"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                record = json.loads(path.read_text())
                records[str(record["job_id"])] = (path.parent, record)
        queued = self.commands.run(["squeue", "--me", "--noheader", "--format=%i|%j|%T"], check=True)
        found = []
        for line in queued.stdout.splitlines():
            job_id, name, state = line.strip().split("|", 2)
            if not name.startswith(f"{self.job_name_prefix}-"):
                continue
            run_dir, record = records[job_id] if job_id in records else (None, {})
            run = instance.get_run_by_id(record["dagster_run_id"]) if record.get("dagster_run_id") else None
            if run is None:
                why = "no Dagster run recorded it"
            elif run.is_finished:
                why = f"its Dagster run {run.run_id[:8]} ended {run.status.value}"
            elif record.get("host") == socket.gethostname() and not _alive(record.get("pid")):
                why = f"the process of its Dagster run {run.run_id[:8]} is gone"
            else:
                continue  # followed
            found.append({"job_id": job_id, "job_name": name, "state": state, "run_dir": run_dir, "why": why})
        return found

    def mirror(self, remote: str, run_dir: Path, names: list[str]) -> None:
        """Append what the remote files gained since the last call to their local copies."""
        for name in names:
            local = run_dir / name
            offset = local.stat().st_size if local.exists() else 0
            data = self.commands.read_from(f"{remote}/{name}", offset)
            if data:
                with open(local, "ab") as handle:
                    handle.write(data)

    def fetch(self, remote: str, run_dir: Path, job_id: str, outputs: tuple[str, ...]) -> None:
        """The job's final output and the outputs the caller named, copied back from the cluster."""
        self.mirror(remote, run_dir, [PIPES_MESSAGES_FILE, job_stdout(job_id), job_stderr(job_id)])
        for name in outputs:
            (run_dir / name).unlink(missing_ok=True)
        self.mirror(remote, run_dir, list(outputs))

    def watch(self, context, job_id: str, run_dir: Path, remote: str | None = None) -> dict[str, str]:
        budget = self.queue_wait_budget_s + self.time_budget_factor * time_limit_seconds(self.time_limit)
        deadline, delay = time.monotonic() + budget, self.poll_initial_s
        last_state, streamed, unanswered_since, preempted_since = None, 0, None, None
        while True:
            try:
                info = self.job_state(job_id)
                if remote:
                    self.mirror(remote, run_dir, [PIPES_MESSAGES_FILE, job_stdout(job_id), job_stderr(job_id)])
            except SlurmUnreachable as error:
                unanswered_since = unanswered_since or time.monotonic()
                if time.monotonic() - unanswered_since > self.unreachable_budget_s:
                    raise RuntimeError(
                        f"SLURM gave no answer about job {job_id} for {self.unreachable_budget_s:.0f} s "
                        f"(unreachable_budget_s): {error}"
                    ) from None
                context.log.warning(f"SLURM job {job_id}: {error}; asking again")
                time.sleep(delay)
                delay = min(delay * 1.5, self.poll_max_s)
                continue
            unanswered_since = None
            state = info["JobState"]
            streamed = self._stream(context, run_dir / job_stdout(job_id), streamed)
            if state != last_state:
                context.log.info(
                    f"SLURM job {job_id}: {state} (reason {info.get('Reason', '-')}, "
                    f"restarts {info.get('Restarts', '0')})"
                )
                last_state, delay = state, self.poll_initial_s
            # A preempted job SLURM requeues (PreemptMode=REQUEUE) goes back to PENDING; one that stays PREEMPTED
            # (PreemptMode=CANCEL) has ended, and its partition is retried.
            preempted_since = (preempted_since or time.monotonic()) if state == "PREEMPTED" else None
            awaiting_requeue = (
                preempted_since is not None
                and self.requeue
                and time.monotonic() - preempted_since < self.preempted_grace_s
            )
            if state in TERMINAL_STATES and not awaiting_requeue:
                return info
            if time.monotonic() > deadline:
                raise dg.Failure(
                    f"SLURM job {job_id} still {state} after {budget:.0f} s: cancelled", allow_retries=False
                )
            time.sleep(delay)
            delay = min(delay * 1.5, self.poll_max_s)

    @staticmethod
    def _stream(context, path: Path, offset: int) -> int:
        """Forward new lines of the job's stdout to the Dagster log; returns the new offset."""
        if not path.exists():
            return offset
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
        complete = chunk.rfind(b"\n") + 1
        for line in chunk[:complete].decode(errors="replace").splitlines():
            context.log.info(f"[slurm stdout] {line}")
        return offset + complete
