"""Every exception scoop defines, in one hierarchy, shared by the API, the runtime and the launcher.

::

    ScoopError                      the base: ``except ScoopError`` catches scoop's own
    |-- BrokenJobError              the job can run no more futures (sticky)
    |   |-- JobStopped              the launcher stopped the job
    |   `-- JobOver                 the job ended before this worker took part
    |-- WorkerLostError             one task's workers kept dying: that task fails
    |-- TaskTimeoutError            a task ran past its ``task_timeout`` (also a TimeoutError)
    |-- SerializationError          a call or result cannot be pickled or unpickled
    |-- RemoteError                 a task's exception that could not travel as itself
    |-- AuthError                   a message that is not an authentic one of this job
    |-- LaunchError                 the job cannot start
    |-- SpawnError                  a worker process cannot be started
    |-- HostfileError               a hostfile with a bad line
    `-- ProgramError                the program cannot run (no such module, bad syntax)

Each also keeps the built-in base it always had (``BrokenJobError`` is a RuntimeError,
``SerializationError`` a TypeError, ...), so code written against those still works.

A lost worker is *not* a broken job: :class:`WorkerLostError` fails the tasks a dying
worker held (after ``--max-attempts`` deaths) through their futures, and the job goes on
with the others; :class:`BrokenJobError` means no future can run any more.

Not errors, and so not ScoopErrors: :class:`RemoteTraceback` (the worker-side traceback
chained as a task exception's ``__cause__``), :class:`UnguardedCall` (a
BaseException that stops a worker's import of the program, see ``scoop._bootstrap``) and
:class:`WallTimeReached` (a BaseException, like KeyboardInterrupt, that ends the program
when the job's time is up).
"""

from __future__ import annotations

from concurrent.futures import CancelledError, TimeoutError  # noqa: A004  (PEP 3148 names)

__all__ = [
    "CancelledError",
    "TimeoutError",
    "ScoopError",
    "RemoteTraceback",
    "RemoteError",
    "BrokenJobError",
    "JobStopped",
    "JobOver",
    "SerializationError",
    "WorkerLostError",
    "TaskTimeoutError",
    "AuthError",
    "LaunchError",
    "SpawnError",
    "HostfileError",
    "ProgramError",
    "UnguardedCall",
    "WallTimeReached",
]


class ScoopError(Exception):
    """The base of every error scoop raises itself."""


class RemoteTraceback(Exception):
    """The worker-side traceback of a task's exception, chained as its ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(ScoopError):
    """A task raised an exception that could not travel back as itself (unpicklable).

    Carries the original type name, message and worker-side traceback text.
    """

    def __init__(self, type_name: str, message: str, tb: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.tb = tb

    def __reduce__(self):
        return type(self), (self.type_name, self.message, self.tb)


class SerializationError(ScoopError, TypeError):
    """A task's function, arguments or result could not be pickled or unpickled."""


class BrokenJobError(ScoopError, RuntimeError):
    """The job can no longer run futures (its broker is gone or it was shut down).

    Likely causes: the launcher was stopped, or ``futures.shutdown()`` was called.
    """


class JobStopped(BrokenJobError):
    """The launcher stopped the job (Ctrl-C, SIGTERM, its end): waits end with this."""


class JobOver(BrokenJobError):
    """The job ended before this worker could take part (not an error for a worker)."""


class WorkerLostError(ScoopError, RuntimeError):
    """A task's worker died while holding it, again and again (see ``MAX_ATTEMPTS``).

    Likely causes: the task crashes the interpreter (a segfault in an extension, os._exit)
    or exhausts memory (the OOM killer). Not a BrokenJobError: only that task fails, and
    the job goes on with the workers left.
    """


class TaskTimeoutError(ScoopError, TimeoutError):
    """A task ran past its ``task_timeout`` (``futures.map(..., task_timeout=)``,
    ``futures.with_options``): the worker running it was ended (and replaced), and only
    that task fails. The message names the function and the limit."""


class AuthError(ScoopError, ValueError):
    """A message that is not an authentic message of this job (bad sig, mac or layout)."""


class LaunchError(ScoopError, RuntimeError):
    """The job could not start (bad program, interpreter or option)."""


class SpawnError(ScoopError, RuntimeError):
    """A worker process could not be started."""


class HostfileError(ScoopError, ValueError):
    """A hostfile (or a scheduler's host file) that cannot be read or has a bad line."""


class ProgramError(ScoopError):
    """The program cannot run at all (no such module, a syntax error); the message is
    what to print, in Python's own words."""


class UnguardedCall(BaseException):
    """A non-root worker's import of the program reached a futures call: code only the
    root should run. A BaseException, so that ``except Exception`` lets it through."""


class WallTimeReached(BaseException):
    """The job's time is up (SIGUSR1 to the launcher, or ``--walltime``): raised in the
    root's program once the grace period is over, so that its ``finally`` blocks (a
    checkpointed map's last results) run. A BaseException: ``except Exception`` in the
    program does not swallow it. The launcher then exits with ``EXIT_WALLTIME`` (75)."""
