"""scoop vs concurrent.futures.ProcessPoolExecutor vs multiprocessing.Pool, side by side.

Run from the repository root::

    python bench/bench.py                 # full run (~2 minutes on 2 cores)
    python bench/bench.py --quick         # smaller sizes, a smoke run
    python bench/bench.py --workers 4 --json results.json

Every pool has the same number of workers. scoop runs as an in-process pool
(``scoop._launch.Launcher``): this interpreter is the root worker, which also runs tasks,
plus ``workers - 1`` spawned processes. The peers get ``workers`` worker processes each
(their parent process only submits). See bench/README.md for what each line measures.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import faulthandler
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_tasks as T  # noqa: E402

import scoop  # noqa: E402
from scoop import futures  # noqa: E402
from scoop._launch import Launcher  # noqa: E402

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None

perf = time.perf_counter

SIZES = {
    "full": dict(noop=10_000, map=100_000, lat=500, depth=10, cpu=100, cpu_ms=20.0,
                 big=50, big_mb=10, startup=5, reps=3),
    "quick": dict(noop=1_000, map=10_000, lat=100, depth=7, cpu=20, cpu_ms=20.0,
                  big=10, big_mb=10, startup=3, reps=2),
}
SECTION_TIMEOUT_S = 300  # a section that takes longer is a hang: dump stacks and exit


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def section(name: str) -> None:
    """Log progress and re-arm the hang watchdog."""
    faulthandler.cancel_dump_traceback_later()
    faulthandler.dump_traceback_later(SECTION_TIMEOUT_S, exit=True)
    log(name)


def best_of(reps: int, fn) -> tuple[float, list[float]]:
    """Run ``fn`` ``reps`` times; return (the shortest wall time, all of them)."""
    times = []
    for _ in range(reps):
        t0 = perf()
        fn()
        times.append(perf() - t0)
    return min(times), times


def latency(reps: int, n: int, one_call) -> tuple[float, list[float]]:
    """Mean latency (s) of ``n`` sequential calls; the best mean of ``reps`` runs."""
    means = []
    for _ in range(reps):
        t0 = perf()
        for _ in range(n):
            one_call()
        means.append((perf() - t0) / n)
    return min(means), means


def cpu_runs(reps: int, workers: int, run_batch) -> dict:
    """Time ``run_batch()`` (which returns the CPU seconds its tasks used) ``reps`` times.

    Efficiency of a run = (CPU time of its tasks / workers) / wall time: the ideal time
    is measured by the tasks themselves (thread CPU time), so a slower or faster CPU, or
    a calibration taken at another moment, does not skew it. The best run counts.
    """
    runs = []
    for _ in range(reps):
        t0 = perf()
        cpu = run_batch()
        wall = perf() - t0
        runs.append({"wall_s": wall, "task_cpu_s": cpu, "efficiency": cpu / workers / wall})
    return {"value": max(r["efficiency"] for r in runs), "runs": runs}


def calibrate_spin(target_s: float) -> tuple[int, float]:
    """Iterations of ``spin`` that take ``target_s`` here; and the measured time per task."""
    n = 100_000
    for _ in range(6):
        n = max(1000, int(n * target_s / T.spin_cpu(n)))
    return n, statistics.median(T.spin_cpu(n) for _ in range(7))


def make_big_args(count: int, mb: int) -> list:
    size = mb * 1_000_000
    if np is not None:
        return [np.full(size, i % 251, dtype=np.uint8) for i in range(count)]
    return [bytearray([i % 251]) * size for i in range(count)]


# =========================================================================================
# scoop
# =========================================================================================
def scoop_warmup() -> None:
    fs = [futures.submit(T.noop) for _ in range(200)]
    futures.wait(fs)
    list(futures.map(T.inc, range(2000)))
    futures.submit(T.tree, 4).result()
    futures.wait([futures.submit(T.spin, 1000) for _ in range(4)])
    futures.wait([futures.submit(T.who) for _ in range(4)])
    futures.submit(T.nbytes, bytearray(200_000)).result()


def shipped_latency(reps: int, n: int, remote_only: bool) -> dict:
    """Sequential submit + ``futures.wait([f])``: the future is shipped, never run inline.

    Each call is timed on its own and labelled with the worker that ran it. The value is
    the best (over runs) mean latency of all calls, or with ``remote_only`` of the calls
    that ran on a worker other than the root.
    """
    where: Counter = Counter()
    means = []
    for _ in range(reps):
        samples = []
        for _ in range(n):
            t0 = perf()
            f = futures.submit(T.who)
            # A wait with a timeout makes this worker run nothing meanwhile (scoop's rule
            # for timed waits), so the call really crosses to another process and back.
            futures.wait([f], timeout=60 if remote_only else None)
            dt = perf() - t0
            w = f.result()
            where[w] += 1
            if not remote_only or w != 0:
                samples.append(dt)
        if samples:
            means.append(statistics.fmean(samples))
    return {"value": min(means) * 1e6 if means else None,
            "means_us": [x * 1e6 for x in means], "ran_on_worker": dict(where)}


def run_scoop(cfg: dict, workers: int, spin_n: int, big_args: list) -> dict:
    r: dict = {}
    reps = cfg["reps"]
    with Launcher(workers, pythonpath=HERE, encrypt=cfg["encrypt"]):
        section("scoop: warm-up")
        scoop_warmup()

        section("scoop: 1 no-op tasks")
        def noop_burst():
            fs = [futures.submit(T.noop) for _ in range(cfg["noop"])]
            done, not_done = futures.wait(fs)
            assert not not_done and all(f.exception() is None for f in fs)
        t, ts = best_of(reps, noop_burst)
        r["noop"] = {"value": cfg["noop"] / t, "times_s": ts}

        section("scoop: 2 map")
        items = list(range(cfg["map"]))
        def do_map():
            out = list(futures.map(T.inc, items))
            assert len(out) == len(items) and out[-1] == items[-1] + 1
        t, ts = best_of(reps, do_map)
        r["map"] = {"value": cfg["map"] / t, "times_s": ts}

        section("scoop: 3 latency")
        m, ms = latency(reps, cfg["lat"], lambda: futures.submit(T.noop).result())
        r["lat_inline"] = {"value": m * 1e6, "means_us": [x * 1e6 for x in ms]}
        r["lat_wait"] = shipped_latency(reps, cfg["lat"], remote_only=False)

        section("scoop: 4 nested tree")
        depth = cfg["depth"]
        nodes = 2 ** (depth + 1) - 1
        def do_tree():
            got = futures.submit(T.tree, depth).result()
            assert got == nodes, (got, nodes)
        t, ts = best_of(reps, do_tree)
        r["tree"] = {"value": nodes / t, "times_s": ts, "tasks": nodes}

        section("scoop: 5 CPU-bound")
        def do_cpu():
            fs = [futures.submit(T.spin_cpu, spin_n) for _ in range(cfg["cpu"])]
            futures.wait(fs)
            return sum(f.result() for f in fs)
        r["cpu"] = cpu_runs(max(1, reps - 1), workers, do_cpu)

        section("scoop: 6 big arguments")
        def do_big():
            fs = [futures.submit(T.nbytes, a) for a in big_args]
            futures.wait(fs)
            assert sum(f.result() for f in fs) == sum(memoryview(a).nbytes for a in big_args)
        t, ts = best_of(max(1, reps - 1), do_big)
        r["big"] = {"time_s": t, "times_s": ts}
    if workers > 1:
        section("scoop: 3 latency, remote (timed wait: the root runs nothing)")
        with Launcher(workers, pythonpath=HERE, encrypt=cfg["encrypt"]):
            scoop_warmup()
            r["lat_remote"] = shipped_latency(reps, cfg["lat"], remote_only=True)
    return r


def cf_noop(ex: cf.Executor, cfg: dict, reps: int) -> dict:
    """Line 1 on a concurrent.futures executor: submit no-op calls, wait for all."""
    def noop_burst():
        fs = [ex.submit(T.noop) for _ in range(cfg["noop"])]
        cf.wait(fs)
        assert all(f.exception() is None for f in fs)
    t, ts = best_of(reps, noop_burst)
    return {"value": cfg["noop"] / t, "times_s": ts}


def cf_map(ex: cf.Executor, items: list, chunksize: int | None, reps: int) -> dict:
    """Line 2 on a concurrent.futures executor: ``ex.map`` with ``chunksize``."""
    def do_map():
        out = list(ex.map(T.inc, items, chunksize=chunksize))
        assert out[-1] == items[-1] + 1
    t, ts = best_of(reps, do_map)
    return {"value": len(items) / t, "times_s": ts, "chunksize": chunksize}


def cf_latency(ex: cf.Executor, cfg: dict, reps: int) -> dict:
    """Line 3 on a concurrent.futures executor: sequential ``submit(f).result()``."""
    m, ms = latency(reps, cfg["lat"], lambda: ex.submit(T.noop).result())
    return {"value": m * 1e6, "means_us": [x * 1e6 for x in ms]}


def run_executor(cfg: dict, workers: int) -> dict:
    """scoop.Executor, measured as PPE is: ``workers`` processes, the caller only submits."""
    reps = cfg["reps"]
    with scoop.Executor(workers, pythonpath=HERE, encrypt=cfg["encrypt"]) as ex:
        section("scoop.Executor: warm-up")
        cf.wait([ex.submit(T.noop) for _ in range(200)])
        list(ex.map(T.inc, range(2000)))
        section("scoop.Executor: 8a no-op tasks")
        r = {"noop": cf_noop(ex, cfg, reps)}
        section("scoop.Executor: 8b map (automatic chunks)")
        r["map"] = cf_map(ex, list(range(cfg["map"])), None, reps)
        section("scoop.Executor: 8c latency")
        r["lat"] = cf_latency(ex, cfg, reps)
    return r


# =========================================================================================
# ProcessPoolExecutor and multiprocessing.Pool
# =========================================================================================
def run_ppe(cfg: dict, workers: int, spin_n: int, big_args: list) -> dict:
    r: dict = {}
    reps = cfg["reps"]
    ex = cf.ProcessPoolExecutor(max_workers=workers)
    try:
        section("PPE: warm-up")
        cf.wait([ex.submit(T.noop) for _ in range(200)])
        list(ex.map(T.inc, range(2000), chunksize=100))
        cf.wait([ex.submit(T.spin, 1000) for _ in range(4)])
        ex.submit(T.nbytes, bytearray(200_000)).result()

        section("PPE: 1 no-op tasks")
        r["noop"] = cf_noop(ex, cfg, reps)

        items = list(range(cfg["map"]))
        section("PPE: 2 map, chunksize=1 (default)")
        r["map"] = cf_map(ex, items, 1, max(1, reps - 1))
        chunk = max(1, math.ceil(len(items) / (4 * workers)))  # mp.Pool.map's heuristic
        section(f"PPE: 2b map, chunksize={chunk}")
        r["map_chunked"] = cf_map(ex, items, chunk, reps)

        section("PPE: 3 latency")
        r["lat"] = cf_latency(ex, cfg, reps)

        section("PPE: 5 CPU-bound")
        def do_cpu():
            fs = [ex.submit(T.spin_cpu, spin_n) for _ in range(cfg["cpu"])]
            return sum(f.result() for f in fs)
        r["cpu"] = cpu_runs(max(1, reps - 1), workers, do_cpu)

        section("PPE: 6 big arguments")
        def do_big():
            fs = [ex.submit(T.nbytes, a) for a in big_args]
            assert sum(f.result() for f in fs) == sum(memoryview(a).nbytes for a in big_args)
        t, ts = best_of(max(1, reps - 1), do_big)
        r["big"] = {"time_s": t, "times_s": ts}
    finally:
        ex.shutdown(wait=True)
    return r


def run_pool(cfg: dict, workers: int, spin_n: int, big_args: list) -> dict:
    r: dict = {}
    reps = cfg["reps"]
    pool = multiprocessing.Pool(workers)
    try:
        section("Pool: warm-up")
        [a.get() for a in [pool.apply_async(T.noop) for _ in range(200)]]
        pool.map(T.inc, range(2000))
        [a.get() for a in [pool.apply_async(T.spin, (1000,)) for _ in range(4)]]
        pool.apply(T.nbytes, (bytearray(200_000),))

        section("Pool: 1 no-op tasks")
        def noop_burst():
            rs = [pool.apply_async(T.noop) for _ in range(cfg["noop"])]
            for a in rs:
                a.get()
        t, ts = best_of(reps, noop_burst)
        r["noop"] = {"value": cfg["noop"] / t, "times_s": ts}

        section("Pool: 2 map (default chunksize)")
        items = list(range(cfg["map"]))
        def do_map():
            out = pool.map(T.inc, items)
            assert out[-1] == items[-1] + 1
        t, ts = best_of(reps, do_map)
        r["map"] = {"value": cfg["map"] / t, "times_s": ts}

        section("Pool: 3 latency")
        m, ms = latency(reps, cfg["lat"], lambda: pool.apply_async(T.noop).get())
        r["lat"] = {"value": m * 1e6, "means_us": [x * 1e6 for x in ms]}

        section("Pool: 5 CPU-bound")
        def do_cpu():
            rs = [pool.apply_async(T.spin_cpu, (spin_n,)) for _ in range(cfg["cpu"])]
            return sum(a.get() for a in rs)
        r["cpu"] = cpu_runs(max(1, reps - 1), workers, do_cpu)

        section("Pool: 6 big arguments")
        def do_big():
            rs = [pool.apply_async(T.nbytes, (a,)) for a in big_args]
            assert sum(a.get() for a in rs) == sum(memoryview(a).nbytes for a in big_args)
        t, ts = best_of(max(1, reps - 1), do_big)
        r["big"] = {"time_s": t, "times_s": ts}
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return r


# =========================================================================================
# 7: whole-process startup + shutdown
# =========================================================================================
TRIVIAL_SCOOP = """\
from scoop import futures

if __name__ == "__main__":
    assert list(futures.map(abs, [-1, -2])) == [1, 2]
"""
TRIVIAL_PPE = """\
import concurrent.futures as cf

if __name__ == "__main__":
    with cf.ProcessPoolExecutor(max_workers={workers}) as ex:
        assert ex.submit(abs, -1).result() == 1
"""
TRIVIAL_POOL = """\
import multiprocessing

if __name__ == "__main__":
    pool = multiprocessing.Pool({workers})
    assert pool.apply(abs, (-1,)) == 1
    pool.close()
    pool.join()
"""


def run_startup(cfg: dict, workers: int) -> dict:
    section("7 startup + shutdown (subprocesses)")
    r = {}
    with tempfile.TemporaryDirectory(prefix="scoop-bench-") as tmp:
        progs = {}
        for name, src in (("scoop", TRIVIAL_SCOOP), ("ppe", TRIVIAL_PPE),
                          ("pool", TRIVIAL_POOL)):
            path = os.path.join(tmp, f"trivial_{name}.py")
            with open(path, "w") as f:
                f.write(src.format(workers=workers))
            progs[name] = path
        cmds = {
            "scoop": [sys.executable, "-m", "scoop", "-n", str(workers), progs["scoop"]],
            "ppe": [sys.executable, progs["ppe"]],
            "pool": [sys.executable, progs["pool"]],
            "python": [sys.executable, "-c", "pass"],  # the interpreter's own start-up
        }
        for name, cmd in cmds.items():
            subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)  # warm caches
            times = []
            for _ in range(cfg["startup"]):
                t0 = perf()
                p = subprocess.run(cmd, cwd=tmp, capture_output=True, timeout=60)
                times.append(perf() - t0)
                if p.returncode != 0:
                    raise RuntimeError(f"{cmd} failed ({p.returncode}):\n"
                                       f"{p.stderr.decode(errors='replace')}")
            r[name] = {"value": statistics.median(times), "times_s": times}
    return r


# =========================================================================================
# report
# =========================================================================================
def fmt(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        s = f"{v:,.0f}"
    elif abs(v) >= 100:
        s = f"{v:.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:#.3g}"
    return s


def ratio(a, b) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def build_rows(cfg, workers, S, E, P, U, spin_t, X) -> list[dict]:
    mb = cfg["big"] * cfg["big_mb"]

    def eff(d):
        return d["cpu"]["value"]

    def mbps(d):
        return mb / d["big"]["time_s"]

    rows = []

    def row(key, label, unit, s, e, p, target, ok):
        rows.append({"key": key, "line": label, "unit": unit, "scoop": s, "ppe": e,
                     "pool": p, "target": target, "pass": ok})

    row("noop", f"1 {cfg['noop']:,} no-op tasks (submit all, wait)", "tasks/s",
        S["noop"]["value"], E["noop"]["value"], P["noop"]["value"],
        ">= 3x Pool", S["noop"]["value"] >= 3 * P["noop"]["value"])
    row("map", f"2 map over {cfg['map']:,} ints (PPE chunksize=1)", "items/s",
        S["map"]["value"], E["map"]["value"], P["map"]["value"],
        ">= 1.2x Pool", S["map"]["value"] >= 1.2 * P["map"]["value"])
    row("map_chunked", f"2b  same, PPE chunksize={E['map_chunked']['chunksize']}",
        "items/s", S["map"]["value"], E["map_chunked"]["value"], P["map"]["value"],
        "(info)", None)
    row("lat_inline", f"3a {cfg['lat']} x submit+result (scoop: inline)", "us",
        S["lat_inline"]["value"], E["lat"]["value"], P["lat"]["value"],
        "<= 0.5x PPE", S["lat_inline"]["value"] <= 0.5 * E["lat"]["value"])
    w = S["lat_wait"]["ran_on_worker"]
    row("lat_wait", f"3b  scoop: submit+wait (shipped; ran on {_where(w)})", "us",
        S["lat_wait"]["value"], E["lat"]["value"], P["lat"]["value"],
        "<= 0.5x PPE", S["lat_wait"]["value"] <= 0.5 * E["lat"]["value"])
    if "lat_remote" in S:
        w = S["lat_remote"]["ran_on_worker"]
        v = S["lat_remote"]["value"]
        row("lat_remote", f"3c  scoop: submit+wait(timeout), remote ({_where(w)})", "us",
            v, E["lat"]["value"], P["lat"]["value"],
            "<= 1x PPE", None if v is None else v <= E["lat"]["value"])
    row("tree", f"4 nested binary tree depth {cfg['depth']} "
        f"({S['tree']['tasks']:,} tasks)", "tasks/s", S["tree"]["value"], None, None,
        ">= 10,000/s", S["tree"]["value"] >= 10_000)
    row("cpu", f"5 {cfg['cpu']} CPU-bound ~{spin_t * 1e3:.0f} ms tasks: efficiency", "",
        eff(S), eff(E), eff(P), ">= 0.95", eff(S) >= 0.95)
    row("big", f"6 {cfg['big']} tasks x {cfg['big_mb']} MB argument", "MB/s",
        mbps(S), mbps(E), mbps(P), ">= 3x PPE", mbps(S) >= 3 * mbps(E))
    row("startup", f"7 startup+shutdown, trivial job, -n {workers} (median)", "s",
        U["scoop"]["value"], U["ppe"]["value"], U["pool"]["value"], "<= 2x PPE",
        U["scoop"]["value"] <= 2 * U["ppe"]["value"])
    # scoop.Executor (its caller runs no task, as PPE's) in the scoop column.
    row("exe_noop", f"8a  scoop.Executor: {cfg['noop']:,} no-op submits, cf.wait", "tasks/s",
        X["noop"]["value"], E["noop"]["value"], P["noop"]["value"], "(info)", None)
    row("exe_map", f"8b  scoop.Executor.map over {cfg['map']:,} ints (PPE chunksize="
        f"{E['map_chunked']['chunksize']})", "items/s", X["map"]["value"],
        E["map_chunked"]["value"], P["map"]["value"], "(info)", None)
    row("exe_lat", f"8c  scoop.Executor: {cfg['lat']} x submit+result", "us",
        X["lat"]["value"], E["lat"]["value"], P["lat"]["value"], "(info)", None)
    return rows


def _where(counts: dict) -> str:
    total = sum(counts.values()) or 1
    parts = [f"w{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items(),
                                                                   key=lambda kv: str(kv[0]))]
    return ", ".join(parts)


def print_table(rows: list[dict]) -> None:
    head = ["line", "unit", "scoop", "PPE", "mp.Pool", "scoop/PPE", "scoop/Pool", "target",
            "result"]
    body = []
    for r in rows:
        mark = "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        body.append([r["line"], r["unit"], fmt(r["scoop"]), fmt(r["ppe"]), fmt(r["pool"]),
                     ratio(r["scoop"], r["ppe"]), ratio(r["scoop"], r["pool"]),
                     r["target"], mark])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    left = {0, 1, 7, 8}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(line(head))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print(line(b))


def leftover_children() -> list[str]:
    """Live (non-zombie) processes whose parent is this process."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[1]) == me and fields[0] != b"Z":
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{name}: {cmdline}")
        except (OSError, ValueError, IndexError):
            continue
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="workers per pool (default 2)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    ap.add_argument("--encrypt", action="store_true",
                    help="scoop's pools encrypt their traffic (ZeroMQ CURVE, as --encrypt)")
    ns = ap.parse_args(argv)
    if ns.workers < 1:
        ap.error("--workers must be >= 1")
    cfg = dict(SIZES["quick" if ns.quick else "full"], encrypt=ns.encrypt)
    workers = ns.workers
    t_start = perf()
    log(f"{'quick' if ns.quick else 'full'} run, {workers} workers per pool, "
        f"{'encrypted, ' if ns.encrypt else ''}"
        f"{os.cpu_count()} CPUs, python {platform.python_version()}, scoop {scoop.__version__}")
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        log(f"warning: load average {load1:.2f}: other work on this machine skews the numbers")

    section("calibrating the CPU-bound task")
    spin_n, spin_t = calibrate_spin(cfg["cpu_ms"] / 1000)
    log(f"spin({spin_n:,}) takes {spin_t * 1e3:.1f} ms here")
    big_args = make_big_args(cfg["big"], cfg["big_mb"])

    S = run_scoop(cfg, workers, spin_n, big_args)
    X = run_executor(cfg, workers)
    E = run_ppe(cfg, workers, spin_n, big_args)
    P = run_pool(cfg, workers, spin_n, big_args)
    del big_args
    U = run_startup(cfg, workers)
    faulthandler.cancel_dump_traceback_later()

    rows = build_rows(cfg, workers, S, E, P, U, spin_t, X)
    print()
    print(f"scoop {scoop.__version__} vs ProcessPoolExecutor vs multiprocessing.Pool: "
          f"{workers} workers each, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()} ({'quick' if ns.quick else 'full'} sizes)")
    print("throughput and efficiency: best of runs; latency: best mean of runs; "
          "startup: median of runs")
    print_table(rows)
    print(f"load average at start: {load1:.2f}")
    print(f"notes: bare `python -c pass` takes {U['python']['value']:.3f} s here (median). "
          f"scoop's pool counts its root process as a worker; the peers' parent only "
          f"submits.")
    for k in ("lat_wait", "lat_remote"):
        if k in S:
            print(f"  {k}: executed on workers {S[k]['ran_on_worker']}")
    kids = leftover_children() + [repr(c) for c in multiprocessing.active_children()]
    print(f"leftover child processes: {kids if kids else 'none'}")
    elapsed = perf() - t_start
    print(f"total bench time: {elapsed:.1f} s")
    if ns.json:
        out = {
            "config": {**cfg, "workers": workers, "cpus": os.cpu_count(),
                       "python": platform.python_version(), "scoop": scoop.__version__,
                       "spin_iterations": spin_n, "spin_task_s": spin_t, "quick": ns.quick},
            "rows": rows,
            "raw": {"scoop": S, "ppe": E, "pool": P, "startup": U, "executor": X},
            "leftover_children": kids,
            "load_average_at_start": load1,
            "elapsed_s": elapsed,
        }
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        log(f"wrote {ns.json}")
    return 1 if kids else 0


if __name__ == "__main__":
    sys.exit(main())
