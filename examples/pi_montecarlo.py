"""Estimate pi by Monte Carlo, one batch of random points per task.

Each task draws ``BATCH`` points in the unit square with its own ``random.Random(seed)``
and counts those inside the quarter circle; ``futures.map`` runs the batches in
parallel. Seeding per batch makes the result reproducible whatever worker runs which
batch, so it is checked against the same computation done serially.

Run it with::

    python -m scoop -n 2 examples/pi_montecarlo.py

Prints ``pi_montecarlo: OK 64 batches``.
"""

import random

from scoop import futures

BATCHES = 64
BATCH = 20_000


def hits(seed):
    """Number of ``BATCH`` random points of the unit square inside the unit circle."""
    rng = random.Random(seed)
    count = 0
    for _ in range(BATCH):
        x, y = rng.random(), rng.random()
        if x * x + y * y <= 1.0:
            count += 1
    return count


if __name__ == "__main__":
    seeds = range(BATCHES)
    parallel = list(futures.map(hits, seeds))
    assert parallel == [hits(s) for s in seeds], "parallel batches differ from serial ones"
    pi = 4.0 * sum(parallel) / (BATCHES * BATCH)
    assert abs(pi - 3.14159) < 0.05, f"pi estimate too far off: {pi}"
    print(f"pi ~= {pi:.5f}")
    print(f"pi_montecarlo: OK {BATCHES} batches")
