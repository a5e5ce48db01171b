"""Task time limits (issue 13): ``task_timeout=`` on maps, ``futures.with_options`` for
submit, in real jobs: a task that sleeps forever fails at its limit, its worker is ended
and replaced, and nothing else is lost or run twice (executions counted in files)."""

from __future__ import annotations

import pickle
import re
import warnings

import pytest

from scoop import _limits, futures
from scoop._errors import ScoopError

from conftest import run_scoop, write_program

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftovers")]

LIMIT = 3  # seconds: ample for the items that do not hang, even on a loaded machine

PROGRAM = """
    import os, sys, time
    import scoop
    from scoop import futures, shared

    MARKS, HOW, LIMIT = sys.argv[1], sys.argv[2], float(sys.argv[3])

    def runs(x):
        path = os.path.join(MARKS, str(x))
        return os.path.getsize(path) if os.path.exists(path) else 0

    def work(x, hang=30):
        # one mark per run of x, wherever it runs; item `hang` never ends
        with open(os.path.join(MARKS, str(x)), "a") as f:
            f.write(".")
        if x == hang:
            time.sleep(3600)
        return x * 10

    def call(x, timeout=None, retries=None):
        # the keywords scoop's own options would take: they are the function's here
        return x, timeout, retries, scoop.worker

    def flaky_then_hang(x):
        work(x, hang=-1)
        if runs(x) == 1:
            raise OSError("first attempt fails")
        time.sleep(3600)

    def meet(n):
        # waits (up to 30 s) until n different workers run one of these; a wait with a
        # deadline hands back what this worker had queued (another one of these)
        with open(os.path.join(MARKS, "w%d" % scoop.worker), "w"):
            pass
        deadline = time.monotonic() + 30
        while len([m for m in os.listdir(MARKS) if m.startswith("w")]) < n:
            if time.monotonic() > deadline:
                return "alone"
            shared.getConst("never set", timeout=0.05)
        return scoop.worker

    def report(results, exc=None):
        print("results", results)
        if exc is not None:
            print("raised", type(exc).__name__, isinstance(exc, TimeoutError), exc)

    if __name__ == "__main__":
        out = []
        try:
            if HOW == "map":  # the last item hangs: every other one comes, in order
                for r in futures.map(work, range(12), [11] * 12, task_timeout=LIMIT):
                    out.append(r)
            elif HOW == "as_completed":  # item 30 hangs; the others are quick
                for r in futures.map_as_completed(work, range(40), task_timeout=LIMIT,
                                                  chunksize=1):
                    out.append(r)
            elif HOW == "wait":  # item 30 hangs; every other call completes
                fs = [futures.submit(futures.with_options(work, task_timeout=LIMIT), x)
                      for x in range(40)]
                futures.wait(fs)
                out = [f.result() if f.exception() is None else
                       type(f.exception()).__name__ for f in fs]
            elif HOW == "submit":
                limited = futures.with_options(work, task_timeout=LIMIT)
                out.append(futures.submit(limited, 3, hang=-1).result())
                out.append(futures.submit(limited, 30).result())
            elif HOW == "retries":
                f = futures.with_options(flaky_then_hang, task_timeout=LIMIT, retries=3,
                                         retry_on=OSError)
                out.append(futures.submit(f, 1).result())
            report(out)
        except futures.TaskTimeoutError as exc:
            report(out, exc)
        print("runs", [runs(x) for x in range(40)])
        if HOW in ("wait", "submit"):
            # the worker it ended was replaced: two workers (never the root) meet
            meeting = futures.with_options(meet, task_timeout=60)
            print("met", sorted(f.result() for f in
                                [futures.submit(meeting, 2) for _ in range(2)]))
        if HOW == "submit":
            f = futures.with_options(call, task_timeout=60, retries=2, retry_on=OSError)
            print("kwargs", futures.submit(f, 7, timeout=3, retries=1).result()[:3])
"""


def run(tmp_path, how: str, n: int = 3) -> list[str]:
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = run_scoop("-n", str(n), write_program(tmp_path, PROGRAM), str(marks), how,
                     str(LIMIT), timeout=90)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def runs(lines: list[str]) -> list[int]:
    return eval(next(line for line in lines if line.startswith("runs "))[5:])


def test_a_map_item_that_hangs_fails_at_its_limit_after_every_other_result(tmp_path):
    lines = run(tmp_path, "map")
    assert lines[0] == f"results {[x * 10 for x in range(11)]}"
    assert lines[1] == (f"raised TaskTimeoutError True work() exceeded its task_timeout "
                        f"of {LIMIT:g} s (on item 11 of the map)")
    assert runs(lines)[:12] == [1] * 12  # each ran once, the one that hung included


def test_map_as_completed_raises_at_the_item_that_hung_and_runs_nothing_twice(tmp_path):
    # the failure comes when it completes: the items its worker held, running again
    # elsewhere, may come later (unseen: the map stopped), but none runs twice
    lines = run(tmp_path, "as_completed")
    results = eval(lines[0][len("results "):])
    assert set(results) <= {x * 10 for x in range(40) if x != 30}
    assert len(results) >= 30 - 4 * 3, lines  # at most a few groups per worker held
    assert lines[1] == (f"raised TaskTimeoutError True work() exceeded its task_timeout "
                        f"of {LIMIT:g} s (on item 30 of the map)")
    assert runs(lines)[30] == 1 and max(runs(lines)) == 1


def test_the_rest_completes_exactly_once_and_the_worker_is_replaced(tmp_path):
    lines = run(tmp_path, "wait")
    assert lines[0] == "results " + str(
        [x * 10 if x != 30 else "TaskTimeoutError" for x in range(40)])
    # what the ended worker held (groups queued behind the one that hung, usually) ran
    # again elsewhere, once: no call ran twice, none was lost
    assert runs(lines) == [1] * 40
    # the job kept its workers: the ended one (1 or 2) was replaced by worker 3
    met = eval(lines[2][len("met "):])
    assert len(set(met)) == 2 and 0 not in met and 3 in met, lines


def test_with_options_on_submit_limits_the_call_and_keeps_its_keywords(tmp_path):
    lines = run(tmp_path, "submit")
    assert lines[0] == "results [30]"
    assert lines[1] == (f"raised TaskTimeoutError True work() exceeded its task_timeout "
                        f"of {LIMIT:g} s")
    assert runs(lines)[3] == 1 and runs(lines)[30] == 1
    met = eval(lines[3][len("met "):])
    assert len(set(met)) == 2 and 0 not in met and 3 in met, lines
    assert lines[4] == "kwargs (7, 3, 1)"


def test_an_attempt_that_times_out_is_not_retried(tmp_path):
    lines = run(tmp_path, "retries")
    assert lines[1].startswith("raised TaskTimeoutError True flaky_then_hang()")
    assert runs(lines)[1] == 2  # the OSError was retried; the timed-out attempt was not


ROOT_ONLY = """
    import os, sys, time
    import scoop
    from scoop import futures

    def where(x):
        return scoop.worker

    def hang(x):
        time.sleep(3600)

    def outer(x):
        # a limited function called directly, in a task that runs on the root: ending
        # its worker would end the job, so the limit is not enforced there
        return futures.with_options(slow, task_timeout=0.2)(x)

    def slow(x):
        time.sleep(0.5)
        return x

    if __name__ == "__main__":
        print("direct", list(futures.map(outer, range(3))))
        print("unlimited", sorted(set(futures.map(where, range(8)))))
        print("limited", sorted(set(futures.map(where, range(8), task_timeout=30))))
        try:
            futures.submit(futures.with_options(hang, task_timeout=%s), 1).result()
        except futures.TaskTimeoutError as exc:
            print("raised", exc)
        print("after", sorted(set(futures.map(where, range(4), task_timeout=30))))
"""


def test_the_root_never_runs_a_limited_task_a_worker_is_started_for_it(tmp_path):
    # -n 1: the root alone; a limited task goes to a worker the launcher starts for it
    proc = run_scoop("-n", "1", write_program(tmp_path, ROOT_ONLY % LIMIT), timeout=90)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "direct [0, 1, 2]"
    assert "task_timeout is not enforced" in proc.stderr
    assert lines[1] == "unlimited [0]"
    assert lines[2] == "limited [1]"
    assert lines[3] == f"raised hang() exceeded its task_timeout of {LIMIT:g} s"
    assert lines[4] == "after [2]"  # the one the limit ended was replaced


def test_with_options_checks_its_arguments_and_pickles():
    assert futures.with_options(abs) is abs
    f = futures.with_options(abs, task_timeout=2.5, retries=1, retry_on=OSError)
    g = pickle.loads(pickle.dumps(f))
    assert _limits.limit_of_func(g) == 2.5 and g.retries == 1 and g.on is OSError
    assert _limits.limit_of((g, (), {})) == 2.5 and _limits.limit_of((abs, (), {})) is None
    for bad, exc in [(0, ValueError), (-1, ValueError), ("3", TypeError),
                     (True, TypeError)]:
        with pytest.raises(exc):
            futures.with_options(abs, task_timeout=bad)
    with pytest.raises(ValueError):
        futures.map(abs, [1], task_timeout=0)
    assert issubclass(futures.TaskTimeoutError, TimeoutError)
    assert issubclass(futures.TaskTimeoutError, ScoopError)


def test_outside_a_job_the_limit_is_not_enforced_and_says_so(monkeypatch):
    monkeypatch.setattr(_limits, "_warned", False)  # once per process
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        f = futures.with_options(divmod, task_timeout=1)
        assert f(7, 2) == (3, 1)
    assert any("task_timeout is not enforced outside a job, nor on a call made directly"
               in str(w.message)
               for w in seen)


CHECKPOINT = """
    import os, sys, time
    from scoop import futures

    def item(x):
        if x == 4 and not os.path.exists(sys.argv[2]):
            time.sleep(3600)
        with open(os.path.join(sys.argv[1], str(x)), "a") as f:
            f.write(".")
        return x * 10

    if __name__ == "__main__":
        try:
            print(list(futures.map(item, range(8), task_timeout=%s, chunksize=1,
                                   checkpoint=sys.argv[3])))
        except futures.TaskTimeoutError as exc:
            print("raised")
"""


def test_a_timed_out_item_is_not_recorded_by_a_checkpoint(tmp_path):
    marks, fixed, db = tmp_path / "marks", tmp_path / "fixed", tmp_path / "run.db"
    marks.mkdir()
    prog = write_program(tmp_path, CHECKPOINT % LIMIT)
    first = run_scoop("-n", "3", prog, str(marks), str(fixed), str(db), timeout=90)
    assert first.stdout.splitlines() == ["raised"], first.stderr
    fixed.touch()  # item 4 no longer hangs: the rerun runs it (and what never ran)
    second = run_scoop("-n", "3", prog, str(marks), str(fixed), str(db), timeout=90)
    assert second.stdout.splitlines() == [str([x * 10 for x in range(8)])], second.stderr
    assert (marks / "4").stat().st_size == 1
    assert all((marks / str(x)).stat().st_size == 1 for x in range(8))  # none ran twice


def test_executor_submit_with_options_times_out_and_the_pool_goes_on(tmp_path):
    import scoop

    with scoop.Executor(2) as pool:
        hung = pool.submit(futures.with_options(_hang, task_timeout=LIMIT), 1)
        with pytest.raises(futures.TaskTimeoutError, match=r"_hang\(\) exceeded its "
                           r"task_timeout of 3 s"):
            hung.result(timeout=60)
        limited = futures.with_options(divmod, task_timeout=60)
        assert [pool.submit(limited, x, 3).result(timeout=60) for x in range(4)] == [
            divmod(x, 3) for x in range(4)]


@pytest.mark.parametrize("initializer", [None, len])
def test_executor_map_with_a_task_timeout_fails_the_hung_item_only(initializer):
    import scoop

    kw = {} if initializer is None else {"initializer": initializer, "initargs": ((),)}
    with scoop.Executor(2, **kw) as pool:
        results = pool.map(_hang_on_3, range(6), task_timeout=LIMIT)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(futures.TaskTimeoutError, match=r"_hang_on_3\(\) exceeded its "
                           r"task_timeout of 3 s"):
            next(results)
        assert list(pool.map(abs, range(-3, 3), task_timeout=60)) == [3, 2, 1, 0, 1, 2]


def _hang_on_3(x):
    if x == 3:
        _hang(x)
    return x


def _hang(x):
    import time

    time.sleep(3600)


HELD = """
    import os, sys, time
    from scoop import futures

    MARKS, LIMIT = sys.argv[1], float(sys.argv[2])

    def work(x):
        with open(os.path.join(MARKS, str(x)), "a") as f:
            f.write(".")
        if x == 100:
            time.sleep(3600)
        return x

    def child(seconds):
        time.sleep(seconds)
        return seconds

    def parent(seconds):
        # parked on its child, its worker runs other tasks; its own clock runs on
        return futures.submit(child, seconds).result()

    def outcome(f):
        return f.result() if f.exception() is None else type(f.exception()).__name__

    if __name__ == "__main__":
        # with -n 2 worker 1 alone runs limited tasks; warmed up, it takes several at a
        # time: those behind the one that hangs are held there, never started
        list(futures.map(abs, range(200), task_timeout=60, chunksize=1))
        fs = [futures.submit(futures.with_options(work, task_timeout=LIMIT), x)
              for x in range(100, 106)]
        futures.wait(fs)
        print([outcome(f) for f in fs])
        print([os.path.getsize(os.path.join(MARKS, str(x))) for x in range(100, 106)])
        waits = futures.submit(futures.with_options(parent, task_timeout=LIMIT), LIMIT + 3)
        print(outcome(waits))
"""


def test_the_groups_held_behind_the_task_that_hung_run_once_elsewhere(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = run_scoop("-n", "2", write_program(tmp_path, HELD), str(marks), str(LIMIT),
                     timeout=90)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(["TaskTimeoutError", 101, 102, 103, 104, 105])
    assert lines[1] == str([1] * 6)  # none lost, none run twice
    held = re.search(r"worker 1 .* is gone \(ended: work\(\) exceeded its task_timeout of "
                     r"3 s\); (\d+) task group\(s\) it held will run again", proc.stderr)
    assert held and int(held.group(1)) >= 1, proc.stderr
    # a task parked on its children keeps its clock running
    assert lines[2] == "TaskTimeoutError"
