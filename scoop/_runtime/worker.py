"""The runtime of one process, :class:`Worker`: the API the futures call, completion, the
life cycle; it composes the pieces of this package (see its docstring for the flow).

Life cycle, one :class:`Flags` object, three endings::

    Worker(wid)     in-process until connect(): no broker, shipping queues locally
    connect()       HELLO -> WELCOME: size, max_attempts, constants; a link to the broker
    serve()         a non-root worker runs the hub until the job ends
    stop_accepting  futures.shutdown(): (wait for this worker's futures, then) refuse new
                    ones; the job goes on                       -> flags.accepting False
    stop(reason)    the job ended or broke: the hub stops, parked greenlets raise
                    BrokenJobError from reason                  -> flags.broken, stopped
    shutdown(code)  the root's program ended: send SHUTDOWN(code), stop, close the link
    close()         close the link (its socket and context) only
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from greenlet import getcurrent

from .. import _protocol as P
from .._errors import BrokenJobError, TimeoutError
from .._future import FINISHED, PENDING, Future
from .._limits import Deadlines, limit_of
from .consts import Constants
from .handlers import Handlers
from .hub import Hub, Waiter
from .outbox import Shipper
from .policy import MAX_ATTEMPTS, MAX_INLINE_DEPTH, OUTBOX_MAX, Policy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .._chunks import Chunk
    from .._transport import Credentials
    from .link import Link

log = logging.getLogger("scoop")


class Flags:
    """The life-cycle state of a runtime, in one place (after loky's ``_ExecutorFlags``).

    Attributes:
        accepting: new futures are accepted (False once ``futures.shutdown()`` ran).
        broken: why no future can run any more (sticky); waits raise BrokenJobError
            from it.
        stopped: the hub loop ends (set with ``broken``).
    """

    __slots__ = ("accepting", "broken", "stopped")

    def __init__(self) -> None:
        self.accepting = True
        self.broken: BaseException | None = None
        self.stopped = False

    def flag_as_not_accepting(self) -> None:
        self.accepting = False

    def check_usable(self) -> None:
        """Raise BrokenJobError (from the reason) if no future can run any more."""
        if self.broken is not None:
            raise BrokenJobError(str(self.broken)) from self.broken

    def flag_as_broken(self, reason: BaseException) -> None:
        self.broken = reason
        self.stopped = True


def _where(wid: int) -> str:
    return f"worker {wid} on {socket.gethostname()} (pid {os.getpid()})"


class Worker:
    """The scoop runtime of one process: owns its futures and runs tasks.

    Args:
        wid: this worker's id (0 is the root, which runs the program).
        size: the number of workers of the job.
        codec: kept for callers of older versions; the link to the broker brings its own
            (None, the default: everything runs in-process until :meth:`connect`).
    """

    def __init__(self, wid: int = 0, size: int = 1, codec: P.Codec | None = None) -> None:
        self.wid = wid
        self.where = _where(wid)
        self.codec = codec
        self.link: Link | None = None  # the broker; None: in-process
        self.idle_wait: Callable[[int], bool] | None = None  # Executor's, for Link.drain
        self.flags = Flags()
        self.policy = Policy(max(1, size))
        self.max_attempts = MAX_ATTEMPTS
        self.shm: str | None = None  # large frames' segments are this job's (scoop._shm)
        self.elastic = False  # workers join at any time: maps cut chunks for more (_mapping)
        # Called by submit while set (_bootstrap: a futures call outside the main guard?),
        # and by close before the link's context ends (the watchdog's retire).
        self.submit_hook: Callable[[], None] | None = None
        self.on_close: Callable[[], None] | None = None
        self._ids = itertools.count(1)
        self.shipper = Shipper(self)
        self.hub = Hub(self)
        self.handlers = Handlers(self)
        self.constants = Constants(self)
        self.deadlines = Deadlines()  # of the limited calls running here (the watchdog's)
        self.outbox, self.pending, self.away = (
            self.shipper.outbox, self.shipper.pending, self.shipper.away)
        self.runq, self.wakeups = self.hub.runq, self.hub.wakeups  # the pieces' tables

    @property
    def size(self) -> int:
        """The number of workers of the job."""
        return self.policy.size

    @size.setter
    def size(self, n: int) -> None:
        self.policy.size = max(1, n)

    # -- API: submit, wait, cancel (from program and task greenlets) ----------------------
    def submit(self, fn: Callable, args: tuple, kwargs: dict, weight: int = 1,
               state: Chunk | None = None, *, chunk: Chunk | None = None) -> Future:
        """Queue ``fn(*args, **kwargs)`` in the outbox and return its Future.

        ``weight``: the items of work it stands for; ``state`` (alias ``chunk``): a map
        chunk's state, with which its owner resumes it after a worker loss.
        """
        if self.submit_hook is not None:
            self.submit_hook()
        if self.flags.broken is not None:  # (checked first: check_usable is a call)
            self.flags.check_usable()  # raises
        if not self.flags.accepting:
            raise RuntimeError("cannot submit new futures after futures.shutdown()")
        fut = Future(self, next(self._ids), (fn, args, kwargs), weight,
                     state if state is not None else chunk)
        self.outbox[fut._id] = fut
        if len(self.outbox) >= OUTBOX_MAX:
            self.shipper.ship()
        return fut

    def cancel(self, fut: Future) -> bool:
        """Cancel a future still in the outbox (``Future.cancel``); False if it left."""
        if self.outbox.pop(fut._id, None) is None:
            return False
        fut._mark_cancelled()
        self.notify(fut)
        return True

    def wait_one(self, fut: Future, timeout: float | None) -> None:
        """Wait for one future: run it inline if it is still here, else park."""
        hub = self.hub
        if (timeout is None and fut._state == PENDING and fut._id in self.outbox
                and hub.inline_depth < MAX_INLINE_DEPTH and getcurrent() is not hub.glet
                and self.policy.runs_tasks and limit_of(fut._call) is None):
            del self.outbox[fut._id]
            if self.policy.ships_on_inline(len(self.away)):
                self.shipper.ship()  # the others leave now, so idle workers can take them
            hub.run_inline(fut)
            return
        self.wait_many([fut], 1, False, timeout)
        if fut._state < FINISHED:
            raise TimeoutError()

    def wait_many(self, futs, need: int, on_error: bool, timeout: float | None) -> Waiter:
        """Park until ``need`` of ``futs`` are done (or one failed, with on_error); return
        the waiter, whose ``arrived`` lists the futures that finished meanwhile."""
        if self.flags.broken is not None:
            self.flags.check_usable()  # raises
        waiter = Waiter(getcurrent(), need, on_error)
        pending = [f for f in futs if f._state < FINISHED]
        waiter.remaining = need - (len(futs) - len(pending))
        if waiter.remaining <= 0 or (on_error and any(
                f._exception is not None for f in futs if f._state == FINISHED)):
            return waiter
        if timeout is not None and timeout <= 0:
            self.poll_now()  # a check, not a wait: run nothing
            return waiter
        for f in pending:
            f._waiters.append(waiter)  # (inline: Future._add_waiter)
        self.hub.park(waiter, None if timeout is None else time.monotonic() + timeout)
        return waiter

    def watch(self, futs: Iterable[Future]) -> Waiter:
        """A waiter that collects each of ``futs`` in ``arrived`` as it completes."""
        waiter = Waiter(getcurrent(), 1)
        for f in futs:
            if f._state >= FINISHED:
                waiter.arrived.append(f)
            else:
                f._add_waiter(waiter)
        return waiter

    def park(self, waiter: Waiter, deadline: float | None) -> None:
        """Switch to the hub until ``waiter`` is woken (or the deadline passes).

        Meanwhile this worker runs other tasks, except while a wait has a deadline: then
        it starts none (unless it is the job's only worker), so that no task makes the
        wait overrun. It stands by instead: if every worker of the job waits with a
        deadline, the broker sends each one group to run anyway (or all would time out).
        """
        self.hub.park(waiter, deadline)

    def poll_now(self) -> None:
        """Ship the outbox and take in what has arrived, without running any task."""
        self.shipper.ship()
        self.poll_messages()

    def poll_messages(self) -> None:
        """Take in what has arrived from the broker, from inside a long task."""
        if self.link is not None:
            self.poll(0)

    def poll(self, timeout_ms: int) -> None:
        """Hand what arrives within ``timeout_ms`` to the handlers (with a link only)."""
        dispatch = self.handlers.dispatch
        for msg in self.link.drain(timeout_ms, self.idle_wait):
            dispatch(msg)

    def ship(self, keep_first: bool = False) -> None:
        """Send the outbox away now (see :meth:`Shipper.ship`)."""
        self.shipper.ship(keep_first)

    def send_partial(self, owner: int, tid: int, values: list, func=None) -> None:
        """Send finished results of a map chunk that is still running to its owner
        (``func``, the mapped function, names it if a result cannot be pickled)."""
        self.shipper.send_partial(owner, tid, values, func)

    def stop_accepting(self, wait: bool = True) -> None:
        """``futures.shutdown``: wait (if ``wait``) for every future this worker submitted,
        then refuse new ones (submit raises RuntimeError); the job goes on."""
        if wait:
            futs = [*self.outbox.values(), *self.pending.values()]
            if futs:
                self.wait_many(futs, len(futs), False, None)
        self.flags.flag_as_not_accepting()

    # -- completion (from the hub, the handlers and scoop._chunks) -------------------------
    def new_id(self) -> int:
        """A fresh future id (for the pieces of a lost map chunk, ``scoop._chunks``)."""
        return next(self._ids)

    def complete(self, fut: Future | None, ok: bool, value) -> None:
        """Record the outcome of one of this worker's futures and notify its waiters; a
        duplicate or late result (or None) is ignored: each result is delivered once."""
        if fut is None or fut._state >= FINISHED:
            return
        self.pending.pop(fut._id, None)
        self.away.discard(fut._id)
        self.shipper.release(fut._id)  # its arguments' segments, if it has any
        fut._finish(ok, value)
        self.notify(fut)

    def notify(self, fut: Future) -> None:
        """Tell a done (or cancelled) future's waiters; run its done-callbacks."""
        for w in fut._take_waiters():
            w.notify(self, fut)
        if fut._callbacks:
            self.hub.run_callbacks(fut, fut._take_callbacks())

    def run_callbacks(self, fut: Future, callbacks) -> None:
        """Run done-callbacks (see :meth:`Hub.run_callbacks`): for Future."""
        self.hub.run_callbacks(fut, callbacks)

    # -- shared constants (consts.py) ------------------------------------------------------
    def set_const(self, values: dict) -> None:
        """Record shared constants here and broadcast them to every worker."""
        self.constants.set(values)

    def get_const(self, name: str, timeout: float | None):
        """The shared constant ``name``, waiting up to ``timeout`` (None: it never came)."""
        return self.constants.get(name, timeout)

    # -- life cycle ------------------------------------------------------------------------
    def ask_id(self, address: str, creds: Credentials, timeout: float = 30.0) -> int:
        """Get a worker id from the broker (a worker started by another launcher)."""
        from . import link  # ZeroMQ loads when a job starts: `import scoop.futures` stays light

        self.wid = link.ask_id(address, creds, timeout)
        self.where = _where(self.wid)
        return self.wid

    def connect(self, address: str, creds: Credentials, timeout: float = 30.0) -> dict:
        """Join the broker at ``address``; return the WELCOME body."""
        from .link import join, open_link  # ZeroMQ loads when a job starts (see ask_id)

        self.link = open_link(address, creds, self.wid, linger_ms=2000)
        self.codec = self.link.codec
        try:
            welcome = join(self.link, address, timeout)
        except BaseException:
            self.close()
            raise
        self.size = int(welcome.body.get("size", self.size))
        self.max_attempts = int(welcome.body.get("max_attempts", self.max_attempts))
        self.elastic = bool(welcome.body.get("elastic"))
        self.handlers.handle_const(welcome)
        return welcome.body

    def serve(self) -> None:
        """Run tasks until the broker says stop (the loop of a non-root worker)."""
        self.hub.glet.switch()

    def stop(self, reason: BaseException) -> None:
        """Stop the hub; parked greenlets wake up to BrokenJobError(reason)."""
        self.flags.flag_as_broken(reason)

    def shutdown(self, status: int = 0) -> None:
        """Root only: tell the broker the program ended with ``status``, then close."""
        if self.link is not None and not self.flags.stopped:
            try:
                self.shipper.flush()
                self.link.send(P.SHUTDOWN, arg=status & 0xFFFFFFFF)
            except Exception:  # noqa: BLE001 - closing anyway
                log.debug("could not send SHUTDOWN", exc_info=True)
        self.stop(BrokenJobError("the job has shut down"))
        self.close()

    def close(self) -> None:
        """Close the link to the broker (the runtime is in-process afterwards)."""
        self.shipper.close_pool()  # no group of this runtime is left to run
        if self.link is not None:
            if self.on_close is not None:
                self.on_close()
            self.link.close()
            self.link = None
