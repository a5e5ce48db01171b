"""Maps that stream (issue 11): the input is read as the results are consumed.

A map (``futures.map``, ``map_as_completed``, ``mapReduce``, ``mapScan``) reads its input
a chunk at a time and keeps a bounded amount of it *in flight*: read, and not yet handed
to the consumer (submitted, running, or finished and waiting its turn). An endless
generator, or ``range(10**7)``, then costs the root a few chunks of memory, not the
whole input. The work still starts at the call: the first chunks are submitted and
shipped before the caller iterates. ::

    program (consumer)             Feed (one map)                        runtime (_worker)
    ------------------             --------------                        -----------------
    futures.map(f, data)  ------>  fill: read a chunk, submit it   ----> outbox -> ship
                                   (until the window is full)            (at the call, the
                                                                          first group stays)
    next(results)         <------  the next chunk done (in order, or
                                   as completed): its results       <--- chunk results
    ... the consumer comes back -> its items leave the window: fill
    stops, or drops it    ------>  read no more; cancel what has not left

*The window* (``buffersize``): by default :data:`CHUNKS_AHEAD` chunks per worker, so
every worker has work queued while the consumer catches up, of at most
:data:`MAX_CHUNK` items each and :data:`MAX_IN_FLIGHT` in all, so memory stays bounded
(chunks of an explicit ``chunksize``: up to :data:`MAX_SMALL_CHUNKS` of them). With
``buffersize=N``, at most N items are in flight (Python 3.14's
``Executor.map(..., buffersize=)``, counted in items here, not in chunks). The window is
filled again once a quarter of it is free, so that refills leave in batches.

*Chunk sizes.* When the input has a length (``len()`` of every iterable, or their length
hints), the chunks keep the guided shape of an eager map: each takes a share of the
items not read yet (big first, small last, for balance at the end), and at least
:data:`MIN_CHUNK_S` of work at the function's quickest pace seen (remembered from its
earlier maps): a chunk costs a few hundred us on its way, whatever it holds. That floor
stops at :data:`CHUNKS_AHEAD` chunks per worker over the whole input (as
``multiprocessing.Pool``'s), in case the items got slower since. Without a
length, they adapt: the first ones hold one item each (one per worker, until a result is
back: more of them would only queue up behind the first), and each next one aims at
:data:`TARGET_CHUNK_S` of work on one worker, at the time an item was seen to take
lately (a chunk's time from its submission to the arrival of its result, per item),
growing by :data:`GROWTH` at most. An explicit ``chunksize`` is used as given.

*Workers and CPUs.* Chunks are cut for the job's workers, except where this host has
more workers than CPUs (``-n 128`` on 2 cores) and the items compute: the workers beyond
the CPUs could only take turns on them, and each chunk more costs messages and wake-ups
(a 200,000-item map of a cheap function at ``-n 128`` on 2 cores: ~1,150 chunks cut for
the workers, 17 for the CPUs; over a generator, chunks paced for 128 workers on 2 cores
stay near one item each). Whether a function's items compute is measured once, at its
first map in such a job: its first item runs at the call, on this worker, and computes
if its thread's CPU time is at least half its wall time. Items that wait (I/O, sleep,
remote calls) are cut for every worker, as are the maps of a function not measured yet
that cannot run an item here (``task_timeout``, ``map_as_completed``, a checkpoint,
``scoop.Executor``), and elastic jobs.

*Stopping early* (the consumer closes or drops the iterator): the input is read no
further and the chunks still in this worker's outbox are cancelled. The runtime cannot
call back a chunk already shipped: those run to their end and their results are
dropped; the window bounds that work.

*The results iterator* is an ``itertools.chain`` over the chunks' result lists, so that
yielding an item costs no Python call; it reports the input's length (``len()``, for
``tqdm``'s total) where the input has one.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
import socket
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import scoop

from . import _chunks, _limits, _progress, _serialize, _worker
from ._errors import TimeoutError
from ._future import never_waits

if TYPE_CHECKING:  # sqlite3 and the checkpoint's keys load only for a map that has one
    from ._checkpoint import Checkpoint

# Chunks in flight per worker by default: enough that each worker has work queued while
# the consumer takes a chunk in (or the root runs one itself); more costs memory and
# work that runs for nothing when the consumer stops early.
CHUNKS_AHEAD = 4
# The most items an automatic chunk holds: smaller pays more messages per item, bigger
# holds more memory (CHUNKS_AHEAD x workers x MAX_CHUNK items in flight at most) ...
MAX_CHUNK = 32_768
# ... and a map holds at most this many items in flight by default (a few MB of small
# items): a job with more workers cuts smaller chunks, rather than reading further ahead.
MAX_IN_FLIGHT = 2 * CHUNKS_AHEAD * MAX_CHUNK
# In an elastic job (workers join at any time), automatic chunks are cut for at least this
# many workers: a map begun on the root alone would otherwise keep half its input in one
# chunk, which no worker that joins later could share. A lone root pays a few more
# chunks (messages) per map.
ELASTIC_POOL = 8
# Chunks of an explicit (small) chunksize in flight by default, at most: enough that the
# consumer seldom finds the next one unfinished (each wait costs this worker a few
# messages), few enough that their futures cost little memory.
MAX_SMALL_CHUNKS = 1024
# The window is filled again once this share of it is free: the chunks leave in one
# batch of messages instead of one message each.
REFILL_SHARE = 4
# Guided chunking (input with a length): a chunk takes 1/(CHUNK_SPLIT * workers) of the
# items not read yet, so the first chunks are big (little overhead) and the last ones
# small (good balance).
CHUNK_SPLIT = 2
# The smallest guided chunk is 1/(MIN_CHUNK_SPLIT * workers) of the items: the tail of a
# big map is not cut into a long run of tiny tasks, each paying a round trip.
MIN_CHUNK_SPLIT = 64
# Input without a length: a chunk aims at this much work (s) on one worker. Longer ones
# cost less per item, but the last ones to finish leave the other workers idle longer.
TARGET_CHUNK_S = 0.05
# ... and is at most GROWTH times the one before: chunks of items of unknown cost start at
# one item and grow as results come back, so that a slow function is timed before it is
# sent in big chunks; a larger factor reaches big chunks of fast items sooner.
GROWTH = 4
# The rate a map goes at is measured over the last RATE_WINDOW_S to 2 x RATE_WINDOW_S
# seconds: long enough to smooth chunked arrivals, short enough to follow a change.
RATE_WINDOW_S = 1.0
# Input with a length, at a known pace: a chunk holds at least this much work (at the
# quickest turnaround per item seen): a smaller one costs more in messages than it gains
# in balance (a chunk costs a few hundred us of CPU on its way, cheap items ~50 ns each).
MIN_CHUNK_S = 0.002


# Seconds per item of the functions mapped before (the quickest turnaround seen): a later
# map of an input without a length starts at that pace instead of one item per chunk
# (DEAP maps generators of the same function every generation). Weak keys: a function
# that goes takes its pace along.
_paces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Whether the items of a function keep a CPU busy (its first item, timed at its first map
# in a job with more workers than CPUs): then its chunks are cut for the CPUs.
_computes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pace_of(func: Any, store: weakref.WeakKeyDictionary = _paces) -> Any:
    try:
        return store.get(func)
    except TypeError:  # not weakly referable (a callable object with __slots__)
        return None


def _remember_pace(func: Any, pace: Any, store: weakref.WeakKeyDictionary = _paces) -> None:
    try:
        store[func] = pace
    except TypeError:
        pass


def check_sizes(chunksize: int | None, buffersize: int | None) -> None:
    """Raise as ``concurrent.futures`` does for a bad ``chunksize`` or ``buffersize``."""
    if chunksize is not None and chunksize < 1:
        raise ValueError("chunksize must be >= 1")
    if buffersize is not None:
        if not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")


def input_length(iterables: tuple) -> tuple[int | None, bool]:
    """``(length, exact)`` of the zipped iterables (the shortest wins): exact if each has a
    ``len()``, an estimate if each has a length hint, else ``(None, False)``."""
    lengths, exact = [], True
    for it in iterables:
        try:
            lengths.append(len(it))
            continue
        except Exception:  # noqa: BLE001 - a length is optional (range(10**20) overflows)
            exact = False
        try:
            hint = operator.length_hint(it, -1)
        except Exception:  # noqa: BLE001
            hint = -1
        if hint < 0:
            return None, False
        lengths.append(hint)
    return min(lengths, default=0), exact


def pool_size(rt, per_cpu: bool = False) -> int:
    """The workers a map cuts its automatic chunks for: the job's (in an elastic job, as
    it is now, and at least :data:`ELASTIC_POOL`); ``per_cpu``: those that can compute
    at once, the workers of this host beyond its CPUs left out (:func:`idle_workers`)."""
    if rt.elastic:
        return max(rt.size, ELASTIC_POOL)
    return max(1, rt.size - idle_workers()) if per_cpu else rt.size


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=8)
def _idle_workers(hosts: tuple, cpus: int) -> int:
    if sum(n for _, n in hosts) <= cpus:
        return 0
    here = sum(n for name, n in hosts if is_here(name))
    return max(0, here - cpus)


def is_here(name: str) -> bool:
    """Whether host ``name`` is this machine."""
    # loopback names at no cost; scoop._hosts (~10 ms to import) for the others
    if name in ("localhost", "::1", socket.gethostname()) or name.startswith("127."):
        return True
    from ._hosts import is_local

    return is_local(name)


def idle_workers() -> int:
    """The workers of the job on this host beyond the CPUs this process may use: they
    cannot compute while the others do (``-n 128`` on 2 cores: 126). Other hosts count
    one CPU per worker (their CPUs are not known here)."""
    hosts = tuple(tuple(h) for h in scoop.HOSTS)
    return _idle_workers(hosts, usable_cpus()) if hosts else 0


class _Ran:
    """The value of a chunk run at the call (see :func:`probe`), as a done future."""

    __slots__ = ("value",)

    def __init__(self, value: tuple) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> tuple:
        return self.value

    def add_done_callback(self, fn: Callable) -> None:
        fn(self)

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False


def per_cpu(feed: Feed, func: Any, ordered: bool) -> bool:
    """Whether ``feed`` cuts its chunks for the CPUs rather than the workers: only where
    this host has more workers than CPUs, and only for a function whose items keep a CPU
    busy (more workers would only add messages). Items
    that wait (I/O, sleep) go to every worker. At a function's first map, its first
    item runs here, timed, if this worker may run it (``ordered``: a map in order);
    else the workers."""
    rt = feed.rt
    if rt.elastic or not idle_workers():
        return False
    computes = _pace_of(func, _computes)
    if computes is None and ordered and feed.resumable and rt is _worker.current() \
            and rt.link is not None and rt.policy.runs_tasks \
            and _limits.limit_of_func(func) is None:
        computes = probe(feed)
        if computes is not None:
            _remember_pace(func, computes, _computes)
    return bool(computes)


def probe(feed: Feed) -> bool | None:
    """Run the first item of ``feed`` here, as its first chunk; whether it kept the CPU
    busy (its thread's CPU time at least half its wall time). None: no item to run."""
    try:
        chunk = list(itertools.islice(feed.items, 1))
    except Exception as exc:  # noqa: BLE001 - the input's own, raised in its turn
        feed.error = exc
        chunk = []
    if not chunk:
        feed.items = None  # empty, or failed: fill() reads no more
        return None
    wall, cpu = time.perf_counter(), time.thread_time()
    ran = _Ran(feed.runner(*feed.prefix, chunk, feed.star))
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    feed.futs.append((ran, 1, time.monotonic(), None))
    feed.read = feed.in_flight = 1
    if feed.count is not None:
        feed.count.submitted(ran, 1)
    feed.pace.took(wall)
    return ran.value[1] is None and cpu >= wall / 2


class _Pace:
    """The pace of one map's items, measured as its chunks come back: the size of its
    next adaptive chunk (input without a length; see the module docstring).

    Args:
        func: the mapped function (its pace is remembered for its next map).
        ahead: the most chunks in flight.
    """

    def __init__(self, func: Any, ahead: int) -> None:
        self.func = func
        self.last_step = 0  # the size of the last chunk submitted
        now = time.monotonic()
        self.marks = [(now, 0), (now, 0)]  # the rate window's start, and the next one
        # Seconds per item from submission to result, of the last chunks handed out.
        self.turnarounds: deque[float] = deque(maxlen=ahead)
        self.arrivals: dict[int, float] = {}  # id(future) -> when its result arrived
        self.best = float("inf")  # the quickest of all, remembered for the next map
        pace = _pace_of(func)
        if pace is not None:  # mapped before: start at its pace, not one item per chunk
            self.took(pace)
            self.last_step = max(1, int(TARGET_CHUNK_S / max(pace, 1e-9)) // GROWTH)

    def step(self, size: int, done: int) -> int:
        """The next chunk's size, for ``size`` workers, ``done`` items handed out."""
        if not self.turnarounds:
            return 1  # nothing measured yet
        # Two bounds on the time an item takes on one worker, both high: the quickest
        # recent chunk's turnaround per item (high by the time it was queued, and at
        # first by the round trip), and the workers' share of the rate the map went at
        # lately (high while the map warms up, or when the consumer is slower).
        per_item = min(self.turnarounds)
        now = time.monotonic()
        if now - self.marks[1][0] >= RATE_WINDOW_S:
            self.marks = [self.marks[1], (now, done)]
        since, done_then = self.marks[0]
        if done > done_then:
            per_item = min(per_item, size * (now - since) / (done - done_then))
        return min(GROWTH * self.last_step, int(TARGET_CHUNK_S / max(per_item, 1e-9)))

    def least(self) -> int:
        """The fewest items of a chunk of an input with a length: :data:`MIN_CHUNK_S` of
        work at the quickest turnaround per item seen in this map or remembered (0: none
        seen yet)."""
        return 0 if self.best == float("inf") else int(MIN_CHUNK_S / max(self.best, 1e-9))

    def took(self, per_item: float) -> None:
        """A chunk's turnaround per item."""
        self.turnarounds.append(per_item)
        self.best = min(self.best, per_item)

    @never_waits
    def arrived(self, fut: Any) -> None:
        """A done-callback: the chunk's result is here (its consumer may take it later,
        after the chunks before it: the turnaround ends now, not then)."""
        if len(self.arrivals) > MAX_SMALL_CHUNKS:  # not taken back: timed too late
            self.arrivals.clear()
        self.arrivals[id(fut)] = time.monotonic()

    def came_back(self, fut: Any, n: int, submitted: float) -> None:
        """The consumer takes the result of a chunk of ``n`` items."""
        arrived = self.arrivals.pop(id(fut), 0.0)
        if arrived < submitted:  # not timed yet, or the time of a future gone (its id)
            arrived = time.monotonic()
        self.took((arrived - submitted) / n)

    def remember(self) -> None:
        """The map ends: its function's next map starts at the quickest pace seen."""
        if self.turnarounds:
            _remember_pace(self.func, self.best)


class Feed:
    """One map: reads the input as it goes, submits ``runner(*prefix, chunk, star)`` for
    each chunk, keeps the window (see the module docstring) and hands out the chunks'
    values in order (:meth:`ordered`) or as they complete (:meth:`completed`).

    The first chunks are submitted and shipped here, at the call. An exception raised by
    the input is kept and raised after the values of the items read before it.

    Args:
        runner: the chunk task, called as ``runner(*prefix, chunk, star)``.
        prefix: the runner's first arguments.
        iterables: the map's input, zipped when there are several.
        chunksize: items per chunk (None: automatic).
        buffersize: the most items in flight (None: CHUNKS_AHEAD chunks per worker,
            MAX_IN_FLIGHT items at most).
        timeout: seconds from now after which a value not yet available raises
            TimeoutError (None: no limit).
        ordered: whether the values are taken in order (else as completed).
        resumable: the runner is ``futures._run_chunk``, whose chunks survive a
            worker's death item by item (see :mod:`scoop._chunks`).
        rt: the runtime the chunks go to (None: this process's; ``Executor.map``
            passes one for its pool).
    """

    def __init__(self, runner: Callable, prefix: tuple, iterables: tuple, *,
                 chunksize: int | None = None, buffersize: int | None = None,
                 timeout: float | None = None, ordered: bool = True,
                 resumable: bool = False, checkpoint: Checkpoint | None = None,
                 rt: Any = None) -> None:
        check_sizes(chunksize, buffersize)
        self.checkpoint = checkpoint
        self.ready: deque[tuple] = deque()  # as completed: chunks that were all stored
        self.rt = rt = _worker.current() if rt is None else rt
        self.runner, self.prefix, self.resumable = runner, prefix, resumable
        self.star = len(iterables) != 1
        self.length, self.exact = input_length(iterables)
        self.items: Iterator | None = zip(*iterables) if self.star else iter(iterables[0])
        self.seq = iterables[0] if type(iterables[0]) is list and not self.star else None
        self.error: Exception | None = None  # raised by the input, raised in turn later
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.buffersize = buffersize
        self.fixed = None if chunksize is None else min(chunksize, buffersize or chunksize)
        self.per_cpu = False  # chunks cut for the CPUs, not the workers (see per_cpu)
        self._window()
        self.read = 0  # items read so far: the map index of the next one
        self.in_flight = 0  # items read and not yet handed to the consumer
        self.finished = 0  # items handed to the consumer
        self.pace = _Pace(prefix[0] if prefix else runner, self.ahead)
        # The chunks in flight, (future, items, submitted at): in input order (ordered),
        # or by future, with a waiter that collects them as they complete.
        self.futs: deque[tuple] | dict[Any, tuple] = deque() if ordered else {}
        self.waiter = None if ordered else rt.watch(())
        self.current: list | None = None  # the result list being yielded (clear: ends it)
        self.rest: list | None = None  # drained: the results not yielded yet
        self.count = _progress.MapCount.start(self.length if self.exact else None)
        if chunksize is None and checkpoint is None:
            self.per_cpu = per_cpu(self, self.pace.func, ordered)
            self._window()
        self.fill(keep_first=True)  # the work starts now, before the caller iterates

    def _window(self) -> None:
        """The most chunks in flight, the biggest automatic chunk, when to fill again."""
        self.ahead = CHUNKS_AHEAD * self.pool()
        buffersize, chunksize = self.buffersize, self.fixed
        self.cap = max(1, min(MAX_CHUNK, (buffersize or MAX_IN_FLIGHT) // self.ahead))
        if chunksize is not None and buffersize is None:
            self.ahead = max(self.ahead, min(MAX_SMALL_CHUNKS, MAX_IN_FLIGHT // chunksize))
        self.refill_at = max(1, (self.ahead if buffersize is None else buffersize)
                             // REFILL_SHARE)

    def pool(self) -> int:
        """The workers its automatic chunks are cut for (see :func:`pool_size`)."""
        return pool_size(self.rt, self.per_cpu)

    # -- reading and submitting -------------------------------------------------------
    def fill(self, keep_first: bool = False) -> None:
        """Read and submit chunks while the window has room; ship them."""
        submitted = False
        self.ahead = max(self.ahead, CHUNKS_AHEAD * self.pool())  # the pool grew
        # Automatic chunks are CHUNKS_AHEAD per worker at most, whatever the window:
        # before they grow, a window of items would be one chunk (message) each. Of
        # unknown pace, one per worker: more 1-item chunks would only queue up.
        ahead = self.ahead if self.length is not None or self.pace.turnarounds \
            or self.fixed is not None else self.pool()
        while self.items is not None:
            if ((self.buffersize is None or self.fixed is None)
                    and len(self.futs) >= ahead):
                break
            step = self._step()
            if self.buffersize is not None and self.in_flight + step > self.buffersize:
                break
            chunk = _read(self, step)
            if chunk:
                self._submit(chunk)
                self.pace.last_step = step
                submitted = True
            if len(chunk) < step:
                self.items = self.seq = None  # exhausted (or failed): let the input go
                if self.count is not None:
                    self.count.stopped_reading()
        if submitted:
            # At the call the first group stays on this worker (no round trip); later
            # chunks all leave, as this worker runs none while the consumer is busy.
            self.rt.ship(keep_first=keep_first)

    def _submit(self, chunk: list) -> None:
        n = len(chunk)
        layout = None  # with a checkpoint: the chunk's items, Stored or Pending
        if self.checkpoint is not None:
            layout = self.checkpoint.lookup(list(enumerate(chunk, self.read)))
            chunk = self.checkpoint.to_run(layout)
        fut = None  # None: every item of the chunk was stored by an earlier run
        if chunk:
            state = _chunks.Chunk(self.read) if self.resumable else None
            fut = self.rt.submit(self.runner, (*self.prefix, chunk, self.star), {},
                                 len(chunk), state)
        entry = (fut, n, time.monotonic(), layout)
        if layout is not None and fut is not None:
            # as it arrives, not when the consumer takes it: in order, a slow first chunk
            # would hold back the recording of every chunk after it
            fut.add_done_callback(functools.partial(self._record, layout))
        if self.waiter is None:
            self.futs.append(entry)
            if fut is not None and self.fixed is None:  # (in order: taken late, maybe)
                fut.add_done_callback(self.pace.arrived)
        elif fut is None:
            self.ready.append(entry)
        else:
            self.futs[fut] = entry
            fut.add_done_callback(self._arrived)
        self.read += n
        self.in_flight += n
        if self.count is not None:
            self.count.submitted(fut, n)

    def _step(self) -> int:
        """The size of the next chunk."""
        if self.fixed is not None:
            return self.fixed
        size = self.pool()
        if self.length is not None and self.length > self.read:
            unread = self.length - self.read
            # the floor of work: no more than Pool's chunks (CHUNKS_AHEAD per worker),
            # whatever the pace: a pace remembered from cheaper items may be stale
            floor = min(self.pace.least(), self.length // (CHUNKS_AHEAD * size))
            smallest = max(self.length // (MIN_CHUNK_SPLIT * size), floor)
            step = max(1, smallest, -(-unread // (CHUNK_SPLIT * size)))
        else:
            step = self.pace.step(size, self.finished)
        return max(1, min(self.cap, step))

    def _left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _came_back(self, entry: tuple) -> None:
        fut, n, submitted, _ = entry
        if fut is not None:
            self.pace.came_back(fut, n, submitted)

    def _record(self, layout: list, fut) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.checkpoint.record_chunk(layout, fut.result()[0])

    def _value(self, entry: tuple, value: tuple) -> tuple:
        """A chunk's ``(results, error)``, its stored results put back in their places and
        its new ones recorded (see :mod:`scoop._checkpoint`)."""
        layout = entry[3]
        if layout is None:
            return value
        results, wire = value
        return self.checkpoint.merge(layout, results), wire

    def _consumed(self, entry: tuple) -> None:
        """The consumer is done with a chunk: make room, read on."""
        self.in_flight -= entry[1]
        self.finished += entry[1]
        room = (self.ahead - len(self.futs) if self.buffersize is None
                else self.buffersize - self.in_flight)
        if room >= self.refill_at:
            self.fill()

    def cancel(self) -> None:
        """Read no more; cancel the chunks not shipped (those shipped run to their end)."""
        self.items = self.seq = None
        self.pace.remember()
        if self.count is not None:
            self.count.stopped_reading()
        if self.checkpoint is not None:
            self.checkpoint.close()  # writes the results recorded so far
        entries = list(self.futs if self.waiter is None else self.futs.values())
        self.futs.clear()
        self.ready.clear()
        for fut, *_ in entries:
            if fut is not None:
                fut.cancel()

    # -- handing out the values ---------------------------------------------------------
    def ordered(self) -> Iterator:
        """The chunks' values (``future.result()``), in input order."""
        futs = self.futs
        try:
            while futs:
                fut = futs[0][0]
                value = ([], None) if fut is None else fut.result(self._left())
                entry = futs.popleft()
                self._came_back(entry)
                yield self._value(entry, value)
                self._consumed(entry)
            if self.error is not None:
                raise self.error
        finally:
            self.cancel()

    def completed(self) -> Iterator:
        """The chunks' values, in the order the chunks complete."""
        futs, waiter = self.futs, self.waiter
        arrived = waiter.arrived
        try:
            while futs or self.ready:
                if self.ready:  # stored by an earlier run: complete already
                    entry = self.ready.popleft()
                    yield self._value(entry, ([], None))
                    self._consumed(entry)
                    continue
                while not arrived:
                    # one waiter for every chunk, as in futures.as_completed
                    waiter.remaining = 1
                    self.rt.park(waiter, self.deadline)
                    if not arrived and self._left() == 0.0:
                        raise TimeoutError(f"{len(futs)} chunks of the map unfinished")
                entry = futs.pop(arrived.popleft(), None)
                if entry is not None:  # (else cancelled by this map)
                    self._came_back(entry)
                    yield self._value(entry, entry[0].result())
                    self._consumed(entry)
            if self.error is not None:
                raise self.error
        finally:
            self.cancel()

    @never_waits
    def _arrived(self, fut) -> None:
        self.waiter.notify(self.rt, fut)


def _read(feed: Feed, step: int) -> list:
    """The next ``step`` items of ``feed``'s input: fewer at its end, or where it failed
    (the error is kept in ``feed.error``, raised after the items read before it)."""
    if feed.seq is not None:  # a list: sliced, a tenth of the cost of its iterator's items
        return feed.seq[feed.read:feed.read + step]
    chunk: list = []
    try:
        chunk.extend(itertools.islice(feed.items, step))  # (keeps what came before a failure)
    except Exception as exc:  # noqa: BLE001 - the input's own, raised in its turn
        feed.error = exc
    return chunk


# -- map's results ----------------------------------------------------------------------
def unwrap(wire) -> BaseException:
    """The exception of a failed map chunk (already rebuilt if it was unpickled)."""
    if isinstance(wire, BaseException):
        return wire
    return _serialize.rebuild_exception(wire.exc, wire.tb)


class MapResults(itertools.chain):
    """The results of ``futures.map`` and ``map_as_completed``: a lazy iterator.

    Iterating it reads the input on (see :mod:`scoop._mapping`); closing it, or dropping
    it, stops the map. ``len()`` is the number of results in all
    where the input has a length (for ``tqdm``'s total); ``operator.length_hint`` gives
    it where the input has length hints.
    """

    __slots__ = ("_feed", "_lists")

    @classmethod
    def of(cls, feed: Feed, ordered: bool, drain: bool = False) -> MapResults:
        """The results of ``feed`` (of ``futures._run_chunk``), in order or as completed.

        ``drain``: keep no reference to a result once yielded (as ``concurrent.futures``
        promises, CPython issue 14406).
        """
        lists = _results_lists(feed, ordered)
        self = (SizedMapResults if feed.exact else cls).from_iterable(
            map(functools.partial(_drain, feed), lists) if drain else lists)
        self._feed, self._lists = feed, lists
        return self

    def __length_hint__(self) -> int:
        length = self._feed.length
        return NotImplemented if length is None else length

    def close(self) -> None:
        """Stop: read no more input, cancel what has not left, drop the results not
        yielded yet (as closing a generator does)."""
        self._lists.close()
        self._feed.cancel()
        for left in (self._feed.current, self._feed.rest):
            if left is not None:
                left.clear()  # the chain's iterator over current ends there


class SizedMapResults(MapResults):
    """:class:`MapResults` of an input with a ``len()``."""

    __slots__ = ()

    def __len__(self) -> int:
        return self._feed.length


def _results_lists(feed: Feed, ordered: bool) -> Iterator[list]:
    """The chunks' result lists, for the chain to flatten; a chunk's failure is raised
    after the results before it."""
    for results, wire in feed.ordered() if ordered else feed.completed():
        if results:
            feed.current = results
            yield results
        if wire is not None:
            raise unwrap(wire)


def _drain(feed: Feed, results: list) -> Iterator:
    """The results, in order, keeping no reference to those yielded: each is popped, by
    a C loop (a generator's resume per result cost 2 ms per 100,000). It ends once
    ``feed.current``, the list its calls are read from, is cleared (``close``)."""
    results.reverse()
    calls = [()] * len(results)
    feed.current, feed.rest = calls, results
    return itertools.starmap(results.pop, calls)
