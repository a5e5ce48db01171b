"""Exceptions raised by tasks come back to the caller with their own type.

When a task raises, ``Future.result()`` (and iterating ``futures.map``) re-raises the
same exception type in the caller; the traceback of the worker that ran the task is
attached as the exception's ``__cause__`` (a ``scoop.futures.RemoteTraceback``), so the
error message shows where it really happened. ``futures.wait`` does not raise: failed
futures are simply returned among the done ones, and ``Future.exception()`` gives their
exception.

Run it with::

    python -m scoop -n 2 examples/exceptions.py

Prints ``exceptions: OK caught ValueError with remote traceback, 3 of 10 failed``.
"""

from scoop import futures


class CustomError(Exception):
    """A program-defined exception type travels back as itself too."""


def check_positive(x):
    if x < 0:
        raise ValueError(f"negative input: {x}")
    return x


def fail_on_multiples_of_four(x):
    if x % 4 == 0:
        raise CustomError(f"{x} is a multiple of four")
    return x


if __name__ == "__main__":
    # 1. result() re-raises the task's exception, same type, remote traceback attached.
    fut = futures.submit(check_positive, -5)
    try:
        fut.result()
    except ValueError as exc:
        assert "negative input: -5" in str(exc), str(exc)
        cause = exc.__cause__
        assert isinstance(cause, futures.RemoteTraceback), repr(cause)
        assert "check_positive" in str(cause), str(cause)
        print("caught ValueError; worker-side traceback in __cause__:")
        print(str(cause).rstrip().splitlines()[-1])
    else:
        raise AssertionError("the task's ValueError was not raised")

    # 2. map yields the results before the failing item, then raises.
    got = []
    try:
        for value in futures.map(check_positive, [1, 2, -3, 4]):
            got.append(value)
    except ValueError as exc:
        assert isinstance(exc.__cause__, futures.RemoteTraceback)
    else:
        raise AssertionError("map did not raise")
    assert got == [1, 2], got

    # 3. wait() returns failed futures among the done ones instead of raising.
    fs = [futures.submit(fail_on_multiples_of_four, i) for i in range(10)]
    done, not_done = futures.wait(fs)
    assert done == set(fs) and not not_done
    failed = [f for f in fs if f.exception() is not None]
    assert [fs.index(f) for f in failed] == [0, 4, 8]
    for f in failed:
        assert isinstance(f.exception(), CustomError), repr(f.exception())
        assert isinstance(f.exception().__cause__, futures.RemoteTraceback)
    ok = [f.result() for f in fs if f.exception() is None]
    assert ok == [i for i in range(10) if i % 4], ok

    print(f"exceptions: OK caught ValueError with remote traceback, "
          f"{len(failed)} of {len(fs)} failed")
