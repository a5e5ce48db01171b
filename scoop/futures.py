"""Parallel map, submit and friends: SCOOP's public futures API (PEP 3148 shapes).

Run the program with ``python -m scoop program.py`` and these calls spread over the job's
workers; run it with plain ``python`` and they run one at a time in-process (with one
warning), so the same program works both ways.

Deliberate differences from the original SCOOP, each a fix:

* ``map`` batches small items into chunks by itself (results still come in order, as a
  lazy iterator), reads its input as the results are consumed, with a bounded amount in
  flight (see :mod:`scoop._mapping`), and accepts the ``timeout``, ``chunksize`` and
  ``buffersize`` of concurrent.futures. Unknown keyword arguments are ignored with a
  warning instead of being passed on.
* A task's exception keeps its type and carries the worker-side traceback as its
  ``__cause__``; ``wait`` and ``as_completed`` return failed futures instead of raising.
* ``mapReduce`` of one element gives that element's mapped value and of none raises
  TypeError (like ``functools.reduce``); ``mapScan`` returns the correct running reduction.
* Functions, lambdas and closures defined anywhere in the program can be submitted.
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
)
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _chunks, _limits, _mapping, _progress, _serialize, _worker
from ._errors import (
    BrokenJobError,
    CancelledError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskTimeoutError,
    TimeoutError,
    WorkerLostError,
)
from ._future import FINISHED, Future
from ._limits import with_options
from ._retry import retrying

if TYPE_CHECKING:
    from ._executor import Executor

__all__ = [
    "map", "map_as_completed", "submit", "wait", "as_completed", "mapReduce", "mapScan",
    "shutdown", "Future", "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION",
    "CancelledError", "TimeoutError", "RemoteError", "RemoteTraceback", "BrokenJobError",
    "SerializationError", "WorkerLostError", "TaskTimeoutError", "DoneAndNotDoneFutures",
    "Executor", "retrying", "with_options",
]

_builtin_map = map


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
    fut = _worker.current().submit(func, args, kwargs)
    if _progress.active is not None:  # --progress: count the call, and its end
        _progress.active.add_total(1)
        fut.add_done_callback(_progress.count_done)
    return fut


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
        stream = _chunks.Stream.of(rt, fine, _limits.limit_of_func(func) is not None)
        if stream is None:
            out.extend(_calls(func, chunk, star))  # keeps the results before a failure
        else:
            stream.run(func, chunk, star, out)
    except Exception as exc:  # noqa: BLE001 - reported at the failing item
        return out, _serialize.wire_exception(exc, rt.where)
    return out, None


# Chunk runners: errors name the mapped function, their first argument, not the runner;
# a time limit on the mapped function is the chunk's.
_serialize.register_runner(_run_chunk, _serialize.Runner(results="chunk"))
_limits.register_chunk_runner(_run_chunk)


def _warn_unknown(name: str, kwargs: dict) -> None:
    if kwargs:
        warnings.warn(f"futures.{name}() ignores unknown keyword arguments: "
                      f"{', '.join(sorted(kwargs))}", RuntimeWarning, stacklevel=3)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def map(func: Callable, *iterables: Iterable, timeout: float | None = None,
        chunksize: int | None = None, buffersize: int | None = None,
        checkpoint: str | os.PathLike | None = None, retries: int = 0,
        retry_on: type[BaseException] | tuple = Exception,
        task_timeout: float | None = None, **kwargs: Any) -> Iterator:
    """Apply ``func`` to every item in parallel; a lazy iterator of the results, in order.

    Like the built-in ``map``: several iterables are zipped (the shortest wins) and any
    iterable works, generators and endless ones included. The input is read as the
    results are consumed, with at most ``buffersize`` items *in flight* (read and not yet
    yielded), so memory stays bounded; the work starts at the call, before the caller
    iterates. Closing the iterator (or dropping it, as ``itertools.islice`` does when
    it stops early) stops the map: the input is read no further and the chunks not
    sent to a worker yet are cancelled (those sent run to their end, unseen).

    A call's exception is raised when iteration reaches it (the results before it are
    yielded first) and the rest is cancelled; so is an exception raised by the input.

    The iterator has a ``len()``, the number of results, when every iterable has one
    (``tqdm(futures.map(f, data))`` shows a total), and a length hint when every one has
    a ``len()`` or a length hint.

    Args:
        func: the function to apply.
        *iterables: the argument iterables.
        timeout: seconds from this call after which a result not yet available raises
            TimeoutError (None: wait forever).
        chunksize: items per task; by default chosen for balance and low overhead:
            guided (big first chunks, small last ones) when the input has a length,
            growing with the speed seen so far when it has none.
        buffersize: the most items in flight (as Python 3.14's ``Executor.map``, but
            counted in items, not tasks; an explicit ``chunksize`` above it is cut down
            to it). None (the default): 4 chunks per worker of the job, and 262,144
            items at most (automatic chunks hold 32,768 at most; of an explicit
            ``chunksize``, up to 1,024 chunks); set it lower for big items.
        checkpoint: a file (sqlite) where every result is recorded as it arrives; run
            the program again and the items finished before (a kill, the wall-time
            limit) come back from it in their places, only the rest runs. A result is
            used again only for the same function (its code, defaults and closure), the
            same call (the n-th map of it in the program) and the same item at the same
            place; exceptions and results that cannot be pickled are not recorded. A
            kill loses at most the last half second of results. See
            :mod:`scoop._checkpoint` and docs/guarantees.md.
        retries: a call that raises one of ``retry_on`` is tried again, where it ran,
            up to this many times before its exception is delivered (a worker's death
            is retried by the job itself, see ``--max-attempts``). For ``submit``, use
            :func:`with_options` (or :func:`retrying`).
        retry_on: the exception class (or tuple of them) that is retried.
        task_timeout: seconds each item may run on a worker, from its start (each
            attempt, with ``retries``); past them the worker running it is ended (and
            replaced) and the item fails with ``TaskTimeoutError``, naming ``func`` and
            the limit, at its place. Such items never run on the root; each chunk
            reports every result as it comes (a message per item). None: no limit.
            For ``submit``, use :func:`with_options`. See docs/guarantees.md.
        **kwargs: accepted for programs written for old SCOOP versions; ignored with a
            warning.

    Returns:
        An iterator of ``func(*items)``, in the order of the items.

    Raises:
        ValueError: ``chunksize`` or ``buffersize`` below 1, ``task_timeout`` not above 0.
        TypeError: ``buffersize`` is not an integer, ``task_timeout`` not a number.
    """
    _warn_unknown("map", kwargs)
    return _map(with_options(func, task_timeout=task_timeout, retries=retries,
                             retry_on=retry_on), iterables, timeout, chunksize,
                buffersize, ordered=True, checkpoint=checkpoint, key_of=func)


def map_as_completed(func: Callable, *iterables: Iterable, timeout: float | None = None,
                     chunksize: int | None = None, buffersize: int | None = None,
                     checkpoint: str | os.PathLike | None = None, retries: int = 0,
                     retry_on: type[BaseException] | tuple = Exception,
                     task_timeout: float | None = None, **kwargs: Any) -> Iterator:
    """Like :func:`map`, but yield each result as soon as it is available.

    Results come in completion order (within a chunk, in item order); the input is read
    as they are consumed, as in :func:`map`, with the same arguments (results stored by
    a ``checkpoint`` come first). A call's exception
    is raised when its result would have been yielded.
    """
    _warn_unknown("map_as_completed", kwargs)
    return _map(with_options(func, task_timeout=task_timeout, retries=retries,
                             retry_on=retry_on), iterables, timeout, chunksize,
                buffersize, ordered=False, checkpoint=checkpoint, key_of=func)


def _map(func: Callable, iterables: tuple, timeout: float | None, chunksize: int | None,
         buffersize: int | None, ordered: bool, checkpoint=None, key_of=None,
         rt=None) -> Iterator:
    ckpt = None
    if checkpoint is not None:
        # here, not at the top: sqlite3 and the keys cost ~20 ms at every import
        from ._checkpoint import Checkpoint

        ckpt = Checkpoint.open(checkpoint, key_of or func)
    feed = _mapping.Feed(_run_chunk, (func,), iterables, chunksize=chunksize,
                         buffersize=buffersize, timeout=timeout, ordered=ordered,
                         resumable=True, checkpoint=ckpt, rt=rt)
    return _mapping.MapResults.of(feed, ordered, drain=rt is not None)


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
    done = set()
    for f in fs:  # (not f.done() in a comprehension: two calls more per wait)
        if f._state >= FINISHED:
            done.add(f)
    return DoneAndNotDoneFutures(done, fs - done)


def _map_reduce_chunk(map_func: Callable, reduce_func: Callable, chunk: list, star: bool):
    return _reduce(reduce_func, _calls(map_func, chunk, star))


_serialize.register_runner(_map_reduce_chunk, _serialize.Runner())


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
    the chunks' partial results are then combined pairwise, in parallel. The input is
    read as the chunks come back, as in :func:`map`: an input of any size costs the
    memory of a few chunks and of one partial result per chunk.

    Returns:
        The reduction of ``mapFunc(*items)`` over all items; one item gives its mapped
        value.

    Raises:
        TypeError: if the iterables are empty (as ``functools.reduce`` does).
    """
    _warn_unknown("mapReduce", kwargs)
    feed = _mapping.Feed(_map_reduce_chunk, (mapFunc, reductionFunc), iterables)
    level = list(feed.ordered())
    if not level:
        raise TypeError("mapReduce() of empty iterable with no initial value")
    while len(level) > 1:
        pairs = [submit(reductionFunc, a, b) for a, b in zip(level[0::2], level[1::2])]
        level = [f.result() for f in pairs] + level[2 * len(pairs):]  # (an odd one last)
    return level[0]


def _scan_chunk(map_func: Callable, reduce_func: Callable, chunk: list, star: bool) -> list:
    return list(itertools.accumulate(_calls(map_func, chunk, star), reduce_func))


_serialize.register_runner(_scan_chunk, _serialize.Runner())


def _offset_scan(reduce_func: Callable, offset, values: list) -> list:
    return [reduce_func(offset, v) for v in values]


def mapScan(mapFunc: Callable, reductionFunc: Callable, *iterables: Iterable,  # noqa: N802,N803
            **kwargs: Any) -> list:
    """Map in parallel and return the running reduction (a parallel prefix scan).

    The result equals ``list(itertools.accumulate(map(mapFunc, *iterables),
    reductionFunc))``; ``reductionFunc`` must be associative. The input is read as the
    chunks come back, as in :func:`map`.
    """
    _warn_unknown("mapScan", kwargs)
    scans = list(_mapping.Feed(_scan_chunk, (mapFunc, reductionFunc), iterables).ordered())
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
    _worker.current().stop_accepting(wait)
