"""Elastic jobs (issue 13): workers join a running job at any time (python -m scoop.join,
no fixed count) and leave it cleanly on SIGTERM, handing their work back; real processes.

Every execution of a mapped item is counted in a file of its own process, so that the
tests can tell an item computed once from one computed twice."""

from __future__ import annotations

import collections
import functools
import os
import signal
import subprocess
import sys
import time

import pytest
from test_join import UNTIL_ALL_SEEN

from conftest import write_program

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftovers")]

# Items of a few ms; each execution appends its item to this process's count file.
MAP_LOOP = """
    import os, sys, time
    import scoop
    from scoop import futures
    COUNTS = sys.argv[1]
    def square(x):
        with open(os.path.join(COUNTS, f"{scoop.worker}-{os.getpid()}"), "a") as f:
            f.write(f"{x}\\n")
        time.sleep(0.02)
        return x * x
    if __name__ == "__main__":
        if sys.argv[2:] == ["submit"]:  # groups of plain futures, not map chunks
            got = [f.result() for f in [futures.submit(square, x) for x in range(400)]]
        else:
            got = list(futures.map(square, range(400), chunksize=4))
        print("OK" if got == [x * x for x in range(400)] else f"WRONG {got}", flush=True)
"""


def start_job(tmp_path, source: str, *args: str,
              opts: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """An elastic job (its job file alone makes it so) running ``source``."""
    prog = write_program(tmp_path, source)
    job_file = str(tmp_path / "job.json")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "scoop", "-n", "1", "--job-file", job_file,
         "--broker-hostname", "127.0.0.1", *opts, prog, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: os.path.exists(job_file) or launcher.poll() is not None,
             "the job file")
    assert launcher.poll() is None, launcher.communicate()
    return launcher, job_file


def join(job_file: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scoop.join", job_file],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def executions(counts) -> dict[str, collections.Counter]:
    """Per count file (worker-pid): how many times each item ran there."""
    out = {}
    for path in counts.iterdir():
        out[path.name] = collections.Counter(int(x) for x in path.read_text().split())
    return out


def total(counts) -> int:
    return sum(sum(c.values()) for c in executions(counts).values())


def finish(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.mark.parametrize("how", ["map", "submit"])
def test_workers_join_and_leave_mid_map(tmp_path, how):
    counts = tmp_path / "counts"
    counts.mkdir()
    launcher, job_file = start_job(tmp_path, MAP_LOOP, str(counts), how)
    procs = [launcher]
    try:
        first, second = join(job_file), join(job_file)
        procs += [first, second]
        # Both at work (each ran items), then the first leaves mid-map.
        wait_for(lambda: len(executions(counts)) >= 3, "both joiners to run items")
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, first.communicate()
        assert launcher.poll() is None, "the map ended before the leave: make it longer"
        third = join(job_file)
        procs.append(third)
        out, err = launcher.communicate(timeout=90)
        assert launcher.returncode == 0, err
        assert out.strip() == "OK"
        for p in (second, third):
            assert p.wait(30) == 0, p.communicate()
        runs = executions(counts)
        merged = sum(runs.values(), collections.Counter())
        assert sorted(merged) == list(range(400))
        twice = {x: n for x, n in merged.items() if n != 1}
        assert not twice, f"items computed more than once: {twice}"
        assert len(runs) >= 3, f"the joiners did no work: {list(runs)}"
    finally:
        finish(procs)


# Items past the first few wait on the root until a joined worker ran one: the job
# starts with no worker but the root, and must hand work to one that joins later.
LATE_JOINER = """
    import os, sys, time
    import scoop
    from scoop import futures
    MARK = sys.argv[1]
    def work(x):
        if scoop.worker != 0:
            open(MARK, "a").close()
        elif x >= 3:
            deadline = time.time() + 60
            while not os.path.exists(MARK) and time.time() < deadline:
                time.sleep(0.02)
        return x + 1
    if __name__ == "__main__":
        got = list(futures.map(work, range(40), chunksize=1))
        print(scoop.SIZE, got == [x + 1 for x in range(40)], os.path.exists(MARK),
              flush=True)
"""


def test_a_job_with_no_joiner_gets_one_later(tmp_path):
    mark = tmp_path / "joiner-ran"
    launcher, job_file = start_job(tmp_path, LATE_JOINER, str(mark))
    procs = [launcher]
    try:
        time.sleep(0.5)  # the map has started on the root alone
        assert launcher.poll() is None
        joiner = join(job_file)
        procs.append(joiner)
        out, err = launcher.communicate(timeout=90)
        assert launcher.returncode == 0, err
        assert "python -m scoop.join" in err  # where joiners are pointed to
        assert out.split() == ["1", "True", "True"]  # scoop.SIZE: the workers at start
        assert joiner.wait(30) == 0, joiner.communicate()
        # The job is over: its job file says so, without the key, and a late worker
        # exits at once, with status 0 and a line that says why.
        late = subprocess.run([sys.executable, "-m", "scoop.join", job_file],
                              capture_output=True, text=True, timeout=30)
        assert late.returncode == 0, late.stderr
        assert "has ended" in late.stderr
        assert "key" not in open(job_file).read()
    finally:
        finish(procs)


# One long task per worker: a SIGTERM while it runs lets it finish (no item runs twice);
# a grace shorter than the task hands the task back (it runs again elsewhere, uncharged).
# The root takes one item at a time too: four leave the joiner at least one.
LONG_TASKS = """
    import os, sys, time
    import scoop
    from scoop import futures
    COUNTS, SECONDS = sys.argv[1], float(sys.argv[2])
    def slow(x):
        with open(os.path.join(COUNTS, f"{scoop.worker}-{os.getpid()}"), "a") as f:
            f.write(f"{x}\\n")
        time.sleep(SECONDS)
        return -x
    if __name__ == "__main__":
        got = list(futures.map(slow, range(4), chunksize=1))
        print(got == [-x for x in range(4)], flush=True)
"""


@pytest.mark.parametrize(("grace", "seconds"), [("30", "2"), ("0.5", "2.5")])
def test_a_running_task_finishes_or_is_handed_back(tmp_path, grace, seconds):
    counts = tmp_path / "counts"
    counts.mkdir()
    # --max-attempts 1: a task handed back charged as a crash would fail at once
    launcher, job_file = start_job(tmp_path, LONG_TASKS, str(counts), seconds,
                                   opts=("--max-attempts", "1"))
    procs = [launcher]
    try:
        env = dict(os.environ, SCOOP_LEAVE_GRACE=grace)
        leaver = join(job_file, env=env)
        procs.append(leaver)
        wait_for(lambda: any(n.endswith(str(leaver.pid)) for n in os.listdir(counts)),
                 "the joiner to start a task")
        leaver.send_signal(signal.SIGTERM)
        assert leaver.wait(30) == 0, leaver.communicate()
        ran = {n: c for n, c in executions(counts).items() if n.endswith(str(leaver.pid))}
        out, err = launcher.communicate(timeout=90)
        assert launcher.returncode == 0, err
        assert out.strip() == "True"
        merged = sum(executions(counts).values(), collections.Counter())
        again = {x: n for x, n in merged.items() if n > 1}
        if grace == "30":
            assert not again, f"a clean leave ran items twice: {again}"
        else:  # the task it ran (longer than the grace) went back and ran again once
            assert again == {x: 2 for c in ran.values() for x in c}, (again, ran)
    finally:
        finish(procs)


LOCAL = MAP_LOOP.replace("range(400)", "range(300)")


def test_a_local_worker_terminated_from_outside_leaves_cleanly(tmp_path):
    counts = tmp_path / "counts"
    counts.mkdir()
    prog = write_program(tmp_path, LOCAL)
    launcher = subprocess.Popen([sys.executable, "-m", "scoop", "-n", "3", prog, str(counts)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(n.startswith("1-") for n in os.listdir(counts)),
                 "worker 1 to run items")
        pid = int(next(n for n in os.listdir(counts) if n.startswith("1-"))[2:])
        os.kill(pid, signal.SIGTERM)
        out, err = launcher.communicate(timeout=90)
        assert launcher.returncode == 0, err
        assert out.strip() == "OK"
        assert "ended early" not in err  # a clean leave is no failure
        merged = sum(executions(counts).values(), collections.Counter())
        assert sorted(merged) == list(range(300))
        assert set(merged.values()) == {1}, "a clean leave ran items twice"
    finally:
        finish([launcher])


# Tasks that wait on their own children: a worker that leaves while one of them waits
# hands the children back and leaves once the parent has its results and returned.
NESTED = """
    import os, sys, time
    import scoop
    from scoop import futures
    COUNTS = sys.argv[1]
    def child(i):
        time.sleep(0.2)
        return i
    def parent(x):
        with open(os.path.join(COUNTS, f"{scoop.worker}-{os.getpid()}"), "a") as f:
            f.write(f"{x}\\n")
        return sum(futures.map(child, range(10 * x, 10 * x + 6), chunksize=1))
    if __name__ == "__main__":
        got = list(futures.map(parent, range(6), chunksize=1))
        print(got == [sum(range(10 * x, 10 * x + 6)) for x in range(6)], flush=True)
"""


def test_a_worker_leaves_while_its_task_waits_on_children(tmp_path):
    counts = tmp_path / "counts"
    counts.mkdir()
    launcher, job_file = start_job(tmp_path, NESTED, str(counts))
    procs = [launcher]
    try:
        leaver, stayer = join(job_file), join(job_file)
        procs += [leaver, stayer]
        wait_for(lambda: any(n.endswith(f"-{leaver.pid}") for n in os.listdir(counts)),
                 "the joiner to start a parent task")
        leaver.send_signal(signal.SIGTERM)
        assert leaver.wait(60) == 0, leaver.communicate()
        out, err = launcher.communicate(timeout=90)
        assert launcher.returncode == 0, err
        assert out.strip() == "True"
        assert stayer.wait(30) == 0, stayer.communicate()
        merged = sum(executions(counts).values(), collections.Counter())
        assert merged == collections.Counter(range(6)), "a parent ran twice (or never)"
    finally:
        finish(procs)


def test_elastic_without_a_job_file_says_where_it_is(tmp_path):
    """--elastic alone: the job file goes to ~/.scoop/jobs/ and its path is printed."""
    mark = tmp_path / "joiner-ran"
    prog = write_program(tmp_path, LATE_JOINER)
    env = dict(os.environ, HOME=str(tmp_path))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "scoop", "-n", "1", "--elastic", "--broker-hostname",
         "127.0.0.1", prog, str(mark)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    procs = [launcher]
    try:
        line = launcher.stderr.readline()
        assert "python -m scoop.join " in line, line
        job_file = line.split("python -m scoop.join ", 1)[1].strip()
        assert job_file.startswith(str(tmp_path / ".scoop" / "jobs")), job_file
        procs.append(join(job_file, env=env))
        out, err = launcher.communicate(timeout=90)
        assert launcher.returncode == 0, err
        assert out.split() == ["1", "True", "True"]
        assert procs[1].wait(30) == 0, procs[1].communicate()
    finally:
        finish(procs)


def test_an_elastic_map_cuts_chunks_for_workers_to_come():
    """A map begun on the root alone of an elastic job keeps a small first chunk and
    queues many: workers that join take them (with a fixed pool: two halves)."""
    from scoop import _mapping
    from scoop._runtime.worker import Worker

    def first_chunks(elastic: bool) -> list[int]:
        rt = Worker(0)
        rt.elastic = elastic
        # not the process's runtime; a function never mapped (no pace remembered from
        # another test: chunks would hold MIN_CHUNK_S of work at that pace)
        feed = _mapping.Feed(functools.partial(abs), (), (range(800),), rt=rt)
        return [n for _, n, *_ in feed.futs]

    fixed, elastic = first_chunks(False), first_chunks(True)
    assert fixed[0] == 400 and len(fixed) == _mapping.CHUNKS_AHEAD
    assert elastic[0] == 800 // (_mapping.CHUNK_SPLIT * _mapping.ELASTIC_POOL)
    assert len(elastic) == _mapping.CHUNKS_AHEAD * _mapping.ELASTIC_POOL


def test_external_n_also_takes_workers_beyond_n(tmp_path):
    """--external 1: one joiner is counted in scoop.SIZE; a second one is welcome too."""
    prog = write_program(tmp_path, UNTIL_ALL_SEEN)
    job_file = str(tmp_path / "job.json")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "scoop", "-n", "1", "--external", "1", "--job-file",
         job_file, "--broker-hostname", "127.0.0.1", prog, "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [launcher]
    try:
        wait_for(lambda: os.path.exists(job_file) or launcher.poll() is not None,
                 "the job file")
        procs += [join(job_file), join(job_file)]
        out, err = launcher.communicate(timeout=90)
        assert launcher.returncode == 0, err
        assert out.strip() == "2 [0, 1, 2]"
        for p in procs[1:]:
            assert p.wait(30) == 0, p.communicate()
        assert not os.path.exists(job_file), "--external keeps removing its job file"
    finally:
        finish(procs)


def test_old_ended_marks_are_pruned_as_a_job_writes_its_file(tmp_path):
    """An elastic job leaves an ended mark in ~/.scoop/jobs (late workers read why they
    need not start); the next job's launcher removes those older than a week, and only
    those."""
    import json

    from scoop._launch.launcher import ENDED_MARK_KEEP_S

    jobs = tmp_path / ".scoop" / "jobs"
    jobs.mkdir(parents=True)
    old_end, fresh_end, old_live, other = (jobs / n for n in (
        "job-1-aaaa.json", "job-2-bbbb.json", "job-3-cccc.json", "notes.txt"))
    for path in (old_end, fresh_end, other):
        path.write_text(json.dumps({"ended": True, "job": "x"}))
    old_live.write_text(json.dumps({"address": "tcp://127.0.0.1:1", "wid": None}))
    long_ago = time.time() - ENDED_MARK_KEEP_S - 3600
    for path in (old_end, old_live, other):
        os.utime(path, (long_ago, long_ago))
    prog = write_program(tmp_path, """
        from scoop import futures
        if __name__ == "__main__":
            print(sum(futures.map(abs, range(-5, 5))))
    """)
    out = subprocess.run([sys.executable, "-m", "scoop", "-n", "1", "--elastic", prog],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, HOME=str(tmp_path)))
    assert out.returncode == 0 and out.stdout == "25\n", out.stderr
    assert not old_end.exists()
    assert fresh_end.exists() and old_live.exists() and other.exists()
    ours = set(os.listdir(jobs)) - {p.name for p in (fresh_end, old_live, other)}
    assert len(ours) == 1, ours  # this job's own file, now its ended mark
    assert json.loads((jobs / ours.pop()).read_text())["ended"] is True


def test_an_elastic_executor_takes_workers_that_join_and_leave(tmp_path):
    """scoop.Executor(elastic=True): a worker joins with the pool's job file, its size
    follows, maps run on it; it leaves on SIGTERM and the pool goes on without it."""
    import json

    import scoop

    job_file = str(tmp_path / "job.json")
    with scoop.Executor(1, elastic=True, job_file=job_file) as ex:
        assert ex.job_file == job_file and ex.size == 1
        joiner = join(job_file)
        try:
            # the size comes with results: a call's brings the broker's count of now
            wait_for(lambda: ex.submit(abs, -1).result() and ex.size == 2,
                     "the joiner in the pool's size")
            pids = set(ex.map(lambda _: (time.sleep(0.005), os.getpid())[1], range(200),
                              chunksize=1))
            assert joiner.pid in pids and len(pids) == 2, (pids, joiner.pid)
            joiner.send_signal(signal.SIGTERM)
            assert joiner.wait(30) == 0, joiner.communicate()
            wait_for(lambda: ex.submit(abs, -1).result() and ex.size == 1,
                     "the pool's size without the joiner")
            assert list(ex.map(abs, range(-50, 0))) == list(range(50, 0, -1))
        finally:
            finish([joiner])
    assert json.loads(open(job_file).read())["ended"] is True  # late joiners exit at once
