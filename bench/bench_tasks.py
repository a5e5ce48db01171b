"""Task functions of bench.py, in an importable module.

They live outside ``bench.py`` so that every pool ships them *by reference*, the same way:
ProcessPoolExecutor and multiprocessing.Pool (fork) resolve them by module name, and so do
the scoop workers (bench.py puts this directory on their PYTHONPATH). Functions defined in
the ``__main__`` of an in-process scoop pool would instead travel by value (cloudpickle),
which would add pickling cost that a ``python -m scoop program.py`` run does not have.
"""

from __future__ import annotations

import time


def noop(*_args):
    """Does nothing: measures pure per-task overhead."""
    return None


def inc(x):
    """A cheap function of an int (the map line)."""
    return x + 1


def who(*_args):
    """The scoop worker id that ran this task (None outside scoop)."""
    import scoop

    return scoop.worker


def spin(n):
    """A CPU-bound busy loop of ``n`` iterations (no sleep); n is calibrated to ~20 ms."""
    x = 0
    for i in range(n):
        x += i
    return x


def spin_cpu(n):
    """``spin(n)``; returns the CPU time it took in this thread (seconds)."""
    t0 = time.thread_time()
    spin(n)
    return time.thread_time() - t0


def nbytes(arr):
    """Receives a large argument, returns a small value."""
    return len(memoryview(arr).cast("B"))


def tree(depth):
    """A node of a full binary tree of futures; returns the number of nodes below it."""
    if depth == 0:
        return 1
    from scoop import futures

    left = futures.submit(tree, depth - 1)
    right = futures.submit(tree, depth - 1)
    return 1 + left.result() + right.result()


def big_result(mb, i):
    """Returns a large value (``mb`` x 10^6 bytes): a numpy array, else a bytearray."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        return bytearray([i % 251]) * (mb * 1_000_000)
    return np.full(mb * 1_000_000, i % 251, dtype=np.uint8)
