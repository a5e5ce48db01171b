"""scoop.Executor: a pool started from Python, behind the concurrent.futures interface.

CPython's own executor tests run in tests/test_executor_cpython.py; these cover what is
scoop's: where tasks run, the standard futures with asyncio, tracebacks, interrupts,
cleanup, and the module-level API inside ``with``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import cloudpickle
import pytest

import scoop
from scoop import _checkpoint, futures, shared

from conftest import _pool_pids, marked_processes, wait_no_processes, write_program

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture(scope="module")
def ex():
    """One pool of 2 workers for the tests that do not stop it."""
    pool = scoop.Executor(2)
    pids = {p.pid for p in pool._launcher.procs.values()}
    _pool_pids.update(pids)  # alive across tests: not leftovers
    try:
        yield pool
    finally:
        pool.shutdown()
        _pool_pids.difference_update(pids)


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def fail(x):
    if x == 3:
        raise KeyError(f"bad item {x}")  # the failing line
    return x


def test_tasks_run_in_the_workers_and_futures_are_standard(ex):
    fs = [ex.submit(pid_after, 0.2) for _ in range(4)]
    assert all(isinstance(f, cf.Future) for f in fs)
    done, not_done = cf.wait(fs, timeout=30)
    assert not not_done
    pids = {f.result() for f in fs}
    assert os.getpid() not in pids and len(pids) == 2  # both workers, never the caller
    assert list(cf.as_completed(fs)) and ex.size == 2


def test_asyncio_run_in_executor_and_wrap_future(ex):
    async def main():
        loop = asyncio.get_running_loop()
        a = loop.run_in_executor(ex, pow, 2, 10)
        b = asyncio.wrap_future(ex.submit(abs, -7))
        return await asyncio.gather(a, b)

    assert asyncio.run(main()) == [1024, 7]


def test_exception_keeps_its_type_and_the_worker_side_traceback(ex):
    with pytest.raises(KeyError) as info:
        ex.submit(fail, 3).result()
    tb = str(info.value.__cause__)
    assert "Traceback from worker" in tb and f"pid {os.getpid()}" not in tb
    assert 'raise KeyError(f"bad item {x}")  # the failing line' in tb


def test_map_orders_results_and_raises_at_the_failing_item(ex):
    assert list(ex.map(abs, range(-500, 500))) == [abs(x) for x in range(-500, 500)]
    assert list(ex.map(pow, [2, 3], [5, 2], chunksize=1, buffersize=1)) == [32, 9]
    got = []
    with pytest.raises(KeyError):
        for value in ex.map(fail, range(10), chunksize=4):
            got.append(value)
    assert got == [0, 1, 2]
    with pytest.raises(ValueError):
        ex.map(abs, [1], buffersize=0)


class Counted:
    """An input that counts the items read from it (by the caller's thread)."""

    def __init__(self, items) -> None:
        self.items, self.read = iter(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        self.read += 1
        return item


def test_map_reads_its_input_as_results_are_consumed_buffersize_in_items(ex):
    data = Counted(range(300))
    ahead, got = 0, []
    for i, value in enumerate(ex.map(abs, data, buffersize=20)):
        got.append(value)
        ahead = max(ahead, data.read - (i + 1))
    assert got == list(range(300))
    assert ahead <= 20  # items read and not yet yielded
    data = Counted(range(300))
    results = ex.map(abs, data, chunksize=4, buffersize=10)
    assert data.read <= 10  # read at the call: no more than the window
    assert next(results) == 0 and data.read <= 11
    results.close()
    assert list(results) == []  # closed: the rest of its chunk is dropped too


def test_map_of_an_endless_input_returns_what_islice_takes(ex):
    data = Counted(itertools.count())
    assert list(itertools.islice(ex.map(abs, data), 1000)) == list(range(1000))
    assert data.read < 300_000  # the default window, not the endless input
    read = data.read
    time.sleep(0.2)
    assert data.read == read  # dropped by islice: the map stopped reading


def test_first_map_of_a_function_times_one_item_per_worker_first(ex):
    f = functools.partial(abs)  # a function never mapped: its pace is unknown
    data = Counted(range(5000))
    results = ex.map(f, data)
    assert data.read == ex.size  # one item per worker at the call: they time it
    assert sum(results) == sum(range(5000))
    data = Counted(range(5000))
    results = ex.map(f, data)
    assert data.read > 4 * ex.size  # its pace is known: bigger chunks, from the start
    assert sum(results) == sum(range(5000))


def test_map_has_a_len_where_its_input_has_one(ex):
    assert len(ex.map(abs, range(10))) == 10
    assert len(ex.map(pow, [1, 2, 3], range(10))) == 3
    with pytest.raises(TypeError):
        len(ex.map(abs, (x for x in range(3))))


def logged_square(x: int, log: str) -> int:
    with open(log, "a") as f:  # one short append per computation
        f.write(f"{x}\n")
    return x * x


def _computed(log) -> list[int]:
    return sorted(int(x) for x in log.read_text().split()) if log.exists() else []


def test_map_checkpoint_resumes_computing_only_the_missing_items(ex, tmp_path):
    db, log = tmp_path / "run.db", tmp_path / "computed"
    _checkpoint.new_run()
    seen = []
    with scoop.Executor(2) as pool:  # its end waits for the chunks already sent
        results = pool.map(logged_square, range(200), [str(log)] * 200, chunksize=5,
                           buffersize=20, checkpoint=str(db))
        for value in results:
            seen.append(value)
            if len(seen) == 50:
                break
        results.close()  # stopped half way, as a kill or an interrupt would
    first = _computed(log)
    assert set(range(50)) <= set(first) and len(first) < 200
    log.unlink()
    _checkpoint.new_run()  # the program run again
    assert list(ex.map(logged_square, range(200), [str(log)] * 200, checkpoint=str(db))) \
        == [x * x for x in range(200)]
    again = _computed(log)
    assert not set(again) & set(range(50))  # yielded before: recorded before
    assert set(first) | set(again) == set(range(200))
    assert len(again) == len(set(again))  # each at most once


def flaky(x: int, folder: str) -> int:
    """Fails the first time it sees ``x`` (a file marks it seen), then works."""
    mark = os.path.join(folder, str(x))
    if not os.path.exists(mark):
        open(mark, "w").close()
        raise ConnectionError(f"first try of {x}")
    return -x


def test_map_retries_a_failing_call(ex, tmp_path):
    items = range(12)
    assert list(ex.map(flaky, items, [str(tmp_path)] * 12, retries=1,
                       retry_on=ConnectionError)) == [-x for x in items]
    with pytest.raises(ConnectionError, match="first try of 20"):
        list(ex.map(flaky, [20], [str(tmp_path)]))


def test_interrupted_map_cancels_the_rest_and_the_pool_goes_on(ex):
    main = threading.get_ident()
    timer = threading.Timer(0.6, signal.pthread_kill, (main, signal.SIGINT))
    results = ex.map(pid_after, [0.1] * 200, chunksize=1)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        for _ in results:
            pass
    # The rest of the map was cancelled: the pool is free again within a few tasks.
    assert ex.submit(abs, -1).result(timeout=10) == 1
    assert time.monotonic() - t0 < 5


@pytest.fixture
def within():
    """A pool of 2 workers, its `with` block around the test."""
    with scoop.Executor(2) as pool:
        yield pool


def test_module_level_api_inside_with_uses_the_pool(within):
    assert scoop.IS_RUNNING and futures._worker.current() is within._relay
    assert list(futures.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert futures.submit(os.getpid).result() != os.getpid()
    fs = [futures.submit(pid_after, 0.05) for _ in range(4)]
    assert len(futures.wait(fs).done) == 4
    assert len(list(futures.as_completed(fs))) == 4
    assert futures.mapReduce(abs, lambda a, b: a + b, range(-10, 0)) == 55
    got = []
    for delay in (0.2, 0):  # a callback added before and after its future completes
        fut = futures.submit(pid_after, delay)
        fut.add_done_callback(lambda f: got.append(f.result()))
        fut.result()
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(got) == 2 and os.getpid() not in got
    # a standard future's callback runs in the pool's thread, where it may wait on futures
    fut = within.submit(pid_after, 0.2)
    fut.add_done_callback(lambda f: got.append(futures.submit(abs, -7).result()))
    fut.result()
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got[2:] == [7]
    shared.setConst(answer=42)
    assert shared.getConst("answer") == 42
    assert list(futures.map(lambda _: shared.getConst("answer", timeout=5), range(3))) == \
        [42] * 3


def tree(depth: int) -> int:
    """A task that submits and waits on tasks, at any depth (on the workers)."""
    if depth == 0:
        return 1
    left, right = futures.submit(tree, depth - 1), futures.submit(tree, depth - 1)
    return left.result() + right.result()


def test_nested_tasks_from_the_executor_and_the_module_api(within):
    assert within.submit(tree, 5).result(timeout=60) == 32
    assert futures.submit(tree, 4).result() == 16
    assert sum(futures.map(tree, [3, 3])) == 16


def job_globals(_) -> tuple:
    return scoop.SIZE, scoop.IS_RUNNING, scoop.IS_ORIGIN, scoop.worker


def test_scoop_globals_in_the_caller_agree_with_the_workers():
    outside = job_globals(None)
    with scoop.Executor(2) as pool:
        # the caller: the origin, worker 0 (it runs no task), SIZE as the workers see it
        assert job_globals(None) == (2, True, True, 0)
        seen = set(pool.map(job_globals, range(40), chunksize=1))
        assert {size for size, *_ in seen} == {2} == {pool.size}
        assert {wid for *_, wid in seen} <= {1, 2}
        assert all(running and not origin for _, running, origin, _ in seen)
        assert futures.submit(job_globals, None).result()[0] == 2
    # as before the block: (1, False, True, None) in a plain interpreter, the session
    # pool's globals when an earlier test of this process started it
    assert job_globals(None) == outside


def test_with_blocks_nest_and_give_back_what_they_replaced():
    job_globals = ("IS_RUNNING", "IS_ORIGIN", "worker", "SIZE", "HOSTS")
    before = {name: getattr(scoop, name) for name in job_globals}
    with scoop.Executor(1) as outer:
        assert futures._worker.current() is outer._relay and scoop.IS_RUNNING
        with scoop.Executor(1) as inner:
            assert futures._worker.current() is inner._relay
        assert futures._worker.current() is outer._relay
    assert {name: getattr(scoop, name) for name in job_globals} == before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # outside a job: serial
        assert futures._worker.current() is not outer._relay
        assert list(futures.map(abs, [-1])) == [1]
    with pytest.raises(RuntimeError, match="after shutdown"):
        outer.submit(abs, 1)


def test_max_workers_and_hosts_checked():
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        scoop.Executor(0)
    with pytest.raises(ValueError, match="hosts"):
        scoop.Executor(hosts=[])


def test_importing_scoop_futures_starts_nothing():
    code = ("import sys, scoop, scoop.futures; assert 'zmq' not in sys.modules; "
            "assert scoop.futures.Executor is scoop.Executor; assert 'zmq' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def test_interpreter_exit_stops_the_pool_without_shutdown(tmp_path):
    prog = write_program(tmp_path, """
        import os, sys, time
        import scoop
        def slow(x):
            time.sleep(0.5)
            return os.getpid()
        if __name__ == "__main__":
            pool = scoop.Executor(2)
            print(pool.submit(slow, 1).result() != os.getpid(), flush=True)
            pool.submit(slow, 2)  # still running at exit: waited for
            other = scoop.Executor(1)  # never used, never shut down
    """)
    out = subprocess.run([sys.executable, prog], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True" and out.stderr == ""
    assert not wait_no_processes(timeout=10)


def test_killed_caller_leaves_no_process(tmp_path):
    prog = write_program(tmp_path, """
        import time
        import scoop
        if __name__ == "__main__":
            pool = scoop.Executor(2)
            pool.submit(time.sleep, 60)
            print("started", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, prog], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        assert len(marked_processes()) >= 3  # the caller and its two workers
        proc.kill()  # as a notebook kernel killed by its restart
        proc.wait(10)
        assert not wait_no_processes(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


ONEMAX = """
import os, runpy, sys, warnings
import scoop

# DEAP's OneMax (examples/deap/onemax.py: toolbox.register("map", futures.map)), loaded as
# a notebook's cells are: its functions exist in no module the workers could import.
onemax = runpy.run_path(sys.argv[1], run_name="a_notebook")
evaluate = onemax["toolbox"].evaluate
calls_here = []

def counted(individual):
    calls_here.append(1)  # on a worker: its own copy of the list
    return evaluate(individual)

onemax["toolbox"].register("evaluate", counted)

if __name__ == "__main__":
    warnings.simplefilter("ignore", RuntimeWarning)  # serial scoop says it is serial
    hof, log = onemax["main"]()
    serial, serial_calls = (hof[0], hof[0].fitness.values, list(log)), len(calls_here)
    with scoop.Executor(2):
        hof, log = onemax["main"]()
    parallel = (hof[0], hof[0].fitness.values, list(log))
    print(serial == parallel, serial_calls > 0, len(calls_here) == serial_calls)
"""


def test_deap_onemax_through_futures_map_inside_with(tmp_path):
    pytest.importorskip("deap")
    prog = write_program(tmp_path, ONEMAX)
    onemax = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "deap",
                          "onemax.py")
    out = subprocess.run([sys.executable, prog, onemax], capture_output=True, text=True,
                         timeout=80)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"], out.stdout


def set_mark(value: str) -> None:
    os.environ["SCOOP_TEST_INIT"] = value  # the initializer's effect, in the worker


def read_mark(_) -> str | None:
    time.sleep(0.02)
    return os.environ.get("SCOOP_TEST_INIT")


def test_initializer_runs_in_each_worker_before_its_tasks():
    with scoop.Executor(2, mp_context=None, initializer=set_mark, initargs=("set",)) as pool:
        assert set(pool.map(read_mark, range(20), chunksize=1)) == {"set"}
        assert pool.submit(read_mark, 0).result() == "set"
    assert "SCOOP_TEST_INIT" not in os.environ


def test_unpicklable_call_and_result_fail_their_future_only(ex):
    with pytest.raises(futures.SerializationError, match="argument 0"):
        ex.submit(id, threading.Lock()).result()
    with pytest.raises(futures.SerializationError, match="cannot be pickled"):
        ex.submit(threading.Lock).result()
    assert ex.submit(abs, -2).result() == 2


def test_a_killed_worker_does_not_break_the_pool():
    with scoop.Executor(2) as pool:
        fs = [pool.submit(pid_after, 0.3) for _ in range(8)]
        time.sleep(0.5)  # both workers hold tasks
        victim = pool._launcher.procs[1]
        victim.kill()
        pids = {f.result(timeout=60) for f in fs}  # its tasks ran again on the other
        assert pool._launcher.procs[2].pid in pids
        assert pool.submit(abs, -4).result(timeout=30) == 4


def test_interrupted_module_level_map_leaves_the_pool_working(within):
    timer = threading.Timer(0.5, signal.pthread_kill, (threading.get_ident(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        list(futures.map(pid_after, [0.05] * 60, chunksize=1))
    assert futures.submit(abs, -5).result() == 5
    assert list(futures.map(abs, [-1, -2])) == [1, 2]


def test_workers_see_the_callers_sys_path(tmp_path, monkeypatch):
    (tmp_path / "helper_e11.py").write_text("import os\ndef where():\n    return os.getpid()\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # as a notebook's sys.path.append does
    import helper_e11  # travels by reference: the workers import it

    try:
        with scoop.Executor(1) as pool:
            assert pool.submit(helper_e11.where).result() != os.getpid()
    finally:
        sys.modules.pop("helper_e11", None)
