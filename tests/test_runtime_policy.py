"""The worker's scheduling decisions, without a socket: tables played on
``scoop._runtime.policy`` (credit, standby, grouping, give-back), then a worker whose
link to the broker is a recorder, to check what it hands back and under which tag, and
an in-process one whose futures wait on each other (a deadlock, reported as such).

Policy scripts are lists of ``(call, args, expected)``: the call is a Policy method,
``expected`` its answer (None: not checked), then the state named in the case.
"""

from __future__ import annotations

import pytest

from scoop import _protocol as P
from scoop import _serialize
from scoop._errors import BrokenJobError
from scoop._runtime import Worker
from scoop._runtime import policy as pol
from scoop._runtime.hub import Group
from scoop._runtime.policy import (
    IN_FLIGHT_PER_WORKER,
    MAX_CREDIT,
    MAX_GROUP_WEIGHT,
    PREFETCH_BACKLOG_S,
    Policy,
)

FAST = PREFETCH_BACKLOG_S / 1000  # a task this quick: prefetch as much as allowed
WARM = [("task_took", (FAST,), None)] * 80  # many fast tasks ran
SLOW = PREFETCH_BACKLOG_S * 100  # a task this slow: ask for one group at a time

# -- credit and standby ----------------------------------------------------------------
CREDIT_CASES = {
    "first ask: one group (the slice estimate starts pessimistic)": (2, [
        ("want", (0, False), 1),
        ("want", (0, False), 0),  # asked already
        ("received", (1, False), None),
        ("want", (0, False), 1),
    ], {"credit_out": 1}),
    "fast tasks: up to MAX_CREDIT ahead, none while the queue holds enough": (2, [
        *WARM,
        ("want", (0, False), MAX_CREDIT),
        ("received", (2, False), None),
        ("want", (0, False), 2),  # back up to MAX_CREDIT
        ("received", (4, False), None),
        ("want", (10_000, False), 0),  # 10,000 queued tasks last long enough
    ], {"credit_out": 0}),
    "a slow task stops prefetching at once": (2, [
        *WARM,
        ("want", (0, False), MAX_CREDIT),
        ("task_took", (SLOW,), None),
        ("received", (MAX_CREDIT, False), None),
        ("want", (0, False), 1),
        ("want", (1, False), 0),  # one slow task queued is enough
    ], {"credit_out": 1}),
    "greenlets about to resume: ask for nothing yet": (2, [
        ("want", (0, True), 0),
    ], {"credit_out": 0}),
    "a wait with a deadline: no task starts, no work is asked for": (2, [
        ("timed_wait", (1,), None),
        ("may_run", (), False),
        ("want", (0, False), 0),
        ("timed_wait", (-1,), None),
        ("may_run", (), True),
        ("want", (0, False), 1),
    ], {"credit_out": 1}),
    "standby is said once, again after work was forced on the worker": (2, [
        ("want", (0, False), 1),
        ("stand_by", (), True),  # WITHDRAW 1: the credit is dropped
        ("stand_by", (), False),
        ("received", (1, False), None),
        ("stand_by", (), False),
        ("received", (1, True), None),  # forced: it may be what waits now
        ("stand_by", (), True),
        ("stand_by", (), False),
    ], {"credit_out": 0, "standby": True, "forced_since": False}),
    "asking for work ends a standby": (2, [
        ("stand_by", (), True),
        ("want", (0, False), 1),
        ("stand_by", (), True),
    ], {"standby": True}),
    "the program resumes: withdraw the credit once; a standby stands": (2, [
        ("withdraw", (), False),  # nothing to withdraw
        ("want", (0, False), 1),
        ("withdraw", (), True),
        ("withdraw", (), False),
        ("stand_by", (), True),
        ("withdraw", (), False),  # no WITHDRAW 0 after a timed wait...
        ("stand_by", (), False),  # ...nor WITHDRAW 1 at the next one
        ("want", (0, False), 1),  # an untimed wait asks for work: the standby ends
        ("withdraw", (), True),
    ], {"credit_out": 0, "standby": False}),
}


def _play(p: Policy, call: str, args: tuple):
    if call == "timed_wait":
        p.timed_waits += args[0]
        return None
    return getattr(p, call)(*args)


@pytest.mark.parametrize("size,script,state", CREDIT_CASES.values(), ids=CREDIT_CASES)
def test_credit_and_standby(size, script, state):
    p = Policy(size)
    for step, (call, args, expected) in enumerate(script):
        got = _play(p, call, args)
        if expected is not None:
            assert got == expected, f"step {step}: {call}{args} -> {got!r}"
    assert {name: getattr(p, name) for name in state} == state


def test_the_only_worker_runs_tasks_even_in_a_timed_wait():
    p = Policy(1)  # nobody else would
    p.timed_waits = 1
    assert p.may_run() and p.want(0, False) == 1 and p.credit_out == 1


@pytest.mark.parametrize("queued,timed,size,keeps", [
    (0, 0, 2, True),  # nothing queued: the first group runs here, no round trip
    (3, 0, 2, False),  # work queued already: everything ships
    (0, 1, 2, False),  # a timed wait runs nothing: everything ships
    (0, 1, 1, True),  # ... unless this is the only worker
])
def test_first_group_kept(queued, timed, size, keeps):
    p = Policy(size)
    p.timed_waits = timed
    assert p.keeps_first(queued) is keeps


@pytest.mark.parametrize("slices,queued,timed,asks", [
    ([0.02], 0, 0, True),  # a long task, the last queued: ask for the next group now
    ([0.02], 1, 0, False),  # more queued: asked for when that one starts
    ([0.0001] * 50, 0, 0, False),  # short tasks: prefetched after each one instead
    ([], 0, 0, False),  # nothing known yet
    ([0.02], 0, 1, False),  # in a timed wait no work is asked for
])
def test_asks_for_the_next_group_before_the_last_long_task(slices, queued, timed, asks):
    p = Policy(2)
    for s in slices:
        p.task_took(s)
    p.timed_waits = timed
    assert p.asks_ahead(queued) is asks


@pytest.mark.parametrize("away,size,ships", [
    (0, 2, True),
    (IN_FLIGHT_PER_WORKER * 2 - 1, 2, True),
    (IN_FLIGHT_PER_WORKER * 2, 2, False),  # enough away: the leaves of a tree run here
    (IN_FLIGHT_PER_WORKER * 2, 4, True),
])
def test_outbox_ships_on_inline_run(away, size, ships):
    assert Policy(size).ships_on_inline(away) is ships


# -- guided grouping -------------------------------------------------------------------
GROUP_CASES = {
    "ten futures, one worker: big groups first, then ones": (
        [1] * 10, [True] * 10, 1, [(0, 3), (3, 5), (5, 7), (7, 8), (8, 9), (9, 10)]),
    "map chunks never share a group with plain futures": (
        [1, 1, 5, 5, 1], [True, True, False, False, True], 1,
        [(0, 2), (2, 3), (3, 4), (4, 5)]),
    "one heavy future makes a group alone": (
        [500, 1, 1], [True] * 3, 1, [(0, 1), (1, 2), (2, 3)]),
    "more workers, smaller first groups": (
        [1] * 8, [True] * 8, 2, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7),
                                 (7, 8)]),
    "nothing to ship": ([], [], 3, []),
}


@pytest.mark.parametrize("weights,plain,size,groups", GROUP_CASES.values(), ids=GROUP_CASES)
def test_guided_groups(weights, plain, size, groups):
    assert list(pol.guided_groups(weights, plain, size)) == groups


@pytest.mark.parametrize("n,size", [(1000, 1), (1000, 2), (10_000, 16), (7, 3)])
def test_guided_groups_cover_everything_big_first_and_bounded(n, size):
    got = list(pol.guided_groups([1] * n, [True] * n, size))
    assert [start for start, _ in got] == [0] + [stop for _, stop in got[:-1]]
    assert got[-1][1] == n
    sizes = [stop - start for start, stop in got]
    assert sizes == sorted(sizes, reverse=True)
    assert max(sizes) <= MAX_GROUP_WEIGHT and sizes[-1] == 1


# -- give-back -------------------------------------------------------------------------
def test_give_back_keeps_forced_groups_and_sorts_the_rest_by_group():
    a, b, f = Group(0, 1, 2), Group(2, 9, 1), Group(0, 3, 1, forced=True)
    runq = [(a, 1, "a1"), (f, 5, "f5"), (b, 7, "b7"), (a, 2, "a2")]
    stay, groups = pol.give_back(runq)
    assert stay == [(f, 5, "f5")]
    assert groups == [(a, [(1, "a1"), (2, "a2")]), (b, [(7, "b7")])]


FRESH = P.returned_tag(1, 5)
TAG_CASES = {
    "the whole group, as sent: its own fid (the broker drops its hold)": (
        7, 3, 3, False, 7),
    "part of it (one task ran here): a fresh group of its own": (7, 3, 2, False, FRESH),
    "kept by its owner (fid 0): a fresh group": (0, 3, 3, False, FRESH),
    "kept by its owner, map chunks: fresh and resumable": (
        0, 2, 2, True, FRESH | P.RESUMABLE),
    "part of a resumable, suspect group: both bits stay": (
        7 | P.RESUMABLE | P.SUSPECT, 4, 1, True, FRESH | P.RESUMABLE | P.SUSPECT),
    "a whole suspect group: its own fid, bits and all": (
        7 | P.SUSPECT, 2, 2, False, 7 | P.SUSPECT),
}


@pytest.mark.parametrize("fid,remaining,n,chunks,tag", TAG_CASES.values(), ids=TAG_CASES)
def test_return_tag(fid, remaining, n, chunks, tag):
    assert pol.return_tag(fid, remaining, n, chunks, FRESH) == tag


def test_returned_tag_layout():
    tag = P.returned_tag(3, 12)
    assert tag & P.RETURNED and tag >> 32 & 0x1FFFFFFF == 3 and tag & 0xFFFFFFFF == 12
    assert not tag & (P.RESUMABLE | P.SUSPECT)


# -- a worker without a socket ---------------------------------------------------------
KEY = b"k" * 32


class Recorder:
    """Stands for the link to the broker: records what the worker sends."""

    def __init__(self, wid: int) -> None:
        self.codec = P.Codec(KEY, wid)
        self.sent: list[tuple[bytes, dict]] = []

    def send(self, kind: bytes, **kw) -> None:
        self.sent.append((kind, kw))

    def reject(self, source: str, exc: Exception) -> None:
        raise AssertionError(f"{source}: {exc}")


def _worker() -> Worker:
    rt = Worker(1, size=2)
    rt.link = Recorder(1)
    return rt


def _tasks(rt: Worker, fid: int, tids: list[int], forced: bool = False) -> None:
    """The broker sends ``rt`` one group of ``abs`` calls from worker 0."""
    broker = P.Codec(KEY, 0xFFFFFFFF)
    frames = _serialize.dumps([(abs, (-t,), {}) for t in tids])
    parcel = broker.parcel([P.task_ids_frame(tids), *frames], tag=fid, peer=0)
    msg = broker.decode(broker.encode(P.TASKS, arg=int(forced), parcels=[parcel]))
    rt.handlers.dispatch(msg)


def _returned(rt: Worker) -> list[tuple[int, int, list[int]]]:
    return [(p.tag, p.peer, list(P.task_ids(p)))
            for kind, kw in rt.link.sent if kind == P.RETURN for p in kw["parcels"]]


def test_tasks_that_arrive_during_a_timed_wait_go_back_whole():
    rt = _worker()
    rt.policy.credit_out = 1
    rt.policy.timed_waits = 1
    _tasks(rt, 7, [1, 2, 3])
    assert _returned(rt) == [(7, 0, [1, 2, 3])] and not rt.runq
    assert rt.policy.credit_out == 0


def test_forced_tasks_stay_during_a_timed_wait():
    rt = _worker()
    rt.policy.timed_waits = 1
    _tasks(rt, 7, [1, 2], forced=True)
    assert _returned(rt) == [] and len(rt.runq) == 2 and rt.policy.forced_since


def test_a_group_partly_run_goes_back_as_a_group_of_its_own():
    rt = _worker()
    _tasks(rt, 7 | P.SUSPECT, [1, 2, 3])
    group, tid, call = rt.runq.popleft()  # the hub started it
    rt.policy.timed_waits = 1
    rt.shipper.give_back()
    assert _returned(rt) == [(P.returned_tag(1, 1) | P.SUSPECT, 0, [2, 3])]
    assert group.remaining == 1 and not rt.runq


_cycle: dict = {}


def _wait_for(name: str):
    return _cycle[name].result()


def test_futures_that_wait_on_each_other_in_process_end_in_a_deadlock_error():
    rt = Worker()  # in-process: no broker, no socket
    a = rt.submit(_wait_for, ("b",), {})
    b = rt.submit(_wait_for, ("a",), {})
    _cycle.update(a=a, b=b)
    with pytest.raises(BrokenJobError, match="deadlock"):
        a.result()
    assert rt.flags.broken is None  # the runtime is still usable
    assert rt.submit(abs, (-3,), {}).result() == 3
