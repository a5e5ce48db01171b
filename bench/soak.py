"""Soak test: a long stream of futures while worker processes are killed and replaced.

Run from the repository root::

    python bench/soak.py                        # 10 minutes, 4 workers, a kill every 3 s
    python bench/soak.py --seconds 60
    python bench/soak.py --seconds 30 --kill-every 1 --json soak.json

This interpreter is the root worker of an in-process job (``scoop._launch.Launcher``)
with ``--workers - 1`` worker processes. The main thread keeps several hundred futures in
flight (``futures.submit`` of small tasks, some nested ones that submit and wait for two
children, and regular ``futures.map`` / ``map_as_completed`` calls); every task returns
its own index and a deterministic value, checked here. A monitor thread calls
``Launcher.check_workers`` every 50 ms, SIGKILLs a random non-root worker every
``--kill-every`` seconds and starts a replacement with a fresh id, samples this process's
RSS, and dumps the state of the job if no result arrives for ``--hang-s`` seconds.

At the end it checks that every task's result arrived exactly once and was right, that
no task failed (``WorkerLostError`` included), that the root's RSS did not grow by more
than 50% after the warm-up, and that no worker process is left after ``Launcher.stop``.
Exit status: 0 if every check passed, 1 otherwise. See bench/README.md.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))

MULT = 2654435761  # Knuth's multiplicative hash: a cheap, deterministic value per index
WORKER_MODULE = "scoop._start_worker"
RSS_GROWTH_LIMIT = 0.5  # more than +50% after the warm-up fails the run
TIMED_WAIT_S = 120.0  # the timeout of --timed-frac tasks' waits: long, never reached


# -- the tasks (this file is imported as the module ``soak`` by every worker, so they
#    travel by reference) ------------------------------------------------------------------
def expected(i: int) -> int:
    """The value task ``i`` must return."""
    return (i * MULT) % 2**32


def task(i: int, dur: float) -> tuple[int, int]:
    """Sleep ``dur`` seconds; return the index and its value."""
    time.sleep(dur)
    return i, expected(i)


def half(i: int, k: int, dur: float) -> int:
    """The low (k=0) or high (k=1) 16 bits of ``expected(i)``."""
    time.sleep(dur)
    v = expected(i)
    return (v >> 16) if k else (v & 0xFFFF)


def nested(i: int, dur: float, timeout: float | None = None) -> tuple[int, int]:
    """Submit two children (the halves of the value) and combine them; wait for them
    with ``timeout`` if given (a worker waiting with a deadline hands its queue back)."""
    from scoop import futures

    lo = futures.submit(half, i, 0, dur / 2)
    hi = futures.submit(half, i, 1, dur / 2)
    return i, lo.result(timeout) | (hi.result(timeout) << 16)


# -- measurements ------------------------------------------------------------------------
def rss_kb() -> int:
    """This process's resident set size (VmRSS, kB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _proc_info(pid: int) -> tuple[str, int, str] | None:
    """(cmdline, parent pid, state) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        ppid, state = 0, "?"
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    ppid = int(line.split()[1])
                elif line.startswith("State:"):
                    state = line.split()[1]
        return cmdline, ppid, state
    except (OSError, ValueError):
        return None


def leftover_workers(procs, spawned_pids: set[int]) -> list[int]:
    """Worker processes of this job still alive: unreaped Popens, any pid we spawned that
    still runs a worker, and any worker process whose parent is this one."""
    left = {p.pid for p in procs if p.poll() is None}
    for pid in spawned_pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        info = _proc_info(pid)
        if info and WORKER_MODULE in info[0] and info[2] != "Z":
            left.add(pid)
    me = os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _proc_info(int(name))
            if info and WORKER_MODULE in info[0] and info[1] == me and info[2] != "Z":
                left.add(int(name))
    return sorted(left)


class LogCounter(logging.Handler):
    """Counts scoop's log records in this process; shows the unexpected ones."""

    EXPECTED = ("ended early", "is gone")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.expected = 0
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING and any(s in msg for s in self.EXPECTED):
            self.expected += 1
        elif record.levelno >= logging.WARNING:
            self.unexpected.append(f"{record.levelname} {msg}")
            print(f"[soak] scoop log: {record.levelname} {msg}", file=sys.stderr, flush=True)


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the monitor thread ------------------------------------------------------------------
class Monitor(threading.Thread):
    """Watches the workers, kills and replaces them, samples RSS, detects hangs.

    The main thread only runs futures; it never touches ``job.procs`` while this runs.
    """

    def __init__(self, job, args, state: Soak) -> None:
        super().__init__(name="soak-monitor", daemon=True)
        self.job = job
        self.args = args
        self.state = state
        self.rng = random.Random(args.seed + 1)
        self.stop_event = threading.Event()
        self.killing = threading.Event()
        self.killing.set()
        self.next_wid = args.workers
        self.killed: list[dict] = []
        self.replacements = 0
        self.spawned_pids = {p.pid for p in job.procs.values()}
        self.rss: list[tuple[float, int]] = []
        self.hang_reported = False
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported in the summary
            import traceback

            self.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()

    def _loop(self) -> None:
        args, job, state = self.args, self.job, self.state
        t0 = time.monotonic()
        next_kill = t0 + args.kill_every if args.kill_every > 0 else float("inf")
        next_rss = t0
        while not self.stop_event.wait(0.05):
            now = time.monotonic()
            job.check_workers()
            if now >= next_rss:
                self.rss.append((round(now - t0, 1), rss_kb()))
                next_rss = now + args.rss_every
            if self.killing.is_set() and now >= next_kill:
                self.kill_one(now - t0)
                next_kill = now + args.kill_every * self.rng.uniform(0.5, 1.5)
            idle = now - state.last_progress
            if state.inflight_count and idle > args.hang_s and not self.hang_reported:
                self.hang_reported = True
                state.hang = True
                self.dump(f"no result for {idle:.0f} s with {state.inflight_count} "
                          "futures in flight")
            if self.hang_reported and idle > args.hang_s + 30 and not state.finished:
                log("the main thread is stuck too: emergency exit")
                state.emergency_exit(self)

    def kill_one(self, t: float) -> None:
        job = self.job
        alive = [(wid, p) for wid, p in job.procs.items() if wid and p.poll() is None]
        if not alive:
            return
        wid, proc = self.rng.choice(alive)
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.killed.append({"t": round(t, 2), "wid": wid, "pid": proc.pid})
        new = self.next_wid
        self.next_wid += 1
        job.procs[new] = job._spawn(new)
        self.spawned_pids.add(job.procs[new].pid)
        self.replacements += 1

    def dump(self, why: str) -> None:
        """Print what the job looks like (racy reads: diagnostics only)."""
        log(f"HANG: {why}; state of the job follows")
        job, b = self.job, self.job.broker
        try:
            peers = {p.wid: {"credit": p.credit, "held": len(p.held)}
                     for p in list(b.schedule.roster.peers.values())}
            log(f"broker: queue={len(b.schedule.queue)} peers={peers} "
                f"losses={len(b.schedule.recovery.losses)}")
            rw = job.root_worker
            if rw is not None:
                log(f"root: pending={len(rw.pending)} away={len(rw.away)} "
                    f"outbox={len(rw.outbox)} runq={len(rw.runq)} "
                    f"credit_out={rw.policy.credit_out}")
            procs = {w: (p.pid, p.poll()) for w, p in list(job.procs.items())}
            log(f"procs (wid: pid, returncode): {procs}")
            missing = sorted(self.state.inflight_indices())[:20]
            log(f"first missing task indices: {missing}")
        except Exception as exc:  # noqa: BLE001
            log(f"(could not read the state: {exc!r})")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


# -- the load ----------------------------------------------------------------------------
class Soak:
    """The main thread's side: submits, collects and checks results."""

    def __init__(self, args, T, futures) -> None:
        self.args = args
        self.T = T
        self.futures = futures
        self.rng = random.Random(args.seed)
        self.counts = bytearray()  # per task index: results delivered (saturates at 255)
        self.callbacks = bytearray()  # per submitted future: done-callback calls
        self.inflight: dict = {}  # Future -> task index
        self.inflight_count = 0
        self.errored: set[int] = set()
        self.errors: Counter = Counter()
        self.error_samples: list[str] = []
        self.wrong = 0
        self.misrouted = 0
        self.map_calls = 0
        self.map_items_abandoned = 0
        self.inline_runs = 0
        self.last_progress = time.monotonic()
        self.hang = False
        self.main_error: str | None = None
        self.finished = False
        self.summary_fn = None

    # task indices
    def new_index(self) -> int:
        self.counts.append(0)
        return len(self.counts) - 1

    def duration(self) -> float:
        return self.rng.random() * self.args.max_ms / 1000

    def inflight_indices(self) -> list[int]:
        return list(self.inflight.values())

    # results
    def record(self, i_asked: int | None, value) -> None:
        self.last_progress = time.monotonic()
        try:
            j, v = value
        except (TypeError, ValueError):
            self.wrong += 1
            return
        if not isinstance(j, int) or not 0 <= j < len(self.counts):
            self.wrong += 1
            return
        if self.counts[j] < 255:
            self.counts[j] += 1
        if i_asked is not None and j != i_asked:
            self.misrouted += 1
        if v != expected(j):
            self.wrong += 1

    def record_error(self, indices, exc: BaseException) -> None:
        self.last_progress = time.monotonic()
        self.errors[type(exc).__name__] += 1
        self.errored.update(indices)
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{type(exc).__name__}: {exc}")

    def collect(self, fut) -> None:
        i = self.inflight.pop(fut)
        self.inflight_count = len(self.inflight)
        exc = fut.exception()
        if exc is not None:
            self.record_error([i], exc)
        else:
            self.record(i, fut.result())

    # load
    def submit_batch(self, k: int) -> None:
        futures, T = self.futures, self.T
        for _ in range(k):
            i = self.new_index()
            r = self.rng.random()
            if r < self.args.timed_frac:
                fut = futures.submit(T.nested, i, self.duration(), TIMED_WAIT_S)
            elif r < self.args.timed_frac + self.args.nested_frac:
                fut = futures.submit(T.nested, i, self.duration())
            else:
                fut = futures.submit(T.task, i, self.duration())
            self.callbacks.append(0)
            fut.add_done_callback(self._on_done(i))
            self.inflight[fut] = i
        self.inflight_count = len(self.inflight)

    def _on_done(self, i: int):
        def done(_fut) -> None:
            if self.callbacks[i] < 255:
                self.callbacks[i] += 1
        return done

    def run_map(self) -> None:
        futures, T = self.futures, self.T
        n = self.rng.randint(20, self.args.map_items)
        idx = [self.new_index() for _ in range(n)]
        durs = [self.duration() for _ in range(n)]
        self.callbacks.extend(b"\x01" * n)  # no future of their own: count as called once
        self.map_calls += 1
        ordered = self.map_calls % 2 == 1
        got: set[int] = set()
        try:
            if ordered:
                for i, value in zip(idx, futures.map(T.task, idx, durs)):
                    self.record(i, value)
                    got.add(i)
            else:
                for value in futures.map_as_completed(T.task, idx, durs):
                    self.record(None, value)
                    if isinstance(value, tuple):
                        got.add(value[0])
        except Exception as exc:  # noqa: BLE001 - counted, reported
            rest = [i for i in idx if i not in got]
            self.map_items_abandoned += len(rest)
            self.record_error(rest, exc)

    def run(self, job, monitor: Monitor) -> float:
        """The load loop; returns the seconds it ran (drain excluded)."""
        args, futures = self.args, self.futures
        t0 = time.monotonic()
        end = t0 + args.seconds
        next_report = t0 + args.report_every
        iteration = 0
        while time.monotonic() < end and not self.hang:
            deficit = args.inflight - len(self.inflight)
            while deficit > 0:
                k = min(deficit, self.rng.randint(16, 64))
                self.submit_batch(k)
                deficit -= k
            iteration += 1
            if args.map_every and iteration % args.map_every == 0:
                self.run_map()
            if args.inline_every and iteration % args.inline_every == 0 and self.inflight:
                # the newest future is still in the outbox: result() runs it right here
                fut = next(reversed(self.inflight))
                fut.result()
                self.inline_runs += 1
                self.collect(fut)
            done, _ = futures.wait(list(self.inflight), timeout=1.0,
                                   return_when=futures.FIRST_COMPLETED)
            for fut in done:
                self.collect(fut)
            now = time.monotonic()
            if now >= next_report:
                next_report = now + args.report_every
                log(f"{now - t0:5.0f} s: {sum(1 for c in self.counts if c)} results, "
                    f"{len(self.inflight)} in flight, {len(monitor.killed)} killed, "
                    f"{len(self.errored)} failed, RSS {rss_kb() // 1024} MiB")
        ran = time.monotonic() - t0
        monitor.killing.clear()  # no more kills while the last futures finish
        log(f"load stopped after {ran:.0f} s; draining {len(self.inflight)} futures")
        deadline = time.monotonic() + args.drain_s
        while self.inflight and time.monotonic() < deadline and not self.hang:
            done, _ = futures.wait(list(self.inflight), timeout=1.0,
                                   return_when=futures.FIRST_COMPLETED)
            for fut in done:
                self.collect(fut)
        if self.inflight:
            log(f"{len(self.inflight)} futures never finished")
        return ran

    def emergency_exit(self, monitor: Monitor) -> None:
        """Called by the monitor when the main thread is stuck: report, kill, exit 1."""
        procs = list(monitor.job.procs.values())
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
        for p in procs:
            try:
                p.wait(2.0)
            except Exception:  # noqa: BLE001 - counted as a leftover below
                pass
        if self.summary_fn is not None:
            self.summary_fn(emergency=True,
                            leftovers=leftover_workers(procs, monitor.spawned_pids))
        sys.stdout.flush()
        os._exit(1)


# -- main --------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="scoop soak test: futures under worker kills")
    p.add_argument("--seconds", type=float, default=600.0,
                   help="how long to push work (default: 600)")
    p.add_argument("--workers", type=int, default=4,
                   help="workers, the root included (default: 4)")
    p.add_argument("--kill-every", type=float, default=3.0,
                   help="mean seconds between worker kills, 0 for none (default: 3)")
    p.add_argument("--inflight", type=int, default=400,
                   help="futures kept in flight (default: 400)")
    p.add_argument("--max-ms", type=float, default=20.0,
                   help="task durations are uniform in [0, max-ms] ms (default: 20)")
    p.add_argument("--nested-frac", type=float, default=0.05,
                   help="fraction of submitted tasks that submit two children (default 0.05)")
    p.add_argument("--timed-frac", type=float, default=0.0,
                   help="fraction of submitted tasks that are nested ones waiting for their "
                        f"children with result(timeout={TIMED_WAIT_S:.0f}) (default: 0)")
    p.add_argument("--map-every", type=int, default=25,
                   help="a futures.map call every N loop iterations (0: none)")
    p.add_argument("--map-items", type=int, default=200, help="largest map (default: 200)")
    p.add_argument("--inline-every", type=int, default=40,
                   help="every N iterations, result() on a future still queued here")
    p.add_argument("--rss-every", type=float, default=2.0, help="RSS sample period (s)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS baseline (default: 15%% of the run, 5-60 s)")
    p.add_argument("--hang-s", type=float, default=60.0,
                   help="no result for this long counts as a hang (default: 60)")
    p.add_argument("--drain-s", type=float, default=60.0,
                   help="how long the last futures may take after the load stops")
    p.add_argument("--report-every", type=float, default=10.0, help="progress period (s)")
    p.add_argument("--max-attempts", type=int, default=None,
                   help="workers that may die holding a task group before it fails with "
                        "WorkerLostError (default: scoop's)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    args = p.parse_args(argv)
    if args.workers < 2:
        p.error("--workers must be at least 2 (the root and one worker to kill)")
    if args.warmup is None:
        args.warmup = min(60.0, max(5.0, 0.15 * args.seconds))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, HERE)
    import soak as T  # this file as a module: its tasks travel by reference

    from scoop import futures
    from scoop._launch import Launcher

    counter = LogCounter()
    logging.getLogger("scoop").addHandler(counter)
    logging.getLogger("scoop").propagate = False

    state = Soak(args, T, futures)
    t_start = time.monotonic()
    log(f"{args.workers} workers, {args.seconds:.0f} s, a kill every ~{args.kill_every} s, "
        f"{args.inflight} futures in flight")
    extra = {} if args.max_attempts is None else {"max_attempts": args.max_attempts}
    job = Launcher(args.workers, pythonpath=HERE, **extra).start(root_in_process=True)
    monitor = Monitor(job, args, state)
    result: dict = {}

    def summarize(emergency: bool = False, ran: float | None = None,
                  leftovers: list[int] | None = None) -> dict:
        ran = ran if ran is not None else time.monotonic() - t_start
        counts = bytes(state.counts)
        results_ok = sum(1 for c in counts if c)
        lost = [i for i, c in enumerate(counts) if c == 0 and i not in state.errored]
        dups = sum(c - 1 for c in counts if c > 1)
        cb_dups = sum(1 for c in bytes(state.callbacks) if c > 1)
        samples = list(monitor.rss)
        start_kb = samples[0][1] if samples else rss_kb()
        after = [kb for t, kb in samples if t >= args.warmup]
        base_kb = after[0] if after else None
        end_kb = samples[-1][1] if samples else rss_kb()
        growth = (end_kb - base_kb) / base_kb if base_kb else None
        killed = monitor.killed
        noticed = sum(1 for k in killed if k["wid"] in job._reported)
        b = job.broker
        s = {
            "duration_s": round(ran, 1),
            "workers": args.workers,
            "scoop": os.path.dirname(os.path.abspath(sys.modules["scoop"].__file__)),
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "tasks_submitted": len(counts),
            "tasks_done": results_ok,
            "tasks_per_s": round(results_ok / ran, 1) if ran else None,
            "map_calls": state.map_calls,
            "inline_runs": state.inline_runs,
            "workers_killed": len(killed),
            "kills_noticed_by_launcher": noticed,
            "replacements_started": monitor.replacements,
            "results_lost": len(lost),
            "lost_indices_sample": lost[:20],
            "duplicates_delivered": dups,
            "callbacks_called_twice": cb_dups,
            "misrouted_results": state.misrouted,
            "wrong_results": state.wrong,
            "worker_lost_errors": state.errors.get("WorkerLostError", 0),
            "task_errors": dict(state.errors),
            "tasks_failed": len(state.errored),
            "map_items_abandoned": state.map_items_abandoned,
            "error_samples": state.error_samples,
            "rss_start_kb": start_kb,
            "rss_baseline_kb": base_kb,
            "rss_peak_kb": max((kb for _, kb in samples), default=end_kb),
            "rss_end_kb": end_kb,
            "rss_growth_after_warmup": None if growth is None else round(growth, 3),
            "leftover_processes": leftovers,
            "hang": state.hang,
            "emergency_exit": emergency,
            "monitor_error": monitor.error,
            "main_error": state.main_error,
            "scoop_warnings_expected": counter.expected,
            "scoop_warnings_unexpected": counter.unexpected[:20],
            "broker_loss_records": (len(b.schedule.recovery.losses) if b is not None
                                    else None),
            "kills": killed,
            "rss_samples": samples,
        }
        checks = {
            "no_result_lost": not lost,
            "no_duplicate": dups == 0 and cb_dups == 0,
            "all_results_right": state.wrong == 0 and state.misrouted == 0,
            "no_task_failed": not state.errored,
            "rss_flat": growth is None or growth <= RSS_GROWTH_LIMIT,
            "no_leftover_process": leftovers == [],
            "no_hang": not state.hang and not emergency,
            "no_error_in_soak": monitor.error is None and state.main_error is None,
            "kills_happened": args.kill_every <= 0 or args.seconds < 2 * args.kill_every
            or len(killed) > 0,
        }
        s["checks"] = checks
        s["passed"] = all(checks.values())
        result.clear()
        result.update(s)
        print_summary(s)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(s, f, indent=1)
        return s

    state.summary_fn = summarize
    ran = None
    try:
        monitor.start()
        ran = state.run(job, monitor)
    except Exception as exc:  # noqa: BLE001 - the summary still comes, as a failure
        import traceback

        traceback.print_exc()
        state.main_error = f"{type(exc).__name__}: {exc}"
    finally:
        state.finished = True
        monitor.stop_event.set()
        monitor.join(5)
        log("stopping the job")
        job.stop()
    leftovers = leftover_workers(job.procs.values(), monitor.spawned_pids)
    s = summarize(ran=ran, leftovers=leftovers)
    return 0 if s["passed"] else 1


def print_summary(s: dict) -> None:
    kb = lambda v: "-" if v is None else f"{v / 1024:.1f} MiB"  # noqa: E731
    growth = s["rss_growth_after_warmup"]
    lines = [
        ("duration", f"{s['duration_s']} s, {s['workers']} workers"),
        ("scoop", s["scoop"]),
        ("tasks done", f"{s['tasks_done']} of {s['tasks_submitted']} submitted "
                       f"({s['map_calls']} map calls, {s['inline_runs']} inline runs)"),
        ("tasks/s", s["tasks_per_s"]),
        ("workers killed", f"{s['workers_killed']} ({s['kills_noticed_by_launcher']} "
                           "noticed by check_workers)"),
        ("replacements started", s["replacements_started"]),
        ("results lost", s["results_lost"]),
        ("duplicates delivered", f"{s['duplicates_delivered']} (callbacks called twice: "
                                 f"{s['callbacks_called_twice']})"),
        ("wrong results", f"{s['wrong_results']} (misrouted: {s['misrouted_results']})"),
        ("WorkerLostError", s["worker_lost_errors"]),
        ("other task errors", {k: v for k, v in s["task_errors"].items()
                               if k != "WorkerLostError"} or 0),
        ("RSS start/baseline/peak/end",
         f"{kb(s['rss_start_kb'])} / {kb(s['rss_baseline_kb'])} / {kb(s['rss_peak_kb'])} / "
         f"{kb(s['rss_end_kb'])} (growth after warm-up: "
         f"{'-' if growth is None else f'{growth:+.0%}'})"),
        ("leftover processes", s["leftover_processes"]),
        ("hang", s["hang"]),
        ("unexpected scoop warnings", len(s["scoop_warnings_unexpected"])),
    ]
    print("\nsoak summary")
    for name, value in lines:
        print(f"  {name:<28} {value}")
    failed = [name for name, ok in s["checks"].items() if not ok]
    print(f"  {'result':<28} {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
