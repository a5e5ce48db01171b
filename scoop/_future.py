"""The Future of a call submitted to scoop (PEP 3148 interface).

A Future belongs to the worker that created it (its *owner*) and only ever changes there:
the owner's runtime (:mod:`scoop._runtime`) runs it inline, ships it to the broker, or
receives its result, through the methods of the last section (nothing else writes its
fields). Waiting is done by the runtime, which lets the waiting greenlet's
worker run other futures meanwhile.

States, in order: PENDING (in the owner's outbox, can be cancelled or run inline),
RUNNING (shipped to the broker or executing; no longer cancellable), FINISHED, CANCELLED.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._errors import CancelledError

PENDING, RUNNING, FINISHED, CANCELLED = range(4)
_STATE_NAMES = ("pending", "running", "finished", "cancelled")


def never_waits(fn: Callable) -> Callable:
    """Mark a done-callback of scoop's own that never waits on a future: the hub calls it
    directly, not in a greenlet of its own (~7 us per future; issue 12)."""
    fn.scoop_never_waits = True
    return fn


class Future:
    """The result of a call that runs on some worker of the job, now or later.

    Created by :func:`scoop.futures.submit`; do not instantiate directly.
    """

    __slots__ = ("_id", "_state", "_result", "_exception", "_callbacks", "_waiters",
                 "_call", "_weight", "_runtime", "_chunk", "__weakref__")

    def __init__(self, runtime, fid: int, call: tuple, weight: int = 1,
                 chunk: Any = None) -> None:
        self._id = fid
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[Future], object]] = []
        self._waiters: list = []
        self._call = call  # (fn, args, kwargs) until shipped or run
        self._weight = weight  # items of work it stands for (a map chunk is several)
        self._runtime = runtime
        self._chunk = chunk  # a map chunk's state at its owner (scoop._chunks.Chunk)

    def __repr__(self) -> str:
        fn = self._call[0] if self._call else None
        name = getattr(fn, "__qualname__", None)
        what = f" {name}()" if name else ""
        if self._state == FINISHED:
            if self._exception is not None:
                return f"<Future {self._id}{what} raised {type(self._exception).__name__}>"
            return f"<Future {self._id}{what} returned {type(self._result).__name__}>"
        return f"<Future {self._id}{what} {_STATE_NAMES[self._state]}>"

    # -- PEP 3148 ---------------------------------------------------------------------
    def cancel(self) -> bool:
        """Cancel the call if it has not left this worker yet; return True if cancelled.

        A future already shipped to another worker or running cannot be cancelled.
        """
        if self._state == CANCELLED:
            return True
        if self._state != PENDING:
            return False
        return self._runtime.cancel(self)

    def cancelled(self) -> bool:
        """True if the call was cancelled (a cancelled future is also done)."""
        return self._state == CANCELLED

    def running(self) -> bool:
        """True once the call has left the local queue (shipped or executing), until done."""
        return self._state == RUNNING

    def done(self) -> bool:
        """True if the call finished (returned or raised) or was cancelled."""
        return self._state >= FINISHED

    def result(self, timeout: float | None = None) -> Any:
        """Return the call's value, waiting up to ``timeout`` seconds (None: forever).

        While waiting, this worker runs other futures. A call still queued on this worker
        runs here, now (SCOOP's evaluation laziness).

        Raises:
            TimeoutError: the result did not arrive in time.
            CancelledError: the future was cancelled.
            Exception: whatever the call raised, with the worker-side traceback as its
                ``__cause__``.
        """
        if self._state < FINISHED:
            self._runtime.wait_one(self, timeout)
        if self._state == CANCELLED:
            raise CancelledError()
        if self._exception is not None:
            try:
                raise self._exception
            finally:
                self = None  # noqa: PLW0642 - break the cycle frame -> exception -> self
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Return the call's exception (None if it returned), waiting like :meth:`result`.

        Raises:
            TimeoutError: the call did not finish in time.
            CancelledError: the future was cancelled.
        """
        if self._state < FINISHED:
            self._runtime.wait_one(self, timeout)
        if self._state == CANCELLED:
            raise CancelledError()
        return self._exception

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        """Call ``fn(future)`` once the future is done (at once if it already is).

        Callbacks run in the owner's process, in order of addition. An exception raised by
        a callback is logged with its traceback on ``scoop.logger`` and does not stop the
        other callbacks.
        """
        if self._state >= FINISHED:
            self._runtime.run_callbacks(self, [fn])
        else:
            self._callbacks.append(fn)

    # -- set by the owner's runtime only ------------------------------------------------
    def _mark_running(self) -> None:
        """It left the outbox (shipped, kept to run here, or running inline): called by
        the runtime's ``ship``, its inline run and a lost chunk's resumption."""
        self._state = RUNNING

    def _mark_cancelled(self) -> None:
        """Called by the runtime's ``cancel``, which took it out of the outbox."""
        self._state = CANCELLED
        self._call = None

    def _drop_arguments(self) -> None:
        """Its call was pickled into a group: keep the function (for repr and error
        messages), free the arguments. Called by the runtime's group packing."""
        self._call = (self._call[0], (), {})

    def _add_waiter(self, waiter) -> None:
        """Notify ``waiter`` (``notify(runtime, future)``) once it is done: called by the
        runtime's waits and by a lost chunk's :class:`scoop._chunks.Join`."""
        self._waiters.append(waiter)

    def _take_waiters(self) -> list:
        """The waiters to notify once it is done (and forget them): called by the runtime."""
        waiters, self._waiters = self._waiters, []
        return waiters

    def _take_callbacks(self) -> list:
        """The done-callbacks to run once it is done (and forget them): ditto."""
        callbacks, self._callbacks = self._callbacks, []
        return callbacks

    def _finish(self, ok: bool, value: Any) -> None:
        """Record the outcome; called by the runtime, which then wakes waiters."""
        self._state = FINISHED
        if ok:
            self._result = value
        else:
            self._exception = value
        self._call = None
