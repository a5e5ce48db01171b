"""The first map of a function over a generator vs the later ones (issue 11).

A map of an input without a length cuts chunks by the pace it measures; a later map of
the same function starts at the pace remembered from the one before, the first one from
nothing. This times ``sum(futures.map(f, (i for i in range(N))))`` for a fresh ``f`` (a
new ``functools.partial(abs)``: cheap items, the worst case for a slow start), then again
with the same ``f``, a few times over; and the same for a slow function (1 ms per item),
where the first chunks must stay small.

Run from the repository root (well under a minute on 2 cores)::

    python -m scoop -n 2 bench/bench_first_map.py [--items 100000] [--trials 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

from scoop import futures


def slow(x: int) -> int:
    time.sleep(0.001)
    return x


def timed(func, n: int) -> float:
    t0 = time.perf_counter()
    total = sum(futures.map(func, (i for i in range(n))))
    assert total == sum(range(n))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    timed(functools.partial(abs), 1000)  # warm up the job's workers
    for name, make, n in (("abs", lambda: functools.partial(abs), args.items),
                          ("1 ms", lambda: functools.partial(slow), 2000)):
        first, later = [], []
        for _ in range(args.trials):
            func = make()
            first.append(timed(func, n))
            later += [timed(func, n) for _ in range(2)]
        print(f"{name:>5} x {n}: first map {statistics.median(first) * 1e3:7.1f} ms, "
              f"later maps {statistics.median(later) * 1e3:7.1f} ms "
              f"(medians of {args.trials} and {len(later)})", flush=True)


if __name__ == "__main__":
    main()
