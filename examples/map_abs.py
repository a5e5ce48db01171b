"""Parallel ``map``: SCOOP's drop-in replacement for the built-in ``map``.

The example of the SCOOP usage page: apply ``abs`` to 1000 random integers, once with
Python's serial ``map`` and once with ``futures.map``, and check both agree (same values,
same order).

Run it with::

    python -m scoop -n 2 examples/map_abs.py

Prints ``map_abs: OK 1000 results``.
"""

import random

from scoop import futures

# Every worker imports this module and draws its own numbers; that does not matter here,
# since the items travel with the tasks and only the root's list is used.
data = [random.randint(-1000, 1000) for _ in range(1000)]


if __name__ == "__main__":
    # Python's standard serial function
    data_serial = list(map(abs, data))

    # SCOOP's parallel function: a generator of the results, in order
    data_parallel = list(futures.map(abs, data))

    assert data_serial == data_parallel, "parallel map differs from the serial map"
    print(f"map_abs: OK {len(data_parallel)} results")
