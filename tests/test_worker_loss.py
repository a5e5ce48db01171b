"""A worker that dies mid-task: its work runs again elsewhere, or fails after a bound."""

from __future__ import annotations

import pytest

from conftest import run_scoop, write_program

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftovers")]


# For the programs below: True for the first caller only, even for two at once.
FIRST = """
        def _first(path):
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                return False"""


def test_task_of_a_dead_worker_runs_again(tmp_path):
    marker = tmp_path / "killed-once"
    prog = write_program(tmp_path, f"""
        import os, scoop, time
        from scoop import futures
        def fragile(x):
            if not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").close()
                os._exit(9)                       # the first worker to run it dies
            return x * 10, scoop.worker
        if __name__ == "__main__":
            # waiting with a timeout, the root leaves the work to the other workers
            print(futures.submit(fragile, 4).result(timeout=60))
    """)
    out = run_scoop("-n", "3", prog)
    assert out.returncode == 0, out.stderr
    value, wid = eval(out.stdout)  # noqa: S307 - our own program's output
    assert value == 40 and wid != 0
    assert "ended early: exit status 9" in out.stderr
    assert "will run again" in out.stderr


def test_task_that_kills_every_worker_fails_after_bounded_attempts(tmp_path):
    prog = write_program(tmp_path, """
        import os
        from scoop import futures
        def poison(_):
            os._exit(1)
        if __name__ == "__main__":
            fut = futures.submit(poison, 0)
            try:
                fut.result(timeout=60)
            except futures.WorkerLostError as exc:
                print("lost:", exc)
    """)
    out = run_scoop("-n", "4", prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("lost: poison(): 3 workers died running this task")
    out = run_scoop("-n", "3", "--max-attempts", "2", prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("lost: poison(): 2 workers died running this task")


def test_healthy_long_task_runs_exactly_once(tmp_path):
    """A task far longer than the heartbeat silence limit is not taken for lost."""
    from scoop import _broker

    runs = tmp_path / "runs"
    prog = write_program(tmp_path, f"""
        import time
        from scoop import futures
        def long_task(seconds):
            with open({str(runs)!r}, "a") as f:
                f.write("run\\n")
            end = time.time() + seconds
            while time.time() < end:      # busy: no chance to answer anything
                pass
            return "done"
        if __name__ == "__main__":
            print(futures.submit(long_task, {_broker.WORKER_SILENCE_S + 2}).result(timeout=60))
    """)
    out = run_scoop("-n", "2", prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    assert runs.read_text().count("run") == 1


def test_nested_parent_on_a_dead_worker_runs_again(tmp_path):
    marker = tmp_path / "killed"
    prog = write_program(tmp_path, f"""
        import os, time, scoop
        from scoop import futures
        def leaf(i):
            time.sleep(0.01)
            return i
{FIRST}
        def parent(n):
            kids = [futures.submit(leaf, i) for i in range(n)]
            total = sum(k.result() for k in kids)
            if scoop.worker != 0 and _first({str(marker)!r}):
                os._exit(9)                 # dies after its children ran
            return total
        if __name__ == "__main__":
            futs = [futures.submit(parent, 20) for _ in range(6)]
            print([f.result(timeout=60) for f in futs])
    """)
    out = run_scoop("-n", "3", prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([190] * 6)
    assert marker.exists(), "no parent ran on another worker"
    assert "ended early: exit status 9" in out.stderr


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_every_other_worker_dies_running_nested_parents(tmp_path, workers):
    """Every worker but the root dies, once each, in a parent task after its children
    ran; the root waits with a timeout (on standby). A sandbox worker runs the lost
    parents again and the root, beside it, is forced the rest: the results are the
    serial ones, long before the timeout (it used to hang until it)."""
    prog = write_program(tmp_path, f"""
        import os, time, scoop
        from scoop import futures
        DIR, OTHERS = {str(tmp_path)!r}, range(1, {workers})
        def leaf(i):
            time.sleep(0.01)
            return i * i
{FIRST}
        def parent(n):
            me = scoop.worker
            if me in OTHERS:  # every other worker holds a parent before any dies
                _first(os.path.join(DIR, f"started-{{me}}"))
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not all(os.path.exists(
                        os.path.join(DIR, f"started-{{w}}")) for w in OTHERS):
                    time.sleep(0.02)
            kids = [futures.submit(leaf, i) for i in range(n)]
            total = sum(k.result() for k in kids)
            if me in OTHERS and _first(os.path.join(DIR, f"died-{{me}}")):
                os._exit(9)                 # dies after its children ran
            return total
        if __name__ == "__main__":
            sizes = range(10, 10 + 3 * {workers})
            futs = [futures.submit(parent, n) for n in sizes]
            got = [f.result(timeout=60) for f in futs]
            print(got == [sum(leaf(i) for i in range(n)) for n in sizes])
    """)
    out = run_scoop("-n", str(workers), "-v", prog, timeout=85)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    assert out.stderr.count("ended early: exit status 9") == workers - 1, out.stderr
    assert sorted(p.name for p in tmp_path.glob("died-*")) == [
        f"died-{w}" for w in range(1, workers)]
    assert "starting sandbox worker" in out.stderr


def test_limited_tasks_beside_a_sandbox_run_on_it(tmp_path):
    """The only other worker died: the root, which never runs a task with a time limit,
    is left with a sandbox worker, which runs them (they used to wait forever)."""
    marker = tmp_path / "killed"
    prog = write_program(tmp_path, f"""
        import os, scoop
        from scoop import futures
        def leaf(i):
            return i
        def parent(n):
            total = sum(k.result() for k in [futures.submit(leaf, i) for i in range(n)])
            if scoop.worker == 1 and not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").close()
                os._exit(9)                 # dies after its children ran
            return total
        def where(x):
            return x * x, scoop.worker
        if __name__ == "__main__":
            print([f.result(timeout=60) for f in [futures.submit(parent, 10) for _ in range(3)]])
            got = list(futures.map(where, range(4), timeout=60, task_timeout=30))
            print([v for v, _ in got], sorted({{w for _, w in got}}))
    """)
    out = run_scoop("-n", "2", "-v", prog, timeout=85)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[45, 45, 45]", "[0, 1, 4, 9] [2]"]
    assert "starting sandbox worker 2" in out.stderr


def test_task_started_before_a_timed_wait_is_not_lost_with_its_worker(tmp_path):
    """A worker that hands back the rest of a group keeps responsibility for the task it
    is running: if it then dies, that task runs again (reproducer from bench/soak.py)."""
    mark = tmp_path / "died-once"
    prog = write_program(tmp_path, f"""
        import os, threading, time
        from scoop import futures
        def child():
            time.sleep(3)
            return 1
        def task(i):
            if i == 0 and not os.path.exists({str(mark)!r}):
                open({str(mark)!r}, "w").close()
                threading.Timer(1.0, os._exit, (9,)).start()   # this worker dies in 1 s
                futures.submit(child).result(timeout=30)         # a timed wait: gives back
            return i
        if __name__ == "__main__":
            fs = [futures.submit(task, i) for i in range(64)]
            done, not_done = futures.wait(fs, timeout=40)
            print("done", len(done), "not done", [i for i in range(64) if fs[i] in not_done])
    """)
    out = run_scoop("-n", "3", prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done 64 not done []"


def test_root_alone_after_every_other_worker_died_finishes_with_timed_waits(tmp_path):
    """The root keeps waiting with a timeout after losing every other worker: it is the
    only worker left, so the broker has it run the work instead of every wait timing
    out forever."""
    prog = write_program(tmp_path, """
        import os, time, scoop
        from scoop import futures
        def die(_):
            if scoop.worker != 0:
                os._exit(3)
        def work(i):
            time.sleep(0.01)
            return i * i, scoop.worker
        if __name__ == "__main__":
            futures.wait([futures.submit(die, i) for i in range(2)], timeout=30)
            fs = [futures.submit(work, i) for i in range(40)]
            rounds = 0
            while not all(f.done() for f in fs):
                futures.wait(fs, timeout=0.2)
                rounds += 1
                assert rounds < 500, "no progress"
            results = [f.result() for f in fs]
            assert [v for v, _ in results] == [i * i for i in range(40)]
            print(sorted({w for _, w in results}))
    """)
    out = run_scoop("-n", "3", "--max-attempts", "5", prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0]"
    # and the sandbox workers started to run the killers (never the root) died too
    assert out.stderr.count("ended early: exit status 3") >= 2


def test_every_worker_in_a_timed_wait_does_not_stall_the_job(tmp_path):
    """Each worker runs a task that waits with a (long) deadline on children it
    submitted: with nobody free to run the children, the broker has the waiting workers
    run them, and every wait returns before its deadline (a wait that reached it would
    raise TimeoutError and fail the job): no wall-clock bound is asserted."""
    prog = write_program(tmp_path, """
        import time
        from scoop import futures
        def child(i):
            time.sleep(0.05)
            return i
        def parent(i):
            kids = [futures.submit(child, i * 10 + k) for k in range(4)]
            return sum(k.result(timeout=60) for k in kids)
        if __name__ == "__main__":
            out = [f.result(timeout=60) for f in [futures.submit(parent, i) for i in range(6)]]
            assert out == [sum(i * 10 + k for k in range(4)) for i in range(6)]
            print("all waits returned")
    """)
    out = run_scoop("-n", "3", prog, timeout=85)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "all waits returned"


def test_group_merely_queued_on_a_killed_worker_is_not_charged(tmp_path):
    """Only the group a worker was running counts as an attempt when it dies: with
    --max-attempts 1, the running task fails, the one queued behind it runs elsewhere."""
    mark = tmp_path / "running"
    prog = write_program(tmp_path, f"""
        import os, signal, threading, time
        from scoop import futures
        MARK = {str(mark)!r}
        def long_task():
            with open(MARK, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(30)
        def quick(i):
            return i
        def killer():
            while not (os.path.exists(MARK) and open(MARK).read()):
                time.sleep(0.01)
            time.sleep(0.3)
            os.kill(int(open(MARK).read()), signal.SIGKILL)
        if __name__ == "__main__":
            # the root runs nothing (timed waits): worker 1 runs these, then prefetches
            futures.wait([futures.submit(quick, i) for i in range(300)], timeout=60)
            threading.Thread(target=killer, daemon=True).start()
            a, b = futures.submit(long_task), futures.submit(quick, -1)
            futures.wait([a, b], timeout=60)
            print(type(a.exception()).__name__, b.result())
    """)
    queued_behind = []
    for _ in range(5):  # until b was queued on the killed worker (else this proves nothing)
        out = run_scoop("-n", "2", "--max-attempts", "1", prog)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "WorkerLostError -1"
        if "1 task group(s) it held will run again" in out.stderr:
            queued_behind.append(out)
            break
    assert queued_behind, f"b never was queued behind the killed task in 5 runs: {out.stderr}"


POISON = """
    import os, signal, sys, time
    import scoop
    from scoop import futures
    def poison(x):
        if x == 0 and scoop.IS_ORIGIN:
            time.sleep(2)  # the root keeps the map's first chunk: the others run elsewhere
        if x == 37:
            if scoop.IS_ORIGIN:  # the root runs it only if nothing has told it not to
                print("the root ran it", flush=True)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return x
    if __name__ == "__main__":
        if sys.argv[1] == "submit":
            fs = [futures.submit(poison, i) for i in range(60)]
            futures.wait(fs, timeout=60)  # a timed wait: the root keeps none of them
            lost = [i for i, f in enumerate(fs)
                    if isinstance(f.exception(), futures.WorkerLostError)]
            assert 37 in lost, lost
            assert all(f.result() == i for i, f in enumerate(fs) if i not in lost)
            print("poison failed alone" if lost == [37] else "poison failed with its group",
                  str(fs[37].exception()).split(";")[-1].strip())
        else:
            results = []
            try:
                # the whole map in flight, as the root sleeps in item 0
                for r in futures.map(poison, range(400), chunksize=1, buffersize=400):
                    results.append(r)
            except futures.WorkerLostError as exc:
                print("map stopped at", len(results), "|", str(exc).split(";")[-1].strip())
        print("the root goes on", scoop.worker)
"""


@pytest.mark.parametrize("n", ["2", "3"])
@pytest.mark.parametrize("how", ["submit", "map"])
def test_a_task_that_killed_a_worker_never_runs_on_the_root(tmp_path, how, n):
    """With -n <= --max-attempts, a task that SIGKILLs its worker was retried until the
    root ran it and the job died (exit 137, no message). Now it goes only to other
    workers, or, once none is left, to sandbox workers the launcher starts for it; it
    fails with WorkerLostError after --max-attempts deaths and the program goes on."""
    out = run_scoop("-v", "-n", n, write_program(tmp_path, POISON), how, timeout=90)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "the root goes on 0", out.stdout
    if lines[0] == "the root ran it":
        # Its first run: nothing had killed a worker yet (SCOOP's laziness, or the root
        # taking work while it waits). That proves nothing here, but must stay rare.
        assert "killed by SIGKILL" not in out.stderr
        pytest.skip("the root ran the task first, before it could kill a worker")
    assert "the root ran it" not in out.stdout
    assert "3 workers died running this task" in lines[0], out.stdout
    if how == "map":
        assert lines[0].startswith("map stopped at "), out.stdout
    assert out.stderr.count("was killed by SIGKILL") >= 3, out.stderr
    assert "starting sandbox worker" in out.stderr, out.stderr
