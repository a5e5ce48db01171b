"""The hub: this worker's scheduling loop, in a greenlet of its own, and the waits that
park other greenlets on it.

::

    program / task greenlet                Hub (its own greenlet)
    -----------------------                ----------------------
    park(waiter, deadline): ship the  -->  loop: resume the woken greenlets; start the
      outbox, stand by if timed;             next queued task (one greenlet each);
      switch to the hub                      flush (ship, results, credit); poll the
                                             link, fire timers when idle
    <-- switch back ---------------------  a waiter's futures completed (or it timed out)
    run_inline(fut): in the caller's stack (SCOOP's laziness)

*Waiters.* A parked greenlet waits on a :class:`Waiter`, registered with the futures it
waits for; completing a future notifies its waiters, and a waiter whose count is reached
(or, with ``on_error``, whose future failed) queues its greenlet to resume.

*Timers.* A wait with a deadline also sits in a heap of timers; when it fires, the
greenlet resumes with its futures unfinished (a timeout). Meanwhile the worker starts no
task (see ``policy.py``, standby).

*Leaving.* A worker told to leave (SIGTERM, ``Policy.leaving``) starts no task and hands
its queue back at once; once its running tasks have finished it sends their results and
BYE, and the loop ends (:meth:`Hub.leave`).

*The end.* When the runtime stops (the job ended or broke), every parked greenlet
resumes and raises BrokenJobError. In-process (no broker), a hub with nothing to run and
no timer can never see a result come: every parked greenlet resumes with a deadlock
error instead of hanging.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from greenlet import GreenletExit, getcurrent, greenlet

from .. import _protocol as P
from .. import _serialize
from .._errors import BrokenJobError, JobStopped

if TYPE_CHECKING:
    from .._future import Future
    from .worker import Worker

log = logging.getLogger("scoop")

# While idle, wake up this often: timers and a stopped runtime are noticed this late.
IDLE_POLL_MS = 250
# A worker whose idle waits run the broker's loop (the in-process root, scoop._baton) gives
# it back to the broker's thread before a task when its tasks take this long (s) lately:
# other workers' messages then wait for no task to end (two wakeups more per task).
LONG_SLICE_S = 0.005


class Group:
    """A task group received from the broker: who owns it and how many tasks remain.

    ``forced``: the broker sent it while every worker waited with a deadline; it runs
    even during such a wait (see :meth:`Hub.park`). ``parcel``: the parcel it came in,
    handed back as it is if none of its tasks started (no pickling again).
    """

    __slots__ = ("owner", "fid", "remaining", "forced", "parcel")

    def __init__(self, owner: int, fid: int, remaining: int, forced: bool = False,
                 parcel=None) -> None:
        self.owner = owner
        self.fid = fid
        self.remaining = remaining
        self.forced = forced
        self.parcel = parcel


class Waiter:
    """A parked greenlet waiting for ``remaining`` futures (or the first failure).

    ``arrived`` lists the futures that completed meanwhile; ``error``, set when the hub
    gives up on every wait (a deadlock), is raised by the waiting greenlet.
    """

    __slots__ = ("glet", "remaining", "on_error", "arrived", "parked", "error")

    def __init__(self, glet, remaining: int, on_error: bool = False) -> None:
        self.glet = glet
        self.remaining = remaining
        self.on_error = on_error
        self.arrived: deque[Future] = deque()
        self.parked = False
        self.error: BaseException | None = None

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


class Hub:
    """The scheduling loop of one worker: its run queue, wakeups and timers."""

    def __init__(self, rt: Worker) -> None:
        self.rt = rt
        self.runq: deque = deque()  # (group, tid, (fn, args, kwargs))
        self.wakeups: deque = deque()  # greenlets to resume
        self.timers: list = []  # heap of [deadline, seq, waiter]
        self._seq = itertools.count()
        self.inline_depth = 0
        self.running_entry = None  # (group, tid, call) of the task started last
        self.active = 0  # task greenlets started and not finished (running or parked)
        self._withdrawn = False  # leaving: the broker was told to send no more work
        self.spare = None  # a task greenlet whose task ended, for the next (_run_tasks)
        self.unhost: Callable[[], None] | None = None  # before a long task: LONG_SLICE_S
        self.thread = threading.get_ident()
        self.main = getcurrent()
        self.glet = greenlet(self.loop, parent=self.main)

    # -- the loop --------------------------------------------------------------------------
    def loop(self) -> None:
        rt, runq, wakeups, flags = self.rt, self.runq, self.wakeups, self.rt.flags
        shipper, policy = rt.shipper, rt.policy
        while not flags.stopped:
            if policy.leaving and self.leave():
                break
            while wakeups:
                g = wakeups.popleft()
                if g is self.main:
                    self._main_resumes()
                if not g.dead:
                    g.switch()
            if runq and (policy.may_run() or runq[0][0].forced):  # (runnable, inline)
                entry = runq.popleft()
                if policy.asks_ahead(len(runq)):
                    shipper.flush()  # the next group comes while this long task runs
                self._start_task(entry)
                if shipper.done_out and rt.link is not None:
                    shipper.flush()
                    if runq or wakeups:  # else the wait below asks the socket first
                        rt.poll(0)
                continue
            shipper.flush()
            if wakeups or self.runnable():
                continue
            self._wait_for_events()
        self.wake_all(flags.broken)

    def _main_resumes(self) -> None:
        """The program's main greenlet resumes: this worker runs no task until it waits
        again, so it takes no more work and hands back what it had queued."""
        rt = self.rt
        if rt.link is None:
            return
        if rt.policy.withdraw():
            rt.link.send(P.WITHDRAW)
        if rt.runq:
            rt.shipper.give_back()

    def runnable(self) -> bool:
        """Whether the hub should start the next queued task now."""
        return bool(self.runq) and (self.rt.policy.may_run() or self.runq[0][0].forced)

    def _start_task(self, entry) -> None:
        rt = self.rt
        if self.unhost is not None and rt.policy.avg_slice_s >= LONG_SLICE_S:
            self.unhost()  # the broker's thread routes while this thread computes
        t0 = time.perf_counter()
        runner, self.spare = self.spare or greenlet(self._run_tasks, parent=self.glet), None
        runner.switch(entry)  # back here when the task ends or parks
        self.rt.policy.task_took(time.perf_counter() - t0)

    def _run_tasks(self, entry) -> None:
        """A task greenlet: runs ``entry``, then, unless a spare one is kept already,
        waits as the spare for the next task. A fresh greenlet per task cost ~9 us (and
        a mapping of its frame stack, made and dropped: issue 12); one whose task parks
        stays with that task."""
        while True:
            self._execute(entry)
            if self.spare is not None:
                return
            self.spare = getcurrent()
            entry = self.glet.switch()

    def _execute(self, entry) -> None:
        group, tid, (fn, args, kwargs) = entry
        group.parcel = None  # started: it goes back in parts now, and its frames may be big
        self.running_entry = entry  # a map chunk streams its results to group.owner
        getcurrent().scoop_task = entry  # whose deadline a limited call notes (_limits)
        self.active += 1
        try:
            ok, value = _call(fn, args, kwargs)
        finally:
            self.active -= 1
        rt = self.rt
        if group.owner == rt.wid:
            if not ok:
                _serialize.attach_traceback(value, rt.where)
            rt.complete(rt.pending.get(tid), ok, value)
        else:
            if not ok:
                value = _serialize.wire_exception(value, rt.where)
            # The call rides along (not sent) to name it if its result cannot be pickled.
            rt.shipper.results_out.setdefault(group.owner, []).append(
                (tid, ok, value, fn, args))
        group.remaining -= 1
        if group.remaining == 0 and group.fid:
            rt.shipper.done_out.append((group.owner, group.fid))

    def leave(self) -> bool:
        """One turn of leaving the job: no more work (WITHDRAW), the queue handed back;
        once no task of this worker runs any more, its results and BYE go, and the
        runtime stops. Whether it has left (the loop ends)."""
        rt = self.rt
        if rt.link is None or rt.wid == 0:  # the root never leaves: its end is the job's
            rt.policy.leaving = False
            return False
        if not self._withdrawn:
            self._withdrawn = True
            rt.link.send(P.WITHDRAW)
        rt.shipper.give_back()
        if self.active or self.wakeups:
            return False  # running tasks finish first (the watchdog bounds how long)
        rt.shipper.flush()
        rt.link.send(P.BYE)
        log.info("%s left the job (SIGTERM): its queued work went back", rt.where)
        rt.stop(JobStopped("this worker left the job"))
        return True

    def _wait_for_events(self) -> None:
        timeout_ms = IDLE_POLL_MS
        if self.timers:
            left = self.timers[0][0] - time.monotonic()
            timeout_ms = max(0, min(timeout_ms, int(left * 1000) + 1))
        if self.rt.link is not None:
            self.rt.poll(timeout_ms)
        elif self.timers:
            time.sleep(timeout_ms / 1000)
        else:  # in-process, nothing runnable and nothing timed: no result can come
            self.wake_all(RuntimeError("every future is waiting and none can run "
                                       "(deadlock)"))
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            timer = heapq.heappop(self.timers)
            timer[2], waiter = None, timer[2]  # fired: not in the heap any more
            waiter.wake(self.rt)

    def wake_all(self, error: BaseException | None) -> None:
        """Resume every parked greenlet; those whose wait is not over raise ``error``."""
        for waiter in self._parked_waiters():
            waiter.error = error
            self.wakeups.append(waiter.glet)
        while self.wakeups:
            g = self.wakeups.popleft()
            if not g.dead and g is not getcurrent():
                g.switch()

    def _parked_waiters(self):
        rt, seen = self.rt, set()
        waiters = itertools.chain(
            (w for fut in itertools.chain(rt.pending.values(), rt.outbox.values())
             for w in fut._waiters),
            rt.constants.waiters, (timer[2] for timer in self.timers))
        for w in waiters:
            if w.parked and id(w.glet) not in seen:
                seen.add(id(w.glet))
                w.parked = False
                yield w

    # -- what greenlets call ---------------------------------------------------------------
    def park(self, waiter: Waiter, deadline: float | None) -> None:
        """Switch to the hub until ``waiter`` is woken (or the deadline passes); see
        :meth:`scoop._runtime.worker.Worker.park`."""
        if getcurrent() is self.glet:
            raise RuntimeError("scoop cannot wait from inside its own scheduler")
        if threading.get_ident() != self.thread:
            raise RuntimeError("scoop futures can only be waited on from the thread that "
                               "started the job")
        rt, policy = self.rt, self.rt.policy
        timer = None
        if deadline is not None:
            timer = [deadline, next(self._seq), waiter]
            heapq.heappush(self.timers, timer)
            policy.timed_waits += 1
        if rt.outbox:
            rt.shipper.ship(keep_first=True)  # keeps nothing if this wait may not run tasks
        if not policy.may_run():
            if rt.runq:
                rt.shipper.give_back()
            if rt.link is not None and policy.stand_by():
                rt.link.send(P.WITHDRAW, arg=1)
        waiter.glet = getcurrent()
        waiter.parked = True
        waiter.error = None  # it may park again (watch, park) after a deadlock woke it
        try:
            self.glet.switch()
        finally:
            if timer is not None:
                policy.timed_waits -= 1
                self._drop(timer)
        waiter.parked = False
        error = waiter.error if waiter.error is not None else rt.flags.broken
        if error is not None and waiter.remaining > 0:
            raise BrokenJobError(str(error)) from error

    def _drop(self, timer: list) -> None:
        """A timed wait ended: its timer goes, unless it fired. Left in the heap until
        its deadline, it kept the waiter and its futures alive (a loop of waits with a
        60-s timeout: 20,000 timers and +24 MB in 20 s, issue 12)."""
        if timer[2] is not None:
            timer[2] = None
            self.timers.remove(timer)  # few: one per parked greenlet with a deadline
            heapq.heapify(self.timers)

    def run_inline(self, fut: Future) -> None:
        """Run a future of the outbox in the calling greenlet, now."""
        fn, args, kwargs = fut._call
        fut._mark_running()
        self.running_entry = None
        self.inline_depth += 1
        try:
            ok, value = _call(fn, args, kwargs)
        finally:
            self.inline_depth -= 1
        if not ok:
            _serialize.attach_traceback(value, self.rt.where)
        self.rt.complete(fut, ok, value)

    def run_callbacks(self, fut: Future, callbacks) -> None:
        """Run done-callbacks; in their own greenlet when called by the hub (they may
        wait), unless each is marked as one that never does (``_future.never_waits``)."""
        if getcurrent() is self.glet and not _never_wait(callbacks):
            greenlet(_call_callbacks, parent=self.glet).switch(fut, callbacks)
        else:
            _call_callbacks(fut, callbacks)


def _call(fn, args: tuple, kwargs: dict) -> tuple[bool, object]:
    """Run one task: ``(True, its value)`` or ``(False, its exception)``. The exception's
    traceback starts here: ``_serialize.format_remote`` drops this one frame."""
    try:
        return True, fn(*args, **kwargs)
    except GreenletExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - any outcome is the future's
        return False, exc


def _never_wait(callbacks) -> bool:
    for cb in callbacks:  # (a bound method answers for its function)
        if not getattr(cb, "scoop_never_waits", False):
            return False
    return True


def _call_callbacks(fut: Future, callbacks) -> None:
    for cb in callbacks:
        try:
            cb(fut)
        except Exception:
            log.exception("exception calling callback %r for %r", cb, fut)
