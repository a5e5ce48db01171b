"""The end of a job's time: drain, then stop the program, so that a job script can requeue.

A batch system kills a job at its wall-time limit; ``sbatch --signal=B:USR1@120`` warns
it first. The launcher (``--walltime`` or SIGUSR1) then does, in its own thread::

    SIGUSR1 to the launcher, or --walltime minus --grace reached
        -> broker.drain(): no task group starts any more; running ones finish and
           their results still reach the root (a checkpointed map records them)
        -> after --grace seconds: SIGUSR1 to the root worker (one on another host:
           its watchdog's next PONG says so, and it signals its own process), which raises
           WallTimeReached in the program: its finally blocks run (the checkpoint
           writes its last results), and the root exits with EXIT_WALLTIME (75)
    the launcher exits with the root's status: 75 means "run me again"

A program that ends within the grace period ends as usual, with its own status.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from .._bootstrap import EXIT_WALLTIME

log = logging.getLogger("scoop")

__all__ = ["EXIT_WALLTIME", "WallClock", "parse_duration"]


def parse_duration(text: str) -> float:
    """Seconds of ``[[DD-]HH:]MM:SS``, ``HH:MM:SS`` or plain seconds (SLURM's forms).

    Raises:
        ValueError: not a duration.
    """
    days, dash, rest = text.partition("-") if "-" in text else ("0", "", text)
    parts = [float(p) for p in rest.split(":")]
    if not days.isdigit() or not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
        raise ValueError(f"not a duration: {text!r} (use HH:MM:SS, MM:SS or seconds)")
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds + int(days) * 86400


class WallClock:
    """Watches for the end of the job's time (see the module docstring).

    Args:
        launcher: the job's launcher (its broker and root process).
        grace: seconds between the drain and the program's stop.
        walltime: the job's time from now (None: only SIGUSR1 ends it early).
    """

    def __init__(self, launcher, grace: float, walltime: float | None = None) -> None:
        self.launcher = launcher
        self.grace = grace
        self.deadline = None if walltime is None else time.monotonic() + walltime - grace
        self.warned = threading.Event()  # set by SIGUSR1 (from the handler: only that)
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scoop-walltime", daemon=True)
        self._previous = signal.SIG_DFL  # SIGUSR1's handler before start: back at stop

    def start(self) -> WallClock:
        previous = signal.signal(signal.SIGUSR1, lambda signum, frame: self.warned.set())
        self._previous = signal.SIG_DFL if previous is None else previous
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        signal.signal(signal.SIGUSR1, self._previous)

    def _run(self) -> None:
        while not self.stopped.is_set():
            if self.warned.wait(0.1) or (self.deadline is not None
                                         and time.monotonic() >= self.deadline):
                break
        else:
            return
        log.warning("scoop: the job's time is nearly up: no task starts any more; the "
                    "program stops in %g s", self.grace)
        self.launcher.broker.drain()
        if self.stopped.wait(self.grace):
            return  # the program ended within the grace period
        root = self.launcher.procs.get(0)
        if root is None:  # a root on another host: told through the broker (its watchdog)
            self.launcher.broker.drain(time_up=True)
            return
        if root.poll() is None:
            try:
                os.kill(root.pid, signal.SIGUSR1)
            except OSError:  # it ended meanwhile
                pass
