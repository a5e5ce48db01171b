"""Line 6 of bench.py (big arguments) on its own, and its mirror (big results): scoop
against ProcessPoolExecutor, and Ray if it is installed.

Run from the repository root (about 30 s on 2 cores with the defaults)::

    python bench/bench_big.py                      # 50 tasks x 10 MB, 2 workers
    python bench/bench_big.py --count 20 --mb 50   # other sizes

``args``: 50 tasks, each with its own 10 MB numpy array as argument, returning a small
int (bench.py's line 6). ``results``: 50 tasks of a small argument, each returning its
own 10 MB array, all kept. MB/s, MB = 10^6 bytes, best of ``--reps`` runs. scoop runs as
bench.py's in-process pool (this interpreter is the root worker and runs tasks too).
To compare two versions, run this file with each one's ``scoop`` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_tasks as T  # noqa: E402

from bench import make_big_args  # noqa: E402
from scoop import futures  # noqa: E402
from scoop._launch import Launcher  # noqa: E402

perf = time.perf_counter


def best(reps: int, fn) -> float:
    times = []
    for _ in range(reps):
        t0 = perf()
        fn()
        times.append(perf() - t0)
    return min(times)


def lines(submit, wait, args: list, mb: int, reps: int) -> dict:
    """MB/s of the ``args`` and ``results`` lines through ``submit``/``wait``."""
    total = sum(memoryview(a).nbytes for a in args) / 1e6

    def do_args():
        fs = [submit(T.nbytes, a) for a in args]
        wait(fs)
        assert sum(f.result() for f in fs) == total * 1e6

    def do_results():
        fs = [submit(T.big_result, mb, i) for i in range(len(args))]
        wait(fs)
        kept = [f.result() for f in fs]
        assert sum(memoryview(k).nbytes for k in kept) == total * 1e6

    submit(T.nbytes, args[0]).result()  # warm-up
    return {"args": total / best(reps, do_args), "results": total / best(reps, do_results)}


def run_scoop(args, mb, workers, reps) -> dict:
    with Launcher(workers, pythonpath=HERE):
        return lines(futures.submit, futures.wait, args, mb, reps)


def run_ppe(args, mb, workers, reps) -> dict:
    with cf.ProcessPoolExecutor(workers) as ex:
        return lines(ex.submit, cf.wait, args, mb, reps)


def run_ray(args, mb, workers, reps) -> dict | None:
    try:
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        remote = {fn: ray.remote(fn) for fn in (T.nbytes, T.big_result)}

        def submit(fn, *a):
            ref = remote[fn].remote(*a)
            return type("F", (), {"result": lambda self: ray.get(ref), "ref": ref})()

        return lines(submit, lambda fs: ray.wait([f.ref for f in fs], num_returns=len(fs)),
                     args, mb, reps)
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=50, help="tasks per line (default 50)")
    ap.add_argument("--mb", type=int, default=10, help="MB per array (default 10)")
    ap.add_argument("--workers", type=int, default=2, help="workers per pool (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="runs per line, best kept")
    ns = ap.parse_args(argv)
    args = make_big_args(ns.count, ns.mb)
    load = os.getloadavg()[0]
    out = {"scoop": run_scoop(args, ns.mb, ns.workers, ns.reps),
           "PPE": run_ppe(args, ns.mb, ns.workers, ns.reps),
           "Ray": run_ray(args, ns.mb, ns.workers, ns.reps)}
    print(f"{ns.count} tasks x {ns.mb} MB, {ns.workers} workers, load average "
          f"{load:.2f} at start, MB/s (best of {ns.reps})")
    print(f"{'':8}{'args':>10}{'results':>10}")
    for name, r in out.items():
        if r is not None:
            print(f"{name:8}{r['args']:>10.0f}{r['results']:>10.0f}")
    s, p = out["scoop"], out["PPE"]
    print(f"scoop/PPE: args {s['args'] / p['args']:.2f}x, "
          f"results {s['results'] / p['results']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
