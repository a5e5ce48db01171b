"""Shared fixtures: a real in-process pool, a runner for `python -m scoop`, leak checks.

Every process a test starts inherits ``SCOOP_TEST_RUN`` (set below), so a process left
behind is found by scanning /proc for that mark, even after it was re-parented to init.
The daemons of the real schedulers (tests/slurmcluster.py, tests/sgecell.py) live for the
session, outside that mark: they carry ``SCOOP_TEST_DAEMON`` with the same value, and the
session's end checks that none is left either.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from scoop import _reaper

RUN_MARK = f"scoop-test-{uuid.uuid4().hex[:12]}"
os.environ["SCOOP_TEST_RUN"] = RUN_MARK
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_pool_pids: set[int] = set()  # the session pool's workers: alive until the session ends


def marked_processes(exclude: set[int] = frozenset(), variable: str = "SCOOP_TEST_RUN",
                     value: str = RUN_MARK) -> dict[int, str]:
    """pid -> command line of every live process started by this test run (with
    ``variable="SCOOP_TEST_DAEMON"``: every scheduler daemon it started), or of those
    whose environment holds another ``variable=value``."""
    found = {}
    for pid in _reaper.marked(variable, value, frozenset(exclude) | _pool_pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
    return found


def running(pid: int) -> bool:
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_no_processes(exclude: set[int] | None = None, timeout: float = 10.0) -> dict:
    """Wait until no marked process is left; return those still there after timeout."""
    exclude = set(_pool_pids) if exclude is None else exclude
    deadline = time.monotonic() + timeout
    while True:
        left = marked_processes(exclude)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.fixture(scope="session")
def pool():
    """A real job: this interpreter is the root worker, one more worker process."""
    from scoop._launch import Launcher

    job = Launcher(2).start(root_in_process=True)
    _pool_pids.update(p.pid for p in job.procs.values())
    try:
        yield job
    finally:
        job.stop()
        _pool_pids.clear()


@pytest.fixture
def no_leftovers():
    """Fail the test if it leaves any process behind (the session pool's excepted)."""
    yield
    left = wait_no_processes(set(_pool_pids))
    assert not left, f"processes left behind: {left}"


def computed(log) -> collections.Counter:
    """How many times each item was computed, from a file where tasks append one
    number per line (a program's record of what actually ran)."""
    return collections.Counter(int(x) for x in log.read_text().split()) if log.exists() \
        else collections.Counter()


def write_program(tmp_path, source: str, name: str = "prog.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def run_scoop(*args: str, timeout: float = 60, cwd=None, env=None, **kw):
    """Run ``python -m scoop ARGS`` to completion; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "scoop", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env, **kw)


@contextlib.contextmanager
def up_test_hosts(n: int = 3):
    """``n`` test hosts (tests/testhosts.py) on a slot of their own (other sessions may
    run at once), removed at the end; skips the test where they cannot be made."""
    testhosts = pytest.importorskip("testhosts")
    reason = testhosts.supported()
    if reason:
        pytest.skip(f"no test hosts here: {reason}")
    th = testhosts.claim()
    th.up(n)
    try:
        yield th
    finally:
        th.down()


@pytest.fixture(scope="session")
def scheduler_hosts():
    """Three test hosts for the real schedulers' nodes, kept for the whole session."""
    with up_test_hosts(3) as th:
        yield th


def _scheduler(module: str, cls: str, name: str, hosts):
    """The daemons of a real scheduler (a tests/daemons.py set), up; skips with the
    reason (a daemon's log tail) where they cannot run."""
    module = importlib.import_module(module)
    reason = module.supported()
    if reason:
        pytest.skip(f"no {name} here: {reason}")
    daemons = getattr(module, cls)(hosts, mark=RUN_MARK)
    try:
        return daemons.up()
    except RuntimeError as exc:
        pytest.skip(f"{name} daemons did not start in the test hosts: {exc}")


@pytest.fixture(scope="session")
def slurm(scheduler_hosts):
    """A real SLURM cluster (tests/slurmcluster.py): slurmctld on the head, a slurmd on
    each test host."""
    with _scheduler("slurmcluster", "SlurmCluster", "SLURM", scheduler_hosts) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def sge(scheduler_hosts):
    """A real Grid Engine cell (tests/sgecell.py): sge_qmaster on the head, an sge_execd
    on each test host."""
    with _scheduler("sgecell", "SGECell", "Grid Engine", scheduler_hosts) as cell:
        yield cell


def pytest_sessionfinish(session, exitstatus):
    left = wait_no_processes(timeout=5)
    daemons = marked_processes(variable="SCOOP_TEST_DAEMON")
    if daemons:
        print(f"\nERROR: scheduler daemons left behind by the tests: {daemons}",
              file=sys.stderr)
        left.update(daemons)
    if left:
        print(f"\nERROR: processes left behind by the tests: {left}", file=sys.stderr)
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        session.exitstatus = 1
