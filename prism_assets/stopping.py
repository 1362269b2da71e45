"""How the main job's processes end: on SIGTERM or SIGINT, and with the main job however it dies.

Owns `StopSignals` (a process's SIGTERM and SIGINT, noticed even while a Dagster run holds their handlers), `Stopped`
(the exception that carries one), `end_with_parent` (a worker killed when the process that started it dies, kill -9
included) and `stop_children` (the main job's workers told to stop, then killed after a grace).
"""

import multiprocessing
import multiprocessing.connection
import os
import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(SystemExit):
    """A stop signal arrived: the process ends with 128 + its number, as a death by that signal reads."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class StopSignals:
    """SIGTERM and SIGINT of this process, from its main thread on. Between Dagster runs the handler raises `Stopped`.
    While a run executes in this thread Dagster takes both signals over (an interrupt stops the run's job and fails
    the run) and hands back this handler after it, so the signal would be lost to this process: every signal is also
    written to a pipe (the wakeup fd), and `check()` raises `Stopped` for one once the run has returned."""

    def __init__(self) -> None:
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        raise Stopped(signum)

    def check(self) -> None:
        """Raise `Stopped` if a stop signal has arrived, whichever handler took it."""
        while True:
            try:
                data = os.read(self._read, 512)
            except BlockingIOError:
                break
            if not data:
                break
            for signum in data:
                if signum in STOP_SIGNALS:
                    self.received = signum
        if self.received is not None:
            raise Stopped(self.received)


def end_with_parent(parent: int) -> None:
    """In a worker, first thing: SIGKILL it when the process that started it (`parent`) dies. An idle worker would
    otherwise wait for work forever, and a busy one train on for a job that is gone."""
    from resources.launcher import die_with_parent

    die_with_parent()  # the signal comes when the thread that started this process ends: the main job's main thread
    if os.getppid() != parent:  # died before the line above: no signal will come
        os._exit(1)


def stop_children(grace_s: float) -> list[int]:
    """SIGTERM every live child process of this one started by multiprocessing (the pool's workers: each interrupts
    its Dagster run, which stops its job and fails the run), SIGKILL those still alive after `grace_s`; the pids of
    those killed."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_s
    waiting: dict = {child.sentinel: child for child in children}  # ready once the child has ended
    while waiting and (left := deadline - time.monotonic()) > 0:
        for sentinel in multiprocessing.connection.wait(list(waiting), timeout=left):
            waiting.pop(sentinel)
    for child in waiting.values():
        child.kill()
    return [child.pid for child in waiting.values() if child.pid is not None]
