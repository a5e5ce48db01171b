"""Shared constants: send a value once to every worker instead of with every task.

``shared.setConst(name=value)`` broadcasts the value to all workers of the job (current
and later ones); a task reads it with ``shared.getConst(name)``. Values may be any
picklable object, including a lambda or a closure. Constants cannot be redefined.

Run it with::

    python -m scoop -n 2 examples/shared_constants.py

Prints ``shared_constants: OK 200 tasks``.
"""

from scoop import futures, shared


def make_scaler(factor):
    """A closure: it captures ``factor``."""
    def scale(x):
        return factor * x
    return scale


def task(key):
    """Look ``key`` up in the shared table, then apply the shared functions."""
    table = shared.getConst("table")
    offset = shared.getConst("offset")
    scale = shared.getConst("scale")
    return scale(offset(table[key]))


def serial(table, key):
    return 3 * (table[key] + 7)


if __name__ == "__main__":
    table = {f"k{i}": i * i for i in range(200)}
    shared.setConst(table=table, offset=lambda x: x + 7, scale=make_scaler(3))

    try:
        shared.setConst(table={})
    except TypeError:
        pass  # constants are immutable
    else:
        raise AssertionError("redefining a constant should raise TypeError")

    keys = sorted(table)
    results = list(futures.map(task, keys))
    assert results == [serial(table, k) for k in keys], "shared constants gave wrong results"
    print(f"shared_constants: OK {len(results)} tasks")
