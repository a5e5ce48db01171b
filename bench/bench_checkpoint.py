"""Micro-benchmark of the checkpoint store (scoop._checkpoint): what recording costs.

A map of a trivial function over N small items (ints in, small tuples out), in this
process, through ``checkpointed_map`` (the flow the parallel map follows: key each item,
look it up, run it, pickle and record its result), against the same loop without a
checkpoint. Lines:

* ``plain``: ``[f(x) for x in items]``, no checkpoint.
* ``record, NORMAL``: first run, the default policy (WAL, synchronous=NORMAL, a commit
  every BATCH_SIZE rows or BATCH_SECONDS).
* ``record, FULL``: the same with synchronous=FULL (an fsync per commit).
* ``commit per row, NORMAL/FULL``: batch_size=1, what batching saves (fewer items).
* ``record_many, chunks of 100``: the default policy, results recorded a chunk at a
  time (as the parallel map gets them), not one by one.
* ``resume, all stored``: a second run that finds every result (look-ups, unpickling).

Usage: ``python bench/bench_checkpoint.py [--items 100000] [--dir DIR]``. The file goes
to DIR (default: a temporary folder; put it on the file system you will use, since
fsync costs differ a lot). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scoop import _checkpoint  # noqa: E402 - after the path is set


def task(x: int) -> tuple:
    return (x, x * x)


def timed_run(items: int, path: str | None, **options) -> tuple[float, float]:
    """Wall and CPU seconds (this process, its threads included) of one map of ``task``
    over ``items`` ints (no checkpoint if no path)."""
    cpu = time.process_time()
    start = time.perf_counter()
    if path is None:
        out = [task(x) for x in range(items)]
    else:
        _checkpoint.new_run()
        out = list(_checkpoint.checkpointed_map(task, range(items), path, **options))
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    assert len(out) == items and out[-1] == task(items - 1)
    return elapsed


def chunked_run(items: int, path: str, chunk: int = 100) -> tuple[float, float]:
    """As :func:`timed_run`, results recorded a chunk at a time with record_many."""
    cpu = time.process_time()
    start = time.perf_counter()
    _checkpoint.new_run()
    out: list = []
    with _checkpoint.Checkpoint.open(path, task) as ckpt:
        pending: list = []
        for entry in _checkpoint.split(ckpt, enumerate(range(items))):
            pending.append(entry)
            if len(pending) == chunk:
                values = [task(e.item) for e in pending]
                ckpt.record_many(pending, values)
                out += values
                pending = []
        values = [task(e.item) for e in pending]
        ckpt.record_many(pending, values)
        out += values
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    assert len(out) == items and out[-1] == task(items - 1)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir)
    n = args.items
    few = max(1, n // 20)  # a commit per row is slow: time fewer rows
    rows = []

    def line(name: str, items: int, times: tuple, base: tuple | None) -> None:
        # Overhead per item over the plain loop: wall time, and CPU time (which other
        # load on the machine disturbs less).
        wall, cpu = times
        extra = "" if base is None else (f"{(wall - base[0]) / items * 1e6:8.1f} us "
                                         f"{(cpu - base[1]) / items * 1e6:8.1f} us")
        rows.append(f"{name:<28} {items:>8} {items / wall:>12,.0f} {extra:>21}")

    try:
        plain = min(timed_run(n, None) for _ in range(3))
        line("plain (no checkpoint)", n, plain, None)
        per_item = (plain[0] / n, plain[1] / n)
        for sync in ("NORMAL", "FULL"):
            _checkpoint.SYNCHRONOUS = sync
            best = (float("inf"), float("inf"))
            for i in range(3):
                path = os.path.join(folder, f"{sync}-{i}.db")
                best = min(best, timed_run(n, path))
            line(f"record, {sync}", n, best, plain)
            if sync == "NORMAL":
                resume = min(timed_run(n, os.path.join(folder, "NORMAL-0.db"))
                             for _ in range(3))
        for sync in ("NORMAL", "FULL"):
            _checkpoint.SYNCHRONOUS = sync
            path = os.path.join(folder, f"row-{sync}.db")
            seconds = timed_run(few, path, batch_size=1)
            line(f"commit per row, {sync}", few, seconds,
                 (per_item[0] * few, per_item[1] * few))
        chunked = min(chunked_run(n, os.path.join(folder, f"chunked-{i}.db"))
                      for i in range(3))
        line("record_many, chunks of 100", n, chunked, plain)
        line("resume, all stored", n, resume, plain)
        size = os.path.getsize(os.path.join(folder, "NORMAL-0.db"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{'':<28} {'items':>8} {'items/s':>12} {'overhead: wall':>14} {'cpu':>6}")
    print("\n".join(rows))
    print(f"file size for {n} results: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
