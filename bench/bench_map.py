"""Line 2 of bench.py alone, in pairs: ``futures.map`` against ``multiprocessing.Pool.map``.

A map of a cheap int function over ``--items`` ints, results consumed, on an in-process
scoop pool (``Launcher(workers)``: this process is the root, which runs tasks too) and a
``multiprocessing.Pool(workers)`` side by side: one scoop map, then one Pool map, again
and again, so that both see the same load (the 2-core development machine is shared).
Prints the median rate of each and the median of the per-pair ratios (scoop / Pool),
with its quartiles. Run from the repository root (~10 s)::

    python bench/bench_map.py                  # 21 pairs of 100,000 items, 2 workers
    python bench/bench_map.py --pairs 41 --items 200000 --workers 4

The pool's other workers join after the ``Launcher`` returns (0.3 s here): the pairs
start once each of them has run a task, or the first maps would run on the root alone.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_tasks as T  # noqa: E402

from scoop import futures  # noqa: E402
from scoop._launch import Launcher  # noqa: E402


def until_joined(workers: int, limit_s: float = 30.0) -> None:
    """Wait until each of the pool's workers has run a task (a timed wait ships it)."""
    seen, start = {0}, time.monotonic()
    while len(seen) < workers and time.monotonic() - start < limit_s:
        f = futures.submit(T.who)
        futures.wait([f], timeout=5)
        if f.done():
            seen.add(f.result())


def pairs(workers: int, items: int, count: int) -> tuple[list[float], list[float]]:
    """``count`` pairs of (scoop map, Pool map) wall times."""
    data = list(range(items))
    pool = multiprocessing.Pool(workers)
    try:
        pool.map(T.inc, range(2000))
        with Launcher(workers, pythonpath=HERE):
            until_joined(workers)
            list(futures.map(T.inc, range(2000)))
            ours, theirs = [], []
            for _ in range(count):
                t0 = time.perf_counter()
                got = list(futures.map(T.inc, data))
                ours.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                want = pool.map(T.inc, data)
                theirs.append(time.perf_counter() - t0)
                assert got == want
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=21)
    ns = ap.parse_args()
    ours, theirs = pairs(ns.workers, ns.items, ns.pairs)
    ratios = sorted(b / a for a, b in zip(ours, theirs))
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    print(f"load average {os.getloadavg()[0]:.2f}; {ns.pairs} pairs, {ns.items:,} items, "
          f"{ns.workers} workers")
    print(f"scoop  futures.map  M items/s: median {ns.items / statistics.median(ours) / 1e6:.2f}")
    print(f"Pool   Pool.map     M items/s: median {ns.items / statistics.median(theirs) / 1e6:.2f}")
    print(f"scoop / Pool, per pair: median {q2:.2f}  (q1 {q1:.2f}, q3 {q3:.2f})")


if __name__ == "__main__":
    main()
