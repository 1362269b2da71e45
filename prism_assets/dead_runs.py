"""The Dagster runs a dead process left unfinished: found, marked failed and their pool slots freed.

A run the main job executes in its own process (dg.materialize) is ended by that process only: killed (kill -9, the
OOM killer, a lost machine) it stays STARTED and keeps the `gpu` pool slot its step claimed, and once the slots are
all kept the next job's steps wait for one forever. So every run the main job starts names its process in its tags
(`process_tags`: pid, host, the process's start time, which tells a reused pid), and the next main job frees the runs
whose process is gone (`free_dead_runs`). Dagster's own events carry a pid but no host. Runs of a live process (a main
job running beside this one) and of another host (which this one cannot look at) are left alone; runs without these
tags (`dagster dev`'s, the schedules' and sensors') are the daemon's run monitoring's.
"""

import os
import socket
from pathlib import Path

import dagster as dg

PID_TAG, HOST_TAG, START_TAG = "prism/pid", "prism/host", "prism/process_start"
UNFINISHED = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces): [0] the state, [19] the start
    time in clock ticks since boot (Linux); None where that cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When the process started, in clock ticks since boot (Linux), or None where that cannot be read."""
    fields = _stat(pid)
    return fields[19] if fields else None


def process_tags() -> dict[str, str]:
    """This process, as the tags of a run it executes name it."""
    pid = os.getpid()
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), START_TAG: process_start(pid) or ""}


def alive(pid: int, start: str) -> bool:
    """Whether the process `pid` of this host, started at `start` (empty: unknown), still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    except OverflowError:
        return False
    fields = _stat(pid)
    if fields is None:
        return True
    if start and fields[19] != start:  # the pid is another process's now
        return False
    return fields[0] != "Z"  # a zombie has ended: only its parent has not read its status yet


def free_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every unfinished run of this instance whose process (of this host) is gone, and free the pool
    slots it claimed and the steps it queued for one; one line per run freed or left alone."""
    host = socket.gethostname()
    lines = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED)):
        if PID_TAG not in run.tags:
            continue
        pid, where, start = run.tags[PID_TAG], run.tags.get(HOST_TAG, ""), run.tags.get(START_TAG, "")
        what = f"run {run.run_id[:8]} ({_describe(run)}, {run.status.value})"
        if where != host:
            lines.append(f"left {what}: its process {pid} is on host {where}, which only that host can tell alive")
            continue
        if alive(int(pid), start):
            lines.append(f"left {what}: its process {pid} is alive (a main job running beside this one?)")
            continue
        slots = _claimed(instance, run.run_id)
        instance.report_run_failed(
            run, message=f"its process ({pid} on {host}) is gone: marked failed by the next main job"
        )
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        freed = ", ".join(f"{count} {pool} slot{'s' if count > 1 else ''}" for pool, count in slots.items())
        lines.append(
            f"freed {what}: its process {pid} is gone; marked FAILURE" + (f", {freed} freed" if freed else "")
        )
    return lines


def _describe(run: dg.DagsterRun) -> str:
    """Its step (and partition), as the runs list of `dagster dev` shows it: `v3__group_dpo_run S1_age.A|0`."""
    steps = list(run.step_keys_to_execute or [])
    what = steps[0] if len(steps) == 1 else f"{len(steps)} steps" if steps else run.job_name
    partition = run.tags.get("dagster/partition")
    return f"{what} {partition}" if partition else what


def _claimed(instance: dg.DagsterInstance, run_id: str) -> dict[str, int]:
    """pool → slots the run holds."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    held = {}
    for pool in sorted(storage.get_concurrency_keys()):
        count = sum(slot.run_id == run_id for slot in storage.get_concurrency_info(pool).claimed_slots)
        if count:
            held[pool] = count
    return held
