"""Scale beyond this machine, by simulation: the real broker with 1,000+ simulated workers.

Run from the repository root (see bench/README.md, "Simulated workers")::

    python bench/simulate.py sweep                    # 10 -> 2,000 workers, 10 s each
    python bench/simulate.py sweep --workers 1000 --seconds 30
    python bench/simulate.py lose --workers 4,1000    # a worker holding groups vanishes
    python bench/simulate.py long --workers 1000 --minutes 10   # the broker's memory
    python bench/simulate.py dispatch                 # the Schedule alone, per message
    python bench/simulate.py plot sweep.json long.json --out bench/simulation.png

The broker is scoop's own (``scoop._broker``, ``scoop._schedule``) in a process of its
own; the workers are simulated, a few hundred per process, and speak the real protocol
(``bench/sim``). Every mode prints a table; ``--json FILE`` also writes every number.
The exit status is 1 if a task was lost, answered twice or wrongly, or a process was
left running.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from sim import harness  # noqa: E402 - after the path that holds it

SWEEP = "10,50,100,250,500,1000,2000"


def _config(args, workers: int, **kw) -> harness.Config:
    fields = dict(workers=workers, per_process=args.per_process, seconds=args.seconds,
                  group=args.group, credit=args.credit, task_s=args.task_ms / 1000,
                  progress=args.progress, profile=args.profile,
                  resumable=args.resumable, pause_s=args.pause_s,
                  owner_stall_s=args.owner_stall_s)
    fields.update(kw)
    return harness.Config(**fields)


def _ok(r: harness.Result) -> bool:
    lost_ok = r.lost is None or (r.lost["answered"] == r.lost["tids"]
                                 and not r.lost["answered_twice"])
    return (r.error is None and not r.missing and not r.duplicates and not r.wrong
            and not r.failed and not r.leftover and lost_ok)


def _row(r: harness.Result) -> str:
    cpu = r.broker_cpu_us_per_task
    reg = r.registration_s
    reg_cpu = r.registration_cpu_s
    return (f"{r.config['workers']:>7} {r.processes:>5} "
            f"{'-' if reg is None else f'{reg:.2f}':>8} "
            f"{'-' if reg_cpu is None else f'{reg_cpu:.2f}':>8} {r.tasks_per_s:>10,.0f} "
            f"{'-' if cpu is None else f'{cpu:.2f}':>9} {r.broker_cpu_frac:>7.0%} "
            f"{r.samples[-1][3] / 1024 if r.samples else 0:>8.1f} "
            f"{'ok' if _ok(r) else 'FAIL'}")


HEADER = (f"{'workers':>7} {'procs':>5} {'reg (s)':>8} {'reg cpu':>8} {'tasks/s':>10} "
          f"{'cpu us/t':>9} {'broker':>7} {'rss (MB)':>8} check")


def _report(r: harness.Result) -> None:
    print(_row(r), flush=True)
    if not _ok(r):
        print(f"    error={r.error} missing={r.missing} duplicates={r.duplicates} "
              f"wrong={r.wrong} failed={r.failed} leftover={r.leftover} lost={r.lost}",
              flush=True)
        if r.broker_log:
            print("    broker log:\n" + r.broker_log[-2000:], flush=True)


def sweep(args) -> list[harness.Result]:
    """Each worker count in turn; with --repeat, the run that routed most is kept (the
    others' numbers are in the JSON, as "others")."""
    print(HEADER, flush=True)
    results = []
    for n in args.workers:
        runs = [harness.run(_config(args, n)) for _ in range(args.repeat)]
        best = max(runs, key=lambda r: (_ok(r), r.tasks_per_s))
        best.others = [dict(r.as_dict(), samples=[], broker_log="") for r in runs
                       if r is not best]
        results.append(best)
        _report(best)
    return results


def lose(args) -> list[harness.Result]:
    print(HEADER + "  | lost worker: groups tasks noticed (s) re-run (s)", flush=True)
    results = []
    for n in args.workers:
        r = harness.run(_config(args, n, lose=True))
        results.append(r)
        print(_row(r), end="", flush=True)
        lost = r.lost or {}
        print(f"  | {lost.get('groups', '-')} {lost.get('tids', '-')} "
              f"{lost.get('noticed_s', '-')} {lost.get('rerun_s', '-')}; "
              f"{r.gone} gone in all", flush=True)
        if not _ok(r):
            _report(r)
    return results


def long(args) -> list[harness.Result]:
    n = args.workers[0]
    r = harness.run(_config(args, n, seconds=args.minutes * 60, sample_s=5.0,
                            warmup_s=10.0, timeout_s=120.0))
    print(HEADER, flush=True)
    _report(r)
    print(f"{'t (s)':>8} {'tasks':>12} {'broker cpu (s)':>15} {'rss (MB)':>9}")
    every = max(1, len(r.samples) // 20)
    for t, tasks, cpu, rss in r.samples[::every] + r.samples[-1:]:
        print(f"{t:>8.0f} {tasks:>12,} {cpu:>15.1f} {rss / 1024:>9.1f}")
    return [r]


def dispatch_cost(args) -> None:
    """The Schedule alone, no socket: what one finished group costs the broker's
    decisions (results, READY, dispatch of the next queued group) when every worker is
    busy and work is queued, one message per turn of its loop."""
    from scoop import _protocol as P
    from scoop._schedule import Schedule

    fids = itertools.count(1)

    def group():
        fid = next(fids)
        return P.Parcel(fid, 0, [P.task_ids_frame([fid]), b""], b"m" * 32)

    print(f"{'workers':>7} {'us per message':>15}")
    for n in args.workers:
        s = Schedule(size=n + 1)
        for wid in range(n + 1):
            s.hello(b"w%d.0" % wid, wid, {"version": P.VERSION, "wid": wid})
        root, peers = s.roster.by_wid[0], [s.roster.by_wid[w] for w in range(1, n + 1)]
        s.tasks(root, [group() for _ in range(2 * n)])
        for peer in peers:
            s.ready(peer, 1)
        s.dispatch(0.0)  # every worker holds a group; n are queued
        rounds = max(args.rounds, 2 * n)
        t0 = time.perf_counter()
        for i in range(rounds):
            peer = peers[i % n]
            s.results(peer, (), [next(iter(peer.held))], 1)
            s.tasks(root, [group()])
            s.dispatch(0.0)
        print(f"{n:>7} {(time.perf_counter() - t0) / rounds * 1e6:>15.1f}", flush=True)


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps, long_run = [], None
    for spec in args.files:  # FILE or FILE=LABEL
        path, _, label = spec.partition("=")
        with open(path) as f:
            data = json.load(f)
        if data["mode"] == "long":
            long_run = data
        else:
            sweeps.append((label or os.path.basename(path), data["results"]))
    panels = [("tasks/s routed", "tasks_per_s"), ("registration (s)", "registration_s"),
              ("broker CPU per task (us)", "broker_cpu_us_per_task")]
    fig, axes = plt.subplots(1, len(panels) + bool(long_run), figsize=(13, 3.2))
    for ax, (title, key) in zip(axes, panels):
        for label, results in sweeps:
            ax.plot([r["config"]["workers"] for r in results], [r[key] for r in results],
                    "o-", label=label, markersize=4)
        ax.set_xscale("log")
        ax.set_xlabel("simulated workers")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    if len(sweeps) > 1:
        axes[0].legend(fontsize=8)
    if long_run:
        r = long_run["results"][0]
        t = [s[0] / 60 for s in r["samples"]]
        axes[-1].plot(t, [s[3] / 1024 for s in r["samples"]], color="tab:red")
        axes[-1].set_xlabel("minutes")
        axes[-1].set_title(f"broker RSS (MB), {r['config']['workers']} workers", fontsize=10)
        axes[-1].set_ylim(bottom=0)
        axes[-1].grid(alpha=0.3)
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=72)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for mode, workers, seconds, task_ms in (("sweep", SWEEP, 10.0, 0.0),
                                            ("lose", "4,1000", 10.0, 2.0),
                                            ("long", "1000", 0.0, 20.0)):
        m = sub.add_parser(mode)
        m.add_argument("--workers", default=workers,
                       type=lambda s: [int(x) for x in s.split(",")],
                       help=f"simulated worker counts, comma-separated (default {workers})")
        m.add_argument("--seconds", type=float, default=seconds, help="measured load (s)")
        m.add_argument("--task-ms", type=float, default=task_ms,
                       help=f"simulated length of one task (ms, default {task_ms})")
        m.add_argument("--group", type=int, default=32, help="tasks per group (default 32)")
        m.add_argument("--credit", type=int, default=2,
                       help="groups each worker asks for ahead (default 2)")
        m.add_argument("--per-process", type=int, default=500,
                       help="simulated workers per process (default 500)")
        m.add_argument("--resumable", action="store_true",
                       help="groups are map chunks: a lost worker's go back to their owner")
        m.add_argument("--pause-s", type=float, default=0.0,
                       help="stop the broker process this long halfway (SIGSTOP, SIGCONT)")
        m.add_argument("--owner-stall-s", type=float, default=0.0,
                       help="the owner reads nothing this long halfway (a busy root)")
        m.add_argument("--progress", action="store_true", help="a line per sample on stderr")
        m.add_argument("--profile", default="", help="write the broker's cProfile stats here")
        m.add_argument("--json", help="also write every number to this file")
        if mode == "sweep":
            m.add_argument("--repeat", type=int, default=1,
                           help="runs per worker count; the one that routed most is kept")
        if mode == "long":
            m.add_argument("--minutes", type=float, default=10.0)
    dc = sub.add_parser("dispatch")
    dc.add_argument("--workers", default="10,100,1000,2000,10000",
                    type=lambda s: [int(x) for x in s.split(",")])
    dc.add_argument("--rounds", type=int, default=20000)
    pl = sub.add_parser("plot")
    pl.add_argument("files", nargs="+",
                    help="JSON files of sweeps (FILE=LABEL names one) and of a long run")
    pl.add_argument("--out", default=os.path.join(HERE, "simulation.png"))
    pl.add_argument("--title", default="scoop broker, simulated workers (bench/simulate.py)")
    args = p.parse_args(argv)
    if args.mode in ("plot", "dispatch"):
        {"plot": plot, "dispatch": dispatch_cost}[args.mode](args)
        return 0
    started = time.time()
    try:
        results = {"sweep": sweep, "lose": lose, "long": long}[args.mode](args)
    except KeyboardInterrupt:  # harness.run has ended its processes
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": args.mode, "argv": sys.argv[1:], "started": started,
                       "cpus": os.cpu_count(), "loadavg_end": os.getloadavg(),
                       "results": [r.as_dict() for r in results]}, f, indent=1)
    return 0 if all(_ok(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
