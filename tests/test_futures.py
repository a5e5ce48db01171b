"""The futures API against a real job: this process is the root, one worker process more."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import warnings

import cloudpickle
import pytest

import scoop
from scoop import futures

# Pool workers cannot import test modules: this module's functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("pool")]


def square(x):
    return x * x


def add(a, b):
    return a + b


def pid_of(_=None):
    time.sleep(0.002)
    return os.getpid()


def fail_at(x, bad=3):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def tree(depth):
    if depth == 0:
        return 1
    left = futures.submit(tree, depth - 1)
    right = futures.submit(tree, depth - 1)
    return left.result() + right.result()


def busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return os.getpid()


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


class Scaler:
    def __init__(self, k):
        self.k = k

    def scale(self, x):
        return self.k * x


# -- map ----------------------------------------------------------------------------------
def test_map_in_order_like_builtin():
    data = list(range(-500, 500))
    assert list(futures.map(abs, data)) == list(map(abs, data))


def _started_at(tag):
    return tag, time.time()


def test_map_returns_generator_and_work_starts_before_iteration(pool):
    gen = futures.map(_started_at, ["a", "b"])
    assert iter(gen) is gen
    time.sleep(1.0)  # the other worker runs its call meanwhile
    iterated = time.time()
    out = list(gen)
    assert [tag for tag, _ in out] == ["a", "b"]
    assert min(t for _, t in out) < iterated, "no call started before the iteration"


def test_map_zip_semantics_and_generators():
    gen = (i for i in range(10))
    assert list(futures.map(add, gen, [100, 200, 300])) == [100, 201, 302]
    assert list(futures.map(square, [])) == []


def test_map_runs_on_other_workers(pool):
    pids = set(futures.map(pid_of, range(200)))
    worker_pids = {p.pid for p in pool.procs.values()}
    assert pids & worker_pids, (pids, worker_pids)


def test_map_exception_raised_when_iteration_reaches_it():
    it = futures.map(fail_at, range(10), chunksize=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3") as info:
        next(it)
    assert isinstance(info.value.__cause__, futures.RemoteTraceback)
    assert "fail_at" in str(info.value.__cause__)


def test_a_workers_traceback_gets_the_source_lines_only_the_caller_has():
    """A function compiled from source held only in the caller's linecache (as IPython
    does with notebook cells) fails on another worker: the traceback shows its line."""
    import linecache

    name = "<scoop-test-cell-1>"
    source = ("import scoop\n"
              "def boom(x):\n"
              "    if scoop.worker != 0:\n"
              "        return {}['missing item ' + str(x)]\n"
              "    return x\n")
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    try:
        namespace: dict = {}
        exec(compile(source, name, "exec"), namespace)
        with pytest.raises(KeyError, match="missing item") as info:
            list(futures.map(namespace["boom"], range(200), chunksize=1))
    finally:
        del linecache.cache[name]
    text = str(info.value.__cause__)
    assert "Traceback from worker 1" in text
    assert f'File "{name}", line 4, in boom' in text
    assert "return {}['missing item ' + str(x)]" in text, text


def test_map_large_input_batched_and_ordered():
    n = 100_000
    assert list(futures.map(square, range(n))) == [x * x for x in range(n)]


def test_map_timeout():
    with pytest.raises(futures.TimeoutError):
        list(futures.map(sleep_then, [1.0, 1.0], [1, 2], timeout=0.2))


def test_map_ignores_unknown_keywords_with_warning():
    with pytest.warns(RuntimeWarning, match="ignores unknown keyword arguments: foo"):
        assert list(futures.map(square, [1, 2], foo=3)) == [1, 4]


def test_map_bad_chunksize():
    with pytest.raises(ValueError):
        futures.map(square, [1], chunksize=0)


def test_map_as_completed_yields_every_result():
    out = list(futures.map_as_completed(sleep_then, [0.2, 0.0, 0.1], ["slow", "fast", "mid"],
                                        chunksize=1))
    # Completion order is not asserted: the root runs tasks too, and results that reach
    # it while it runs one are seen after that one.
    assert sorted(out) == ["fast", "mid", "slow"]


# -- submit and Future ---------------------------------------------------------------------
def test_submit_result_and_kwargs():
    assert futures.submit(add, 2, b=3).result() == 5


def test_future_states():
    fut = futures.submit(sleep_then, 0.3, "x")
    assert not fut.done() and not fut.cancelled()
    futures.wait([fut], timeout=0)  # ships it, runs nothing
    assert fut.running()
    assert fut.result(timeout=5) == "x"
    assert fut.done() and not fut.running()
    assert fut.exception() is None


def test_result_timeout():
    fut = futures.submit(sleep_then, 1.0, 1)
    with pytest.raises(futures.TimeoutError):
        fut.result(timeout=0.1)
    with pytest.raises(futures.TimeoutError):
        fut.exception(timeout=0.05)
    assert fut.result() == 1


def test_exception_keeps_type_and_remote_traceback():
    fut = futures.submit(fail_at, 3)
    futures.wait([fut])  # shipped: may run on the other worker
    exc = fut.exception()
    assert isinstance(exc, ValueError)
    with pytest.raises(ValueError, match="bad item 3"):
        fut.result()


def test_remote_exception_names_worker():
    futs = [futures.submit(fail_at, 3) for _ in range(20)]
    futures.wait(futs)
    causes = [f.exception().__cause__ for f in futs]
    assert all(isinstance(c, futures.RemoteTraceback) for c in causes)
    assert all("in fail_at" in str(c) and " on " in str(c) for c in causes)
    assert any("Traceback from worker 1 " in str(c) for c in causes), "none ran remotely"


def test_cancel_pending_future():
    fut = futures.submit(square, 4)
    assert fut.cancel()
    assert fut.cancelled() and fut.done()
    with pytest.raises(futures.CancelledError):
        fut.result()
    with pytest.raises(futures.CancelledError):
        fut.exception()


def test_cannot_cancel_shipped_future():
    fut = futures.submit(sleep_then, 0.2, 1)
    futures.wait([fut], timeout=0)
    assert not fut.cancel()
    assert fut.result() == 1


def test_done_callback_runs_once_with_result():
    seen = []
    fut = futures.submit(square, 7)
    fut.add_done_callback(lambda f: seen.append(f.result()))
    assert fut.result() == 49
    assert seen == [49]
    fut.add_done_callback(lambda f: seen.append("late"))  # already done: runs now
    assert seen == [49, "late"]


def test_done_callback_exception_is_logged(caplog):
    fut = futures.submit(square, 2)

    def bad(_):
        raise RuntimeError("callback boom")

    fut.add_done_callback(bad)
    with caplog.at_level("ERROR", logger="scoop"):
        assert fut.result() == 4
    assert "callback boom" in caplog.text


def test_a_done_callback_may_wait_on_other_futures():
    seen = []
    futs = [futures.submit(sleep_then, 0.05, i) for i in range(4)]
    for f in futs:  # added before they complete: the hub runs them, each may park
        f.add_done_callback(lambda f: seen.append(futures.submit(square, f.result()).result()))
    futures.wait(futs)
    deadline = time.monotonic() + 10
    while len(seen) < 4 and time.monotonic() < deadline:
        futures.wait([futures.submit(square, 0)], timeout=0.1)  # the hub turns meanwhile
    assert sorted(seen) == [0, 1, 4, 9]


def test_done_callback_on_remote_future():
    seen = []
    futs = [futures.submit(sleep_then, 0.01, i) for i in range(20)]
    for f in futs:
        f.add_done_callback(lambda f: seen.append(f.result()))
    futures.wait(futs)
    assert sorted(seen) == list(range(20))


# -- wait and as_completed -----------------------------------------------------------------
def test_wait_all_completed_includes_failures():
    futs = [futures.submit(fail_at, i) for i in range(6)]
    done, not_done = futures.wait(futs)
    assert done == set(futs) and not not_done
    assert sum(f.exception() is not None for f in futs) == 1


def test_wait_first_completed():
    slow = futures.submit(sleep_then, 1.0, "slow")
    fast = futures.submit(sleep_then, 0.0, "fast")
    done, not_done = futures.wait([slow, fast], return_when=futures.FIRST_COMPLETED)
    # Which one finishes first depends on where each runs (this worker runs tasks too).
    assert done and done | not_done == {slow, fast} and not done & not_done
    assert all(f.done() for f in done) and all(not f.done() for f in not_done)
    assert {f.result() for f in done} <= {"slow", "fast"}
    slow.result()


def test_wait_first_exception():
    futs = [futures.submit(sleep_then, 1.5, 1), futures.submit(fail_at, 3)]
    done, not_done = futures.wait(futs, return_when=futures.FIRST_EXCEPTION)
    assert futs[1] in done
    futs[0].result()


def test_wait_timeout_returns_not_done():
    fut = futures.submit(sleep_then, 1.0, 1)
    done, not_done = futures.wait([fut], timeout=0.1)
    assert not done and not_done == {fut}
    fut.result()


def test_wait_rejects_bad_return_when():
    with pytest.raises(ValueError):
        futures.wait([], return_when="SOMETIMES")


def test_as_completed_order_and_failures():
    futs = [futures.submit(sleep_then, d, d) for d in (0.3, 0.0, 0.15)]
    futs.append(futures.submit(fail_at, 3))
    got = list(futures.as_completed(futs))
    assert sorted(got, key=futs.index) == futs  # each future exactly once


def test_as_completed_timeout():
    fut = futures.submit(sleep_then, 1.0, 1)
    with pytest.raises(futures.TimeoutError):
        for _ in futures.as_completed([fut], timeout=0.1):
            pass
    fut.result()


# -- mapReduce and mapScan -----------------------------------------------------------------
def test_map_reduce():
    assert futures.mapReduce(square, add, range(1000)) == sum(x * x for x in range(1000))
    assert futures.mapReduce(square, add, (x for x in [5])) == 25
    with pytest.raises(TypeError):
        futures.mapReduce(square, add, [])


def test_map_reduce_keeps_order_for_associative_ops():
    words = [str(i) for i in range(300)]
    assert futures.mapReduce(str.upper, add, words) == "".join(words)


def test_map_scan():
    import itertools

    data = list(range(1, 500))
    assert futures.mapScan(square, add, data) == list(
        itertools.accumulate(map(square, data), add))
    assert futures.mapScan(square, add, []) == []
    assert futures.mapScan(str, add, ["a"]) == ["a"]


# -- nesting -------------------------------------------------------------------------------
def test_nested_tree_depth_12():
    assert futures.submit(tree, 12).result() == 4096


def test_nested_map_inside_task():
    def outer(n):
        return sum(futures.map(square, range(n)))

    assert list(futures.map(outer, [10, 20])) == [285, 2470]


# -- what can travel -----------------------------------------------------------------------
def test_lambdas_closures_partials_and_methods():
    k = 3
    assert futures.submit(lambda x: x + k, 1).result() == 4
    assert list(futures.map(functools.partial(add, 10), [1, 2])) == [11, 12]
    assert list(futures.map(Scaler(5).scale, [1, 2])) == [5, 10]
    assert sorted(futures.map(lambda x: (x, k), [1, 2])) == [(1, 3), (2, 3)]


def test_large_numpy_argument_round_trip():
    np = pytest.importorskip("numpy")
    arr = np.arange(2_000_000, dtype=np.float64)
    futs = [futures.submit(np.sum, arr) for _ in range(4)]
    futures.wait(futs)
    assert all(f.result() == arr.sum() for f in futs)


def test_unpicklable_argument_fails_that_future_only():
    lock = threading.Lock()
    bad = futures.submit(square, lock)
    good = futures.submit(square, 6)
    futures.wait([bad, good], timeout=30)  # a timed wait ships everything: both travel
    assert good.result() == 36
    with pytest.raises(futures.SerializationError, match=r"square.*argument 0.*lock"):
        bad.result()


def test_unpicklable_result_reported():
    def make_lock(_):
        return threading.Lock()

    futs = [futures.submit(make_lock, i) for i in range(10)]
    futures.wait(futs)
    errors = [f.exception() for f in futs if f.exception() is not None]
    assert errors, "expected the remotely run calls to fail"
    assert all(isinstance(e, futures.SerializationError) for e in errors)
    assert "make_lock() returned a result that cannot be pickled" in str(errors[0])
    assert "result is a _thread.lock" in str(errors[0])


def _lock_deep_inside(i):
    return {"i": i, "parts": [1, (2, Holder(threading.Lock()))]}


class Holder:
    def __init__(self, thing):
        self.thing = thing


def test_unpicklable_result_of_a_map_names_the_function_and_the_part():
    errors = []
    for _ in range(20):  # until a chunk runs on the other worker (nearly always at once)
        try:
            list(futures.map(_lock_deep_inside, range(400), chunksize=1))
        except futures.SerializationError as exc:
            errors.append(str(exc))
            break
    assert errors, "expected a chunk run on the other worker to fail"
    assert "_lock_deep_inside() returned a result that cannot be pickled" in errors[0]
    assert "result['parts'][1][1].thing is a _thread.lock" in errors[0]


# -- job attributes and shared constants ---------------------------------------------------
def test_job_attributes(pool):
    assert scoop.IS_RUNNING and scoop.IS_ORIGIN
    assert scoop.worker == 0
    assert scoop.SIZE == 2


def test_shared_constants():
    from scoop import shared

    shared.setConst(test_table={"a": 1}, test_fn=lambda x: x * 100)

    def use(x):
        return shared.getConst("test_fn", timeout=5)(x) + shared.getConst("test_table")["a"]

    assert list(futures.map(use, range(30))) == [x * 100 + 1 for x in range(30)]
    with pytest.raises(TypeError, match="already defined"):
        shared.setConst(test_table=2)
    assert shared.getConst("nope", timeout=0.05) is None


def test_serial_fallback_warns_once_and_works(tmp_path):
    import subprocess

    prog = tmp_path / "serial.py"
    prog.write_text(
        "from scoop import futures\n"
        "def sq(x):\n    return x * x\n"
        "if __name__ == '__main__':\n"
        "    print(list(futures.map(sq, range(5))), futures.submit(sq, 3).result())\n")
    with warnings.catch_warnings():
        out = subprocess.run([sys.executable, str(prog)], capture_output=True, text=True,
                             timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 1, 4, 9, 16] 9"
    assert out.stderr.count("python -m scoop") == 1
