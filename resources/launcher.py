"""Launchers: start a DPO run's command in its run directory and follow it through Dagster Pipes.

Owns the launcher interface every backend fits. `run(context, command, run_dir, outputs)` opens a Pipes
session whose context and messages are files in the run directory (`pipes_context.json`,
`pipes_messages.jsonl`, kept for inspection), so a job on another machine that shares the directory
reports the same way as a local subprocess; the backend's `execute` starts the command with the
session's bootstrap environment and returns when it has ended, raising `dg.Failure` on failure.
`LocalLauncher` runs the command as a subprocess of the Dagster run (stdout/stderr into the run
directory, their tail in the failure). Never imports prism_assets.
"""

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import dagster as dg

PIPES_CONTEXT_FILE, PIPES_MESSAGES_FILE = "pipes_context.json", "pipes_messages.jsonl"
STDOUT_FILE, STDERR_FILE = "stdout.log", "stderr.log"


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path.name} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


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
    ) -> dg.PipesClientCompletedInvocation:
        """Run `command` for its run directory; `outputs`: the files (names in the run directory) it leaves there
        that the caller reads, which a backend whose job runs elsewhere copies back."""
        directory = Path(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        messages = directory / PIPES_MESSAGES_FILE
        messages.unlink(missing_ok=True)
        with dg.open_pipes_session(
            context=context,
            context_injector=self.context_injector(directory),
            message_reader=dg.PipesFileMessageReader(str(messages), cleanup_file=False),
            extras=extras,
        ) as session:
            self.execute(
                context, list(command), directory, {**(env or {}), **session.get_bootstrap_env_vars()}, tuple(outputs)
            )
        return dg.PipesClientCompletedInvocation(session)

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
    """Runs the command as a local subprocess (the embedded default; CPU or a local GPU)."""

    threads_per_run: int | None = None  # CPU threads of one run (OMP/MKL); set it when runs share the cores

    def execute(self, context, command, run_dir, env, outputs=()):  # the outputs are already in run_dir
        threads = (
            {}
            if self.threads_per_run is None
            else {"OMP_NUM_THREADS": str(self.threads_per_run), "MKL_NUM_THREADS": str(self.threads_per_run)}
        )
        with open(run_dir / STDOUT_FILE, "w") as stdout, open(run_dir / STDERR_FILE, "w") as stderr:
            process = subprocess.Popen(
                command, cwd=os.getcwd(), env={**os.environ, **threads, **env}, stdout=stdout, stderr=stderr
            )
            try:
                code = process.wait()
            except BaseException as error:  # the Dagster run was terminated: stop the trainer with it
                context.log.warning(f"stopping the trainer (pid {process.pid})")
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
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
