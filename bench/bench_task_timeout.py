"""What task time limits cost and how late they act (``task_timeout=``, ``with_options``).

Runs one job (``python -m scoop -n WORKERS``) of this file, which prints:

* ``map``: a map of N trivial items, without and with ``task_timeout=30`` (a limited
  chunk reports every result as it comes, and never runs on the root).
* ``submit``: N trivial calls submitted and waited for, plain and through
  ``with_options(f, task_timeout=30)`` (each limited call travels alone).
* ``limit``: how long after its submission a call that hangs fails, for limits of 0.5,
  1 and 2 s (the worker running it is ended and replaced each time).
  and how long after that a call runs on the worker that replaced the one ended.

Usage: ``python bench/bench_task_timeout.py [--items 20000] [--workers 3]``, on an idle
machine (~15 s).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import scoop
from scoop import futures


def quick(x):
    return x + 1


def hang(x):
    time.sleep(3600)


def where(x):
    time.sleep(x)
    return scoop.worker


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def job(items: int, workers: int) -> None:
    list(futures.map(quick, range(1000)))  # warm up
    for limit in (None, 30):
        s = timed(lambda limit=limit: list(futures.map(quick, range(items),
                                                       task_timeout=limit)))
        print(f"map     {items} items, task_timeout={limit}: {s:.2f} s "
              f"({s / items * 1e6:.0f} us/item)")
    n = items // 10
    for name, f in (("plain", quick), ("limited", futures.with_options(quick,
                                                                        task_timeout=30))):
        s = timed(lambda f=f: futures.wait([futures.submit(f, x) for x in range(n)]))
        print(f"submit  {n} {name} calls: {s:.2f} s ({s / n * 1e6:.0f} us/call)")
    placed = futures.with_options(where, task_timeout=30)
    for newest, limit in enumerate((0.5, 1.0, 2.0), workers):  # fresh ids from -n on
        t = time.perf_counter()
        try:
            futures.submit(futures.with_options(hang, task_timeout=limit), 0).result()
        except futures.TaskTimeoutError:
            print(f"limit   {limit} s: failed after {time.perf_counter() - t:.2f} s", end="")
        t = time.perf_counter()
        while time.perf_counter() - t < 10:  # pairs of calls: the newcomer gets one
            pair = [futures.submit(placed, 0.02) for _ in range(2)]
            if newest in [f.result() for f in pair]:
                print(f"; its replacement (worker {newest}) ran a call "
                      f"{time.perf_counter() - t:.2f} s later")
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(args.items, args.workers)
        return
    cmd = [sys.executable, "-m", "scoop", "-q", "-n", str(args.workers),
           os.path.abspath(__file__), "--job", "--items", str(args.items),
           "--workers", str(args.workers)]
    sys.exit(subprocess.run(cmd, stderr=subprocess.DEVNULL, timeout=300).returncode)


if __name__ == "__main__":
    main()
