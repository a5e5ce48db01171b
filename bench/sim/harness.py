"""One simulated job from start to end: :func:`run` starts the broker and the worker
processes, joins as the owner, loads the broker, measures it, stops everything.

Phases of a run, each timed::

    broker process up (address on its stdout)
    worker processes up, each "ready" (imports done, nothing connected yet)
    the owner joins; "go" to every worker process    t0
    every worker welcomed                             registration = last "registered" - t0
    load: the owner keeps `window` groups in flight   warm-up, then `seconds` measured:
                                                      tasks answered, broker CPU and RSS
        halfway, as asked: lose (one worker holding groups is dropped; its tasks must
        be answered anyway), pause_s (the broker process is stopped, SIGSTOP, then
        continued), owner_stall_s (the owner reads nothing for a while)
    drain: every task answered; SHUTDOWN; every process gone

Every process started is ended however the run ends (an exception, Ctrl-C): each child
also exits when its stdin closes, so even a SIGKILLed driver leaves nothing running.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from scoop._transport import Credentials

from .owner import Owner

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class Config:
    workers: int = 100
    per_process: int = 500  # simulated workers per process
    seconds: float = 5.0  # measured load
    warmup_s: float = 1.0
    group: int = 32  # tasks per group
    credit: int = 2  # groups a worker asks for ahead (READY n)
    task_s: float = 0.0  # simulated length of one task
    window: int = 0  # groups the owner keeps in flight (0: 2 x workers x credit)
    lose: bool = False  # drop one worker holding groups halfway through the load
    resumable: bool = False  # groups are map chunks: their owner resumes them (LOST)
    pause_s: float = 0.0  # stop the broker process (SIGSTOP) this long, halfway through
    owner_stall_s: float = 0.0  # the owner reads nothing this long, halfway through
    silence_s: float = 0.0  # the broker's WORKER_SILENCE_S (0: scoop's own)
    sample_s: float = 1.0  # how often the broker's CPU and RSS are read
    timeout_s: float = 60.0  # for each phase that waits on the others
    progress: bool = False  # a line on stderr per sample
    profile: str = ""  # write the broker loop's cProfile stats there
    trace_dir: str = ""  # write tracemalloc snapshots of the broker there
    trace_s: float = 60.0  # that often


@dataclass
class Result:
    config: dict
    processes: int = 0
    registration_s: float | None = None
    registration_cpu_s: float | None = None  # the broker's CPU time meanwhile
    tasks: int = 0  # answered in the measured window
    window_s: float = 0.0
    tasks_per_s: float = 0.0
    broker_cpu_s: float = 0.0  # in the measured window
    broker_cpu_us_per_task: float | None = None
    broker_cpu_frac: float = 0.0  # of one core, over the measured window
    submitted: int = 0
    answered: int = 0
    duplicates: int = 0
    missing: int = 0
    wrong: int = 0
    failed: int = 0
    rejected: int = 0
    lost_groups: int = 0  # named to the owner in LOST messages (resumable groups)
    returned: int = 0  # tasks the owner handed back after a LOST
    samples: list = field(default_factory=list)  # [t, tasks answered, broker cpu s, rss kB]
    lost: dict | None = None
    gone: int = 0  # workers the broker's log says are gone (lost or silent)
    worker_stats: list = field(default_factory=list)
    broker_log: str = ""
    leftover: list = field(default_factory=list)  # pids still running at the end
    traces: list = field(default_factory=list)  # the broker's heap figures (trace_dir)
    loadavg: tuple = ()
    error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_KB


class _Child:
    """A child process of the run: config on its stdin, JSON reports from its stdout."""

    def __init__(self, module: str, cfg: dict, events: queue.SimpleQueue, name,
                 stderr) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (BENCH, os.environ.get("PYTHONPATH")) if p))
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=stderr, env=env, cwd=BENCH, text=True, bufsize=1)
        self.send(json.dumps(cfg))
        threading.Thread(target=self._read, args=(events,), daemon=True,
                         name=f"sim-{name}").start()

    def _read(self, events: queue.SimpleQueue) -> None:
        for line in self.proc.stdout:
            try:
                events.put((self.name, json.loads(line)))
            except ValueError:
                sys.stderr.write(f"[{self.name}] {line}")
        events.put((self.name, {"event": "exit"}))

    def send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # it is gone: its exit is reported by its reader

    def end_input(self) -> None:
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class _Events:
    """The reports of every child, waited for by name and kind."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.seen: list[tuple[str, dict]] = []

    def wait(self, kind: str, names, timeout: float, poll=None) -> dict[str, dict]:
        """The first report ``kind`` of each child in ``names`` (calling ``poll`` while
        waiting); TimeoutError if one is missing after ``timeout`` s."""
        want, got = set(names), {}
        for name, ev in self.seen:
            if ev["event"] == kind and name in want:
                got.setdefault(name, ev)
        deadline = time.monotonic() + timeout
        while set(got) != want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind!r} from {sorted(want - set(got))}")
            if poll is not None:
                poll()  # it waits a little itself
            try:
                name, ev = (self.q.get_nowait() if poll is not None
                            else self.q.get(timeout=min(left, 0.1)))
            except queue.Empty:
                continue
            self.seen.append((name, ev))
            if ev["event"] == "exit" and name in want and kind != "exit" and name not in got:
                raise RuntimeError(f"{name} ended before it reported {kind!r}")
            if ev["event"] == kind and name in want:
                got.setdefault(name, ev)
        return got

    def drain(self) -> list[tuple[str, dict]]:
        new = []
        while True:
            try:
                new.append(self.q.get_nowait())
            except queue.Empty:
                self.seen.extend(new)
                return new


def run(cfg: Config) -> Result:
    """Run one simulated job; every process it started is gone when it returns."""
    res = Result(config=dict(cfg.__dict__))
    creds = Credentials.new()
    events = _Events()
    children: list[_Child] = []
    owner: Owner | None = None
    counts = bytearray()  # the owner's answers per task id, kept after it closes
    log_file = tempfile.TemporaryFile("w+")
    try:
        broker = _Child("sim.broker", {**creds.for_worker(), "size": cfg.workers + 1,
                                       "silence_s": cfg.silence_s, "profile": cfg.profile,
                                       "trace_dir": cfg.trace_dir, "trace_s": cfg.trace_s},
                        events.q, "broker", log_file)
        children.append(broker)
        address = events.wait("listening", ["broker"], cfg.timeout_s)["broker"]["address"]
        names = []
        for i, first in enumerate(range(1, cfg.workers + 1, cfg.per_process)):
            wids = list(range(first, min(first + cfg.per_process, cfg.workers + 1)))
            names.append(f"workers{i}")
            children.append(_Child("sim.workers", {
                **creds.for_worker(), "address": address, "wids": wids,
                "task_s": cfg.task_s, "credit": cfg.credit}, events.q, names[-1], log_file))
        res.processes = len(names)
        events.wait("ready", names, cfg.timeout_s)
        owner = Owner(creds, address, cfg.group, cfg.resumable)
        counts = owner.counts
        owner.join(cfg.timeout_s)
        by_name = {c.name: c for c in children}
        cpu0, t0 = proc_cpu_s(broker.proc.pid), time.monotonic()
        for name in names:
            by_name[name].send("go")
        got = events.wait("registered", names, cfg.timeout_s,
                          poll=lambda: owner.poll(10))
        res.registration_s = max(ev["t"] for ev in got.values()) - t0
        res.registration_cpu_s = proc_cpu_s(broker.proc.pid) - cpu0
        _load(cfg, res, owner, broker, by_name[names[0]], events)
        _drain(cfg, res, owner)
        _count(res, owner)
        owner.shutdown()
        owner = None
        done = events.wait("done", names, cfg.timeout_s)
        res.worker_stats = [done[n] for n in names]
        broker.end_input()
        events.wait("stopped", ["broker"], cfg.timeout_s)
        for c in children:
            c.proc.wait(cfg.timeout_s)
    except BaseException as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, Exception):
            raise
    finally:
        if owner is not None:
            _count(res, owner)
            owner.close()
        for c in children:
            c.end_input()
        deadline = time.monotonic() + 3
        for c in children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.kill()
        res.leftover = [c.proc.pid for c in children if c.proc.poll() is None]
        events.drain()
        res.traces = [ev for name, ev in events.seen if ev["event"] == "trace"]
        log_file.seek(0)
        res.broker_log = log_file.read()[-20000:]
        log_file.close()
        res.loadavg = os.getloadavg()
    res.gone = len(_LOG_TIME.findall(res.broker_log))
    if res.lost is not None:
        watch = res.lost.pop("tids")
        res.lost["tids"] = len(watch)
        res.lost["answered"] = sum(1 for t in watch if counts[t])
        res.lost["answered_twice"] = sum(1 for t in watch if counts[t] > 1)
        res.lost["noticed_s"] = _noticed(res.broker_log, res.lost)
    return res


def _load(cfg: Config, res: Result, owner: Owner, broker: _Child, victim: _Child,
          events: _Events) -> None:
    """Keep the broker busy; measure the window after the warm-up; lose a worker."""
    window = cfg.window or 2 * cfg.workers * cfg.credit
    pid = broker.proc.pid
    start = time.monotonic()
    measure_from = start + cfg.warmup_s
    end = measure_from + cfg.seconds
    lose_at = measure_from + cfg.seconds / 2 if cfg.lose else None
    pause_at = measure_from + cfg.seconds / 2 if cfg.pause_s else None
    stall_at = measure_from + cfg.seconds / 2 if cfg.owner_stall_s else None
    next_sample = start
    base = None  # (t, answered, cpu) when the window opened
    while (now := time.monotonic()) < end:
        want = window - owner.outstanding // cfg.group
        if want > 0:
            owner.submit(want)
        owner.poll(10)
        if now >= next_sample:
            sample = [round(now - start, 3), owner.answered, proc_cpu_s(pid),
                      proc_rss_kb(pid)]
            res.samples.append(sample)
            next_sample += cfg.sample_s
            if base is None and now >= measure_from:
                base = (now, owner.answered, sample[2])
            if cfg.progress:
                print(f"  t={sample[0]:6.1f}s answered={sample[1]} broker cpu="
                      f"{sample[2]:.1f}s rss={sample[3] / 1024:.1f}MB", file=sys.stderr)
        if lose_at is not None and now >= lose_at:
            lose_at = None
            victim.send("lose")
            lost = events.wait("lost", [victim.name], cfg.timeout_s,
                               poll=lambda: owner.poll(10))
            res.lost = dict(lost[victim.name])
        if pause_at is not None and now >= pause_at:
            pause_at = None  # as a VM pause, a swap storm or a GIL held for long would
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(cfg.pause_s)
            finally:
                os.kill(pid, signal.SIGCONT)
        if stall_at is not None and now >= stall_at:
            stall_at = None  # as a root whose program computes before it waits
            time.sleep(cfg.owner_stall_s)
        _check_rerun(res, owner)
    now = time.monotonic()
    if base is None:
        base = (start, 0, 0.0)
    res.window_s = now - base[0]
    res.tasks = owner.answered - base[1]
    res.broker_cpu_s = proc_cpu_s(pid) - base[2]
    res.samples.append([round(now - start, 3), owner.answered, proc_cpu_s(pid),
                        proc_rss_kb(pid)])
    res.tasks_per_s = res.tasks / res.window_s if res.window_s else 0.0
    res.broker_cpu_frac = res.broker_cpu_s / res.window_s if res.window_s else 0.0
    if res.tasks:
        res.broker_cpu_us_per_task = res.broker_cpu_s / res.tasks * 1e6


def _drain(cfg: Config, res: Result, owner: Owner) -> None:
    """Wait until every submitted task is answered (a lost worker's after a re-run)."""
    deadline = time.monotonic() + cfg.timeout_s
    while owner.outstanding and time.monotonic() < deadline:
        owner.poll(50)
        _check_rerun(res, owner)


def _check_rerun(res: Result, owner: Owner) -> None:
    """Note when every task the lost worker held has been answered."""
    lost = res.lost
    if lost and "rerun_s" not in lost and all(owner.counts[t] for t in lost["tids"]):
        lost["rerun_s"] = round(time.monotonic() - lost["t"], 3)


def _count(res: Result, owner: Owner) -> None:
    res.submitted, res.answered = owner.submitted, owner.answered
    res.duplicates, res.wrong, res.failed = owner.duplicates, owner.wrong, owner.failed
    res.rejected, res.missing = owner.rejected, owner.missing()
    res.lost_groups, res.returned = owner.lost_groups, owner.returned


_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\].*worker (\d+) .*is gone",
                       re.M)


def _noticed(log: str, lost: dict) -> float | None:
    """Seconds from the loss to the broker's line saying so (its log has ms)."""
    for stamp, wid in _LOG_TIME.findall(log):
        if int(wid) == lost.get("wid"):
            when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return round(when - lost["wall"], 3)
    return None
