"""Parallel map, submit and friends: SCOOP's public futures API (PEP 3148 shapes).

Run the program with ``python -m scoop program.py`` and these calls spread over the job's
workers; run it with plain ``python`` and they run one at a time in-process (with one
warning), so the same program works both ways.

Deliberate differences from the original SCOOP, each a fix:

* ``map`` batches small items into chunks by itself (results still come in order, as a
  generator) and accepts the ``timeout`` and ``chunksize`` of concurrent.futures.
  Unknown keyword arguments are ignored with a warning instead of being passed on.
* A task's exception keeps its type and carries the worker-side traceback as its
  ``__cause__``; ``wait`` and ``as_completed`` return failed futures instead of raising.
* ``mapReduce`` of one element gives that element's mapped value and of none raises
  TypeError (like ``functools.reduce``); ``mapScan`` returns the correct running reduction.
* Functions, lambdas and closures defined anywhere in the program can be submitted.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
)
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _chunks, _serialize, _worker
from ._errors import (
    BrokenJobError,
    CancelledError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TimeoutError,
    WorkerLostError,
)
from ._future import Future

if TYPE_CHECKING:
    from ._executor import Executor

__all__ = [
    "map", "map_as_completed", "submit", "wait", "as_completed", "mapReduce", "mapScan",
    "shutdown", "Future", "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION",
    "CancelledError", "TimeoutError", "RemoteError", "RemoteTraceback", "BrokenJobError",
    "SerializationError", "WorkerLostError", "DoneAndNotDoneFutures", "Executor",
]

_builtin_map = map
# Guided chunking: a chunk takes 1/(CHUNK_SPLIT * workers) of the items still unassigned,
# so the first chunks are big (little overhead) and the last ones small (good balance).
CHUNK_SPLIT = 2


class DoneAndNotDoneFutures(NamedTuple):
    """What :func:`wait` returns: the done futures and the others, as sets."""

    done: set
    not_done: set


def __getattr__(name: str):
    # scoop.Executor, imported on first use: importing scoop.futures opens no socket.
    if name == "Executor":
        from ._executor import Executor

        return Executor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def submit(func: Callable, *args: Any, **kwargs: Any) -> Future:
    """Schedule ``func(*args, **kwargs)`` on some worker and return its Future.

    The call waits in this worker's queue until this worker waits for something, or asks
    for its result (then it runs right here), so a burst of submits travels in one batch.

    Args:
        func: any picklable callable; lambdas, closures and functions defined in the
            program's ``__main__`` block are sent by value.
        *args, **kwargs: the call's arguments (pickled; large buffers travel out of band).

    Returns:
        The Future of the call.
    """
    return _worker.current().submit(func, args, kwargs)


# The smallest automatic chunk is 1/(MIN_CHUNK_SPLIT * workers) of the items: the tail of
# a big map is not cut into a long run of tiny tasks, each paying a round trip.
MIN_CHUNK_SPLIT = 64


def _cut(items: list, chunksize: int | None, size: int) -> Iterator[list]:
    n, i = len(items), 0
    smallest = max(1, n // (MIN_CHUNK_SPLIT * size))
    while i < n:
        step = chunksize or max(smallest, -(-(n - i) // (CHUNK_SPLIT * size)))
        yield items[i:i + step]
        i += step


def _calls(func: Callable, chunk: list, star: bool) -> Iterator:
    """``func`` applied over a chunk: of argument tuples (``star``) or of single items."""
    return itertools.starmap(func, chunk) if star else _builtin_map(func, chunk)


def _run_chunk(func: Callable, chunk: list, star: bool, fine: bool = False) -> tuple[list, Any]:
    """Apply ``func`` to a chunk; stop at the first exception.

    Returns (results so far, None) or (results before the failure, the wire exception),
    so the caller can yield the good results before raising. A chunk run for another
    worker reports its results as it goes (after every item if ``fine``); it returns
    only those not reported yet (see :mod:`scoop._chunks`).
    """
    out: list = []
    rt = _worker.current()
    try:
        stream = _chunks.Stream.of(rt, fine)
        if stream is None:
            out.extend(_calls(func, chunk, star))  # keeps the results before a failure
        else:
            stream.run(func, chunk, star, out)
    except Exception as exc:  # noqa: BLE001 - reported at the failing item
        return out, _serialize.wire_exception(exc, rt.where)
    return out, None


# Chunk runners: errors name the mapped function, their first argument, not the runner.
_run_chunk.maps_first_argument = _run_chunk.returns_chunk_results = True


def _unwrap(wire) -> BaseException:
    """The exception of a failed chunk (already rebuilt if it was unpickled)."""
    if isinstance(wire, BaseException):
        return wire
    return _serialize.rebuild_exception(wire.exc, wire.tb)


def _warn_unknown(name: str, kwargs: dict) -> None:
    if kwargs:
        warnings.warn(f"futures.{name}() ignores unknown keyword arguments: "
                      f"{', '.join(sorted(kwargs))}", RuntimeWarning, stacklevel=3)


def _submit_chunks(runner: Callable, prefix: tuple, iterables, chunksize) -> list[Future]:
    """Submit ``runner(*prefix, chunk)`` for chunks of the zipped iterables; ship them.

    Chunks of ``_run_chunk`` (map) survive a worker's death item by item (``_chunks``).
    """
    if chunksize is not None and chunksize < 1:
        raise ValueError("chunksize must be >= 1")
    rt = _worker.current()
    star = len(iterables) != 1
    items = list(zip(*iterables)) if star else list(iterables[0])
    resumable = runner is _run_chunk
    futs = []
    base = 0
    for chunk in _cut(items, chunksize, rt.size):
        state = _chunks.Chunk(base) if resumable else None
        futs.append(rt.submit(runner, (*prefix, chunk, star), {}, len(chunk), state))
        base += len(chunk)
    rt.ship(keep_first=True)  # work starts now, before the caller iterates
    return futs


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def map(func: Callable, *iterables: Iterable, timeout: float | None = None,
        chunksize: int | None = None, **kwargs: Any) -> Iterator:
    """Apply ``func`` to every item in parallel; a generator of the results, in order.

    Like the built-in ``map``: several iterables are zipped (the shortest wins) and any
    iterable works, generators included. All items are read and the work starts at the
    call, before the caller iterates. A call's exception is raised when iteration reaches
    it (the results before it are yielded first).

    Args:
        func: the function to apply.
        *iterables: the argument iterables.
        timeout: seconds from this call after which a result not yet available raises
            TimeoutError (None: wait forever).
        chunksize: items per task; by default chosen for balance and low overhead.
        **kwargs: accepted for programs written for old SCOOP versions; ignored with a
            warning.

    Returns:
        A generator of ``func(*items)``, in the order of the items.
    """
    _warn_unknown("map", kwargs)
    deadline = _deadline(timeout)
    futs = _submit_chunks(_run_chunk, (func,), iterables, chunksize)
    return _ordered_results(futs, deadline)


def _ordered_results(futs: list[Future], deadline: float | None) -> Iterator:
    futs.reverse()
    try:
        while futs:
            results, wire = futs[-1].result(_left(deadline))
            futs.pop()
            yield from results
            if wire is not None:
                raise _unwrap(wire)
    finally:
        for f in futs:
            f.cancel()


def map_as_completed(func: Callable, *iterables: Iterable, timeout: float | None = None,
                     chunksize: int | None = None, **kwargs: Any) -> Iterator:
    """Like :func:`map`, but yield each result as soon as it is available.

    Results come in completion order (within a chunk, in item order). A call's exception
    is raised when its result would have been yielded.
    """
    _warn_unknown("map_as_completed", kwargs)
    futs = _submit_chunks(_run_chunk, (func,), iterables, chunksize)
    return _completed_results(futs, timeout)


def _completed_results(futs: list[Future], timeout: float | None) -> Iterator:
    for fut in as_completed(futs, timeout):
        results, wire = fut.result()
        yield from results
        if wire is not None:
            raise _unwrap(wire)


def as_completed(fs: Iterable[Future], timeout: float | None = None) -> Iterator[Future]:
    """Yield the futures of ``fs`` as they complete (finished or cancelled).

    Failed futures are yielded like the others: call ``result()`` to get their exception.

    Raises:
        TimeoutError: if ``timeout`` seconds pass before every future is done.
    """
    deadline = _deadline(timeout)
    pending = set(fs)
    rt = _worker.current()
    waiter = rt.watch(pending)
    while pending:
        while waiter.arrived:
            fut = waiter.arrived.popleft()
            if fut in pending:
                pending.discard(fut)
                yield fut
        if pending:
            left = _left(deadline)
            if left == 0.0:
                raise TimeoutError(f"{len(pending)} (of {len(pending)}) futures unfinished")
            waiter.remaining = 1
            rt.park(waiter, deadline)


def wait(fs: Iterable[Future], timeout: float | None = None,
         return_when: str = ALL_COMPLETED) -> DoneAndNotDoneFutures:
    """Wait for the futures of ``fs``; return the done and not-done sets.

    Args:
        fs: the futures to wait for.
        timeout: the most seconds to wait (None: no limit). No exception on timeout.
        return_when: ``FIRST_COMPLETED``, ``FIRST_EXCEPTION`` or ``ALL_COMPLETED``.

    Returns:
        ``DoneAndNotDoneFutures(done, not_done)``; failed futures count as done.
    """
    fs = set(fs)
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
        raise ValueError(f"invalid return_when: {return_when!r}")
    need = 1 if return_when == FIRST_COMPLETED else len(fs)
    if fs:
        _worker.current().wait_many(list(fs), need, return_when == FIRST_EXCEPTION, timeout)
    done = {f for f in fs if f.done()}
    return DoneAndNotDoneFutures(done, fs - done)


def _map_reduce_chunk(map_func: Callable, reduce_func: Callable, chunk: list, star: bool):
    return _reduce(reduce_func, _calls(map_func, chunk, star))


_map_reduce_chunk.maps_first_argument = True


def _reduce(func: Callable, values: Iterable):
    it = iter(values)
    acc = next(it)
    for value in it:
        acc = func(acc, value)
    return acc


def mapReduce(mapFunc: Callable, reductionFunc: Callable, *iterables: Iterable,  # noqa: N802,N803
              **kwargs: Any) -> Any:
    """Map in parallel, then reduce the mapped values in a parallel tree.

    ``reductionFunc`` must be associative: values are combined in item order, but
    grouped differently from a left fold. Each chunk reduces its own items where it runs;
    the chunks' partial results are then combined pairwise, in parallel.

    Returns:
        The reduction of ``mapFunc(*items)`` over all items; one item gives its mapped
        value.

    Raises:
        TypeError: if the iterables are empty (as ``functools.reduce`` does).
    """
    _warn_unknown("mapReduce", kwargs)
    futs = _submit_chunks(_map_reduce_chunk, (mapFunc, reductionFunc), iterables, None)
    if not futs:
        raise TypeError("mapReduce() of empty iterable with no initial value")
    while len(futs) > 1:
        pairs = itertools.zip_longest(futs[0::2], futs[1::2])
        futs = [submit(reductionFunc, a.result(), b.result()) if b is not None else a
                for a, b in pairs]
    return futs[0].result()


def _scan_chunk(map_func: Callable, reduce_func: Callable, chunk: list, star: bool) -> list:
    return list(itertools.accumulate(_calls(map_func, chunk, star), reduce_func))


_scan_chunk.maps_first_argument = True


def _offset_scan(reduce_func: Callable, offset, values: list) -> list:
    return [reduce_func(offset, v) for v in values]


def mapScan(mapFunc: Callable, reductionFunc: Callable, *iterables: Iterable,  # noqa: N802,N803
            **kwargs: Any) -> list:
    """Map in parallel and return the running reduction (a parallel prefix scan).

    The result equals ``list(itertools.accumulate(map(mapFunc, *iterables),
    reductionFunc))``; ``reductionFunc`` must be associative.
    """
    _warn_unknown("mapScan", kwargs)
    futs = _submit_chunks(_scan_chunk, (mapFunc, reductionFunc), iterables, None)
    scans = [f.result() for f in futs]
    out = list(scans[0]) if scans else []
    fixes = []
    offset = out[-1] if out else None
    for scan in scans[1:]:
        fixes.append(submit(_offset_scan, reductionFunc, offset, scan))
        offset = reductionFunc(offset, scan[-1])
    for fix in fixes:
        out.extend(fix.result())
    return out


def shutdown(wait: bool = True) -> None:
    """Wait (if ``wait``) for every future this worker submitted; then refuse new ones.

    After ``shutdown``, :func:`submit` and :func:`map` raise RuntimeError. The job itself
    ends when the program does.
    """
    rt = _worker.current()
    if wait:
        futs = [*rt.outbox.values(), *rt.pending.values()]
        if futs:
            rt.wait_many(futs, len(futs), False, None)
    rt.closed = True
