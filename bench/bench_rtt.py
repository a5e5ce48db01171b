"""Round trip and start-up, in wall time and in CPU time (issue 12).

Run from the repository root::

    python bench/bench_rtt.py                 # all three parts, ~1 minute on 2 cores
    python bench/bench_rtt.py rtt --calls 2000
    python bench/bench_rtt.py startup --runs 7
    python bench/bench_rtt.py wide --workers 128

On a loaded machine wall times move a lot; CPU time per call moves much less, so each
part prints both. The parts:

* ``rtt``: sequential ``submit(who)`` then ``futures.wait([f], timeout=60)`` on an
  in-process scoop pool of 2 (the timed wait makes the root run nothing, so each call
  crosses to worker 1 and back), next to ``ProcessPoolExecutor(2).submit(f).result()``.
  Wall: median and quartiles of the per-call times. CPU: utime+stime of every process of
  the pool (scoop: the root, with its broker thread, and worker 1; PPE: the parent and
  its workers) over all calls, divided by the calls; and context switches per call (every
  sleep and wake-up of a thread). ``--strace`` also counts the system
  calls of scoop's worker 1 over the calls (``strace -c -f -p``).
* ``startup``: wall and CPU (this process's children) of ``python -m scoop -n 2`` running
  a trivial program, next to the same with ProcessPoolExecutor and multiprocessing.Pool.
* ``wide``: ``-n W`` (default 128): the time from the launch until every worker has run
  a task (each task sleeps 10 ms, so early workers cannot take all of them), then the
  rate of a map of ``--items`` (200,000) cheap items (``futures.map``, ``Pool.map``, each
  with its automatic chunks), and the time until the process has exited, next to
  ``multiprocessing.Pool(W)``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_tasks as T  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def threads_cpu(pid: int, names: dict | None = None) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, by thread name (same names summed);
    ``names`` names threads by id (Python's names are not the kernel's)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = (names or {}).get(int(tid)) or f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def switches(pid: int) -> int:
    """Context switches (voluntary and not) of every thread of ``pid`` so far: each sleep
    and wake-up of a thread, steadier than CPU time on a loaded machine."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def per_thread(before: dict, after: dict, calls: int) -> str:
    return "  ".join(f"{k} {(after[k] - before.get(k, 0.0)) / calls * 1e6:.0f}"
                     for k in sorted(after))


def spread(xs: list[float], scale: float = 1.0) -> str:
    xs = sorted(x * scale for x in xs)
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"median {q[1]:7.1f}  (q1 {q[0]:7.1f}, q3 {q[2]:7.1f})"


def timed_calls(calls: int, one) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        one()
        out.append(time.perf_counter() - t0)
    return out


# -- rtt -----------------------------------------------------------------------------------
def rtt_scoop(calls: int, use_strace: bool) -> None:
    from scoop import futures
    from scoop._launch import Launcher

    with Launcher(2, pythonpath=HERE) as launcher:
        for _ in range(200):  # warm up, and make sure worker 1 has joined
            f = futures.submit(T.who)
            futures.wait([f], timeout=60)
        pids = [os.getpid(), launcher.procs[1].pid]
        tracer = None
        if use_strace:
            out = tempfile.mktemp(prefix="scoop-strace-")
            tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pids[1])],
                                      stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        cpu0 = [cpu_of(p) for p in pids]
        import threading
        names = {t.native_id: t.name for t in threading.enumerate()}
        thr0 = [threads_cpu(pids[0], names), threads_cpu(pids[1])]
        sw0 = [switches(p) for p in pids]
        remote = []

        def one():
            f = futures.submit(T.who)
            futures.wait([f], timeout=60)
            remote.append(f.result() != 0)
        times = timed_calls(calls, one)
        cpu1 = [cpu_of(p) for p in pids]
        thr1 = [threads_cpu(pids[0], names), threads_cpu(pids[1])]
        sw1 = [switches(p) for p in pids]
        if tracer is not None:
            tracer.terminate()
            tracer.wait()
    n = sum(remote)
    times = [t for t, r in zip(times, remote) if r]
    print(f"scoop rtt  ({n}/{calls} remote) wall us: {spread(times, 1e6)}")
    print(f"scoop rtt  cpu us/call: root+broker {(cpu1[0] - cpu0[0]) / calls * 1e6:6.1f}"
          f"  worker {(cpu1[1] - cpu0[1]) / calls * 1e6:6.1f}"
          f"  total {(sum(cpu1) - sum(cpu0)) / calls * 1e6:6.1f}")
    print(f"scoop rtt  cpu us/call by thread: root: {per_thread(thr0[0], thr1[0], calls)}; "
          f"worker: {per_thread(thr0[1], thr1[1], calls)}")
    print(f"scoop rtt  context switches/call: root {(sw1[0] - sw0[0]) / calls:.2f}"
          f"  worker {(sw1[1] - sw0[1]) / calls:.2f}")
    if tracer is not None:
        with open(out) as f:
            lines = f.read().splitlines()
        os.unlink(out)
        print(f"scoop rtt  worker 1's system calls over {calls} calls (under strace):")
        for ln in lines[:8] + lines[-2:]:
            print("    " + ln)


def rtt_ppe(calls: int) -> None:
    with cf.ProcessPoolExecutor(2) as ex:
        for _ in range(200):
            ex.submit(T.noop).result()
        pids = [os.getpid(), *ex._processes]
        cpu0, sw0 = [cpu_of(p) for p in pids], [switches(p) for p in pids]
        times = timed_calls(calls, lambda: ex.submit(T.noop).result())
        cpu1, sw1 = [cpu_of(p) for p in pids], [switches(p) for p in pids]
    print(f"PPE   rtt  wall us: {spread(times, 1e6)}")
    print(f"PPE   rtt  cpu us/call: parent {(cpu1[0] - cpu0[0]) / calls * 1e6:6.1f}"
          f"  workers {(sum(cpu1[1:]) - sum(cpu0[1:])) / calls * 1e6:6.1f}"
          f"  total {(sum(cpu1) - sum(cpu0)) / calls * 1e6:6.1f}")
    print(f"PPE   rtt  context switches/call: parent {(sw1[0] - sw0[0]) / calls:.2f}"
          f"  workers {(sum(sw1[1:]) - sum(sw0[1:])) / calls:.2f}")


# -- startup -------------------------------------------------------------------------------
TRIVIAL = {
    "scoop": "from scoop import futures\n\nif __name__ == '__main__':\n"
             "    assert list(futures.map(abs, [-1, -2])) == [1, 2]\n",
    "ppe": "import concurrent.futures as cf\n\nif __name__ == '__main__':\n"
           "    with cf.ProcessPoolExecutor(max_workers=2) as ex:\n"
           "        assert ex.submit(abs, -1).result() == 1\n",
    "pool": "import multiprocessing\n\nif __name__ == '__main__':\n"
            "    pool = multiprocessing.Pool(2)\n    assert pool.apply(abs, (-1,)) == 1\n"
            "    pool.close()\n    pool.join()\n",
}


def run_timed(cmd: list[str], cwd: str, env=None) -> tuple[float, float, str]:
    """Wall time, CPU time of the process tree, stdout."""
    r0 = os.times()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=300, env=env)
    wall = time.perf_counter() - t0
    r1 = os.times()
    if p.returncode:
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{p.stderr.decode()}")
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    return wall, cpu, p.stdout.decode()


def startup(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="scoop-bench-") as tmp:
        for name, src in TRIVIAL.items():
            path = os.path.join(tmp, f"trivial_{name}.py")
            with open(path, "w") as f:
                f.write(src)
            cmd = ([sys.executable, "-m", "scoop", "-n", "2", path] if name == "scoop"
                   else [sys.executable, path])
            run_timed(cmd, tmp)  # warm caches
            got = [run_timed(cmd, tmp)[:2] for _ in range(runs)]
            print(f"{name:5} start+task+exit  wall ms: {spread([w for w, _ in got], 1e3)}"
                  f"   cpu ms: {spread([c for _, c in got], 1e3)}")


# -- wide ----------------------------------------------------------------------------------
WIDE_SCOOP = """\
import os, sys, time
import scoop
from scoop import futures

def who():
    time.sleep(0.01)
    return scoop.worker

def inc(x):
    return x + 1

if __name__ == "__main__":
    want, seen = int(sys.argv[1]), set()
    while len(seen) < want:
        fs = [futures.submit(who) for _ in range(2 * want)]
        seen.update(f.result() for f in fs)
    ready = time.time() - float(os.environ["BENCH_T0"])
    t0 = time.perf_counter()
    assert sum(futures.map(inc, range(int(sys.argv[2])))) == sum(range(1, int(sys.argv[2]) + 1))
    print(ready, time.perf_counter() - t0)
"""
WIDE_POOL = """\
import multiprocessing, os, sys, time

def who(_):
    time.sleep(0.01)
    return os.getpid()

def inc(x):
    return x + 1

if __name__ == "__main__":
    want, seen = int(sys.argv[1]), set()
    with multiprocessing.Pool(want) as pool:
        while len(seen) < want:
            seen.update(pool.map(who, range(2 * want), chunksize=1))
        ready = time.time() - float(os.environ["BENCH_T0"])
        t0 = time.perf_counter()
        assert sum(pool.map(inc, range(int(sys.argv[2])))) == sum(range(1, int(sys.argv[2]) + 1))
        print(ready, time.perf_counter() - t0)
"""


def wide(workers: int, runs: int, items: int) -> None:
    with tempfile.TemporaryDirectory(prefix="scoop-bench-") as tmp:
        for name, src in (("scoop", WIDE_SCOOP), ("pool", WIDE_POOL)):
            path = os.path.join(tmp, f"wide_{name}.py")
            with open(path, "w") as f:
                f.write(src)
            args = [path, str(workers), str(items)]
            cmd = ([sys.executable, "-m", "scoop", "-n", str(workers), *args]
                   if name == "scoop" else [sys.executable, *args])
            ready, rates, walls, cpus = [], [], [], []
            for _ in range(runs):
                env = dict(os.environ, BENCH_T0=repr(time.time()))
                wall, cpu, out = run_timed(cmd, tmp, env)
                ready.append(float(out.split()[-2]))
                rates.append(items / float(out.split()[-1]))
                walls.append(wall)
                cpus.append(cpu)
            print(f"{name:5} -n {workers}: every worker ran a task  s: {spread(ready)}")
            print(f"{name:5} -n {workers}: map of {items:,} items   items/s: "
                  f"{spread(rates)}")
            print(f"{name:5} -n {workers}: until exit               s: {spread(walls)}"
                  f"   cpu s: {spread(cpus)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="*", default=["rtt", "startup", "wide"])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=128)
    ap.add_argument("--items", type=int, default=200_000, help="wide: the map's items")
    ap.add_argument("--strace", action="store_true")
    ns = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    if "rtt" in ns.parts:
        rtt_scoop(ns.calls, ns.strace)
        rtt_ppe(ns.calls)
    if "startup" in ns.parts:
        startup(ns.runs)
    if "wide" in ns.parts:
        wide(ns.workers, max(1, ns.runs // 2), ns.items)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
