"""What this worker does with each message from the broker: the handlers of the hub.

::

    broker --> link.drain() --> Handlers.dispatch(msg)
    TASKS    check each parcel (a forged one is dropped), unpickle its calls (a call that
             cannot be unpickled fails alone) -> run queue; handed back at once if this
             worker may not run tasks now (a wait with a deadline)
    RESULTS  check, unpickle -> complete the futures (a map chunk's partial results are
             kept until its last one comes: scoop._chunks)
    LOST     a worker died holding map chunks of ours: cut what they had not finished
             into pieces and send them back, first in line (scoop._chunks); ``timeouts``:
             chunks that ran past their time limit fail at their item (scoop._limits)
    CONST    shared constants -> the runtime's table (consts.py); wake getConst
    STOP     the job is over: stop the runtime (parked greenlets raise JobStopped)
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from .. import _chunks, _serialize, _shm
from .. import _protocol as P
from .._errors import JobStopped, SerializationError, WorkerLostError
from .._future import FINISHED
from .hub import Group

if TYPE_CHECKING:
    from .._future import Future
    from .worker import Worker

log = logging.getLogger("scoop")

_SKIP = object()  # a result entry that completes no future


class Handlers:
    """The handlers of one worker's messages, by kind."""

    def __init__(self, rt: Worker) -> None:
        self.rt = rt
        self.table = {
            P.TASKS: self.handle_tasks,
            P.RESULTS: self.handle_results,
            P.CONST: self.handle_const,
            P.STOP: self.handle_stop,
            P.LOST: self.handle_lost,
        }

    def dispatch(self, msg: P.Message) -> None:
        handler = self.table.get(msg.kind)
        if handler is None:
            log.warning("worker %d: unexpected %r from the broker, dropped", self.rt.wid, msg)
            return
        handler(msg)

    def _authentic(self, msg: P.Message, what: str) -> list:
        """The parcels of ``msg`` that pass their mac check; each other one is logged
        (once per source) and skipped."""
        link = self.rt.link
        return link.codec.authentic(msg.parcels, link.reject, what)

    def handle_tasks(self, msg: P.Message) -> None:
        rt = self.rt
        forced = bool(msg.arg)
        accepted = False
        for parcel in self._authentic(msg, "a task parcel"):
            accepted = True
            tids = P.task_ids(parcel)
            group = Group(parcel.peer, parcel.tag, len(tids), forced, parcel)
            calls = self._own_calls(tids) if parcel.peer == rt.wid else None
            broken: dict = {}
            try:
                if calls is None:
                    calls, broken = _serialize.loads_items(_shm.restore(parcel.frames[1:]))
            except Exception as exc:  # noqa: BLE001 - fail the group's tasks, keep working
                err = self.unpickling_error("a task group", exc)
                calls, broken = [(_raise, (err,), {})] * len(tids), {}
            for i, exc in broken.items():
                # Only this task fails. Queued as the raising call, not the marker, so
                # that it can also be handed back to another worker.
                err = self.unpickling_error("the task's function or arguments", exc)
                calls[i] = (_raise, (err,), {})
            rt.runq.extend(zip(itertools.repeat(group), tids, calls))
        rt.policy.received(len(msg.parcels), forced and accepted)
        if not rt.policy.may_run() and rt.runq:
            rt.shipper.give_back()

    def _own_calls(self, tids: list) -> list | None:
        """The calls of a group of this worker's own map chunks, which it keeps (to resume
        them): no unpickling of what it pickled itself (an in-process root's map hands
        chunks back and forth with the broker as its program resumes and waits). None
        if the group holds anything else."""
        pending, calls = self.rt.pending, []
        for tid in tids:
            fut = pending.get(tid)
            if fut is None or fut._chunk is None:
                return None
            calls.append(fut._call)
        return calls

    def handle_results(self, msg: P.Message) -> None:
        rt = self.rt
        if msg.arg:  # an elastic job's pool, as it is now: new maps cut chunks for it
            rt.size = msg.arg
        for parcel in self._authentic(msg, "a result parcel"):
            try:
                results, broken = _serialize.loads_items(
                    _shm.restore(parcel.frames, unlink_after=True))
            except Exception as exc:  # noqa: BLE001 - keep the hub alive for the others
                # The task ids are inside the broken pickle: these futures cannot be told.
                log.error("%s: dropped a batch of results that could not be unpickled; "
                          "their futures will never complete: %s: %s",
                          rt.where, type(exc).__name__, exc)
                continue
            pending = rt.pending
            for i, (tid, ok, value) in enumerate(results):
                fut = pending.get(tid)
                if fut is None:
                    continue  # a duplicate or late result
                if fut._chunk is not None and i not in broken:
                    value = _chunk_result(fut._chunk, ok, value)
                    if value is _SKIP:
                        continue
                if i in broken:
                    what = "the result of" if ok else "the exception raised by"
                    ok, value = False, self.unpickling_error(
                        f"{what} {_call_name(fut)}()", broken[i])
                elif isinstance(value, WorkerLostError) and fut._call:
                    value = WorkerLostError(f"{_call_name(fut)}(): {value}")
                rt.complete(fut, ok, value)

    def handle_lost(self, msg: P.Message) -> None:
        """A worker died holding map chunks of this worker's: run what they had not
        finished again, in pieces, first in line (see scoop._chunks)."""
        rt = self.rt
        body = msg.body or {}
        how = str(body.get("how", "?"))
        for tid, error in body.get("timeouts", ()):
            fut = rt.pending.get(tid)
            if fut is not None and fut._chunk is not None and not fut._chunk.resumed:
                rt.complete(fut, True, _chunks.timed_out(fut._chunk, str(error)))
        clean = bool(body.get("clean"))  # it left on purpose: nothing to charge
        subs: list[Future] = []
        for running, tids in body.get("groups", ()):
            first = bool(running)  # its first unfinished chunk is the one that ran
            for tid in tids:
                fut = rt.pending.get(tid)
                ch = fut._chunk if fut is not None else None
                if ch is None or ch.resumed:
                    continue
                if ch.parent is not None and ch.parent._state >= FINISHED:
                    rt.complete(fut, True, ([], None))  # nobody needs it any more
                    continue
                # which of them killed it is a guess: never the root (unless a time limit
                # ended that worker: then it is known; or it left on purpose)
                ch.suspect |= not (clean or body.get("blameless"))
                subs += _chunks.resume(rt, fut, (first or bool(ch.parts)) and not clean, how)
                first = False
        if subs:
            rt.shipper.send_pieces(subs)

    def handle_const(self, msg: P.Message) -> None:
        self.rt.constants.receive(self._authentic(msg, "a constants parcel"),
                                  self.unpickling_error)

    def handle_stop(self, msg: P.Message) -> None:
        self.rt.stop(JobStopped("the job was stopped"))

    def unpickling_error(self, what: str, exc: BaseException) -> SerializationError:
        hint = (" (is that module importable on this worker's host, from its sys.path?)"
                if isinstance(exc, ImportError) else "")
        return SerializationError(f"{self.rt.where} could not unpickle {what}: "
                                  f"{type(exc).__name__}: {exc}{hint}")


def _chunk_result(ch: _chunks.Chunk, ok, value):
    """A map chunk's result entry: partial results are kept (_SKIP), the final one joins
    them; those of a chunk already cut into pieces are dropped."""
    if ch.resumed:
        return _SKIP
    if ok == _chunks.PARTIAL:
        ch.add(value)
        return _SKIP
    if ok and ch.parts:
        return ch.parts + value[0], value[1]
    return value


def _raise(exc: BaseException):
    raise exc


def _call_name(fut: Future) -> str:
    fn = fut._call[0] if fut._call else None
    return getattr(fn, "__qualname__", None) or repr(fn)
