"""LocalLauncher through a real Dagster materialization: a `python -m` job as a subprocess and as a warm fork of
the Dagster process (`warm_modules`), which must report, fail and stop alike."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
import torch

from resources.launcher import LocalLauncher

TESTS = str(Path(__file__).parent)
THREADS = 1
SUBPROCESS = LocalLauncher(threads_per_run=THREADS)
WARM = LocalLauncher(threads_per_run=THREADS, warm_modules=["torch", "launcher_jobs"])
# A subprocess finds the job module where this process does; a fork has it already.
JOB_ENV = {
    "PYTHONPATH": os.pathsep.join([TESTS, *filter(None, [os.environ.get("PYTHONPATH")])]),
    "LAUNCHER_JOB_VARIABLE": "reached",
}


def job_asset(what: str, run_dir: Path, python_args: tuple[str, ...] = ()) -> dg.AssetsDefinition:
    @dg.asset(name=f"job_{what}")
    def job(context: dg.AssetExecutionContext, launcher: LocalLauncher) -> dg.MaterializeResult:
        return launcher.run(
            context=context,
            command=[sys.executable, *python_args, "-m", "launcher_jobs", what, str(run_dir)],
            run_dir=str(run_dir),
            outputs=[],
            env=JOB_ENV,
        ).get_materialize_result()

    return job


def materialize(
    instance: dg.DagsterInstance, launcher: LocalLauncher, what: str, run_dir: Path, python_args: tuple[str, ...] = ()
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [job_asset(what, run_dir, python_args)],
        instance=instance,
        resources={"launcher": launcher},
        raise_on_error=False,
    )


def step_failure(result: dg.ExecuteInProcessResult):
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failure.step_failure_data


@pytest.fixture(scope="module")
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def test_a_message_seen_half_written_is_read_whole_and_a_bad_line_is_reported(instance, tmp_path):
    result = materialize(instance, SUBPROCESS, "torn", tmp_path)
    assert result.success
    [event] = result.get_asset_materialization_events()
    assert event.materialization.metadata["torn"].value == "whole"
    logged = [entry.message for entry in instance.all_logs(result.run_id)]
    assert any("not a message" in message for message in logged), logged


@pytest.mark.parametrize(
    ("launcher", "python_args", "forked"),
    [
        (SUBPROCESS, (), False),
        (WARM, (), True),
        (WARM, ("-X", "utf8"), False),  # not `<this python> -m <module>`: a subprocess even when warm
    ],
    ids=["subprocess", "warm", "warm-but-other-command"],
)
def test_a_job_reports_through_pipes_and_writes_its_streams(instance, tmp_path, launcher, python_args, forked):
    result = materialize(instance, launcher, "report", tmp_path, python_args)
    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = {key: value.value for key, value in event.materialization.metadata.items()}
    # a fork of this process has its modules imported before the job starts; a new interpreter has not
    assert metadata["torch_before_start"] is forked
    assert metadata["ppid"] == os.getpid()
    assert metadata["argv"] == f"report {tmp_path}"
    assert metadata["cwd"] == os.getcwd()
    assert metadata["job_variable"] == "reached"
    assert "hello from pid" in "\n".join(e.message for e in instance.all_logs(result.run_id) if e.message)
    assert (tmp_path / "stdout.log").read_text() == "a line to stdout\n"
    assert (tmp_path / "stderr.log").read_text() == "a line to stderr\n"
    assert (tmp_path / "pipes_messages.jsonl").read_text().count("report_asset_materialization") == 1


@pytest.mark.parametrize("launcher", [SUBPROCESS, WARM], ids=["subprocess", "warm"])
def test_the_threads_per_run_reach_the_job(instance, tmp_path, launcher):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS + 1)  # what a fork inherits, unless the launcher sets its threads
    try:
        result = materialize(instance, launcher, "report", tmp_path)
    finally:
        torch.set_num_threads(threads)
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["omp_num_threads"].value == str(THREADS)
    # the environment comes too late for the torch a fork inherits: the launcher sets its threads
    assert metadata["torch_threads"].value == THREADS


@pytest.mark.parametrize(
    ("what", "code", "last_line"),
    [("exit", 3, "the job's last words"), ("raise", 1, "ValueError: the job's own error"), ("kill", -9, "")],
)
def test_a_failing_job_fails_alike_as_subprocess_and_as_fork(instance, tmp_path, what, code, last_line):
    failures = []
    for launcher in (SUBPROCESS, WARM):
        result = materialize(instance, launcher, what, tmp_path)
        assert not result.success
        failures.append(step_failure(result))
    for failure in failures:
        message = failure.error.message.strip()
        assert f"the trainer exited with code {code} (run directory {tmp_path}); stderr ends:" in message
        assert message.splitlines()[-1].strip() == last_line or (not last_line and message.endswith("ends:"))
        assert failure.user_failure_data.metadata["exit_code"].value == code
        assert failure.error.cls_name == "Failure"
    if what != "raise":  # a traceback's frames above the job's own differ (runpy's, the launcher's)
        assert failures[0].error.message == failures[1].error.message


def test_warming_keeps_the_dagster_process_signal_handlers(instance, tmp_path, monkeypatch):
    """A warm module may install signal handlers as it is imported (the trainer does, for SIGTERM); in the Dagster
    process they would take the place of Dagster's own, which stop the run."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "launcher_handler_module.py").write_text(
        "import signal\nsignal.signal(signal.SIGTERM, lambda signum, frame: None)\n"
    )
    monkeypatch.syspath_prepend(str(modules))
    run_dir, handlers = tmp_path / "run", {}

    @dg.asset
    def job(context: dg.AssetExecutionContext, launcher: LocalLauncher) -> dg.MaterializeResult:
        handlers["before"] = signal.getsignal(signal.SIGTERM)
        invocation = launcher.run(
            context=context,
            command=[sys.executable, "-m", "launcher_jobs", "report", str(run_dir)],
            run_dir=str(run_dir),
            env=JOB_ENV,
        )
        handlers["after"] = signal.getsignal(signal.SIGTERM)
        return invocation.get_materialize_result()

    launcher = LocalLauncher(warm_modules=["launcher_handler_module"])
    assert dg.materialize([job], instance=instance, resources={"launcher": launcher}).success
    assert "launcher_handler_module" in sys.modules  # imported during this run, here
    assert handlers["after"] is handlers["before"]


def run_script(script: str, interrupt_once: Path | None = None) -> str:
    """Run `script` (dedented; tests/ on its path) in a new interpreter, SIGINT it once `interrupt_once` exists, and
    return its stdout. Its own process group: a job it leaves behind (hung, or not stopped) ends with it."""
    script = f"import sys\nsys.path.insert(0, {TESTS!r})\n" + textwrap.dedent(script)
    run = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        if interrupt_once is not None:
            deadline = time.monotonic() + 60
            while not interrupt_once.exists() and time.monotonic() < deadline and run.poll() is None:
                time.sleep(0.05)
            run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert run.returncode == 0, err[-3000:]
    return out


@pytest.mark.parametrize("warm", [False, True], ids=["subprocess", "warm"])
def test_an_interrupted_run_stops_the_job_and_reaps_it(tmp_path, warm):
    """Dagster interrupting the run (SIGINT here) stops the job with SIGTERM; the run fails as terminated and no
    child is left behind."""
    script = f"""
        import os
        import dagster as dg
        from resources.launcher import LocalLauncher
        from test_launcher import materialize, step_failure

        with dg.instance_for_test() as instance:
            launcher = LocalLauncher(warm_modules={["launcher_jobs"] if warm else []!r})
            print(step_failure(materialize(instance, launcher, "sleep", {str(tmp_path)!r})).error.message)
        try:
            os.waitpid(-1, os.WNOHANG)
            print("a child is left")
        except ChildProcessError:
            print("no child left")
        """
    out = run_script(script, interrupt_once=tmp_path / "started")
    job_pid = int((tmp_path / "started").read_text())
    assert f"the run was terminated: trainer pid {job_pid} stopped" in out
    assert (tmp_path / "stopped").read_text() == str(int(signal.SIGTERM))  # the job's own handler saw SIGTERM
    assert out.strip().endswith("no child left")


@pytest.mark.parametrize("warm", [False, True], ids=["subprocess", "warm"])
def test_a_killed_dagster_process_takes_its_local_job_with_it(tmp_path, warm):
    """kill -9 of the Dagster process: its local job ends too, instead of writing on into a run directory that the
    next launch of the partition resumes from."""
    script = f"""
        import dagster as dg
        from resources.launcher import LocalLauncher
        from test_launcher import materialize

        with dg.instance_for_test() as instance:
            materialize(instance, LocalLauncher(warm_modules={["launcher_jobs"] if warm else []!r}), "sleep",
                        {str(tmp_path)!r})
        """
    script = f"import sys\nsys.path.insert(0, {TESTS!r})\n" + textwrap.dedent(script)
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    job_pid = int((tmp_path / "started").read_text())
    run.kill()
    run.wait()
    deadline = time.monotonic() + 10
    while _alive(job_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(job_pid)
    if alive:
        os.kill(job_pid, signal.SIGKILL)
    assert not alive


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs torch's CPU threads: two cores or more")
def test_a_fork_uses_torch_threads_after_this_process_has(tmp_path):
    """GNU OpenMP (torch's CPU threads) hangs in a child forked by a thread that has run a parallel region; the
    Dagster process may have (building the tiny model) before it launches a job."""
    script = f"""
        import dagster as dg
        import torch
        from resources.launcher import LocalLauncher
        from test_launcher import materialize

        x = torch.rand(1000, 1000)
        (x @ x).sum() + x.exp().sum()  # parallel regions, in the thread that runs the materialization
        with dg.instance_for_test() as instance:
            launcher = LocalLauncher(warm_modules=["torch", "launcher_jobs"])
            print(materialize(instance, launcher, "parallel", {str(tmp_path)!r}).success)
        """
    assert run_script(script).strip() == "True"
    assert (tmp_path / "stdout.log").read_text().strip()  # the job's sum: it ran to the end
