"""Idle waits that poll briefly before they sleep (scoop._spin, issue 12): when they do,
when they stop, and which workers of a job may."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time

import cloudpickle
import pytest

import scoop
from scoop import _spin, futures

from conftest import run_scoop

pytestmark = pytest.mark.timeout(60)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack this module

CPUS = len(os.sched_getaffinity(0))


class CountingPoll:
    """A real ``select.poll`` on a pipe's read end that counts its calls by timeout."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self._poll = select.poll()
        self._poll.register(self.r, select.POLLIN)
        self.zero = self.sleeping = 0

    def poll(self, timeout_ms: int) -> list:
        if timeout_ms:
            self.sleeping += 1
        else:
            self.zero += 1
        return self._poll.poll(timeout_ms)

    def write_later(self, delay_s: float) -> threading.Thread:
        t = threading.Thread(target=lambda: (time.sleep(delay_s), os.write(self.w, b"x")))
        t.start()
        return t

    def take(self) -> None:
        os.read(self.r, 1)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def pipe():
    p = CountingPoll()
    yield p
    p.close()


def test_an_answer_already_there_is_taken_without_sleeping(pipe):
    os.write(pipe.w, b"x")
    spin = _spin.Spin(0.001)
    assert spin.poll(pipe.poll, 1000) == [(pipe.r, select.POLLIN)]
    assert (pipe.zero, pipe.sleeping) == (1, 0)


def test_a_late_answer_is_slept_for_and_ends_the_spinning_until_answers_are_quick(pipe):
    spin = _spin.Spin(0.0002)
    pipe.write_later(0.05).join(0)
    assert spin.poll(pipe.poll, 5000)  # spun for the window, then slept until it came
    assert pipe.zero >= 1 and pipe.sleeping == 1
    pipe.take()
    zero = pipe.zero
    pipe.write_later(0.05)
    assert spin.poll(pipe.poll, 5000)  # the last answer was late: straight to sleep
    assert (pipe.zero, pipe.sleeping) == (zero, 2)
    pipe.take()
    os.write(pipe.w, b"x")  # an answer at once: quick again
    assert spin.poll(pipe.poll, 5000)
    pipe.take()
    pipe.write_later(0.05)
    assert spin.poll(pipe.poll, 5000)  # so this wait spun first again
    assert pipe.zero > zero


def test_a_wait_that_times_out_spins_once_then_sleeps(pipe):
    spin = _spin.Spin(0.0005)
    assert spin.poll(pipe.poll, 20) == []
    assert spin.poll(pipe.poll, 20) == []
    assert pipe.sleeping == 2
    zero = pipe.zero
    assert spin.poll(pipe.poll, 0) == [] and pipe.zero == zero + 1  # (a look: no spin)


def test_the_window_comes_from_the_environment(monkeypatch, caplog):
    monkeypatch.delenv(_spin.SPIN_ENV, raising=False)
    assert _spin.window_us() == _spin.SPIN_US
    monkeypatch.setenv(_spin.SPIN_ENV, "0")
    assert _spin.window_us() == 0
    monkeypatch.setenv(_spin.SPIN_ENV, " 250 ")
    assert _spin.window_us() == 250
    for bad in ("abc", "-5", "1e9"):
        monkeypatch.setenv(_spin.SPIN_ENV, bad)
        assert _spin.window_us() == _spin.SPIN_US
        assert f"SCOOP_SPIN_US={bad!r} is not a number of microseconds" in caplog.text


@pytest.mark.parametrize("address, apart, workers, spins", [
    ("inproc://scoop-router-1", True, CPUS, True),  # the root of an in-process pool
    ("unix:///tmp/x/b", False, CPUS, True),  # a worker of such a pool: the broker is the root
    ("unix:///tmp/x/b", True, CPUS, False),  # the launcher's broker takes one more CPU
    ("unix:///tmp/x/b", True, CPUS - 1, True),
    ("tcp://127.0.0.1:5555", True, CPUS, False),
    ("inproc://scoop-router-1", True, CPUS + 1, False),  # more workers than CPUs
])
def test_only_jobs_with_a_cpu_for_every_process_here_spin(monkeypatch, address, apart,
                                                          workers, spins):
    monkeypatch.setattr(scoop, "HOSTS", [("127.0.0.1", workers)] if workers else [])
    spin = _spin.for_this_host(100, address, apart)
    assert (spin is not None) == spins
    if spin is not None:
        assert spin.window == pytest.approx(100e-6)
    assert _spin.for_this_host(0, address, apart) is None
    monkeypatch.setattr(scoop, "HOSTS", [])  # hosts unknown: never
    assert _spin.for_this_host(100, address, apart) is None


def _spins() -> bool:
    from scoop import _worker

    return _worker.current().link.spin is not None


@pytest.mark.usefixtures("pool")
def test_an_in_process_pool_spins_where_each_worker_has_a_cpu(pool):
    assert (pool.root_worker.link.spin is not None) == (scoop.SIZE <= CPUS)
    f = futures.submit(_spins)
    futures.wait([f], timeout=30)  # (the root runs nothing: it goes to worker 1)
    assert f.result() == (scoop.SIZE <= CPUS)


@pytest.mark.parametrize("env, workers", [({}, 1), ({}, 2), ({"SCOOP_SPIN_US": "0"}, 1)])
def test_a_jobs_workers_spin_where_they_and_the_broker_each_have_a_cpu(tmp_path, env,
                                                                        workers):
    prog = tmp_path / "prog.py"
    prog.write_text("from scoop import futures, _worker\n"
                    "def spins(_):\n    return _worker.current().link.spin is not None\n"
                    "if __name__ == '__main__':\n"
                    "    print('SPINS', sorted(set(futures.map(spins, range(20)))))\n")
    proc = run_scoop("-n", str(workers), str(prog), env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    expected = not env and workers + 1 <= CPUS  # the launcher's broker needs one too
    assert f"SPINS [{expected}]" in proc.stdout


@pytest.mark.skipif(CPUS < 2, reason="a pool of 2 spins only with 2 CPUs")
def test_an_idle_worker_that_spins_sleeps():
    """A spinning worker left without work while the root waits on something else uses
    next to no CPU: it spins at most once, then sleeps in every wait."""
    code = (
        "import os, time\nfrom scoop._launch import Launcher\nfrom scoop import futures\n"
        "def where():\n"
        "    from scoop import _worker\n"
        "    return os.getpid(), _worker.current().link.spin is not None\n"
        "def cpu(pid):\n"
        "    with open(f'/proc/{pid}/stat') as f:\n"
        "        v = f.read().rsplit(')', 1)[1].split()\n"
        "    return (int(v[11]) + int(v[12])) / os.sysconf('SC_CLK_TCK')\n"
        "with Launcher(2):\n"
        "    for _ in range(50):\n"
        "        f = futures.submit(where)\n"
        "        futures.wait([f], timeout=30)\n"
        "    pid, spins = f.result()\n"
        "    before = cpu(pid)\n"
        "    time.sleep(2)\n"
        "    print('IDLE', spins, cpu(pid) - before)\n")
    env = {**os.environ, "SCOOP_SPIN_US": "10000"}  # a wide window: seen if it stuck
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    spins, idle = out.stdout.split("IDLE")[1].split()
    assert spins == "True"  # worker 1 spun after each of its 50 answers
    assert float(idle) < 0.05, idle  # a 10-ms spin per 250-ms idle wait: ~0.08 s


def test_spinning_leaves_results_unchanged():
    code = ("import os\nfrom scoop._launch import Launcher\nfrom scoop import futures\n"
            "with Launcher(2):\n"
            "    fs = [futures.submit(pow, i, 2) for i in range(300)]\n"
            "    futures.wait(fs, timeout=60)\n"
            "    print(sum(f.result() for f in fs))\n")
    for env in ({"SCOOP_SPIN_US": "0"}, {"SCOOP_SPIN_US": "5000"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == str(sum(i * i for i in range(300)))
