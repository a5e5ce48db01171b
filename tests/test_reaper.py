"""The reaper (scoop._reaper): marked processes are found and ended, others are not."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from scoop import _reaper

from conftest import running

pytestmark = pytest.mark.timeout(60)


def _spawn(env_extra: dict, code: str) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def test_marked_processes_and_their_daemons_are_ended_others_are_not(tmp_path):
    job = _reaper.new_job_id()
    pidfile = tmp_path / "daemon.pid"
    # A double-forked setsid daemon: it leaves the process group and the session.
    daemon = (f"import os, time\n"
              f"if os.fork() == 0:\n"
              f"    os.setsid()\n"
              f"    if os.fork() == 0:\n"
              f"        open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
              f"        time.sleep(60)\n"
              f"    os._exit(0)\n"
              f"time.sleep(60)\n")
    ignores_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
                   "time.sleep(60)"
    mine = [_spawn({_reaper.JOB: job}, daemon), _spawn({_reaper.JOB: job}, ignores_term)]
    other = _spawn({_reaper.JOB: "another-job"}, "import time; time.sleep(60)")
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        daemon_pid = int(pidfile.read_text())
        assert set(_reaper.marked(_reaper.JOB, job)) >= {p.pid for p in mine} | {daemon_pid}
        ended = _reaper.end_marked(_reaper.JOB, job, grace=0.5)
        assert {p.pid for p in mine} | {daemon_pid} <= set(ended)
        for p in mine:
            p.wait(10)
        deadline = time.monotonic() + 10
        while running(daemon_pid):
            assert time.monotonic() < deadline, "the setsid daemon outlived end_marked"
            time.sleep(0.05)
        assert other.poll() is None, "a process of another job was ended"
        assert _reaper.marked(_reaper.JOB, job) == []
    finally:
        for p in [*mine, other]:
            p.kill()
            p.wait()


def test_a_worker_mark_names_its_job_worker_and_pid(monkeypatch):
    monkeypatch.setenv(_reaper.JOB, "abc")
    monkeypatch.delenv(_reaper.WORKER, raising=False)
    tag = _reaper.mark_worker(3)
    assert tag == f"abc.3.{os.getpid()}" and os.environ[_reaper.WORKER] == tag


def test_nothing_marked_nothing_ended():
    assert _reaper.end_marked(_reaper.JOB, _reaper.new_job_id()) == []
    assert _reaper.end_marked(_reaper.JOB, "") == []
