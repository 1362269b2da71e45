"""The SLURM launcher against the real single-node cluster of scripts/slurm-dev-cluster.sh (2 fake GPUs).

Happy path, then one test per fault: non-zero exit, scancel from outside, time limit, an impossible
request, `scontrol requeue` or a node failure in mid-run (resumes to the same metrics), termination of the
Dagster run, its process killed or interrupted (the job runs on and is followed again), and unsafe names refused
before anything is submitted.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from builders import run_dirs, upstream_of_runs
from test_dpo_assets import _broken_python, _definitions, _materialize_partition

from prism_assets import automation, partitions
from resources.slurm import SlurmLauncher, parse_scontrol, time_limit_seconds

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]


def _cluster_ready() -> str | None:
    try:
        nodes = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired) as error:
        return f"no SLURM CLI: {error}"
    if nodes.returncode != 0 or "Gres=gpu:2" not in nodes.stdout:
        return f"no SLURM node with 2 (fake) GPUs: {nodes.stderr.strip() or nodes.stdout.strip()}"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    problem = _cluster_ready()
    if problem:
        if os.environ.get("PRISM_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM tests required but {problem} (start it: SLURM_CI_GPUS=2 scripts/slurm-dev-cluster.sh)")
        pytest.skip(problem)


def _launcher(**overrides) -> SlurmLauncher:
    settings = dict(
        partition="debug", cpus_per_task=1, mem=None, gpus=1, time_limit="5", poll_initial_s=0.5, poll_max_s=2.0
    )
    return SlurmLauncher(**{**settings, **overrides})


@pytest.fixture(scope="module")
def cluster_instance(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("slurm")
    assets, resources = _definitions(tmp_path, max_steps=6, logging_steps=2)
    with dg.instance_for_test() as instance:
        dg.materialize(upstream_of_runs(assets), instance=instance, resources=resources)
        instance.add_dynamic_partitions(partitions.SEED, ["0"])
        yield tmp_path, instance


def _run(cluster_instance, cell, launcher, **settings):
    tmp_path, instance = cluster_instance
    assets, resources = _definitions(tmp_path, **{"max_steps": 6, "logging_steps": 2, **settings})
    resources["launcher"] = launcher
    result = _materialize_partition(assets, resources, instance, cell, 0, raise_on_error=False)
    return result, _run_dir(tmp_path / "runs", cell, timeout=0)


def _run_dir(runs: Path, cell: str, timeout: float = 60) -> Path:
    """The newest run directory of `cell` under `runs` (named by the run's identity), once its config is written."""
    deadline = time.time() + timeout
    while True:
        found = run_dirs(runs, cell)
        if found or time.time() >= deadline:
            break
        time.sleep(0.2)
    return max(found, key=lambda d: (d / "config.json").stat().st_mtime) if found else runs / "not-launched"


def _failure(result) -> str:
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failure.step_failure_data.error.message


def _job(job_id: str) -> dict:
    return parse_scontrol(
        subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    )


def _job_id(run_dir: Path | tuple[Path, str], timeout: float = 60) -> str:
    """The id of the job submitted for run_dir (or for (runs, cell), once its directory exists), once it runs (read
    from its stdout file name)."""
    deadline = time.time() + timeout
    if isinstance(run_dir, tuple):
        run_dir = _run_dir(*run_dir, timeout=timeout)
    while time.time() < deadline:
        outs = list(run_dir.glob("slurm-*.out"))
        if outs:
            return outs[0].stem.split("-")[1]
        time.sleep(0.2)
    raise AssertionError(f"no SLURM job started for {run_dir}")


def _in_background(fn):
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_partitions_run_as_sbatch_jobs_with_gpus_and_the_table_builds(cluster_instance):
    tmp_path, instance = cluster_instance
    costs = []
    for cell in ("S8_region.A", "S8_region.B"):
        result, run_dir = _run(cluster_instance, cell, _launcher())
        assert result.success, _failure(result)
        [event] = result.get_asset_materialization_events()
        job_id = event.materialization.metadata["slurm_job_id"].value
        assert "#SBATCH --gres=gpu:1" in (run_dir / "job.sbatch").read_text()
        job = _job(job_id)
        assert job["JobState"] == "COMPLETED" and job["TresPerNode"] == "gres:gpu:1"
        assert json.loads((run_dir / "run.json").read_text())["cuda_visible_devices"] in ("0", "1")
        assert (run_dir / f"slurm-{job_id}.out").read_text().count("step 6/6") == 1
        assert (run_dir / "pipes_messages.jsonl").exists()
        # What the job cost, from slurmdbd, as SLURM's own sacct reports it.
        cost = {k[len("cost_") :]: v.value for k, v in event.materialization.metadata.items() if k.startswith("cost_")}
        [allocation, *steps] = _sacct(job_id)
        assert cost["jobs"] == 1 and cost["elapsed_s"] == int(allocation["ElapsedRaw"]) > 0
        assert "gres/gpu=1" in allocation["AllocTRES"]
        assert cost["gpu_hours"] == pytest.approx(cost["elapsed_s"] / 3600)
        assert cost["max_rss_mb"] == max(float(step["MaxRSS"].rstrip("M")) for step in steps) > 100  # torch loaded
        assert cost["cpu_efficiency"] > 0 and cost["queue_wait_s"] >= 0
        costs.append(cost["gpu_hours"])
    assets, resources = _definitions(tmp_path, max_steps=6, logging_steps=2)  # the runs' settings: the table's runs
    report = dg.materialize(
        assets, selection=[dg.AssetKey("correspondence_table")], instance=instance, resources=resources
    )
    table = report.output_for_node("correspondence_table")["table"]
    assert table.set_index(["split", "metric"]).loc[("S8_region", "mean_heldout_acc_tail"), "n_seeds"] == 1
    metadata = report.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["runs_with_cost"].value == 2
    assert metadata["gpu_hours"].value == pytest.approx(sum(costs))


def _sacct(job_id: str) -> list[dict[str, str]]:
    """The job's accounting rows (allocation first, then its steps), read straight from sacct."""
    fields = ["JobID", "ElapsedRaw", "AllocTRES", "MaxRSS"]
    done = subprocess.run(
        ["sacct", "-j", job_id, "-n", "-P", "--units=M", "-o", ",".join(fields)], capture_output=True, text=True
    )
    return [dict(zip(fields, line.split("|"))) for line in done.stdout.splitlines()]


def test_runs_per_gpu_packs_jobs_onto_one_gpu_through_shards(tmp_path):
    launcher = _launcher(runs_per_gpu=2, shards_per_gpu=2)
    jobs = []
    for i in range(2):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        script = launcher.job_script(
            ["bash", "-c", "echo gpu=$CUDA_VISIBLE_DEVICES; sleep 8"], run_dir, {}, f"pack{i}", str(tmp_path)
        )
        assert "#SBATCH --gres=shard:1" in script and "--gres=gpu" not in script
        (run_dir / "job.sbatch").write_text(script)
        jobs.append((launcher.submit(run_dir / "job.sbatch"), run_dir))
    deadline, together = time.time() + 60, False
    while time.time() < deadline and not together:
        together = all(_job(job_id).get("JobState") == "RUNNING" for job_id, _ in jobs)
        time.sleep(0.3)
    assert together, [_job(job_id) for job_id, _ in jobs]  # two runs at once on a node …
    assert all(_job(job_id)["TresPerNode"] == "gres:shard:1" for job_id, _ in jobs)
    for job_id, run_dir in jobs:
        assert launcher.watch(dg.build_asset_context(), job_id, run_dir)["JobState"] == "COMPLETED"
        # Half a GPU each: the job's gres/shard over the GPU's shards.
        cost = launcher.cost(dg.build_asset_context(), job_id, run_dir)
        assert cost is not None and cost["gpu_hours"] == pytest.approx(cost["elapsed_s"] / 2 / 3600)
        assert cost["elapsed_s"] >= 8
    gpus = {(run_dir / f"slurm-{job_id}.out").read_text().strip() for job_id, run_dir in jobs}
    assert len(gpus) == 1 and gpus <= {"gpu=0", "gpu=1"}  # … sharing one GPU


def test_runs_per_gpu_needs_shards_that_divide_and_single_gpu_runs(tmp_path):
    with pytest.raises(ValueError, match="needs shards_per_gpu"):
        _launcher(runs_per_gpu=2).sbatch_options(tmp_path, "x")
    with pytest.raises(ValueError, match="a multiple of 3"):
        _launcher(runs_per_gpu=3, shards_per_gpu=4).sbatch_options(tmp_path, "x")
    with pytest.raises(ValueError, match="one untyped GPU"):
        _launcher(runs_per_gpu=2, shards_per_gpu=4, gpus=2).sbatch_options(tmp_path, "x")
    assert "--gres=shard:2" in _launcher(runs_per_gpu=2, shards_per_gpu=4).sbatch_options(tmp_path, "x")


def test_a_failing_job_names_state_exit_code_and_stderr(cluster_instance, tmp_path):
    result, _ = _run(cluster_instance, "S1_age.A", _launcher(), python=_broken_python(tmp_path, code=1))
    assert not result.success
    message = _failure(result)
    assert re.search(r"SLURM job \d+ ended FAILED \(exit code 1:0", message)
    assert "broken environment: no torch here" in message and "Hint: the trainer failed" in message


def test_a_cluster_environment_with_other_trainer_code_fails_naming_both_versions(cluster_instance, tmp_path):
    """The job's interpreter runs an edited copy of the project (a stale venv on the cluster): the trainer refuses
    to train, naming its version and the one the asset recorded."""
    from prism_assets.assets.dpo import JOB_CODE_VERSIONS, TRAINER_MODULE

    stale = tmp_path / "stale"
    shutil.copytree(REPO / "prism_assets", stale / "prism_assets", ignore=shutil.ignore_patterns("__pycache__"))
    engine = stale / "prism_assets" / "training" / "engine.py"
    engine.write_text(engine.read_text() + "\nSTALE = True\n")
    python = stale / "python"  # the cluster's interpreter, with the stale copy first on its path
    python.write_text(f'#!/bin/sh\ncd {stale} && exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    result, run_dir = _run(cluster_instance, "S3_personalisation.B", _launcher(), python=str(python))
    assert not result.success
    message = _failure(result)
    expected = JOB_CODE_VERSIONS[TRAINER_MODULE]
    assert re.search(
        rf"stale code: {TRAINER_MODULE} here is version \w{{12}}, the asset .* recorded {expected}", message
    )
    assert not (run_dir / "curve.parquet").exists()


def test_a_job_cancelled_outside_dagster_fails_the_partition(cluster_instance):
    _in_background(lambda: subprocess.run(["scancel", _job_id((cluster_instance[0] / "runs", "S1_age.B"))]))
    result, _ = _run(cluster_instance, "S1_age.B", _launcher(), max_steps=400, logging_steps=50)
    assert not result.success
    assert "ended CANCELLED" in _failure(result) and "cancelled outside this run" in _failure(result)


def test_an_impossible_request_surfaces_sbatchs_message(cluster_instance):
    result, run_dir = _run(cluster_instance, "S2_education.A", _launcher(gpus=3))
    assert not result.success
    message = _failure(result)
    assert "sbatch rejected the job" in message and "Requested node configuration is not available" in message
    assert not list(run_dir.glob("slurm-*.out"))


def test_unsafe_names_and_values_are_refused_before_submission(cluster_instance, tmp_path):
    _, instance = cluster_instance
    jobs_before = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout
    instance.add_dynamic_partitions(partitions.cells_name("v3"), ["S1_age$(touch pwned).A"])
    result, _ = _run(cluster_instance, "S1_age$(touch pwned).A", _launcher())
    assert not result.success and "invalid split name" in _failure(result)
    instance.delete_dynamic_partition(partitions.cells_name("v3"), "S1_age$(touch pwned).A")
    for bad in (
        dict(partition="debug;id"),
        dict(account="a b"),
        dict(extra_sbatch_args=["--comment=$(id)"]),
        dict(time_limit="1:00\n#SBATCH --uid=0"),
        dict(mem="8G;id"),
        dict(gpu_type="a100 x"),
    ):
        with pytest.raises(ValueError, match="not allowed"):
            _launcher(**bad).sbatch_options(tmp_path, "job")
    with pytest.raises(ValueError, match="--long-option"):
        _launcher(extra_sbatch_args=["-p debug"]).sbatch_options(tmp_path, "job")
    assert not Path("pwned").exists()
    assert (
        subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout == jobs_before
    )


def test_time_limit_forms():
    assert [time_limit_seconds(t) for t in ("5", "5:30", "1:00:00", "2-3", "1-00:00:10")] == [
        300,
        330,
        3600,
        183600,
        86410,
    ]


def _release_requeued(job_id_of, stop: threading.Event):
    """Requeued jobs wait ~2 min (SLURM's begin-time delay); let them start after a few seconds instead
    (sooner races the controller's cleanup of the previous attempt: "Job credential revoked")."""
    waiting_since = None
    while not stop.is_set():
        job_id = job_id_of()
        if job_id and _job(job_id).get("Reason") == "BeginTime":
            waiting_since = waiting_since or time.time()
            if time.time() - waiting_since > 5:
                subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], capture_output=True)
                waiting_since = None
        else:
            waiting_since = None
        time.sleep(0.5)


@pytest.mark.slow
def test_scontrol_requeue_mid_run_resumes_to_the_same_metrics(cluster_instance):
    tmp_path, _ = cluster_instance
    cell, settings = "S3_personalisation.A", dict(max_steps=60, logging_steps=4, checkpoint_steps=8)
    stop = threading.Event()

    def requeue_mid_run():
        run_dir = _run_dir(tmp_path / "runs", cell)
        job_id = _job_id(run_dir)
        out = run_dir / f"slurm-{job_id}.out"
        while "step 20/60" not in (out.read_text() if out.exists() else ""):
            time.sleep(0.2)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        _release_requeued(lambda: job_id, stop)

    _in_background(requeue_mid_run)
    result, run_dir = _run(cluster_instance, cell, _launcher(), **settings)
    stop.set()
    assert result.success, _failure(result)
    job_id = result.get_asset_materialization_events()[0].materialization.metadata["slurm_job_id"].value
    assert int(_job(job_id)["Restarts"]) == 1
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "signal SIGTERM: checkpoint saved" in log and "resuming from" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    straight = _uninterrupted(tmp_path, run_dir, "uninterrupted")  # the same run, straight through the trainer
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "curve.parquet"), straight, rtol=1e-6, atol=1e-7)
    assert (
        metrics["data_version"]
        == json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())["data_version"]
    )


def _node() -> str:
    return parse_scontrol(subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True).stdout)[
        "NodeName"
    ]


def _node_state(node: str) -> str:
    out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True).stdout
    return parse_scontrol(out)["State"]


@pytest.mark.slow
def test_a_node_failure_mid_run_retries_the_partition_and_resumes_from_its_checkpoint(cluster_instance):
    """The node goes down mid-job (NODE_FAIL, no requeue): the partition's retry submits a new job, which resumes
    from the checkpoint the first left in the run directory, and ends with an uninterrupted run's curve."""
    tmp_path, _ = cluster_instance
    cell, settings = "S6_helpfulness.A", dict(max_steps=60, logging_steps=4, checkpoint_steps=8)
    node, failed = _node(), []

    def fail_the_node_mid_run():
        run_dir = _run_dir(tmp_path / "runs", cell)
        job_id = _job_id(run_dir)
        failed.append(job_id)
        out = run_dir / f"slurm-{job_id}.out"
        while "step 20/60" not in (out.read_text() if out.exists() else ""):
            time.sleep(0.1)
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=node-fail-test"], check=True)
        try:
            _wait_for_state(job_id, {"NODE_FAIL", "COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
        finally:
            # ReturnToService=2 may have brought the node back already when its slurmd re-registered; resume
            # only a node that is still down (scontrol refuses to resume an idle one).
            if "DOWN" in _node_state(node):
                subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=True)

    _in_background(fail_the_node_mid_run)
    result, run_dir = _run(cluster_instance, cell, _launcher(requeue=False), **settings)
    assert result.success, _failure(result)
    [failed_job] = failed
    assert _job(failed_job)["JobState"] == "NODE_FAIL", _job(failed_job)
    retried_job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
    assert retried_job != failed_job and "resuming from" in (run_dir / f"slurm-{retried_job}.out").read_text()
    # Both jobs are paid for: the one the node failure ended, and the retry.
    assert result.get_asset_materialization_events()[0].materialization.metadata["cost_jobs"].value == 2
    straight = _uninterrupted(tmp_path, run_dir, "after-node-fail")
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "curve.parquet"), straight, rtol=1e-6, atol=1e-7)


def _uninterrupted(tmp_path: Path, run_dir: Path, name: str) -> pd.DataFrame:
    """The curve of the run in `run_dir` trained straight through by the trainer, in tmp_path/<name>."""
    config = json.loads((run_dir / "config.json").read_text()) | {
        "output_dir": str(tmp_path / name),
        "pairs_path": str(run_dir / "pairs.parquet"),
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    subprocess.run(
        [sys.executable, "-m", "prism_assets.training.trainer", "--config", str(tmp_path / f"{name}.json")],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    return pd.read_parquet(tmp_path / name / "curve.parquet")


@pytest.mark.slow
def test_time_limit_warning_checkpoints_requeues_and_finishes(cluster_instance):
    """--time=1 with SLURM's warning 45 s before the end: each attempt checkpoints and requeues itself."""
    tmp_path, _ = cluster_instance
    cell = "S4_safety.A"
    stop = threading.Event()
    _in_background(
        lambda: _release_requeued(
            lambda: next((p.stem.split("-")[1] for p in _run_dir(tmp_path / "runs", cell).glob("slurm-*.out")), None),
            stop,
        )
    )
    result, run_dir = _run(
        cluster_instance,
        cell,
        _launcher(time_limit="1", signal_before_end_s=45),
        max_steps=800,
        logging_steps=20,
        checkpoint_steps=100,
    )  # ≈ 40 s of training on 2 cores: the warning, due 15 s in and seen between steps 20 and 220, comes first
    stop.set()
    assert result.success, _failure(result)
    job_id = result.get_asset_materialization_events()[0].materialization.metadata["slurm_job_id"].value
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert int(_job(job_id)["Restarts"]) >= 1 and "signal SIGUSR1: checkpoint saved" in log
    assert list(pd.read_parquet(run_dir / "curve.parquet")["step"]) == list(range(20, 820, 20))


@pytest.mark.slow
def test_hitting_the_time_limit_without_requeue_names_timeout_and_the_fix(cluster_instance):
    result, _ = _run(
        cluster_instance, "S4_safety.B", _launcher(time_limit="1", requeue=False), max_steps=5000, logging_steps=100
    )
    assert not result.success
    message = _failure(result)
    assert "ended TIMEOUT" in message and "raise time_limit" in message


def _partition_process(root: Path, cell: str, max_steps: int, python: Path | None = None) -> subprocess.Popen:
    """One partition in a Dagster process of its own (tests/slurm_partition.py), its instance under root/home."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "slurm_partition.py"), str(root), cell, str(max_steps)]
        + ([str(python)] if python else []),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _report(process: subprocess.Popen, timeout: float = 600) -> tuple[dict, str]:
    try:
        output = process.communicate(timeout=timeout)[0].decode()
    finally:
        process.kill()
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, output[-3000:]
    return json.loads(lines[-1]), output


def _killed(process: subprocess.Popen) -> str:
    """The end of what a process wrote, killed: the message of a wait that failed."""
    process.kill()
    return process.communicate()[0].decode()[-3000:]


def _wait_for_state(job_id: str, states: set[str], timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while (state := _job(job_id)["JobState"]) not in states and time.time() < deadline:
        time.sleep(0.5)
    return state


def _running_job(root: Path, cell: str) -> tuple[str, Path]:
    """The job of the partition a first process launched, once the trainer has logged a step."""
    run_dir = _run_dir(root / "runs", cell, timeout=240)
    job_id = _job_id(run_dir, timeout=120)
    deadline = time.time() + 120
    while "step " not in (run_dir / f"slurm-{job_id}.out").read_text() and time.time() < deadline:
        time.sleep(0.3)
    return job_id, run_dir


def _followed_by(process: subprocess.Popen, run_dir: Path, timeout: float = 240) -> None:
    """Wait until `process` follows the run directory's job: its record names that process (follow() writes it)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((run_dir / "slurm_job.json").read_text()).get("pid") == process.pid:
                return
        time.sleep(0.3)
    raise AssertionError(f"process {process.pid} (exit code {process.poll()}) never followed the job of {run_dir}")


@contextlib.contextmanager
def _suspended(job_id: str):
    """The job held (SIGSTOP) inside the block and resumed after it; cancelled if the block fails, since a suspended
    job keeps its GPU and its time limit stands still."""
    subprocess.run(["scontrol", "suspend", job_id], check=True)
    try:
        yield
    except BaseException:
        subprocess.run(["scancel", job_id], check=False)
        raise
    subprocess.run(["scontrol", "resume", job_id], check=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "job_meanwhile"),
    [(signal.SIGKILL, "running"), (signal.SIGKILL, "finished"), (signal.SIGINT, "running")],
    ids=["killed-job-running", "killed-job-finished", "interrupted-job-running"],
)
def test_a_job_outlives_its_dagster_process_and_the_next_launch_follows_it(tmp_path, how, job_meanwhile):
    """The Dagster process dies (kill -9) or is interrupted (a restart) mid-job: the job goes on, and launching the
    partition again follows that job (still running, or finished meanwhile) instead of submitting another. A job
    that is to outlive both processes is held mid-run by `scontrol suspend` until the second one follows it."""
    cell, steps = "baseline", 100 if job_meanwhile == "running" else 60
    first = _partition_process(tmp_path, cell, steps)
    job_id, run_dir = _running_job(tmp_path, cell)
    with _suspended(job_id) if job_meanwhile == "running" else contextlib.nullcontext():
        first.send_signal(how)
        output = first.communicate(timeout=60)[0].decode()
        if how == signal.SIGINT:
            assert f"SLURM job {job_id} keeps running" in output, output[-2000:]
        if job_meanwhile == "running":
            assert _job(job_id)["JobState"] == "SUSPENDED", output[-2000:]  # alive, neither cancelled nor ended
            # Meanwhile the job is an orphan: listed with its run directory and why, not cancelled without a grace.
            with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
                [orphan] = _launcher().orphans(instance, tmp_path / "runs")
                tick = automation.build_orphans_sensor(str(tmp_path / "runs"))(
                    dg.build_sensor_context(instance=instance, resources={"launcher": _launcher()})
                )
            assert (orphan["job_id"], orphan["run_dir"]) == (job_id, run_dir)
            # kill -9 leaves the Dagster run STARTED: its process, gone, tells; an interrupted run ends FAILURE.
            assert ("is gone" if how == signal.SIGKILL else "ended FAILURE") in orphan["why"], orphan
            assert job_id in tick.skip_message and "cancelled" not in tick.skip_message
            second = _partition_process(tmp_path, cell, steps)
            _followed_by(second, run_dir)
    if job_meanwhile == "finished":
        assert _wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", output[-2000:]
        second = _partition_process(tmp_path, cell, steps)

    report, output = _report(second)
    assert report["success"], report.get("failure", output[-3000:])
    if job_meanwhile == "running":  # followed to its end
        assert report["metadata"]["slurm_job_id"] == job_id, output[-3000:]
        assert f"SLURM job {job_id} of {run_dir} is SUSPENDED: following it" in output
    else:  # its outputs are there: adopted
        assert report["metadata"]["trained"] is False, output[-3000:]
    assert [p.name for p in run_dir.glob("slurm-*.out")] == [f"slurm-{job_id}.out"]  # one job in all
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert report["metadata"]["final_heldout_acc"] == pytest.approx(metrics["final_heldout_acc"])
    assert "resuming from" not in (run_dir / f"slurm-{job_id}.out").read_text()  # never interrupted
    assert len(pd.read_parquet(run_dir / "curve.parquet")) == 10


@pytest.mark.slow
def test_a_reference_job_outlives_its_dagster_process_and_is_followed_again(tmp_path):
    """reference_logps as well: its job (slowed by a wrapper interpreter) runs on after kill -9 of the Dagster
    process, and materializing the asset again follows that job instead of replacing its directory."""
    slow = tmp_path / "slow-python"
    slow.write_text(f'#!/bin/sh\nsleep 20\nexec {sys.executable} "$@"\n')
    slow.chmod(0o755)
    first = _partition_process(tmp_path, "reference", 6, slow)
    deadline = time.time() + 240
    while not (records := list((tmp_path / "runs" / "reference").glob("*/slurm_job.json"))) and time.time() < deadline:
        time.sleep(0.3)
    assert records, _killed(first)
    run_dir, job_id = records[0].parent, json.loads(records[0].read_text())["job_id"]
    assert _wait_for_state(job_id, {"RUNNING"}, timeout=60) == "RUNNING"
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    report, output = _report(_partition_process(tmp_path, "reference", 6, slow))
    assert report["success"], report.get("failure", output[-3000:])
    assert report["metadata"]["slurm_job_id"] == job_id and "is RUNNING: following it" in output, output[-3000:]
    assert [p.name for p in run_dir.glob("slurm-*.out")] == [f"slurm-{job_id}.out"]  # one job in all


def test_the_orphan_sensor_cancels_a_job_no_run_follows_once_its_grace_is_over(tmp_path):
    """A job of this project that no Dagster run recorded (a process gone between sbatch and its record): the
    sensor's first tick lists it, a tick after orphan_grace_s cancels it; other jobs on the cluster are not ours."""
    launcher = _launcher(orphan_grace_s=1.0)
    jobs = {}
    for name in ("prism-dpo-lost-seed0", "someone-elses-job"):
        (tmp_path / f"{name}.sbatch").write_text(
            launcher.job_script(["sleep", "60"], tmp_path, {}, name, str(tmp_path))
        )
        jobs[name] = launcher.submit(tmp_path / f"{name}.sbatch")
    sensor = automation.build_orphans_sensor(str(tmp_path / "runs"))
    try:
        (tmp_path / "home").mkdir()
        listed = subprocess.run(
            [sys.executable, "-m", "prism_assets", "orphans"],
            env={
                **os.environ,
                "DPO_LAUNCHER": "slurm",
                "PRISM_STORAGE": str(tmp_path),
                "DAGSTER_HOME": str(tmp_path / "home"),
            },
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert listed.returncode == 0, listed.stderr[-2000:]
        assert "prism-dpo-lost-seed0" in listed.stdout and "someone-elses-job" not in listed.stdout, listed.stdout
        with dg.instance_for_test() as instance:
            context = dg.build_sensor_context(instance=instance, resources={"launcher": launcher})
            first = sensor(context)
            time.sleep(1.5)
            second = sensor(
                dg.build_sensor_context(instance=instance, cursor=context.cursor, resources={"launcher": launcher})
            )
        assert "1 SLURM jobs" in first.skip_message and "no Dagster run recorded it" in first.skip_message
        assert (
            "cancelled" not in first.skip_message
            and f"{jobs['prism-dpo-lost-seed0']} prism-dpo-lost-seed0" in second.skip_message
            and "cancelled" in second.skip_message
        )
        assert _wait_for_state(jobs["prism-dpo-lost-seed0"], {"CANCELLED"}, timeout=30) == "CANCELLED"
        assert _job(jobs["someone-elses-job"])["JobState"] in ("PENDING", "RUNNING")
    finally:
        subprocess.run(["scancel", *jobs.values()], check=False)


def test_terminating_the_dagster_run_cancels_the_job(tmp_path):
    """A Dagster run in its own process, terminated as `dagster run terminate` and the UI do (the run marked
    CANCELING, then its process interrupted): the job is scancelled."""
    process = _partition_process(tmp_path, "baseline", 2000)
    job_id, _ = _running_job(tmp_path, "baseline")
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        [run] = [r for r in instance.get_runs() if r.status == dg.DagsterRunStatus.STARTED]
        instance.report_run_canceling(run)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0].decode()
    assert _wait_for_state(job_id, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=30) == "CANCELLED", output[-2000:]
    assert f"cancelling SLURM job {job_id}" in output


@pytest.fixture(scope="module")
def local_sshd(tmp_path_factory):
    """Debian's OpenSSH server on 127.0.0.1, with its own host key and one authorized user key."""
    sshd = Path("/usr/sbin/sshd")
    if not sshd.exists():
        if os.environ.get("PRISM_REQUIRE_SLURM") == "1":
            pytest.fail("openssh-server is not installed (make test installs it as root)")
        pytest.skip("openssh-server is not installed")
    home = tmp_path_factory.mktemp("ssh")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True)
    (home / "authorized_keys").write_text((home / "client_key.pub").read_text())
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (home / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {home / 'host_key'}\nPidFile {home / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nSubsystem sftp /usr/lib/openssh/sftp-server\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    server = subprocess.Popen([str(sshd), "-D", "-e", "-f", str(home / "sshd_config")], stderr=subprocess.PIPE)
    (home / "known_hosts").write_text(f"[127.0.0.1]:{port} {(home / 'host_key.pub').read_text()}")
    time.sleep(0.5)
    yield {
        "ssh_host": "127.0.0.1",
        "ssh_port": port,
        "ssh_identity_file": str(home / "client_key"),
        "ssh_known_hosts_file": str(home / "known_hosts"),
        "ssh_control_dir": str(home / "cm"),
    }
    subprocess.run(
        ["ssh", "-o", f"ControlPath={home / 'cm'}/%C", "-O", "exit", "-p", str(port), "127.0.0.1"], capture_output=True
    )
    server.terminate()
    server.wait(timeout=10)


def test_ssh_mode_submits_and_watches_through_one_multiplexed_connection(cluster_instance, local_sshd):
    result, run_dir = _run(cluster_instance, "S5_factuality.A", _launcher(**local_sshd))
    assert result.success, _failure(result)
    job_id = result.get_asset_materialization_events()[0].materialization.metadata["slurm_job_id"].value
    assert _job(job_id)["JobState"] == "COMPLETED"
    assert json.loads((run_dir / "run.json").read_text())["slurm_job_id"] == job_id
    assert list(Path(local_sshd["ssh_control_dir"]).iterdir())  # the multiplexing master's socket


def test_ssh_mode_refuses_an_unknown_host_key(cluster_instance, local_sshd, tmp_path):
    (tmp_path / "empty_known_hosts").write_text("")
    settings = local_sshd | {
        "ssh_known_hosts_file": str(tmp_path / "empty_known_hosts"),
        "ssh_control_dir": str(tmp_path / "cm"),
    }
    result, _ = _run(cluster_instance, "S5_factuality.B", _launcher(**settings))
    assert not result.success
    assert "sbatch rejected the job" in _failure(result) and "Host key verification failed" in _failure(result)


def test_ssh_mode_with_a_remote_run_directory_mirrors_inputs_messages_and_outputs(
    cluster_instance, local_sshd, tmp_path
):
    """The cluster's filesystem is not the Dagster host's: the run directory is copied over and tailed back."""
    remote_root = tmp_path / "cluster-scratch"
    result, run_dir = _run(
        cluster_instance, "S6_helpfulness.A", _launcher(**local_sshd, remote_runs_dir=str(remote_root))
    )
    assert result.success, _failure(result)
    remote = remote_root / run_dir.parent.name / "seed0"  # <remote_runs_dir>/<run id>/seed0
    assert (remote / "pairs.parquet").exists() and (remote / "metrics.json").exists()
    assert f"#SBATCH --output={remote}/slurm-%j.out" in (run_dir / "job.sbatch").read_text()
    assert not (run_dir / "pipes_context.json").exists()  # the context travelled in the job's environment
    assert (run_dir / "metrics.json").read_bytes() == (remote / "metrics.json").read_bytes()
    assert (run_dir / "curve.parquet").read_bytes() == (remote / "curve.parquet").read_bytes()
    assert "report_asset_materialization" in (run_dir / "pipes_messages.jsonl").read_text()
    job_id = result.get_asset_materialization_events()[0].materialization.metadata["slurm_job_id"].value
    assert "step 6/6" in (run_dir / f"slurm-{job_id}.out").read_text()


def test_ssh_mode_with_a_remote_run_directory_builds_reference_logps(cluster_instance, local_sshd, tmp_path):
    """The reference job's output is copied back too: every asset names the files it reads from its run."""
    cluster_tmp, instance = cluster_instance
    assets, resources = _definitions(cluster_tmp, max_steps=6, logging_steps=2)
    resources["launcher"] = _launcher(**local_sshd, remote_runs_dir=str(tmp_path / "cluster-scratch"))
    [reference] = [a.key for a in assets if a.key.path[0] == "reference_logps"]
    name = reference.path[-1]  # <runs>/reference/<name> here, <remote_runs_dir>/reference/<name> there
    earlier = tmp_path / "cluster-scratch" / "reference" / name / "pipes_messages.jsonl"
    earlier.parent.mkdir(parents=True)
    earlier.write_text(
        '{"__dagster_pipes_version": "0.1", "method": "closed", "params": {}}\n'
    )  # an earlier attempt's
    result = dg.materialize(
        assets,
        selection=[reference],
        instance=instance,
        resources=resources,
        raise_on_error=False,
    )
    assert result.success, _failure(result)
    assert earlier.read_text().count('"method": "closed"') == 1  # the remote directory was made afresh
    fetched = cluster_tmp / "runs" / "reference" / name / "reference_logps.parquet"
    assert fetched.read_bytes() == (tmp_path / "cluster-scratch" / "reference" / name / fetched.name).read_bytes()


def test_a_controller_that_stops_answering_for_a_while_does_not_fail_the_partition(cluster_instance):
    """slurmctld frozen (SIGSTOP) for 30 s while a job runs, and slurmdbd for 80 s: scontrol times out (20 s here),
    then sacct (45 s) — else accounting would answer for the controller; the launcher asks again and the run ends
    as usual — it neither cancels the job nor takes the silence for a vanished job."""
    tmp_path, instance = cluster_instance
    cell = "S7_diversity.A"
    cluster = Path(os.environ.get("SLURM_CI_DIR", "/tmp/prism-slurm"))
    controller = int((cluster / "slurmctld.pid").read_text())
    accounting = int((cluster / "slurmdbd.pid").read_text()) if (cluster / "slurmdbd.pid").exists() else None

    def freeze_the_controller():
        _job_id((tmp_path / "runs", cell))
        frozen = [controller] + ([accounting] if accounting else [])
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(30)
            os.kill(controller, signal.SIGCONT)
            time.sleep(50 if accounting else 0)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)

    thread = _in_background(freeze_the_controller)
    result, _ = _run(cluster_instance, cell, _launcher(), max_steps=20, logging_steps=4)
    thread.join()
    assert result.success, _failure(result)
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("asking again" in message for message in messages), messages[-20:]
    assert not any("cancelling SLURM job" in message for message in messages)
