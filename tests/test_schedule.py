"""The broker's decisions, without a socket: scripted cases played on a Schedule.

Each case is a script of events (what workers send, a worker lost, time passing) and
what the broker must answer to all of them, in order, as short lines::

    "w1 TASKS a b"   TASKS to worker 1 with groups a and b ("TASKS!": run them even on
                     standby); "w0 LOST *m1 m2": map groups for their owner (* running)
    "w0 FAIL a"      the tasks of group a fail with WorkerLostError, sent to owner 0
                     ("FAIL-TIMEOUT": with TaskTimeoutError); "w0 LOST ~m1": map group
                     m1 ran past its time limit
    "sandbox 2"      the launcher is asked for worker 2 (a sandbox, or a replacement)

then the queue left (and, where a case says so, the groups held, the attempts charged,
the suspect groups). Groups are named; a worker's id is its connection's name.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest

from scoop import _protocol as P
from scoop._errors import TaskTimeoutError
from scoop._schedule import (
    BROKER_PAUSE_S,
    HELD_FACTOR,
    SANDBOX_JOIN_S,
    STANDBY_GRACE_S,
    WORKER_SILENCE_S,
    AskSandbox,
    Fail,
    Schedule,
    Send,
)

MAC = b"m" * 32  # the schedule never checks a parcel's mac
_TICKS = int(2 * WORKER_SILENCE_S / BROKER_PAUSE_S + 1)  # ticks over twice the silence


def ident(wid: int) -> bytes:
    return b"w%d.0" % wid


def hello_body(wid: int, version: int = P.VERSION) -> dict:
    return {"version": version, "wid": wid, "pid": 1000 + wid, "host": "here"}


class World:
    """A Schedule, its workers and named task groups; :meth:`play` runs one event."""

    def __init__(self, workers: int = 3, joined: int | None = None, max_attempts: int = 3,
                 sandboxes: int = 0) -> None:
        self.s = Schedule(size=workers, max_attempts=max_attempts)
        self.s.recovery.sandbox_budget = sandboxes
        self.now = 1000.0
        self.groups: dict[str, P.Parcel] = {}
        self.names: dict[tuple[int, ...], str] = {}  # task ids -> group name
        self.fid = 0
        self.reasons: list[str] = []  # of every FAIL
        for wid in range(workers if joined is None else joined):
            self.s.hello(ident(wid), wid, hello_body(wid))

    def parcel(self, name: str, flags: int = 0) -> P.Parcel:
        self.fid += 1
        tids = (self.fid * 10, self.fid * 10 + 1)
        self.names[tids] = name
        self.groups[name] = P.Parcel(self.fid | flags, 0,
                                     [P.task_ids_frame(tids), name.encode()], MAC)
        return self.groups[name]

    def key(self, name: str) -> tuple[int, int]:
        return (self.groups[name].peer, self.groups[name].tag)

    def peer(self, wid: int):
        return self.s.roster.by_wid[wid]

    def play(self, op: str, *a) -> list:
        s, now = self.s, self.now
        if op in ("tasks", "map", "limited"):  # owner, "names": submitted (map: RESUMABLE
            # chunks; limited: tasks with a time limit)
            flags = {"tasks": 0, "map": P.RESUMABLE, "limited": P.LIMITED}[op]
            return s.tasks(self.peer(a[0]), [self.parcel(n, flags) for n in a[1].split()])
        if op == "ready":  # wid, n
            return s.ready(self.peer(a[0]), a[1])
        if op == "standby":  # wid: WITHDRAW 1 (waits with a deadline)
            return s.withdraw(self.peer(a[0]), True)
        if op == "return":  # wid, "names": handed back unstarted
            return s.returned(self.peer(a[0]), [self.groups[n] for n in a[1].split()], now)
        if op == "results":  # wid, finished group, results parcel name, for owner
            res = P.Parcel(0, a[3], [b"", a[2].encode()], MAC)
            return s.results(self.peer(a[0]), [res], [self.key(a[1])])
        if op == "const":  # wid, name
            return s.const(self.peer(a[0]), [P.Parcel(0, 0, [b"", a[1].encode()], MAC)])
        if op == "hello":  # wid[, version]
            return s.hello(ident(a[0]), a[0], hello_body(*a))
        if op == "join":  # seq of the JOIN message
            return s.join(b"j.%d" % a[0], a[0])
        if op == "ping":  # wid: its watchdog pings
            return s.ping(b"h%d.0" % a[0], a[0], now)
        if op == "timeout":  # wid, name: its watchdog says that group's task timed out
            body = {"owner": [], "error": "garbled"}  # (name None)
            if a[1] is not None:
                parcel = self.groups[a[1]]
                body = {"owner": parcel.peer, "fid": parcel.tag, "error": "f() exceeded "
                        "its task_timeout of 3 s", "tid": P.task_ids(parcel)[0]}
            return s.timed_out(b"h%d.0" % a[0], a[0], body, now)
        if op == "wait":  # seconds pass
            self.now += a[0]
            return []
        plain = {"dispatch": lambda: s.dispatch(now), "tick": lambda: s.tick(now),
                 "stop": s.stop_workers, "lost": lambda: s.lost(a[0], "killed", now),
                 "bye": lambda: s.bye(self.peer(a[0])),
                 "leave": lambda: s.leaving(a[0], a[1], now),
                 "shutdown": lambda: s.shutdown(self.peer(a[0]), a[1])}
        return plain[op]()

    def show(self, out) -> str:
        """One answer as a short line (see the module doc)."""
        if isinstance(out, AskSandbox):
            return f"sandbox {out.wid}"
        who = P.peer_name(out.to).decode()
        if isinstance(out, Fail):
            self.reasons.append(out.reason)
            kind = "-TIMEOUT" if out.error is TaskTimeoutError else ""
            return f"{who} FAIL{kind} {self.names[tuple(out.tids)]}"
        assert isinstance(out, Send)
        words = [who, P.KIND_NAMES[out.kind] + ("!" if out.kind == P.TASKS and out.arg else "")]
        words += [bytes(p.frames[1]).decode() for p in out.parcels]
        if out.kind == P.LOST:
            words += ["*" * running + self.names[tuple(tids)]
                      for running, tids in out.body["groups"]]
            words += ["~" + next(n for t, n in self.names.items() if tid in t)
                      for tid, _ in out.body.get("timeouts", ())]
        if out.kind == P.ASSIGN:
            words.append(str(out.body["wid"]))
        return " ".join(words)

    def run(self, steps) -> list[str]:
        lines = []
        for step in steps:
            try:
                lines += [self.show(out) for out in self.play(*step)]
            except P.AuthError as exc:
                lines.append(f"refused: {exc}")
        return lines

    def queue(self) -> str:
        return " ".join(bytes(p.frames[1]).decode() for p in self.s.queue)

    def name(self, key) -> str:
        return next(n for n, p in self.groups.items() if (p.peer, p.tag) == key)


class Case(NamedTuple):
    title: str
    steps: list
    out: list[str]  # every answer, in order
    queue: str = ""
    workers: int = 3
    joined: int | None = None  # workers joined before the script (default: all)
    max_attempts: int = 3
    sandboxes: int = 0
    held: dict | None = None  # wid -> "names" held
    losses: dict | None = None  # name -> (ran, held)
    suspect: str | None = None  # the names of the SUSPECT groups
    reason: str = ""  # in the WorkerLostError of every FAIL


CASES = [
    Case("credits: each worker gets what it asked for, workers taking turns",
         [("tasks", 0, "a b c d e"), ("ready", 1, 2), ("ready", 2, 1), ("dispatch",)],
         ["w1 TASKS a b", "w2 TASKS c"], queue="d e", held={1: "a b", 2: "c"}),
    Case("workers with credit take turns, the one that has waited longest first",
         [("tasks", 0, "a b c d"), ("ready", 2, 1), ("ready", 1, 2), ("ready", 2, 1),
          ("dispatch",), ("ready", 1, 1), ("ready", 2, 1), ("tasks", 0, "e f"),
          ("dispatch",)],
         ["w2 TASKS a b", "w1 TASKS c d", "w1 TASKS e", "w2 TASKS f"],
         held={1: "c d e", 2: "a b f"}),
    Case("a worker lost holding groups: they go back first in line, suspect; only the "
         "oldest (the one it ran) is charged",
         [("tasks", 0, "a b c d"), ("ready", 1, 2), ("dispatch",), ("lost", 1)],
         ["w1 TASKS a b"], queue="a b c d", losses={"a": (1, 1), "b": (0, 1)},
         suspect="a b"),
    Case("groups of a lost worker's own are dropped, queued, handed back or held by a "
         "worker lost later: their results have nowhere to go",
         [("tasks", 2, "c d e"), ("tasks", 0, "a"), ("ready", 1, 2), ("dispatch",),
          ("lost", 2), ("return", 1, "d"), ("lost", 1)],
         ["w1 TASKS c d"], queue="a", losses={}),
    Case("a group that killed max_attempts workers fails for its owner; the job goes on",
         [("tasks", 0, "a b"), ("ready", 1, 1), ("dispatch",), ("lost", 1),
          ("ready", 2, 1), ("dispatch",), ("lost", 2), ("ready", 3, 1), ("dispatch",)],
         ["w1 TASKS a", "w2 TASKS a", "w0 FAIL a", "w3 TASKS b"],
         workers=4, max_attempts=2, reason="2 workers died running this task"),
    Case("a timed wait hands unstarted groups back: first in line, no longer held",
         [("tasks", 0, "a b c d"), ("ready", 1, 3), ("dispatch",), ("return", 1, "b c")],
         ["w1 TASKS a b c"], queue="b c d", held={1: "a"}),
    Case("standby: a worker waiting with a deadline takes no work while another can",
         [("tasks", 0, "a b"), ("standby", 1), ("ready", 0, 1), ("dispatch",),
          ("dispatch",)],
         ["w0 TASKS a"], queue="b", workers=2),
    Case("forced dispatch: every worker on standby gets one group to run anyway, once, "
         "and another after it stands by again",
         [("tasks", 0, "a b c d"), ("standby", 0), ("standby", 1), ("dispatch",),
          ("dispatch",), ("standby", 1), ("dispatch",)],
         ["w0 TASKS! a", "w1 TASKS! b", "w1 TASKS! c"], queue="d", workers=2,
         held={0: "a", 1: "b c"}),
    Case("forced dispatch waits STANDBY_GRACE_S for workers still starting",
         [("tasks", 0, "a"), ("standby", 0), ("standby", 1), ("dispatch",),
          ("wait", STANDBY_GRACE_S / 2), ("dispatch",), ("wait", STANDBY_GRACE_S),
          ("dispatch",)],
         ["w0 TASKS! a"], joined=2),
    Case("the root never gets a suspect group; it takes what is behind; others take it",
         [("tasks", 0, "a b"), ("ready", 1, 2), ("dispatch",), ("lost", 1),
          ("tasks", 0, "c"), ("ready", 0, 5), ("dispatch",), ("standby", 0),
          ("standby", 2), ("dispatch",)],
         ["w1 TASKS a b", "w0 TASKS c", "w2 TASKS! a"], queue="b"),
    Case("a stranded suspect group: the launcher is asked for a sandbox worker, which "
         "takes only suspect groups",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",), ("lost", 1), ("tick",),
          ("hello", 2), ("tasks", 0, "b"), ("ready", 2, 5), ("dispatch",)],
         ["w1 TASKS a", "sandbox 2", "w2 WELCOME", "w2 TASKS a"], queue="b",
         workers=2, sandboxes=1),
    Case("a sandbox does not count among the workers on standby: the root on standby "
         "beside a sandbox at work (with credit) is forced ordinary work",
         [("tasks", 0, "a b"), ("ready", 1, 1), ("dispatch",), ("lost", 1), ("hello", 2),
          ("standby", 0), ("ready", 2, 3), ("dispatch",)],
         ["w1 TASKS a", "sandbox 2", "w2 WELCOME", "w2 TASKS a", "w0 TASKS! b"],
         held={0: "b", 2: "a"}, workers=2, sandboxes=1),
    Case("a sandbox takes the groups its tasks submit; the root on standby is not forced "
         "them while the sandbox works, only once it stands by too",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",), ("lost", 1), ("hello", 2),
          ("ready", 2, 1), ("dispatch",), ("tasks", 2, "c d"), ("ready", 2, 1),
          ("standby", 0), ("dispatch",), ("dispatch",), ("standby", 2), ("dispatch",)],
         ["w1 TASKS a", "sandbox 2", "w2 WELCOME", "w2 TASKS a", "w2 TASKS c",
          "w0 TASKS! d"], held={0: "d", 2: "a c"}, workers=2, sandboxes=1),
    Case("a stranded suspect group fails once the sandbox asked for has not joined in "
         "time and the budget is out",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",), ("lost", 1), ("tick",),
          ("wait", SANDBOX_JOIN_S), ("tick",), ("tick",)],
         ["w1 TASKS a", "sandbox 2", "w0 FAIL a"], workers=2, sandboxes=1,
         reason="no worker but the root is left to run it"),
    Case("where no sandbox can start, a stranded suspect group fails at once; the root "
         "runs the rest",
         [("tasks", 0, "a b"), ("ready", 1, 1), ("dispatch",), ("lost", 1),
          ("ready", 0, 1), ("dispatch",)],
         ["w1 TASKS a", "w0 FAIL a", "w0 TASKS b"], workers=2,
         reason="1 workers died running this task"),
    Case("map chunks of a dead worker: LOST to their owner, not queued again; its other "
         "groups are",
         [("map", 0, "m1 m2"), ("tasks", 2, "a"), ("ready", 1, 3), ("dispatch",),
          ("lost", 1)],
         ["w1 TASKS m1 m2 a", "w0 LOST *m1 m2"], queue="a", losses={"a": (0, 1)}),
    Case("a task past its time limit fails (TaskTimeoutError); its worker's other groups "
         "go back first in line, charged only as held, not suspect; a worker replaces it",
         [("limited", 0, "a"), ("tasks", 0, "b c"), ("ready", 1, 3), ("dispatch",),
          ("timeout", 1, "a"), ("ready", 2, 2), ("dispatch",)],
         ["w1 TASKS a b c", "h1 STOP", "w0 FAIL-TIMEOUT a", "sandbox 3", "w2 TASKS b c"],
         sandboxes=1, losses={"b": (0, 1), "c": (0, 1)}, suspect="", reason="exceeded"),
    Case("a map chunk past its time limit: its owner is told (LOST ~); the worker's other "
         "chunks are resumed by their owner, uncharged; no replacement where none can start",
         [("map", 0, "m1 m2"), ("ready", 1, 2), ("dispatch",), ("timeout", 1, "m1"),
          ("timeout", 1, "m1")],
         ["w1 TASKS m1 m2", "h1 STOP", "w0 LOST ~m1", "w0 LOST m2", "h1 STOP"], held={},
         suspect=""),
    Case("a garbled TIMEOUT still ends its worker, whose groups run again",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",), ("timeout", 1, None)],
         ["w1 TASKS a", "h1 STOP"], queue="a", losses={"a": (0, 1)}),
    Case("the root never gets a limited group; with the root alone, a worker is asked "
         "for, which takes it",
         [("limited", 0, "a"), ("tasks", 0, "b"), ("ready", 0, 5), ("dispatch",),
          ("tick",), ("tick",), ("hello", 1), ("ready", 1, 1), ("dispatch",)],
         ["w0 TASKS b", "sandbox 1", "w1 WELCOME", "w1 TASKS a"], workers=1, sandboxes=1),
    Case("a sandbox takes a limited group: beside it, the root alone would never run it",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",), ("lost", 1), ("hello", 2),
          ("ready", 2, 1), ("dispatch",), ("limited", 0, "b"), ("ready", 2, 1),
          ("dispatch",)],
         ["w1 TASKS a", "sandbox 2", "w2 WELCOME", "w2 TASKS a", "w2 TASKS b"],
         workers=2, sandboxes=1),
    Case("where no worker can be started, a limited group with the root alone fails",
         [("limited", 0, "a"), ("ready", 0, 5), ("tick",)],
         ["w0 FAIL a"], workers=1, reason="never runs a task with a time limit"),
    Case("results go to their owner; a finished group is neither held nor run again",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",), ("results", 1, "a", "r", 0),
          ("lost", 1)],
         ["w1 TASKS a", "w0 RESULTS r"], held={}),
    Case("results for an owner that left are dropped",
         [("tasks", 2, "a"), ("ready", 1, 1), ("dispatch",), ("bye", 2),
          ("results", 1, "a", "r", 2)],
         ["w1 TASKS a"]),
    Case("a worker that says goodbye: what it was sent and never took goes first in line "
         "again, uncharged",
         [("tasks", 0, "a b c"), ("ready", 1, 2), ("dispatch",), ("bye", 1)],
         ["w1 TASKS a b"], queue="a b c", losses={}, suspect=""),
    Case("a leaving worker (LEAVE) gets no more work, a READY sent before it included",
         [("tasks", 0, "a b"), ("leave", 1, False), ("ready", 1, 2), ("ready", 2, 1),
          ("dispatch",)],
         ["w2 TASKS a"], queue="b", held={1: "", 2: "a"}),
    Case("a leaving worker gone with its task running: it runs again, uncharged, not "
         "suspect (the root may take it)",
         [("tasks", 0, "a b"), ("ready", 1, 2), ("dispatch",), ("leave", 1, True),
          ("ready", 0, 1), ("dispatch",)],
         ["w1 TASKS a b", "w0 TASKS a"], queue="b", losses={}, suspect=""),
    Case("map chunks of a worker that left: their owner resumes them, none charged",
         [("map", 0, "m1 m2"), ("ready", 1, 2), ("dispatch",), ("leave", 1, False),
          ("lost", 1)],
         ["w1 TASKS m1 m2", "w0 LOST m1 m2"], losses={}),
    Case("a silent worker counts as lost at the next tick; the root never does",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",), ("ping", 0), ("ping", 1),
          ("wait", WORKER_SILENCE_S + 1), ("tick",)],
         ["w1 TASKS a", "h0 PONG", "h1 PONG"], queue="a", held={0: "", 2: ""}),
    Case("a pause of the broker itself (no tick for long) is not its workers' silence",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",), ("ping", 1), ("tick",),
          ("wait", WORKER_SILENCE_S + 1), ("tick",), ("wait", WORKER_SILENCE_S - 1),
          ("tick",)],
         ["w1 TASKS a", "h1 PONG"], held={1: "a"}),
    Case("silence while the broker ticks on counts, however it is cut into ticks",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",), ("ping", 1), ("tick",),
          *[("ping", 2), ("wait", BROKER_PAUSE_S / 2), ("tick",)] * _TICKS],
         ["w1 TASKS a", "h1 PONG", *["h2 PONG"] * _TICKS], queue="a", held={0: "", 2: ""}),
    Case("a worker that never pings counts as lost, its silence counted from the first "
         "tick after its HELLO (its watchdog's first PING comes late: scoop._watchdog)",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",),
          *[("ping", 2), ("wait", BROKER_PAUSE_S / 2), ("tick",)] * (_TICKS + 2)],
         ["w1 TASKS a", *["h2 PONG"] * (_TICKS + 2)], queue="a", held={0: "", 2: ""}),
    Case("after STOP, a lost worker's groups stay lost (the job is over)",
         [("tasks", 0, "a"), ("ready", 1, 1), ("dispatch",), ("stop",), ("lost", 1)],
         ["w1 TASKS a", "w0 STOP", "w1 STOP", "w2 STOP"]),
    Case("JOIN: the next free id, skipping ids in use; a replayed JOIN is refused",
         [("join", 7), ("hello", 3), ("join", 8), ("join", 7)],
         ["j.7 ASSIGN 2", "w3 WELCOME", "j.8 ASSIGN 4", "refused: replayed JOIN (seq 7)"],
         workers=2),
    Case("HELLO: refused for another protocol version or an id in use; STOP once stopping",
         [("hello", 1), ("hello", 5, P.VERSION + 1), ("stop",), ("hello", 5), ("join", 1)],
         ["w1 REFUSED", "w5 REFUSED", "w0 STOP", "w1 STOP", "w5 STOP", "j.1 STOP"],
         workers=2),
    Case("the root's SHUTDOWN stops every other worker, once",
         [("shutdown", 0, 3), ("stop",)], ["w1 STOP", "w2 STOP"]),
    Case("constants go to every other worker, and with WELCOME to those joining later",
         [("const", 0, "k"), ("hello", 3)], ["w1 CONST k", "w2 CONST k", "w3 WELCOME k"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.title.split(":")[0][:40] for c in CASES])
def test_schedule_case(case: Case) -> None:
    world = World(case.workers, case.joined, case.max_attempts, case.sandboxes)
    assert world.run(case.steps) == case.out
    assert world.queue() == case.queue
    if case.held is not None:
        held = {wid: " ".join(world.name(k) for k in world.peer(wid).held)
                for wid in case.held}
        assert held == case.held
    if case.losses is not None:
        losses = {world.name(k): v for k, v in world.s.recovery.losses.items()}
        assert losses == case.losses
    if case.suspect is not None:
        assert " ".join(n for n, p in world.groups.items() if p.tag & P.SUSPECT) == case.suspect
    assert all(case.reason in reason for reason in world.reasons)
    assert bool(world.reasons) == bool(case.reason)


def test_shutdown_status_is_kept() -> None:
    world = World()
    world.run([("shutdown", 0, 3)])
    assert world.s.exit_status == 3 and world.s.stopping


def test_held_by_many_dead_workers_fails_after_held_factor_times_max_attempts() -> None:
    """A group never run (each worker that held it died running another, which a timed
    wait had handed back first in line) still fails once HELD_FACTOR x max_attempts
    workers died holding it."""
    rounds = HELD_FACTOR * 2
    helper = rounds + 1  # finishes each group that killed a worker
    world = World(workers=rounds + 2, max_attempts=2)
    lines = world.run([("tasks", 0, "k1 b"), ("ready", 1, 2), ("dispatch",), ("lost", 1),
                       ("ready", helper, 1), ("dispatch",), ("results", helper, "k1", "r", 0)])
    for wid in range(2, rounds + 1):
        k = f"k{wid}"
        lines = world.run([("tasks", 0, k), ("ready", 0, 1), ("dispatch",), ("return", 0, k),
                           ("ready", wid, 2), ("dispatch",), ("lost", wid)])
        assert lines[:2] == [f"w0 TASKS {k}", f"w{wid} TASKS {k} b"]
        if wid < rounds:
            assert world.run([("ready", helper, 1), ("dispatch",),
                              ("results", helper, k, "r", 0)])[0] == f"w{helper} TASKS {k}"
            assert world.queue() == "b"
    assert lines[2:] == ["w0 FAIL b"]
    assert world.reasons[-1] == f"0 workers died running this task ({rounds} holding it) " \
        "(the last: killed)"


class _CountedDict(dict):
    """A dict that counts the walks over it."""

    walks = 0

    def __iter__(self):
        _CountedDict.walks += 1
        return super().__iter__()

    def values(self):
        _CountedDict.walks += 1
        return super().values()

    def items(self):
        _CountedDict.walks += 1
        return super().items()


def test_dispatch_walks_no_roster_of_every_worker() -> None:
    """With thousands of workers busy and work queued, each message used to make the
    broker scan every worker for credit (bench/simulate.py); a dispatch now reads only the
    workers with credit, and the standby check a count."""
    world = World(workers=2000)
    s = world.s
    world.run([("tasks", 0, " ".join(f"g{i}" for i in range(3000)))]
              + [("ready", wid, 1) for wid in range(1, 2000)] + [("dispatch",)])
    assert not s.roster.ready and len(s.queue) == 1001
    s.roster.peers = _CountedDict(s.roster.peers)
    s.roster.by_wid = _CountedDict(s.roster.by_wid)
    for wid in range(1, 200):  # one message per turn of the loop: results, then dispatch
        finished = world.name(next(iter(world.peer(wid).held)))
        assert world.run([("results", wid, finished, "r", 0), ("ready", wid, 1),
                          ("dispatch",), ("ping", 7), ("dispatch",)])[1:] == [
            f"w{wid} TASKS g{1998 + wid}", "h7 PONG"]
    assert _CountedDict.walks == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_walk_loses_and_duplicates_no_group(seed: int) -> None:
    """Random events from workers (they submit, come, take, finish, hand back and die):
    every group is, at each step, in exactly one place (queued, held by one worker,
    finished or failed), or none once its owner is gone; the root never holds a suspect
    group, a sandbox worker nothing else but its own."""
    rng = random.Random(seed)
    world = World(workers=4, max_attempts=2, sandboxes=2)
    done: set[str] = set()
    failed: set[str] = set()
    for step in range(300):
        live = sorted(world.s.roster.by_wid)
        wid = rng.choice(live)
        held = list(world.peer(wid).held)
        event = rng.choice(["tasks", "ready", "ready", "standby", "return", "results",
                            "lost", "tick", "join", "wait"])
        if event == "tasks":
            steps = [("tasks", rng.choice([0, 0, wid]), f"g{step}")]
        elif event == "ready":
            steps = [("ready", wid, rng.randint(1, 3))]
        elif event == "standby":
            steps = [("standby", wid)]
        elif event in ("return", "results") and held:
            name = world.name(rng.choice(held))
            if event == "return":
                steps = [("return", wid, name)]
            else:
                steps = [("results", wid, name, "r", 0)]
                done.add(name)
        elif event == "lost" and wid:
            steps = [("lost", wid)]
        elif event == "join":
            steps = [("hello", max(world.s.roster.seen) + 1)]
        else:
            steps = [("wait", rng.choice([0.1, 1.0, SANDBOX_JOIN_S])), ("tick",)]
        for line in world.run([*steps, ("dispatch",)]):
            who, kind, *names = line.split()
            if kind == "FAIL":
                failed.update(names)
            elif who == "sandbox":
                world.run([("hello", int(kind))])
        places: dict[str, int] = {}
        for name in [*world.queue().split(), *done, *failed,
                     *(world.name(k) for p in world.s.roster.peers.values() for k in p.held)]:
            places[name] = places.get(name, 0) + 1
        gone = {n for n, p in world.groups.items() if p.peer not in world.s.roster.by_wid}
        assert {n: c for n, c in places.items() if c != 1} == {}
        assert set(world.groups) - set(places) <= gone
        for peer in world.s.roster.peers.values():
            kinds = {bool(p.tag & P.SUSPECT) for p in peer.held.values()
                     if p.peer != peer.wid or not peer.sandbox}
            assert kinds <= ({True} if peer.sandbox else {False} if peer.wid == 0 else
                             {True, False})
            assert peer.forced <= set(peer.held)


def test_draining_starts_nothing_and_still_routes_results() -> None:
    """The job's time is up (launcher: SIGUSR1, --walltime): queued groups stay queued,
    a running one's results still reach their owner."""
    world = World()
    assert world.run([("tasks", 0, "a b"), ("ready", 1, 1), ("dispatch",)]) == ["w1 TASKS a"]
    world.s.draining = True
    assert world.run([("ready", 2, 5), ("dispatch",)]) == []
    assert world.queue() == "b"
    assert world.run([("results", 1, "a", "r", 0)])[0].startswith("w0 RESULTS r")


def test_an_elastic_jobs_results_count_the_workers_now_without_clients() -> None:
    """In an elastic job each result forwarded carries the number of workers that run
    tasks now: an Executor's client (the root's slot, running none) is not one of them."""
    world = World(workers=3)
    world.s.report_size = True
    world.run([("tasks", 0, "a b"), ("ready", 1, 1), ("ready", 2, 1), ("dispatch",)])
    assert [o.arg for o in world.play("results", 1, "a", "r", 0)] == [3]
    world.s.clients = 1
    assert [o.arg for o in world.play("results", 2, "b", "r", 0)] == [2]


def test_time_up_reaches_the_roots_watchdog_only() -> None:
    """A root on another host learns that the job's time is up from its watchdog's PONG
    (see scoop._launch.walltime); other workers' PONGs say nothing of it."""
    world = World()
    assert [out.body for out in world.s.ping(b"h0", 0, 0.0)] == [None]
    world.s.draining = world.s.time_up = True
    assert [out.body for out in world.s.ping(b"h0", 0, 0.0)] == [{"time_up": True}]
    assert [out.body for out in world.s.ping(b"h1", 1, 0.0)] == [None]


def test_a_worker_that_leaves_or_is_lost_leaves_no_ping_record() -> None:
    world = World()
    for wid in (1, 2):
        world.s.ping(b"h%d" % wid, wid, 0.0)
    world.s.bye(world.peer(1))
    world.run([("lost", 2)])
    assert 1 not in world.s.roster.last_ping and 2 not in world.s.roster.last_ping
