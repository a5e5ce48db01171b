"""Map chunks that survive their worker: streamed results, resumption, per-item attempts.

A map chunk (``futures._run_chunk``) running for another worker sends the results it has
finished to their owner as it goes (*partial results*, every :data:`FLUSH_S` at most), so
the owner knows how far it got. Groups of map chunks carry the tag bit
``_protocol.RESUMABLE``; when the worker holding one dies, the broker does not queue it
again (it cannot cut a pickle it never reads) but tells the owner (``LOST``), which:

* keeps the items whose results came back: they do not run again;
* charges an attempt to the items the dead worker may have been running, and only if the
  chunk had started (the broker saw it as that worker's oldest unfinished group, or some
  of its results came back): from the first item whose result had not come back, as many
  as could have finished unreported (twice the most one report carried, plus one; the
  whole rest when nothing came back yet);
* fails the first item charged ``max_attempts`` times with WorkerLostError (the results
  before it are kept);
* sends the rest back, first in line, in smaller pieces. The piece holding the charged
  items (a few) reports after every item (*fine*), so that another death there pins the
  item down to it or the one after it (a report sent just before a SIGKILL may be lost).

Data flow::

    owner                        broker                        worker W (dies)
    map: chunk C (items 0-99) -> TASKS [C] (tag | RESUMABLE) -> runs C, every 50 ms:
    C.parts += 0-37     <------  RESULTS (partial, tid C) <---- RESULTS (partial)
                                 W lost: C held, oldest
    LOST {running, [C]} <------  (not queued again)
    charge items 38-45; C -> pieces 38-45 (fine), 46-57, ..., 94-99
    RETURN [pieces] ------------> queued first ------------------> other workers
    C's result = C.parts + the pieces' results, in order (Join)

A piece is a future of its own (cut again if it is lost in turn); the attempts of all the
pieces of one chunk are counted together (:class:`Lineage`).
"""

from __future__ import annotations

import time
from itertools import islice, starmap

from . import _serialize
from ._errors import TaskTimeoutError, WorkerLostError
from ._future import FINISHED, Future

# A chunk reports its finished results at most this often (one small message each time).
FLUSH_S = 0.05
# After a report in a fine piece, let the I/O thread send it before the next item starts
# (an item that kills its worker at once would take the report with it).
FINE_PAUSE_S = 0.001
# The charged items of a lost chunk run again as a fine piece if they are this few.
FINE_MAX = 16
# A lost chunk's rest is cut into this many pieces per worker of the job.
PIECES_PER_WORKER = 2
PARTIAL = 2  # the ``ok`` field of a result entry that carries partial results of a chunk


def partial_results(func):
    """Stands for the call of a partial result (a list of ``func``'s results) when one of
    them cannot be pickled: the error names ``func`` and the result."""


_serialize.register_runner(partial_results, _serialize.Runner(results="list"))


class Lineage:
    """The attempts charged to the items of one map chunk and to every piece cut from it:
    one item range per worker death (absolute item indexes)."""

    __slots__ = ("charges",)

    def __init__(self) -> None:
        self.charges: list[tuple[int, int]] = []

    def count(self, item: int) -> int:
        return sum(1 for start, stop in self.charges if start <= item < stop)

    def charge(self, start: int, stop: int, max_attempts: int) -> int | None:
        """Charge a death to items [start, stop); return the first of them charged
        ``max_attempts`` times, if any."""
        self.charges.append((start, stop))
        marks = {start} | {a for a, _ in self.charges if start < a < stop}
        return next((x for x in sorted(marks) if self.count(x) >= max_attempts), None)


class Chunk:
    """What the owner knows of one of its map chunk futures (or a piece of one)."""

    __slots__ = ("base", "parts", "batch", "lineage", "fine", "resumed", "parent", "suspect")

    def __init__(self, base: int, lineage: Lineage | None = None, fine: bool = False,
                 parent: Future | None = None, suspect: bool = False) -> None:
        self.base = base  # the map index of its first item
        self.parts: list = []  # the results reported so far
        self.batch = 0  # the most results one report carried
        self.lineage = lineage or Lineage()
        self.fine = fine  # it reports after every item
        self.resumed = False  # lost and cut into pieces: its own results no longer count
        self.parent = parent  # the chunk future it is a piece of
        # A worker died holding it (which item killed it is a guess): the root never runs
        # it, as its own death would end the job.
        self.suspect = suspect

    def charged(self, n: int) -> bool:
        """Whether any of its ``n`` items may have killed a worker: it was in the group
        a worker died running, or one of its items was charged with a death."""
        end = self.base + n
        return self.suspect or any(start < end and self.base < stop
                                   for start, stop in self.lineage.charges)

    def add(self, values: list) -> None:
        self.parts.extend(values)
        self.batch = max(self.batch, len(values))


def plan(ch: Chunk, n: int, running: bool, max_attempts: int, size: int):
    """What to do with a lost chunk of ``n`` items: ``(pieces, failed)``, the item ranges
    ``(start, stop, fine)`` to run again (map indexes) and the item that fails (or None).
    Charges the lineage when ``running``."""
    k, end = ch.base + len(ch.parts), ch.base + n
    if not running or k >= end:
        return _split(k, end, size), None
    width = 2 if ch.fine else (2 * ch.batch + 1 if ch.batch else end - k)
    hot = min(end, k + width)
    failed = ch.lineage.charge(k, hot, max_attempts)
    if failed is not None:
        return _split(k, failed, size), failed
    first = [(k, hot, True)] if hot - k <= FINE_MAX else _split(k, hot, size)
    return first + _split(hot, end, size), None


def _split(start: int, stop: int, size: int) -> list[tuple[int, int, bool]]:
    step = max(1, -(-(stop - start) // (PIECES_PER_WORKER * size)))
    return [(a, min(stop, a + step), False) for a in range(start, stop, step)]


class Join:
    """Completes a lost chunk future from its reported results and its pieces' results."""

    __slots__ = ("fut", "parts", "pieces", "error")
    parked = False  # read by the runtime as if it were a waiter

    def __init__(self, fut: Future, parts: list, pieces: list[Future], error) -> None:
        self.fut = fut
        self.parts = parts
        self.pieces = pieces
        self.error = error  # the WorkerLostError of the failed item that ends the chunk

    def notify(self, rt, _piece=None) -> None:
        if self.fut._state >= FINISHED:
            return
        results = list(self.parts)
        for p in self.pieces:
            if p._state < FINISHED:
                return
            if p._exception is not None:
                rt.complete(self.fut, True, (results, p._exception))
                return
            values, wire = p._result
            results.extend(values)
            if wire is not None:
                rt.complete(self.fut, True, (results, wire))
                return
        rt.complete(self.fut, True, (results, self.error))


def resume(rt, fut: Future, running: bool, how: str) -> list[Future]:
    """The pieces (new futures, to ship) of a lost chunk future; it completes with them."""
    ch = fut._chunk
    fn, (func, items, star, *_), kwargs = fut._call
    ch.resumed = True
    pieces, failed = plan(ch, len(items), running, rt.max_attempts, rt.size)
    error = None
    if failed is not None:
        name = getattr(func, "__qualname__", None) or repr(func)
        error = WorkerLostError(
            f"{name}() on item {failed}: {ch.lineage.count(failed)} workers died running "
            f"this task (the last: {how})")
    subs = []
    for a, b, fine in pieces:
        call = (fn, (func, items[a - ch.base:b - ch.base], star, fine), kwargs)
        subs.append(Future(rt, rt.new_id(), call, b - a,
                           Chunk(a, ch.lineage, fine, fut, ch.suspect)))
    join = Join(fut, ch.parts, subs, error)
    for sub in subs:
        sub._add_waiter(join)
    if not subs:
        join.notify(rt)
    return subs


def timed_out(ch: Chunk, error: str) -> tuple:
    """The value of a chunk future whose item ran past its time limit: the results
    reported before it (a limited chunk reports after every item, so these are all the
    items that finished) and the TaskTimeoutError of that item."""
    item = ch.base + len(ch.parts)
    return ch.parts, TaskTimeoutError(f"{error} (on item {item} of the map)")


class Stream:
    """Runs a chunk for another worker, reporting finished results to their owner."""

    __slots__ = ("rt", "owner", "tid", "fine", "pause")

    def __init__(self, rt, owner: int | None, tid: int, fine: bool,
                 pause: bool = True) -> None:
        self.rt = rt
        self.owner = owner
        self.tid = tid
        self.fine = fine
        self.pause = pause  # after each report of a fine chunk (see FINE_PAUSE_S)

    @classmethod
    def of(cls, rt, fine: bool, limited: bool = False) -> Stream | None:
        """The stream of the chunk task starting now; None outside a job. A chunk run
        for this worker reports nothing: it takes in messages instead (``owner`` None),
        so that a long one does not hold up the resumption of others (LOST). A
        ``limited`` chunk (a time limit per item) reports after every item, without a
        pause: its worker is ended only a limit after the report."""
        if rt.link is None:
            return None
        entry = rt.hub.running_entry  # (group, tid, call); None: an inline run
        if entry is None or entry[0].owner == rt.wid:
            return cls(rt, None, 0, False)
        return cls(rt, entry[0].owner, entry[1], fine or limited, not limited)

    def run(self, func, chunk: list, star: bool, out: list) -> None:
        """Append ``func`` of each item of ``chunk`` to ``out``; what was reported is cut
        from it (on an exception too: ``out`` then holds the results not reported).

        The clock is read after every batch of ``step`` items; a batch is sized to take
        half of FLUSH_S at the speed seen so far, and the last two run as one (except in
        a fine chunk: one item each), straight from the iterator: tiny items cost
        nothing more.
        """
        it = (starmap if star else map)(func, chunk)
        fine, n = self.fine, len(chunk)
        done, step, tail = 0, 1, 1 if self.fine else 2
        start = last = time.perf_counter()
        while done + tail * step < n:
            out.extend(islice(it, step))
            done += step
            now = time.perf_counter()
            if fine or now - last >= FLUSH_S:
                last = now
                if self.owner is None:
                    self.rt.poll_messages()
                else:
                    self.rt.send_partial(self.owner, self.tid, out[:], func)
                    out.clear()
                    if fine:
                        if self.pause:
                            time.sleep(FINE_PAUSE_S)
                        continue
            step = max(1, int(FLUSH_S / 2 * done / max(now - start, 1e-9)))
        out.extend(it)  # the last results travel as the task's own result
