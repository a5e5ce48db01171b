"""Finer control with ``submit``: done-callbacks, ``as_completed`` and ``wait``.

* ``Future.add_done_callback(fn)`` calls ``fn(future)`` in the submitting process once
  the future is done (at once if it already is).
* ``futures.as_completed(fs)`` yields the futures as they finish, in completion order.
* ``futures.wait(fs, return_when=FIRST_COMPLETED)`` returns as soon as one is done, as
  a ``(done, not_done)`` pair of sets.

Run it with::

    python -m scoop -n 2 examples/callbacks.py

Prints ``callbacks: OK 20 callbacks, 20 as_completed, first of 2 completed``.
"""

import time

from scoop import futures


def slow_square(x, delay=0.0):
    time.sleep(delay)
    return x * x


if __name__ == "__main__":
    n = 20

    # Done-callbacks run in this (the submitting) process.
    seen = {}

    def record(fut):
        seen[fut] = fut.result()

    fs = [futures.submit(slow_square, i) for i in range(n)]
    for f in fs:
        f.add_done_callback(record)
    assert [f.result() for f in fs] == [i * i for i in range(n)]
    assert len(seen) == n and all(seen[f] == f.result() for f in fs), seen
    late = []
    fs[0].add_done_callback(late.append)  # already done: called at once
    assert late == [fs[0]]

    # as_completed: every future comes out exactly once, whatever the order.
    fs = [futures.submit(slow_square, i, 0.001 * (i % 5)) for i in range(n)]
    completed = list(futures.as_completed(fs))
    assert len(completed) == n and set(completed) == set(fs)
    assert all(f.done() for f in completed)
    assert sorted(f.result() for f in completed) == sorted(i * i for i in range(n))

    # wait(FIRST_COMPLETED): returns once the quick one is done, the slow one still runs.
    quick = futures.submit(slow_square, 3)
    slow = futures.submit(slow_square, 4, 1.0)
    done, not_done = futures.wait([quick, slow], return_when=futures.FIRST_COMPLETED)
    assert quick in done and len(done) >= 1 and done | not_done == {quick, slow}
    assert quick.result() == 9
    done, not_done = futures.wait([quick, slow])  # ALL_COMPLETED (the default)
    assert done == {quick, slow} and not not_done and slow.result() == 16

    print(f"callbacks: OK {len(seen)} callbacks, {len(completed)} as_completed, "
          f"first of 2 completed")
