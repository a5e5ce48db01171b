"""Processes that tasks start do not outlive the job, however it ends (issue 9).

Tasks on the root and on another worker start a ``subprocess.Popen`` child, a fork+exec
child, a ``setsid`` double-forked daemon and a child forked without exec; after a normal
exit, a SIGTERM and a SIGKILL of the launcher, none of them is left. Over ssh test hosts,
the host agent does the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import running, write_program

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftovers")]

SPAWNER = """
    import os, subprocess, sys, time
    from scoop import futures
    import scoop

    SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]

    def spawn(kind):
        if kind == "popen":
            pid = subprocess.Popen(SLEEP).pid
        elif kind == "forkexec":
            pid = os.fork()
            if pid == 0:
                os.execv(sys.executable, SLEEP)
        elif kind == "forkonly":  # no exec: /proc shows it its parent's first environment
            pid = os.fork()
            if pid == 0:
                time.sleep(120)
                os._exit(0)
        else:  # a daemon: leaves the process group and the session, parent gone
            r, w = os.pipe()
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.write(w, str(os.getpid()).encode())
                    os.execv(sys.executable, SLEEP)
                os._exit(0)
            os.close(w)
            pid = int(os.read(r, 32))
        time.sleep(0.2)  # spread the calls over both workers
        return scoop.worker, kind, pid

    if __name__ == "__main__":
        kinds = ["popen", "forkexec", "daemon", "forkonly"]
        started = list(futures.map(spawn, kinds * 4, chunksize=1))
        print(" ".join(str(pid) for _, _, pid in started), flush=True)
        print("workers", sorted({w for w, _, _ in started}), flush=True)
        if sys.argv[1] == "wait":
            time.sleep(120)
"""


def assert_all_gone(pids: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            left = [p for p in pids if running(p)]
            for p in left:
                os.kill(p, signal.SIGKILL)
            raise AssertionError(f"processes started by tasks outlived the job: {left}")
        time.sleep(0.05)


@pytest.mark.parametrize("ending", ["exit", "sigterm", "sigkill"])
def test_processes_started_by_tasks_end_with_the_job(tmp_path, ending):
    prog = write_program(tmp_path, SPAWNER)
    mode = "exit" if ending == "exit" else "wait"
    proc = subprocess.Popen([sys.executable, "-m", "scoop", "-n", "2", prog, mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 16, proc.stderr.read() if proc.poll() is not None else pids
        assert proc.stdout.readline().strip() == "workers [0, 1]", "one worker ran them all"
        if ending != "exit":
            proc.send_signal(signal.SIGTERM if ending == "sigterm" else signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == {"exit": 0, "sigterm": 143, "sigkill": -9}[ending]
    assert_all_gone(pids)
