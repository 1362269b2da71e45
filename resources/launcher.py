"""Launchers: start a DPO run's command in its run directory and follow it through Dagster Pipes.

Owns the launcher interface every backend fits. `run(context, command, run_dir, outputs)` opens a Pipes
session whose context and messages are files in the run directory (`pipes_context.json`,
`pipes_messages.jsonl`, kept for inspection), so a job on another machine that shares the directory
reports the same way as a local subprocess; the backend's `execute` starts the command with the
session's bootstrap environment and returns when it has ended, raising `dg.Failure` on failure. A backend
whose jobs outlive the Dagster process (SLURM) names a run directory's `live_job`, and `run(job=...)`
follows that job again instead of starting one.
`LocalLauncher` runs the command as a subprocess of the Dagster run, or, for `python -m <module>` of this
interpreter when `warm_modules` is set, in a fork of the Dagster process with those modules already imported
(stdout/stderr into the run directory, their tail in the failure). Of the project it imports only the run folder's
names (`prism_assets.training.run_folder`).
"""

import atexit
import contextlib
import ctypes
import faulthandler
import gc
import importlib
import io
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, NoReturn

import dagster as dg
from dagster_pipes import PipesDefaultMessageWriter
from pydantic import Field

from prism_assets.training.run_folder import PIPES_CONTEXT_FILE, PIPES_MESSAGES_FILE, STDERR_FILE, STDOUT_FILE

PR_SET_PDEATHSIG = 1
_prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform == "linux" else None  # looked up before any fork


def die_with_parent() -> None:
    """In a child before exec: SIGKILL it when the thread that started it ends. A local run lives in the Dagster
    process: killed with it, rather than left writing into a run directory the next launch resumes from."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path.name} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class RunDirMessageReader(dg.PipesFileMessageReader):
    """Reads the run directory's messages file from its start, as it grows. Unlike Dagster's file reader it never
    empties the file (a job followed again has written there already) and it parses a line only once its newline
    is written (a job on another machine may be caught mid-line); a line that is not JSON is reported, not fatal."""

    def __init__(self, path: str):
        super().__init__(path, cleanup_file=False)

    @property
    def expected_writer_count(self) -> int:  # one job writes here (the base's is a preview API, warning when read)
        return 1

    @contextlib.contextmanager
    def read_messages(self, handler: dg.PipesMessageHandler) -> Iterator[dict]:
        Path(self._path).touch()
        closed = threading.Event()
        thread = threading.Thread(target=self._follow, args=(handler, closed), daemon=True, name="pipes-messages")
        thread.start()
        try:
            yield {
                PipesDefaultMessageWriter.FILE_PATH_KEY: self._path,
                PipesDefaultMessageWriter.INCLUDE_STDIO_IN_MESSAGES_KEY: False,
            }
        finally:
            closed.set()
            thread.join()

    def _follow(self, handler: dg.PipesMessageHandler, closed: threading.Event) -> None:
        pending = b""
        with open(self._path, "rb") as handle:
            while True:
                last = closed.is_set()  # read once more after the session closed: what was written before it
                pending += handle.read()
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        handler.handle_message(json.loads(line))
                    except Exception:
                        origin = f"{self._path}: message {line[:200]!r}"
                        handler.report_pipes_framework_exception(origin, sys.exc_info())
                if last:
                    return
                if not lines:
                    time.sleep(0.05)


class RunLauncher(dg.PipesClient, dg.ConfigurableResource):
    """Base of the launchers: a Pipes session on files in the run directory around `execute`."""

    def run(  # type: ignore[override]  # needs command and run_dir, beyond PipesClient.run's context and extras
        self,
        *,
        context: dg.AssetExecutionContext,
        command: Sequence[str],
        run_dir: str,
        outputs: Sequence[str] = (),
        extras: Mapping | None = None,
        env: Mapping[str, str] | None = None,
        job: str | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        """Run `command` for its run directory; `outputs`: the files (names in the run directory) it leaves there
        that the caller reads, which a backend whose job runs elsewhere copies back. `job`: the run directory's
        live job (`live_job`), followed to its end instead of starting the command; its messages are read again."""
        directory = Path(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        messages = directory / PIPES_MESSAGES_FILE
        if job is None:
            messages.unlink(missing_ok=True)
        with dg.open_pipes_session(
            context=context,
            context_injector=self.context_injector(directory),
            message_reader=RunDirMessageReader(str(messages)),
            extras=extras,
        ) as session:
            env = {**(env or {}), **session.get_bootstrap_env_vars()}
            if job is None:
                self.execute(context, list(command), directory, env, tuple(outputs))
            else:
                self.follow(context, job, directory, tuple(outputs))
        return dg.PipesClientCompletedInvocation(session)

    def live_job(self, context: dg.AssetExecutionContext, run_dir: Path) -> str | None:
        """The job an earlier Dagster process started for `run_dir` that is still running or finished successfully
        (to follow again rather than start anew), or None. Local runs end with their Dagster process: never one."""
        return None

    def follow(self, context: dg.AssetExecutionContext, job: str, run_dir: Path, outputs: tuple[str, ...]) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot follow a job started by another process")

    def context_injector(self, run_dir: Path) -> dg.PipesContextInjector:
        return dg.PipesFileContextInjector(str(run_dir / PIPES_CONTEXT_FILE))

    def execute(
        self,
        context: dg.AssetExecutionContext,
        command: list[str],
        run_dir: Path,
        env: dict[str, str],
        outputs: tuple[str, ...] = (),
    ) -> None:
        raise NotImplementedError


class LocalLauncher(RunLauncher):
    """Runs the command as a local subprocess (the embedded default; CPU or a local GPU), or as a warm fork."""

    threads_per_run: int | None = None  # CPU threads of one run (OMP/MKL); set it when runs share the cores
    warm_modules: list[str] = Field(
        default=[],
        description="modules imported once into this process (at its first run) so that a `<this python> -m "
        "<module> ...` command runs in a fork of it instead of a new interpreter, without paying those imports "
        "again (seconds for torch and transformers); empty: every command is a subprocess",
    )

    def execute(self, context, command, run_dir, env, outputs=()):  # the outputs are already in run_dir
        threads = (
            {}
            if self.threads_per_run is None
            else {"OMP_NUM_THREADS": str(self.threads_per_run), "MKL_NUM_THREADS": str(self.threads_per_run)}
        )
        with open(run_dir / STDOUT_FILE, "w") as stdout, open(run_dir / STDERR_FILE, "w") as stderr:
            module = self._warm_module(context, command)
            process: subprocess.Popen | ForkedRun | None = None
            try:
                if module is None:
                    process = subprocess.Popen(
                        command,
                        cwd=os.getcwd(),
                        env={**os.environ, **threads, **env},
                        stdout=stdout,
                        stderr=stderr,
                        preexec_fn=die_with_parent,  # a function of no Python locks: safe beside threads
                    )
                else:
                    process = ForkedRun(module, command[3:], {**threads, **env}, stdout, stderr)
                    process.start()
                    context.log.info(f"{module} runs in a fork of this process, pid {process.pid}")
                code = process.wait()
            except BaseException as error:  # the Dagster run was terminated: stop the trainer with it
                if process is None or process.pid is None:  # it never started
                    raise
                context.log.warning(f"stopping the trainer (pid {process.pid})")
                try:
                    process.terminate()
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                finally:  # reaped, even if another interruption comes meanwhile
                    if process.poll() is None:
                        process.kill()
                        process.wait()
                if isinstance(error, Exception):
                    raise
                # An interruption is not a failure worth retrying: the run's retry policy must not restart it.
                raise dg.Failure(
                    f"the run was terminated: trainer pid {process.pid} stopped", allow_retries=False
                ) from error
        if code != 0:
            raise dg.Failure(
                description=f"the trainer exited with code {code} (run directory {run_dir}); stderr ends:\n"
                f"{tail(run_dir / STDERR_FILE)}",
                metadata={"run_dir": dg.MetadataValue.path(str(run_dir)), "exit_code": code},
                allow_retries=False,
            )

    def _warm_module(self, context: dg.AssetExecutionContext, command: list[str]) -> str | None:
        """The module to run in a fork, or None for a subprocess: another interpreter, or not `-m`, needs one."""
        if not self.warm_modules or len(command) < 3 or command[0] != sys.executable or command[1] != "-m":
            return None
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            context.log.warning("CUDA is initialized in this process, and a fork cannot use it: running a subprocess")
            return None
        problem = warm_up(self.warm_modules)
        if problem:
            context.log.warning(f"cannot import the warm modules here ({problem}): running a subprocess")
            return None
        return command[2]


_WARM: dict[str, str | None] = {}  # module → why it cannot be imported (None: imported), once per process


def warm_up(modules: Sequence[str]) -> str | None:
    """Import `modules` into this process once; why the first that cannot be imported fails, or None."""
    for name in modules:
        if name not in _WARM:
            # A module may install signal handlers as it is imported (the trainer does, for SLURM's warning
            # signal); in this process they would take Dagster's own (termination) away: put those back.
            handlers = {sig: signal.getsignal(sig) for sig in signal.valid_signals()}
            try:
                importlib.import_module(name)
                _WARM[name] = None
            except Exception as error:
                _WARM[name] = f"{name}: {type(error).__name__}: {error}"
            finally:
                for sig, handler in handlers.items():
                    if handler is not None and signal.getsignal(sig) is not handler:
                        signal.signal(sig, handler)
        if _WARM[name]:
            return _WARM[name]
    return None


class ForkedRun:
    """`python -m module *args` run in a fork of this process; waited on and stopped as a `subprocess.Popen` is.

    The child starts as that command would (environment, fds 1 and 2, argv, fresh signal handlers, no inherited
    exit handlers) but with every module of this process already imported. The fork is made from a new thread:
    fork copies only the calling thread, and GNU OpenMP (torch's CPU threads, MKL) hangs in a child whose forking
    thread has already run a parallel region; a thread that never has gives the child a fresh pool. Other threads'
    locks are the usual hazard of forking a threaded process: the child touches nothing of Dagster's.
    """

    def __init__(self, module: str, args: list[str], env: dict[str, str], stdout: IO, stderr: IO):
        self.module, self.args, self.env, self.stdout, self.stderr = module, args, env, stdout, stderr
        self.pid: int | None = None
        self.returncode: int | None = None

    def start(self) -> None:
        for stream in (sys.stdout, sys.stderr):  # or the child would write this process's buffered output too
            if stream is not None:
                stream.flush()
        failed: list[OSError] = []
        parent = os.getpid()

        def fork() -> None:
            try:
                pid = os.fork()
            except OSError as error:
                failed.append(error)
                return
            if pid == 0:
                run_forked(self.module, self.args, self.env, self.stdout, self.stderr, parent)
            self.pid = pid

        forker = threading.Thread(target=fork, name="launcher-fork")
        forker.start()
        try:
            forker.join()
        finally:  # interrupted meanwhile: the child's pid is known before the interruption goes on
            forker.join()
        if failed:
            raise failed[0]

    def poll(self, block: bool = False) -> int | None:
        assert self.pid is not None  # started
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N for death by signal N, as Popen's
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll(block=deadline is None)) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired([f"pid {self.pid}"], timeout or 0)
            time.sleep(0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.pid is not None and self.returncode is None:  # a reaped child's pid may be another's already
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_forked(module: str, args: list[str], env: dict[str, str], stdout: IO, stderr: IO, parent: int) -> NoReturn:
    """In the forked child: run `module` as `python -m` would, and exit with its code, whatever happens; killed when
    the `parent` process ends (the forking thread ends at once, so the kernel's parent-death signal cannot tell)."""
    code = 1
    try:
        threading.Thread(target=exit_with, args=(parent,), daemon=True, name="exit-with-parent").start()
        prepare_child(env, stdout, stderr)
        sys.argv = [module, *args]  # run_module puts the module's file first, as -m does
        sys.path.insert(0, os.getcwd())
        # A module imported here already (warm) must still run afresh as __main__, as -m runs it.
        sys.modules.pop(module, None)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            code = exit_code(exit_)
        except BaseException:
            traceback.print_exc()
        # What the interpreter does before it exits: wait for the module's threads, run its exit handlers.
        getattr(threading, "_shutdown", lambda: None)()
        atexit._run_exitfuncs()
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def exit_code(exit_: SystemExit) -> int:
    """The exit status the interpreter gives `sys.exit(value)`."""
    if exit_.code is None:
        return 0
    if isinstance(exit_.code, int):
        return exit_.code
    print(exit_.code, file=sys.stderr)
    return 1


def prepare_child(env: dict[str, str], stdout: IO, stderr: IO) -> None:
    """The state a new interpreter would start the module in, as far as this process's state differs from it."""
    for sig in signal.valid_signals():  # this process's handlers (Dagster's) are not the child's
        if callable(signal.getsignal(sig)):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    # Nor is its wakeup fd (the main job's workers note their stop signals there): the child's would read as theirs.
    signal.set_wakeup_fd(-1)
    # This process's exit handlers are not the child's to run (multiprocessing's would join this process's queues).
    atexit._clear()
    getattr(threading, "_threading_atexits", []).clear()
    # The collector would walk every object of this process, copying the pages it touches: leave them to it.
    gc.freeze()
    os.dup2(stdout.fileno(), 1)
    os.dup2(stderr.fileno(), 2)
    # sys.stdout and sys.stderr here may be a capture's (pytest's, Dagster's) rather than fds 1 and 2.
    out = io.TextIOWrapper(io.FileIO(1, "w", closefd=False))
    err = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), errors="backslashreplace", line_buffering=True)
    replaced = {id(sys.stdout): out, id(sys.stderr): err}
    sys.stdout, sys.stderr = out, err
    # Log handlers made before the fork (transformers' own) hold this process's stream objects, not fds 1 and 2.
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in (h for logger in loggers if isinstance(logger, logging.Logger) for h in logger.handlers):
        if isinstance(handler, logging.StreamHandler) and id(handler.stream) in replaced:
            handler.stream = replaced[id(handler.stream)]
    if faulthandler.is_enabled():
        faulthandler.enable(sys.stderr)
    os.environ.update(env)
    # Thread counts are read as torch is imported: the environment comes too late for a torch imported already.
    torch = sys.modules.get("torch")
    if torch is not None and "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
