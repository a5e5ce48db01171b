"""Large datasets: keep the data at module level and send tasks only an index.

Everything passed to ``futures.map`` or ``submit`` is pickled and sent with the task.
For large inputs, define the data at module level instead: every worker imports the
program (its ``__main__`` block does not run there), so every worker builds the same
data at start-up and the tasks only need an index into it. This is the "Better" pattern
of SCOOP's usage page. The data must be deterministic (no unseeded randomness), since
each worker builds its own copy.

Run it with::

    python -m scoop -n 2 examples/large_dataset.py

Prints ``large_dataset: OK 9 sums``.
"""

from scoop import futures

data = [[i for i in range(x, x + 1000)] for x in range(0, 8001, 1000)]


def my_sum(index):
    """The worker only receives an index from the network."""
    return sum(data[index])


if __name__ == "__main__":
    results = list(futures.map(my_sum, range(len(data))))
    assert results == [sum(chunk) for chunk in data], results
    print(f"large_dataset: OK {len(results)} sums")
