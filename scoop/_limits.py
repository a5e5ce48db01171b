"""Task time limits (issue 13): ``futures.map(..., task_timeout=)`` and ``with_options``.

A task that runs past its limit cannot be interrupted inside its process (a greenlet,
a C call, a ``time.sleep``): it is stopped by ending the worker process that runs it.
So a task with a limit only ever runs where that costs nothing else: never inline,
never kept by its owner, never on the root (whose death ends the job) or a client. The
limit is enforced only in a task the broker knows as limited (tag LIMITED): a limited
function called directly, from another task or outside a job, runs without it.
::

    owner                          broker                          worker W (not the root)
    -----                          ------                          --------
    submit(with_options(f, task_timeout=30), x), or map(f, xs, task_timeout=30)
    each limited task (a map chunk)
    alone in its group, tag LIMITED
    TASKS ----------------------->  queued; never to the root --->  Limited.__call__ notes
                                                                    its deadline (Deadlines),
                                                                    one per item of a chunk
                                                                    watchdog thread: passed
                                    TIMEOUT {owner, fid, tid} <---  (its own socket)
                                    the task fails: RESULTS
    TaskTimeoutError  <-----------  (a map chunk: LOST, timeouts)
                                    W's other groups queued again,
                                    not charged; a replacement
                                    worker asked of the launcher
                                    STOP ------------------------>  os._exit

The clock of a task starts when it starts running on a worker (not at its submission),
and runs on while the task waits for futures it submitted (in its greenlet, the worker
runs other tasks meanwhile). A map's limit holds per item: each item of a chunk gets
its own deadline, and a limited chunk reports each result as soon as it has it, so
that the items before the one that timed out are kept (they never run twice). With
``retries``, each attempt has its own deadline; an attempt that times out is not
retried (the process that would retry it is gone).
"""

from __future__ import annotations

import itertools
import numbers
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent

from . import _protocol as P
from ._retry import Retrying, retrying

# The ids of the runners of map chunks (``futures._run_chunk``, registered by
# scoop.futures, module-level functions that live as long as the process): their first
# argument is the mapped function, which carries the limit. Ids: a lookup per shipped
# future, which must not call a user callable's __eq__.
_chunk_runners: set[int] = set()
_warned = False


def register_chunk_runner(runner: Callable) -> None:
    """``runner(func, chunk, ...)`` runs ``func`` over a map chunk: a limit on ``func``
    is the chunk's (see :func:`limit_of`)."""
    _chunk_runners.add(id(runner))


def message(func: Callable, seconds: float) -> str:
    """What a :class:`~scoop._errors.TaskTimeoutError` says: the function and its limit."""
    name = getattr(func, "__qualname__", None) or repr(func)
    return f"{name}() exceeded its task_timeout of {seconds:g} s"


class Limited:
    """``func``, called with a deadline ``seconds`` from the start of each call: past it,
    the worker running the call is ended (see the module doc). Picklable."""

    __slots__ = ("func", "seconds")

    def __init__(self, func: Callable, seconds: float) -> None:
        self.func, self.seconds = func, seconds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        entry = getattr(getcurrent(), "scoop_task", None)  # set by the hub (Hub._execute)
        if entry is None or not entry[0].fid & P.LIMITED:
            # Not a task the broker knows as limited (plain python, or a direct call from
            # another task, maybe on the root): ending its worker could end the job.
            _not_enforced()
            return self.func(*args, **kwargs)
        from . import _worker

        deadlines = _worker.current().deadlines
        token = deadlines.start(self, entry)
        try:
            return self.func(*args, **kwargs)
        finally:
            deadlines.end(token)

    def __reduce__(self):
        return Limited, (self.func, self.seconds)

    def __repr__(self) -> str:
        return f"with_options({self.func!r}, task_timeout={self.seconds!r})"


def _not_enforced() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("task_timeout is not enforced outside a job, nor on a call made "
                      "directly (not submitted or mapped): scoop could not end it without "
                      "ending more. Submit it (futures.submit, futures.map) in a job "
                      "started with `python -m scoop`", RuntimeWarning, stacklevel=3)


def limited(func: Callable, seconds: float | None) -> Callable:
    """``func`` with a time limit of ``seconds`` per call (None: ``func`` itself).

    Raises:
        TypeError: ``seconds`` is not a number.
        ValueError: ``seconds`` is not above 0.
    """
    if seconds is None:
        return func
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise TypeError(f"task_timeout must be a number of seconds or None, not "
                        f"{type(seconds).__name__}")
    if not seconds > 0:
        raise ValueError(f"task_timeout must be above 0 seconds (got {seconds!r})")
    return Limited(func, float(seconds))


def with_options(func: Callable, *, task_timeout: float | None = None, retries: int = 0,
                 retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception
                 ) -> Callable:
    """``func`` with scoop's options for one call, for ``futures.submit``:
    ``submit(with_options(f, task_timeout=30, retries=2, retry_on=OSError), x, timeout=5)``
    calls ``f(x, timeout=5)``: every argument of the submit is ``f``'s, its keyword
    arguments included.

    Args:
        func: the function (any picklable callable).
        task_timeout: seconds each attempt may run on a worker, from its start; past
            them the worker is ended and the future fails with ``TaskTimeoutError``
            (None: no limit).
        retries: attempts after the first while the call raises one of ``retry_on``
            (a timed-out attempt is not retried).
        retry_on: the exception class (or tuple of them) that is retried.

    Returns:
        A picklable callable.
    """
    return retrying(limited(func, task_timeout), retries, retry_on)


def limit_of(call: tuple | None) -> float | None:
    """The time limit of a call ``(fn, args, kwargs)``, or of the map chunk it runs, or
    None: such a call travels alone and never runs on the root."""
    if not call:
        return None
    fn, args = call[0], call[1]
    if args and id(fn) in _chunk_runners:
        fn = args[0]
    if not isinstance(fn, (Retrying, Limited)):  # a plain callable: no call more
        return None
    return limit_of_func(fn)


def limit_of_func(fn: Callable) -> float | None:
    """The time limit of each call of ``fn`` (made by :func:`with_options`), or None."""
    while isinstance(fn, Retrying):
        fn = fn.func
    return fn.seconds if isinstance(fn, Limited) else None


class Deadlines:
    """The deadlines of the limited calls running on this worker: written by its tasks,
    read by its watchdog thread (``scoop._watchdog``), hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, tuple] = {}  # token -> (deadline, Limited, entry)
        self._tokens = itertools.count()

    def start(self, call: Limited, entry: tuple) -> int:
        """A limited call starts, in the task ``entry`` (group, tid, call); a token."""
        token = next(self._tokens)
        with self._lock:
            self._live[token] = (time.monotonic() + call.seconds, call, entry)
        return token

    def end(self, token: int) -> None:
        with self._lock:
            self._live.pop(token, None)

    def next_due(self) -> float | None:
        """The earliest deadline (``time.monotonic()``), or None."""
        with self._lock:
            return min((d for d, _, _ in self._live.values()), default=None)

    def expired(self, now: float) -> dict | None:
        """The TIMEOUT body of a call past its deadline at ``now``, or None."""
        with self._lock:
            late = [(d, c, e) for d, c, e in self._live.values() if d <= now]
        if not late:
            return None
        _, call, (group, tid, _) = min(late, key=lambda x: x[0])
        return {"owner": group.owner, "fid": group.fid, "tid": tid,
                "error": message(call.func, call.seconds)}
