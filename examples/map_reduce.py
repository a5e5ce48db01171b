"""``futures.mapReduce`` and ``futures.mapScan``: parallel map plus a reduction.

``mapReduce(f, op, items)`` maps ``f`` over the items in parallel and combines the
mapped values with the associative ``op`` in a parallel tree; it equals
``functools.reduce(op, map(f, items))``. ``mapScan`` returns the running reduction,
equal to ``list(itertools.accumulate(map(f, items), op))``.

Run it with::

    python -m scoop -n 2 examples/map_reduce.py

Prints ``map_reduce: OK 1000 items``.
"""

import functools
import itertools
import operator

from scoop import futures


def square(x):
    return x * x


def concat(a, b):
    """String concatenation: associative but not commutative, so order matters."""
    return a + b


if __name__ == "__main__":
    items = list(range(1000))

    total = futures.mapReduce(square, operator.add, items)
    assert total == functools.reduce(operator.add, map(square, items)), total

    biggest = futures.mapReduce(square, max, items)
    assert biggest == functools.reduce(max, map(square, items)), biggest

    text = futures.mapReduce(str, concat, items)
    assert text == functools.reduce(concat, map(str, items)), "mapReduce lost the order"

    # Several iterables are zipped, as with map.
    dot = futures.mapReduce(operator.mul, operator.add, items, reversed(items))
    assert dot == sum(a * b for a, b in zip(items, reversed(items))), dot

    running = futures.mapScan(square, operator.add, items)
    assert running == list(itertools.accumulate(map(square, items), operator.add))

    prefixes = futures.mapScan(str, concat, range(50))
    assert prefixes == list(itertools.accumulate(map(str, range(50)), concat))

    print(f"sum of squares = {total}")
    print(f"map_reduce: OK {len(items)} items")
