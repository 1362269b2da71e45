"""A job for tests/test_launcher.py: `python -m launcher_jobs <what> <run dir>`, reporting through dagster-pipes
what it sees of the process it runs in, or failing in one of the ways a job fails."""

import os
import signal
import sys
import time
from pathlib import Path

TORCH_BEFORE_START = "torch" in sys.modules  # imported already: a warm launcher's fork


def _stop(signum, frame):
    Path(sys.argv[2], "stopped").write_text(str(signum))
    sys.exit(128 + signum)


# As the trainer does: a handler installed as the module is imported, here and in a process that warms it.
signal.signal(signal.SIGTERM, _stop)


def report() -> None:
    import torch
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        pipes.log.info(f"hello from pid {os.getpid()}")
        print("a line to stdout")
        print("a line to stderr", file=sys.stderr)
        pipes.report_asset_materialization(
            metadata={
                "ppid": os.getppid(),
                "torch_before_start": TORCH_BEFORE_START,
                "torch_threads": torch.get_num_threads(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
                "job_variable": os.environ.get("LAUNCHER_JOB_VARIABLE", ""),
                "argv": " ".join(sys.argv[1:]),
                "cwd": os.getcwd(),
            }
        )


def torn() -> None:
    """A line that is not JSON, and a message written in two halves a moment apart, as a job on another machine
    writing to a shared filesystem can be seen."""
    import json

    from dagster_pipes import decode_env_var, open_dagster_pipes

    with open_dagster_pipes():
        path = decode_env_var(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
        line = json.dumps(
            {
                "__dagster_pipes_version": "0.1",
                "method": "report_asset_materialization",
                "params": {
                    "asset_key": "job_torn",
                    "metadata": {"torn": {"raw_value": "whole", "type": "text"}},
                    "data_version": None,
                },
            }
        )
        with open(path, "a") as messages:
            messages.write("not a message\n")
            messages.write(line[:40])
            messages.flush()
            time.sleep(1)
            messages.write(line[40:] + "\n")


def main() -> None:
    what = sys.argv[1]
    if what == "report":
        report()
    elif what == "torn":
        torn()
    elif what == "exit":
        print("the job's last words", file=sys.stderr)
        sys.exit(3)
    elif what == "raise":
        raise ValueError("the job's own error")
    elif what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "parallel":  # torch's CPU threads at work
        import torch

        x = torch.rand(1000, 1000)
        print(float((x @ x).sum() + x.exp().sum()))
    elif what == "sleep":  # until stopped
        # Written whole by a rename: a test that sees the file reads the pid, never an empty file.
        partial = Path(sys.argv[2], "started.partial")
        partial.write_text(str(os.getpid()))
        partial.rename(partial.with_name("started"))
        time.sleep(120)


if __name__ == "__main__":
    main()
