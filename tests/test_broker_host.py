"""The in-process root runs the broker's loop while it waits (``Broker.host``, issue 12):
the broker's thread sleeps meanwhile, takes the loop over while the root is away (it
computes), and hands it back at the root's next wait."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from scoop import _baton, futures

pytestmark = pytest.mark.timeout(120)


def _switches(tid: int) -> int:
    """Voluntary context switches of thread ``tid`` of this process so far."""
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


def test_the_root_runs_the_broker_loop_while_it_waits(pool):
    broker, calls = pool.broker, 300
    tid = broker._thread.native_id
    visits, slept = broker.baton.visits, _switches(tid)
    start = time.monotonic()
    for _ in range(calls):
        f = futures.submit(os.getpid)
        futures.wait([f], timeout=30)  # a timed wait: the call runs on the other worker
        assert f.result() != os.getpid()
    elapsed = time.monotonic() - start
    assert broker.baton.visits >= visits + calls  # each wait ran the loop in this thread
    # The broker's thread only looked in every HOST_CHECK_S (without hosting it wakes
    # twice per call); a loaded machine makes the calls slower, not the bound tighter.
    assert _switches(tid) - slept <= 2 * elapsed / _baton.HOST_CHECK_S + 20


_RELAY = """
import os, sys, time
from scoop import futures
from scoop._launch import Launcher


def relay(flag, calls):  # on a worker: remote calls that need the broker, then a mark
    for _ in range(calls):
        f = futures.submit(os.getpid)
        futures.wait([f], timeout=30)
    with open(flag, "w") as out:
        out.write("done")


if __name__ == "__main__":
    flag = sys.argv[1]
    with Launcher(3) as job:
        seen = set()  # both other workers have joined: none of the relay's calls is
        while len(seen) < 2:  # forced on the busy root for want of another worker
            g = futures.submit(os.getpid)
            futures.wait([g], timeout=30)
            seen.add(g.result())
        f = futures.submit(relay, flag, 5)
        futures.wait([f], timeout=0.01)  # ships it; the root stands by, runs nothing
        # The root computes without waiting: only the broker's thread can route the
        # relay's calls meanwhile. (The cap only ends a broken run.)
        cap = time.monotonic() + 60
        while not os.path.exists(flag) and time.monotonic() < cap:
            sum(range(1000))
        print("relayed" if os.path.exists(flag) else f"not relayed: {f}")
        f.result(timeout=30)
        visits = job.broker.baton.visits  # back at a wait, the root hosts the loop again
        g = futures.submit(os.getpid)
        futures.wait([g], timeout=30)
        print("hosted again", g.result() != os.getpid() and job.broker.baton.visits > visits)
"""


def test_the_broker_thread_routes_while_the_root_computes(tmp_path):
    # its own process: the session's pool is this process's in-process root
    script = tmp_path / "relay.py"
    script.write_text(_RELAY)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "flag")],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["relayed", "hosted again True"], out.stdout
