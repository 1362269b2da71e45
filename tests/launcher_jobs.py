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


def main() -> None:
    what = sys.argv[1]
    if what == "report":
        report()
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
        Path(sys.argv[2], "started").write_text(str(os.getpid()))
        time.sleep(120)


if __name__ == "__main__":
    main()
