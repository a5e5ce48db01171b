"""A worker: runs futures in greenlets and trades task groups and results with the broker.

Reimplements SCOOP's ``scoop._control`` / ``scoop._types`` scheduling. Deliberate
differences: futures are shipped in pickled *groups* (one pickle per group, not per
future), workers pull work with credits instead of being pushed it, results are batched
per owner, and an exception keeps its type and carries the worker-side traceback.

Data flow inside one worker process::

    program / task greenlet          hub greenlet (this worker's loop)            broker
    -----------------------          ---------------------------------            ------
    submit(fn, *a) -> outbox
    result() on a future still
      in the outbox: run it here  -> (SCOOP laziness; the rest of the outbox ships)
    result() otherwise: park ----->  ship outbox: guided groups, one pickle each -> TASKS
                                     READY(1) when the run queue is nearly empty -> credit
                                     runq <- task groups (parcels) ------------- <- TASKS
                                     one greenlet per task: fn(*a) -> results_out
                                     RESULTS per owner + finished groups -------> route
    waiter woken <- future set  <--  RESULTS for futures this worker owns ------ <- RESULTS

*Submitting greenlet.* ``submit`` only creates a :class:`Future` in the outbox. Asking
for a result of a future still in the outbox runs it inline, in the asking greenlet;
otherwise the greenlet parks and the hub runs. Parking ships the outbox first, so what a
greenlet submitted leaves as soon as it waits.

*Hub.* A loop in its own greenlet: it resumes greenlets whose futures completed, starts a
greenlet per queued task, ships the outbox in guided groups (each takes a share of what
remains, so early groups are big and the last ones small for load balance), sends
results and asks the broker for more work when its queue is about to run dry.

*Task greenlet.* Runs one call. If it waits on futures, it parks and the hub keeps the
worker busy with other tasks; that is why tasks may spawn tasks at any depth without
deadlock, even on a single worker.

Without a broker (``python program.py``), the same runtime runs everything in-process:
shipping just moves the outbox to the run queue.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from greenlet import GreenletExit, getcurrent, greenlet

from . import _chunks, _serialize
from . import _protocol as P
from ._errors import (
    BrokenJobError,
    JobStopped,
    SerializationError,
    TimeoutError,
    WorkerLostError,
)
from ._future import CANCELLED, FINISHED, PENDING, RUNNING, Future

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._transport import Credentials

log = logging.getLogger("scoop")

# -- tuning --------------------------------------------------------------------------------
# A shipped group holds at most this much work (futures, or map items): bigger groups cost
# less per future but balance worse across workers.
MAX_GROUP_WEIGHT = 128
# Guided grouping: a group takes 1/(GROUP_SPLIT * workers) of the weight still to ship.
# Larger values give more, smaller groups (better balance, more messages).
GROUP_SPLIT = 4
# Ship the outbox once this many futures wait in it, even if nobody waits yet, so a long
# stream of submits starts running before the submitter blocks.
OUTBOX_MAX = 1024
# Ask the broker for more groups while the queued work is estimated below this many
# seconds: hides the round trip for short tasks without hoarding long ones.
PREFETCH_BACKLOG_S = 0.002
# At most this many groups requested ahead: more hides more latency for tiny tasks, but a
# worker whose tasks turn out long holds more work that others could have run.
MAX_CREDIT = 4
# After the first group, shipped groups leave in messages of this many: the first one
# leaves alone, so other workers start while the rest is still being pickled.
SHIP_BATCH = 8
# When a future runs inline, the rest of the outbox ships only while fewer than this many
# (per worker) of this worker's futures are away: enough to keep the others busy; beyond
# that, small futures (the leaves of a tree) run here without any message.
IN_FLIGHT_PER_WORKER = 4
# Inline runs nest in the waiting greenlet's stack; past this depth, futures ship instead.
MAX_INLINE_DEPTH = 100
# While idle, wake up this often to check that the job is still alive.
IDLE_POLL_MS = 250
# Messages handled per poll before the hub goes back to running tasks.
MAX_DRAIN = 256

# Workers that may die running a task before it fails (the broker's WELCOME says the job's).
MAX_ATTEMPTS = 3


class _Group:
    """A task group received from the broker: who owns it and how many tasks remain.

    ``forced``: the broker sent it while every worker waited with a deadline; it runs
    even during such a wait (see :meth:`Worker.park`).
    """

    __slots__ = ("owner", "fid", "remaining", "forced")

    def __init__(self, owner: int, fid: int, remaining: int, forced: bool = False) -> None:
        self.owner = owner
        self.fid = fid
        self.remaining = remaining
        self.forced = forced


class _Waiter:
    """A parked greenlet waiting for ``remaining`` futures (or the first failure)."""

    __slots__ = ("glet", "remaining", "on_error", "arrived", "parked")

    def __init__(self, glet, remaining: int, on_error: bool = False) -> None:
        self.glet = glet
        self.remaining = remaining
        self.on_error = on_error
        self.arrived: deque[Future] = deque()
        self.parked = False

    def notify(self, rt: Worker, fut: Future) -> None:
        self.arrived.append(fut)
        self.remaining -= 1
        if self.parked and (self.remaining <= 0 or (
                self.on_error and fut._exception is not None)):
            self.parked = False
            rt.wakeups.append(self.glet)

    def wake(self, rt: Worker) -> None:
        if self.parked:
            self.parked = False
            rt.wakeups.append(self.glet)


class Worker:
    """The scoop runtime of one process: owns its futures and runs tasks.

    Args:
        wid: this worker's id (0 is the root, which runs the program).
        size: the number of workers of the job.
        codec: signs and checks messages; None runs everything in-process (no broker).
    """

    def __init__(self, wid: int = 0, size: int = 1, codec: P.Codec | None = None) -> None:
        self.wid = wid
        self.size = max(1, size)
        self.codec = codec
        self.sock = None
        self.ctx = None
        self.thread = threading.get_ident()
        self.where = f"worker {wid} on {socket.gethostname()} (pid {os.getpid()})"
        self.outbox: dict[int, Future] = {}
        self.pending: dict[int, Future] = {}  # shipped futures owned here, by id
        self.away: set[int] = set()  # ids of those sent to the broker, until they finish
        self.runq: deque = deque()  # (group, tid, (fn, args, kwargs))
        self.wakeups: deque = deque()
        self.timers: list = []
        self.results_out: dict[int, list] = {}
        self.done_out: list[tuple[int, int]] = []
        self.consts: dict[str, object] = {}
        self.const_waiters: list[_Waiter] = []
        self.credit_out = 0
        self.max_attempts = MAX_ATTEMPTS
        self.running_entry = None  # (group, tid, call) of the task started last
        # Estimated run time of one task slice; starts pessimistic (no prefetch) and rises
        # at once on a slow slice, decays slowly on fast ones.
        self.avg_slice_s = PREFETCH_BACKLOG_S
        self.broken: BaseException | None = None
        self.stopped = False
        self.closed = False  # futures.shutdown() was called: no new futures
        # Called by submit while set: _bootstrap looks for a program that calls futures
        # outside its `if __name__ == "__main__":` guard.
        self.submit_hook: Callable[[], None] | None = None
        # Hooks of scoop.Executor's client runtime (scoop._executor), which runs in a thread
        # of the caller's process: ``runs_tasks`` False makes it submit and wait without
        # ever running a task (no credit, nothing kept or run inline, never on standby);
        # ``idle_wait(ms)`` replaces the broker socket's poll in the hub's idle wait, so that
        # requests from other threads wake it too (it returns whether the socket is ready).
        self.runs_tasks = True
        self.idle_wait: Callable[[int], bool] | None = None
        self._ids = itertools.count(1)
        self._fids = itertools.count(1)
        self._returned = itertools.count(1)  # ids of partial groups handed back
        self._seq = itertools.count()
        self._inline_depth = 0
        self._timed_waits = 0  # parked greenlets that wait with a deadline
        self._standby = False  # the broker knows this worker waits with a deadline
        self._forced_since = False  # work was forced on it since it said so
        self._bad_peers: set = set()
        self._handlers = {
            P.TASKS: self.handle_tasks,
            P.RESULTS: self.handle_results,
            P.CONST: self.handle_const,
            P.STOP: self.handle_stop,
            P.LOST: self.handle_lost,
        }
        self.main = getcurrent()
        self.hub = greenlet(self._hub_loop, parent=self.main)

    # ==================================================================================
    # API side: submit, wait, cancel (called from program and task greenlets)
    # ==================================================================================
    def submit(self, fn, args: tuple, kwargs: dict, weight: int = 1,
               chunk: _chunks.Chunk | None = None) -> Future:
        """Queue ``fn(*args, **kwargs)`` in the outbox and return its Future (``chunk``:
        a map chunk's state; its owner then resumes it after a worker loss)."""
        if self.submit_hook is not None:
            self.submit_hook()
        self._check_usable()
        if self.closed:
            raise RuntimeError("cannot submit new futures after futures.shutdown()")
        fut = Future(self, next(self._ids), (fn, args, kwargs), weight)
        fut._chunk = chunk
        self.outbox[fut._id] = fut
        if len(self.outbox) >= OUTBOX_MAX:
            self.ship()
        return fut

    def cancel(self, fut: Future) -> bool:
        if self.outbox.pop(fut._id, None) is None:
            return False
        fut._state = CANCELLED
        fut._call = None
        self._notify(fut)
        return True

    def wait_one(self, fut: Future, timeout: float | None) -> None:
        """Wait for one future: run it inline if it is still here, else park."""
        if (timeout is None and fut._state == PENDING and fut._id in self.outbox
                and self._inline_depth < MAX_INLINE_DEPTH
                and getcurrent() is not self.hub and self.runs_tasks):
            del self.outbox[fut._id]
            if len(self.away) < IN_FLIGHT_PER_WORKER * self.size:
                self.ship()  # the others leave now, so idle workers can take them
            self._run_inline(fut)
            return
        self.wait_many([fut], 1, False, timeout)
        if fut._state < FINISHED:
            raise TimeoutError()

    def wait_many(self, futs, need: int, on_error: bool, timeout: float | None) -> _Waiter:
        """Park until ``need`` of ``futs`` are done (or one failed, with on_error).

        Returns the waiter, whose ``arrived`` lists the futures that finished meanwhile.
        """
        self._check_usable()
        waiter = _Waiter(getcurrent(), need, on_error)
        pending = [f for f in futs if f._state < FINISHED]
        waiter.remaining = need - (len(futs) - len(pending))
        if waiter.remaining <= 0 or (on_error and any(
                f._exception is not None for f in futs if f._state == FINISHED)):
            return waiter
        if timeout is not None and timeout <= 0:
            self.poll_now()  # a check, not a wait: run nothing
            return waiter
        for f in pending:
            f._waiters.append(waiter)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.park(waiter, deadline)
        return waiter

    def poll_now(self) -> None:
        """Ship the outbox and take in what has arrived, without running any task."""
        self.ship()
        if self.sock is not None:
            self._poll(0)

    def watch(self, futs) -> _Waiter:
        """A waiter that collects each of ``futs`` in ``arrived`` as it completes."""
        waiter = _Waiter(getcurrent(), 1)
        for f in futs:
            if f._state >= FINISHED:
                waiter.arrived.append(f)
            else:
                f._waiters.append(waiter)
        return waiter

    def park(self, waiter: _Waiter, deadline: float | None) -> None:
        """Switch to the hub until ``waiter`` is woken (or the deadline passes).

        Meanwhile this worker runs other tasks, except while a wait has a deadline: then
        it starts none (unless it is the job's only worker), so that a task cannot make
        the wait overrun; the other workers do the work. It stands by instead: if every
        worker of the job waits with a deadline, the broker sends each one group to run
        anyway (nobody else would, and every wait would time out).
        """
        if getcurrent() is self.hub:
            raise RuntimeError("scoop cannot wait from inside its own scheduler")
        if threading.get_ident() != self.thread:
            raise RuntimeError("scoop futures can only be waited on from the thread that "
                               "started the job")
        if deadline is not None:
            heapq.heappush(self.timers, (deadline, next(self._seq), waiter))
            self._timed_waits += 1
        self.ship(keep_first=True)  # keeps nothing if this wait may not run tasks
        if not self._may_run():
            self._give_back()
            self._stand_by()
        waiter.glet = getcurrent()
        waiter.parked = True
        try:
            self.hub.switch()
        finally:
            if deadline is not None:
                self._timed_waits -= 1
        waiter.parked = False
        if self.broken is not None and waiter.remaining > 0:
            raise BrokenJobError(str(self.broken)) from self.broken

    def run_callbacks(self, fut: Future, callbacks) -> None:
        """Run done-callbacks; in their own greenlet when called by the hub (may wait)."""
        if getcurrent() is self.hub:
            greenlet(self._call_callbacks, parent=self.hub).switch(fut, callbacks)
        else:
            self._call_callbacks(fut, callbacks)

    @staticmethod
    def _call_callbacks(fut: Future, callbacks) -> None:
        for cb in callbacks:
            try:
                cb(fut)
            except Exception:
                log.exception("exception calling callback %r for %r", cb, fut)

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise BrokenJobError(str(self.broken)) from self.broken

    # ==================================================================================
    # Completion
    # ==================================================================================
    def new_id(self) -> int:
        return next(self._ids)

    def _run_inline(self, fut: Future) -> None:
        fn, args, kwargs = fut._call
        fut._state = RUNNING
        self.running_entry = None
        self._inline_depth += 1
        try:
            value = fn(*args, **kwargs)
            ok = True
        except GreenletExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - any outcome is the future's
            value, ok = _serialize.attach_traceback(exc, self.where), False
        finally:
            self._inline_depth -= 1
        self._complete(fut, ok, value)

    def _complete(self, fut: Future | None, ok: bool, value) -> None:
        if fut is None or fut._state >= FINISHED:
            return  # a duplicate or late result: each result is delivered once
        self.pending.pop(fut._id, None)
        self.away.discard(fut._id)
        fut._finish(ok, value)
        self._notify(fut)

    def _notify(self, fut: Future) -> None:
        waiters, fut._waiters = fut._waiters, []
        for w in waiters:
            w.notify(self, fut)
        if fut._callbacks:
            callbacks, fut._callbacks = fut._callbacks, []
            self.run_callbacks(fut, callbacks)

    # ==================================================================================
    # Shipping: outbox -> task groups -> broker
    # ==================================================================================
    def ship(self, keep_first: bool = False) -> None:
        """Send every future of the outbox away (to the broker, or to the local queue).

        With ``keep_first`` (this worker is about to wait, or a map starts), the first
        group stays here if nothing else is queued: it runs on this worker without being
        pickled or making a broker round trip, while the rest leaves at once.
        """
        if not self.outbox:
            return
        futs = list(self.outbox.values())
        self.outbox.clear()
        for f in futs:
            f._state = RUNNING
            self.pending[f._id] = f
        if self.sock is None:
            self._keep(futs)
            return
        keep = keep_first and not self.runq and self._may_run()
        batch: list[P.Parcel] = []
        sent_first = False
        for chunk in self._guided_groups(futs):
            if keep:
                self._keep(chunk)
                keep = False
                continue
            parcel = self._pack_group(chunk)
            if parcel is not None:
                batch.append(parcel)
            if len(batch) >= (SHIP_BATCH if sent_first else 1):
                self._send(P.TASKS, parcels=batch)
                batch, sent_first = [], True
        if batch:
            self._send(P.TASKS, parcels=batch)

    def _keep(self, futs: list[Future]) -> None:
        group = _Group(self.wid, 0, len(futs))  # fid 0: never held by the broker
        self.runq.extend((group, f._id, f._call) for f in futs)

    def _guided_groups(self, futs: list[Future]):
        remaining = sum(f._weight for f in futs)
        i, n = 0, len(futs)
        while i < n:
            target = min(MAX_GROUP_WEIGHT, -(-remaining // (GROUP_SPLIT * self.size)))
            j, weight, plain = i, 0, futs[i]._chunk is None
            # map chunks never share a group with other futures (see scoop._chunks)
            while j < n and (j == i or (weight + futs[j]._weight <= target
                                        and (futs[j]._chunk is None) == plain)):
                weight += futs[j]._weight
                j += 1
            remaining -= weight
            yield futs[i:j]
            i = j

    def _pack_group(self, futs: list[Future]) -> P.Parcel | None:
        try:
            frames = _serialize.dumps([f._call for f in futs])
        except Exception:  # noqa: BLE001 - find and fail the culprits, ship the rest
            good = []
            for f in futs:
                try:
                    _serialize.dumps(f._call)
                    good.append(f)
                except Exception:  # noqa: BLE001
                    msg = _serialize.describe_unpicklable(*f._call)
                    self._complete(f, False, SerializationError(msg))
            if not good:
                return None
            futs = good
            frames = _serialize.dumps([f._call for f in futs])
        tids = P.task_ids_frame(f._id for f in futs)
        self.away.update(f._id for f in futs)
        if futs[0]._chunk is not None:  # map chunks: kept, to be resumed if they are lost
            tag = next(self._fids) | P.RESUMABLE
            if any(f._chunk.charged(len(f._call[1][1])) for f in futs):
                tag |= P.SUSPECT  # items that may have killed a worker: never for the root
            return self.codec.parcel([tids, *frames], tag=tag)
        for f in futs:
            f._call = (f._call[0], (), {})  # keep the function for repr, drop the data
        return self.codec.parcel([tids, *frames], tag=next(self._fids))

    # ==================================================================================
    # Hub: the scheduling loop
    # ==================================================================================
    def _hub_loop(self) -> None:
        runq, wakeups = self.runq, self.wakeups
        while not self.stopped:
            while wakeups:
                g = wakeups.popleft()
                if g is self.main:
                    self._leave_hub()
                if not g.dead:
                    g.switch()
            if self._runnable():
                self._start_task(runq.popleft())
                if self.done_out and self.sock is not None:
                    self._flush()
                    self._poll(0)
                continue
            self._flush()
            if wakeups or self._runnable():
                continue
            self._wait_for_events()
        self._wake_all()

    def _leave_hub(self) -> None:
        """The program's main greenlet resumes: this worker runs no task until it waits
        again, so it takes no more work and hands back what it had queued."""
        if self.sock is None:
            return
        if self.credit_out or self._standby:
            self.credit_out = 0
            self._standby = False
            self._send(P.WITHDRAW)
        self._give_back()

    def _stand_by(self) -> None:
        """Tell the broker this worker waits with a deadline (takes work only if no one
        else can); again after it was sent work anyway, which may be what waits now."""
        if self.sock is not None and self.runs_tasks and (
                not self._standby or self._forced_since):
            self.credit_out = 0
            self._standby = True
            self._forced_since = False
            self._send(P.WITHDRAW, arg=1)

    def _may_run(self) -> bool:
        """Whether the hub may start tasks now (see :meth:`park` on deadlines)."""
        return self.runs_tasks and (not self._timed_waits or self.size == 1)

    def _runnable(self) -> bool:
        """Whether the hub should start the next queued task now."""
        return bool(self.runq) and (self._may_run() or self.runq[0][0].forced)

    def _start_task(self, entry) -> None:
        t0 = time.perf_counter()
        greenlet(self._execute, parent=self.hub).switch(entry)
        took = time.perf_counter() - t0
        if took > self.avg_slice_s:
            self.avg_slice_s = took  # a slow task: stop prefetching at once
        else:
            self.avg_slice_s += (took - self.avg_slice_s) * 0.1

    def _execute(self, entry) -> None:
        group, tid, (fn, args, kwargs) = entry
        self.running_entry = entry  # a map chunk streams its results to group.owner
        try:
            value = fn(*args, **kwargs)
            ok = True
        except GreenletExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - any outcome is the future's
            value, ok = exc, False
        if group.owner == self.wid:
            if not ok:
                _serialize.attach_traceback(value, self.where)
            self._complete(self.pending.get(tid), ok, value)
        else:
            if not ok:
                value = _serialize.wire_exception(value, self.where)
            # The call rides along (not sent) to name it if its result cannot be pickled.
            self.results_out.setdefault(group.owner, []).append((tid, ok, value, fn, args))
        group.remaining -= 1
        if group.remaining == 0 and group.fid:
            self.done_out.append((group.owner, group.fid))

    def _wait_for_events(self) -> None:
        now = time.monotonic()
        timeout_ms = IDLE_POLL_MS
        if self.timers:
            timeout_ms = max(0, min(timeout_ms, int((self.timers[0][0] - now) * 1000) + 1))
        if self.sock is not None:
            self._poll(timeout_ms)
        elif self.timers:
            time.sleep(timeout_ms / 1000)
        else:
            self._deadlock()
        self._fire_timers()
        self._check_alive()

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            heapq.heappop(self.timers)[2].wake(self)

    def _deadlock(self) -> None:
        # In-process mode with nothing runnable and nothing timed: no result can come.
        self.broken = RuntimeError("every future is waiting and none can run (deadlock)")
        self._wake_all()
        self.broken = None

    def _wake_all(self) -> None:
        for g in list(self._parked_greenlets()):
            self.wakeups.append(g)
        while self.wakeups:
            g = self.wakeups.popleft()
            if not g.dead and g is not getcurrent():
                g.switch()

    def _parked_greenlets(self):
        seen = set()
        for fut in itertools.chain(self.pending.values(), self.outbox.values()):
            for w in fut._waiters:
                if w.parked and id(w.glet) not in seen:
                    seen.add(id(w.glet))
                    w.parked = False
                    yield w.glet
        for w in self.const_waiters + [t[2] for t in self.timers]:
            if w.parked and id(w.glet) not in seen:
                seen.add(id(w.glet))
                w.parked = False
                yield w.glet

    def _check_alive(self) -> None:
        """Hook for liveness checks while idle (overridden by process workers)."""

    # ==================================================================================
    # Network: flush, poll, handlers
    # ==================================================================================
    def _send(self, kind: bytes, **kw) -> None:
        self.sock.send_multipart(self.codec.encode(kind, **kw), copy=False)

    def _flush(self) -> None:
        """Ship the outbox, send results and finished groups, ask for work if low."""
        self.ship()
        if self.sock is None:
            self.done_out.clear()
            return
        want = max(0, self._credit_wanted())
        self.credit_out += want
        if want:
            self._standby = False  # asking for work ends the standby at the broker too
        if self.results_out or self.done_out:
            parcels = [self._pack_results(owner, items)
                       for owner, items in self.results_out.items()]
            # the credit request rides along: one message instead of two
            self._send(P.RESULTS, arg=want, parcels=parcels, done=self.done_out)
            self.results_out = {}
            self.done_out = []
        elif want:
            self._send(P.READY, arg=want)

    def _credit_wanted(self) -> int:
        """How many more groups to ask for, given the queued work and the task speed."""
        if (self.wakeups or not self._may_run()
                or len(self.runq) * self.avg_slice_s >= PREFETCH_BACKLOG_S):
            return 0
        target = min(MAX_CREDIT, max(1, int(PREFETCH_BACKLOG_S / max(self.avg_slice_s, 1e-9))))
        return target - self.credit_out

    def _pack_results(self, owner: int, items: list) -> P.Parcel:
        wire = [(tid, ok, value) for tid, ok, value, _, _ in items]
        try:
            frames = _serialize.dumps(wire)
        except Exception:  # noqa: BLE001 - replace the unpicklable results only
            fixed = []
            for tid, ok, value, fn, args in items:
                try:
                    _serialize.dumps(value)
                except Exception:  # noqa: BLE001
                    err = _serialize.unpicklable_result_error(fn, args, value)
                    ok, value = False, _serialize.wire_exception(err, self.where)
                fixed.append((tid, ok, value))
            frames = _serialize.dumps(fixed)
        return self.codec.parcel(frames, peer=owner)

    def _poll(self, timeout_ms: int) -> None:
        import zmq

        sock = self.sock
        if timeout_ms and not (self.idle_wait or sock.poll)(timeout_ms):
            return
        for _ in range(MAX_DRAIN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = self.codec.decode(frames, peer="broker")
            except P.AuthError as exc:
                self._reject("broker", exc)
                continue
            handler = self._handlers.get(msg.kind)
            if handler is None:
                log.warning("worker %d: unexpected %r from the broker, dropped", self.wid, msg)
                continue
            handler(msg)

    def _reject(self, peer, exc: Exception) -> None:
        if peer not in self._bad_peers:  # log each bad peer once, not every message
            self._bad_peers.add(peer)
            log.warning("worker %d: dropped a message that failed authentication from %s: %s",
                        self.wid, peer, exc)

    def handle_tasks(self, msg: P.Message) -> None:
        for parcel in msg.parcels:
            self.credit_out = max(0, self.credit_out - 1)
            try:
                self.codec.check(parcel)
            except P.AuthError as exc:
                self._reject("a task parcel", exc)
                continue
            tids = P.task_ids(parcel)
            group = _Group(parcel.peer, parcel.tag, len(tids), forced=bool(msg.arg))
            self._forced_since |= group.forced
            try:
                calls, broken = _serialize.loads_items(parcel.frames[1:])
            except Exception as exc:  # noqa: BLE001 - fail the group's tasks, keep working
                err = self._unpickling_error("a task group", exc)
                calls, broken = [(_raise, (err,), {})] * len(tids), {}
            for i, exc in broken.items():
                # Only this task fails. Queued as the raising call, not the marker, so
                # that it can also be handed back to another worker.
                err = self._unpickling_error("the task's function or arguments", exc)
                calls[i] = (_raise, (err,), {})
            self.runq.extend(zip(itertools.repeat(group), tids, calls))
        if not self._may_run():
            self._give_back()

    def _give_back(self) -> None:
        """Return the unstarted tasks to the broker, to be run by another worker."""
        if not self.runq or self.sock is None:
            return
        groups: dict[int, tuple[_Group, list]] = {}
        forced = [entry for entry in self.runq if entry[0].forced]  # those stay and run
        for group, tid, call in self.runq:
            if not group.forced:
                groups.setdefault(id(group), (group, []))[1].append((tid, call))
        self.runq.clear()
        self.runq.extend(forced)
        parcels = []
        for group, items in groups.values():
            try:
                frames = _serialize.dumps([call for _, call in items])
            except Exception:  # noqa: BLE001 - keep what cannot travel; run it later
                self.runq.extend((group, tid, call) for tid, call in items)
                continue
            if group.remaining > len(items) or not group.fid:
                # Part of the group runs here (or it never came from the broker): the rest
                # travels as a group of its own, so that the broker keeps tracking both.
                tag = (1 << 63) | (self.wid << 32) | next(self._returned)
                if group.fid & P.RESUMABLE or (not group.fid and getattr(
                        self.pending.get(items[0][0]), "_chunk", None) is not None):
                    tag |= P.RESUMABLE  # map chunks (kept here, or sent as such)
                tag |= group.fid & P.SUSPECT  # it killed a worker: never for the root
            else:
                tag = group.fid  # the whole group goes back: the broker drops our hold
            group.remaining -= len(items)
            tids = P.task_ids_frame(tid for tid, _ in items)
            parcels.append(self.codec.parcel([tids, *frames], tag=tag, peer=group.owner))
        if parcels:
            self._send(P.RETURN, parcels=parcels)

    def handle_results(self, msg: P.Message) -> None:
        for parcel in msg.parcels:
            try:
                self.codec.check(parcel)
            except P.AuthError as exc:
                self._reject("a result parcel", exc)
                continue
            try:
                results, broken = _serialize.loads_items(parcel.frames)
            except Exception as exc:  # noqa: BLE001 - keep the hub alive for the others
                # The task ids are inside the broken pickle: these futures cannot be told.
                log.error("%s: dropped a batch of results that could not be unpickled; "
                          "their futures will never complete: %s: %s",
                          self.where, type(exc).__name__, exc)
                continue
            pending = self.pending
            for i, (tid, ok, value) in enumerate(results):
                fut = pending.get(tid)
                if fut is None:
                    continue  # a duplicate or late result
                if fut._chunk is not None and i not in broken:
                    value = self._chunk_result(fut._chunk, ok, value)
                    if value is _SKIP:
                        continue
                if i in broken:
                    what = "the result of" if ok else "the exception raised by"
                    ok, value = False, self._unpickling_error(
                        f"{what} {_call_name(fut)}()", broken[i])
                elif isinstance(value, WorkerLostError) and fut._call:
                    value = WorkerLostError(f"{_call_name(fut)}(): {value}")
                self._complete(fut, ok, value)

    @staticmethod
    def _chunk_result(ch: _chunks.Chunk, ok, value):
        """A map chunk's result entry: partial results are kept (_SKIP), the final one
        joins them; those of a chunk already cut into pieces are dropped."""
        if ch.resumed:
            return _SKIP
        if ok == _chunks.PARTIAL:
            ch.add(value)
            return _SKIP
        if ok and ch.parts:
            return ch.parts + value[0], value[1]
        return value

    def handle_lost(self, msg: P.Message) -> None:
        """A worker died holding map chunks of this worker's: run what they had not
        finished again, in pieces, first in line (see scoop._chunks)."""
        body = msg.body or {}
        how = str(body.get("how", "?"))
        subs: list[Future] = []
        for running, tids in body.get("groups", ()):
            first = bool(running)  # its first unfinished chunk is the one that ran
            for tid in tids:
                fut = self.pending.get(tid)
                ch = fut._chunk if fut is not None else None
                if ch is None or ch.resumed:
                    continue
                if ch.parent is not None and ch.parent._state >= FINISHED:
                    self._complete(fut, True, ([], None))  # nobody needs it any more
                    continue
                ch.suspect = True  # which of them killed it is a guess: never the root
                subs += _chunks.resume(self, fut, first or bool(ch.parts), how)
                first = False
        if not subs:
            return
        for sub in subs:
            sub._state = RUNNING
            self.pending[sub._id] = sub
        parcels = [p for group in self._guided_groups(subs)
                   if (p := self._pack_group(group)) is not None]
        for parcel in parcels:
            parcel.peer = self.wid
        self._send(P.RETURN, parcels=parcels)

    def _unpickling_error(self, what: str, exc: BaseException) -> SerializationError:
        hint = (" (is that module importable on this worker's host, from its sys.path?)"
                if isinstance(exc, ImportError) else "")
        return SerializationError(f"{self.where} could not unpickle {what}: "
                                  f"{type(exc).__name__}: {exc}{hint}")

    def handle_const(self, msg: P.Message) -> None:
        for parcel in msg.parcels:
            try:
                self.codec.check(parcel)
            except P.AuthError as exc:
                self._reject("a constants parcel", exc)
                continue
            try:
                items, broken = _serialize.loads_items(parcel.frames)
            except Exception as exc:  # noqa: BLE001 - the names are inside: log, go on
                log.error("%s: dropped shared constants that could not be unpickled: "
                          "%s: %s", self.where, type(exc).__name__, exc)
                continue
            for i, (name, value) in enumerate(items):
                if i in broken:  # getConst(name) raises this error here
                    value = _Unloaded(self._unpickling_error(
                        f"the shared constant {name!r}", broken[i]))
                self.consts.setdefault(name, value)
        waiters, self.const_waiters = self.const_waiters, []
        for w in waiters:
            w.wake(self)

    def handle_stop(self, msg: P.Message) -> None:
        self.stop(JobStopped("the job was stopped"))

    # ==================================================================================
    # Life cycle
    # ==================================================================================
    def ask_id(self, address: str, creds: Credentials, timeout: float = 30.0) -> int:
        """Get a worker id from the broker (a worker started by another launcher)."""
        import zmq

        codec = P.Codec(creds.key, P.ANY_WORKER)
        ctx = zmq.Context()
        sock = creds.connect(ctx, P.routing_id(b"j", 0), address)
        try:
            sock.send_multipart(codec.encode(P.JOIN))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000) + 1):
                try:
                    msg = codec.decode(sock.recv_multipart())
                except P.AuthError as exc:
                    self._reject("broker", exc)
                    continue
                if msg.kind == P.STOP:
                    raise JobOver("the job ended before this worker joined")
                if msg.kind == P.ASSIGN:
                    self.wid = int(msg.body["wid"])
                    self.where = f"worker {self.wid} on {socket.gethostname()} (pid {os.getpid()})"
                    return self.wid
            raise BrokenJobError(f"no answer from the broker at {address} within "
                                 f"{timeout:.0f} s: is the job running, and reachable from "
                                 "here?")
        finally:
            sock.close(0)
            ctx.term()

    def connect(self, address: str, creds: Credentials, timeout: float = 30.0) -> dict:
        """Join the broker at ``address``; return the WELCOME body."""
        import zmq

        self.codec = P.Codec(creds.key, self.wid)
        self.ctx = zmq.Context()
        sock = self.sock = creds.connect(self.ctx, P.routing_id(b"w", self.wid), address,
                                         linger_ms=2000)
        self._send(P.HELLO, body={"version": P.VERSION, "wid": self.wid, "pid": os.getpid(),
                                  "host": socket.gethostname()})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                self.close()
                raise BrokenJobError(f"no answer from the broker at {address} "
                                     f"within {timeout:.0f} s")
            try:
                msg = self.codec.decode(sock.recv_multipart(copy=False), peer="broker")
            except P.AuthError as exc:
                self._reject("broker", exc)
                continue
            if msg.kind == P.REFUSED:
                self.close()
                raise BrokenJobError(f"the broker refused worker {self.wid}: "
                                     f"{msg.body.get('reason')}")
            if msg.kind == P.STOP:
                self.close()
                raise JobOver("the job ended before this worker joined")
            if msg.kind == P.WELCOME:
                self.size = int(msg.body.get("size", self.size))
                self.max_attempts = int(msg.body.get("max_attempts", self.max_attempts))
                self.handle_const(msg)
                return msg.body
            log.debug("worker %d: %r before WELCOME, dropped", self.wid, msg)

    def serve(self) -> None:
        """Run tasks until the broker says stop (the loop of a non-root worker)."""
        self.hub.switch()

    def set_const(self, values: dict) -> None:
        """Record shared constants here and broadcast them to every worker."""
        for name in values:
            if name in self.consts:
                raise TypeError(f"constant {name!r} is already defined; constants are "
                                "immutable")
        frames = _serialize.dumps(list(values.items()))  # items load one by one
        self.consts.update(values)
        if self.sock is not None:
            self._send(P.CONST, parcels=[self.codec.parcel(frames)])

    def get_const(self, name: str, timeout: float | None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while name not in self.consts and self.sock is not None and self.broken is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            waiter = _Waiter(getcurrent(), 1)
            self.const_waiters.append(waiter)
            self.park(waiter, deadline)
        value = self.consts.get(name)
        if isinstance(value, _Unloaded):
            raise value.error
        return value

    def stop(self, reason: BaseException) -> None:
        """Stop the hub; parked greenlets wake up to BrokenJobError(reason)."""
        self.broken = reason
        self.stopped = True

    def shutdown(self, status: int = 0) -> None:
        """Root only: tell the broker the program ended with ``status``, then close."""
        if self.sock is not None and not self.stopped:
            try:
                self._flush()
                self._send(P.SHUTDOWN, arg=status & 0xFFFFFFFF)
            except Exception:  # noqa: BLE001 - closing anyway
                log.debug("could not send SHUTDOWN", exc_info=True)
        self.stop(BrokenJobError("the job has shut down"))
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None


    def poll_messages(self) -> None:
        """Take in what has arrived from the broker, from inside a long task."""
        if self.sock is not None:
            self._poll(0)

    def send_partial(self, owner: int, tid: int, values: list, func=None) -> None:
        """Send finished results of a map chunk that is still running to its owner
        (``func``, the mapped function, names it if a result cannot be pickled)."""
        self._send(P.RESULTS, parcels=[self._pack_results(
            owner, [(tid, _chunks.PARTIAL, values, _list_of_results, (func,))])])


def _list_of_results(func):
    """Stands for the call of a partial result (a list of ``func``'s results) when one of
    them cannot be pickled: the error names ``func`` and the result."""


_list_of_results.maps_first_argument = _list_of_results.returns_result_list = True


_SKIP = object()  # a result entry that completes no future


class _Unloaded:
    """A shared constant that arrived but could not be unpickled on this worker."""

    __slots__ = ("error",)

    def __init__(self, error: SerializationError) -> None:
        self.error = error


class JobOver(BrokenJobError):
    """The job ended before this worker could take part (not an error for a worker)."""


def _raise(exc: BaseException):
    raise exc


def _call_name(fut: Future) -> str:
    fn = fut._call[0] if fut._call else None
    return getattr(fn, "__qualname__", None) or repr(fn)


# -- the runtime of this process --------------------------------------------------------
_current: Worker | None = None
_warned_serial = False


def current() -> Worker:
    """This process's runtime; outside a job, an in-process one (with a warning once)."""
    global _current, _warned_serial
    if _current is None or (_current.stopped and not _current.sock):
        if not _warned_serial:
            _warned_serial = True
            import warnings

            warnings.warn("scoop is not running: futures run one at a time in this process. "
                          "Start the program with `python -m scoop program.py` to run them "
                          "in parallel.", RuntimeWarning, stacklevel=_caller_level())
        _current = Worker()
    return _current


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside scoop."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(
            os.path.abspath(frame.f_code.co_filename)) == package:
        frame, level = frame.f_back, level + 1
    return level


def install(worker: Worker | None) -> None:
    """Make ``worker`` this process's runtime (None: back to in-process mode)."""
    global _current
    _current = worker
