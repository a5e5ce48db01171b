"""The exceptions scoop raises, shared by the API, the worker runtime and the launcher."""

from __future__ import annotations

from concurrent.futures import CancelledError, TimeoutError  # noqa: A004  (PEP 3148 names)

__all__ = [
    "CancelledError",
    "TimeoutError",
    "RemoteTraceback",
    "RemoteError",
    "BrokenJobError",
    "JobStopped",
    "SerializationError",
    "WorkerLostError",
]


class RemoteTraceback(Exception):
    """The worker-side traceback of a task's exception, chained as its ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(Exception):
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


class SerializationError(TypeError):
    """A task's function, arguments or result could not be pickled or unpickled."""


class BrokenJobError(RuntimeError):
    """The job can no longer run futures (its broker is gone or it was shut down).

    Likely causes: the launcher was stopped, or ``futures.shutdown()`` was called.
    """


class JobStopped(BrokenJobError):
    """The launcher stopped the job (Ctrl-C, SIGTERM, its end): waits end with this."""


class WorkerLostError(RuntimeError):
    """A task's worker died while holding it, again and again (see ``MAX_ATTEMPTS``).

    Likely causes: the task crashes the interpreter (a segfault in an extension, os._exit)
    or exhausts memory (the OOM killer).
    """
