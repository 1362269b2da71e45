"""The main job killed or stopped: no process of it stays behind, and the next main job runs to its end by itself.

Each main job here is small (200 synthetic users, v3, one seed, 10 DPO steps of 64 tokens a run) and runs in its own
session, so its process group holds it, its workers and their trainers.
"""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from conftest import REPO

from prism_assets import dead_runs

TRAINED = re.compile(r"^\[\d+/\d+\] group_dpo_run \S+: trained \(")


def _environment(tmp_path: Path, gpu_slots: int = 2) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    # Two gpu slots, as many as the job's runs at once: a slot a dead run keeps slows the next job, two stop it.
    config = (REPO / "dagster.yaml").read_text()
    assert "default_limit: 8" in config
    (home / "dagster.yaml").write_text(config.replace("default_limit: 8", f"default_limit: {gpu_slots}"))
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PRISM_STORAGE": str(tmp_path / "storage"),
        "PRISM_SYNTHETIC_USERS": "200",
        "PRISM_EXPERIMENTS": "v3",
        "DPO_MAX_STEPS": "10",
        "DPO_LOGGING_STEPS": "5",
        "DPO_EVAL_STEPS": "10",
        "DPO_MAX_LENGTH": "64",  # the reference precompute, which every main job runs again, in half the time
        "PYTHONUNBUFFERED": "1",
    }


class MainJob:
    """`python -m prism_assets run --seeds 1 --parallel 2` in its own session: its pid is its process group's."""

    def __init__(self, env: dict[str, str], log: Path):
        self.log = log
        with open(log, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prism_assets", "run", "--seeds", "1", "--parallel", "2"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,
            )
        self.pid = self.process.pid
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern, timeout: float = 600) -> str:
        """The first line of stdout from now on that matches."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"the main job ended ({self.process.wait()}) before {pattern.pattern!r}: {self._tail()}")
            self.lines.append(line)
            if pattern.search(line):
                return line
        pytest.fail(f"no {pattern.pattern!r} in {timeout:.0f} s: {self._tail()}")

    def finish(self, timeout: float) -> int:
        """Its exit code, once it has ended and its stdout is read."""
        code = self.process.wait(timeout=timeout)
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)
        return code

    def _tail(self) -> str:
        return "\n".join(self.lines[-10:]) + "\nstderr ends:\n" + self.log.read_text()[-3000:]

    def kill(self, group: bool) -> set[int]:
        """kill -9 of the main process alone, or of its whole process group; the pids the group had."""
        pids = group_processes(self.pid)
        if group:
            os.killpg(self.pid, signal.SIGKILL)
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait()
        return pids


def group_processes(group: int) -> set[int]:
    """The live processes of a process group (a zombie has ended: its parent has only not read its status yet)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == group and state != "Z":
            found.add(int(stat.parent.name))
    return found


def survivors(group: int, within_s: float) -> set[int]:
    """The processes of the group still alive after `within_s` seconds (killed then, so the test leaves none)."""
    deadline = time.monotonic() + within_s
    while (left := group_processes(group)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        os.killpg(group, signal.SIGKILL)
    return left


def unfinished_runs(env: dict[str, str], monkeypatch) -> list[dg.DagsterRun]:
    """Every run a kill can leave unfinished, NOT_STARTED included (created, its process killed before it began)."""
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as instance:
        return list(instance.get_runs(filters=dg.RunsFilter(statuses=dead_runs.UNFINISHED)))


def claimed_gpu_slots(env: dict[str, str], monkeypatch) -> int:
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as instance:
        return len(instance.event_log_storage.get_concurrency_info("gpu").claimed_slots)


def held_slot(env: dict[str, str], monkeypatch, timeout: float = 120) -> None:
    """Returns once some step holds a gpu pool slot (between two partitions none may, for a moment)."""
    deadline = time.monotonic() + timeout
    while claimed_gpu_slots(env, monkeypatch) < 1:
        if time.monotonic() > deadline:
            pytest.fail(f"no gpu slot claimed within {timeout:.0f} s")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_main_job_leaves_no_process_and_the_next_one_runs_to_its_end(tmp_path, monkeypatch):
    env = _environment(tmp_path)
    # kill -9 of the main process alone, while partitions train: its workers and their trainers end by themselves.
    job = MainJob(env, tmp_path / "stderr-0.log")
    job.wait_for(TRAINED)
    had = job.kill(group=False)
    assert len(had) >= 3  # the main process and its two workers at least
    assert not survivors(job.pid, within_s=10), "processes of the killed main job stayed"

    # kill -9 of the whole group, three times, at different moments of the DPO runs
    for round_, delay in enumerate((0.0, 0.7, 1.5), start=1):
        job = MainJob(env, tmp_path / f"stderr-{round_}.log")
        job.wait_for(TRAINED)
        held_slot(env, monkeypatch)  # a partition's step holds a gpu slot: the kill lands mid-partition
        time.sleep(delay)
        job.kill(group=True)
        assert not survivors(job.pid, within_s=10)
    stuck = unfinished_runs(env, monkeypatch)
    assert stuck and claimed_gpu_slots(env, monkeypatch) >= 1  # what the kills left: STARTED runs holding slots

    # the next main job frees what the killed ones left, and runs to its end
    job = MainJob(env, tmp_path / "stderr-last.log")
    assert job.finish(timeout=900) == 0, job._tail()
    freed = [line for line in job.lines if line.startswith("freed run ")]
    assert {line.split()[2] for line in freed} == {run.run_id[:8] for run in stuck}
    assert all(re.search(r": its process \d+ is gone; marked FAILURE(, 1 gpu slot freed)?$", line) for line in freed)
    assert any(line.endswith("1 gpu slot freed") for line in freed)
    assert "0 failed" in job.lines[-1]
    assert not unfinished_runs(env, monkeypatch) and claimed_gpu_slots(env, monkeypatch) == 0
    assert not survivors(job.pid, within_s=10)


@pytest.mark.slow
def test_sigterm_stops_the_main_job_its_workers_and_their_runs(tmp_path, monkeypatch):
    env = _environment(tmp_path)
    job = MainJob(env, tmp_path / "stderr.log")
    job.wait_for(TRAINED)
    os.kill(job.pid, signal.SIGTERM)
    assert job.finish(timeout=180) == 128 + signal.SIGTERM
    [line] = [line for line in job.log.read_text().splitlines() if line.startswith("prism_assets: ")]
    assert line.startswith("prism_assets: stopped by SIGTERM: the runs in flight were interrupted and marked failed")
    assert not survivors(job.pid, within_s=10)
    # the workers' runs ended as failures (their trainers stopped), not left STARTED holding their slots
    assert not unfinished_runs(env, monkeypatch) and claimed_gpu_slots(env, monkeypatch) == 0


HOLD_A_SLOT = """
import sys, time
from pathlib import Path
import dagster as dg
from prism_assets import dead_runs

@dg.asset(pool="gpu")
def holds_a_slot():
    Path(sys.argv[1]).touch()
    time.sleep(600)

tags = {**dead_runs.process_tags(), **({dead_runs.HOST_TAG: sys.argv[2]} if len(sys.argv) > 2 else {})}
dg.materialize([holds_a_slot], instance=dg.DagsterInstance.get(), tags=tags)
"""


def test_the_runs_of_a_dead_process_are_failed_and_free_their_slots_and_no_other_run_is(tmp_path, monkeypatch):
    """Three runs holding a gpu slot each: one whose process was killed (freed), one of a live process and one of
    another host (both left alone)."""
    from prism_assets import dead_runs

    env = _environment(tmp_path, gpu_slots=3)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with dg.DagsterInstance.get():  # its storage made here, not by three processes at once
        pass
    holders = {
        name: subprocess.Popen([sys.executable, "-c", HOLD_A_SLOT, str(tmp_path / name), *host], cwd=REPO, env=env)
        for name, host in (("dead", []), ("alive", []), ("elsewhere", ["another-host"]))
    }
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / name).exists() for name in holders) and time.monotonic() < deadline:
            assert all(holder.poll() is None for holder in holders.values())
            time.sleep(0.2)
        for name in ("dead", "elsewhere"):
            holders[name].kill()
            holders[name].wait()
        with dg.DagsterInstance.get() as instance:
            runs = {run.tags[dead_runs.PID_TAG]: run for run in instance.get_runs()}
            dead, alive, elsewhere = (runs[str(holders[name].pid)] for name in ("dead", "alive", "elsewhere"))
            assert claimed_gpu_slots(env, monkeypatch) == 3  # the limit: a fourth run would wait for one
            lines = dead_runs.free_dead_runs(instance)
            assert sorted(lines) == sorted(
                [
                    f"freed run {dead.run_id[:8]} (holds_a_slot, STARTED): its process {holders['dead'].pid} is gone; "
                    "marked FAILURE, 1 gpu slot freed",
                    f"left run {alive.run_id[:8]} (holds_a_slot, STARTED): its process {holders['alive'].pid} is "
                    "alive (a main job running beside this one?)",
                    f"left run {elsewhere.run_id[:8]} (holds_a_slot, STARTED): its process {holders['elsewhere'].pid} "
                    "is on host another-host, which only that host can tell alive",
                ]
            )
            status = {run.run_id: run.status for run in instance.get_runs()}
            assert status[dead.run_id] == dg.DagsterRunStatus.FAILURE
            assert status[alive.run_id] == status[elsewhere.run_id] == dg.DagsterRunStatus.STARTED
            held = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
            assert {slot.run_id for slot in held} == {alive.run_id, elsewhere.run_id}
            assert not any(line.startswith("freed") for line in dead_runs.free_dead_runs(instance))  # once only
    finally:
        for holder in holders.values():
            holder.kill()
            holder.wait()
