"""The worker's scheduling decisions, with no I/O: when to ask the broker for work, when to
stand by, how to cut the outbox into groups, and what goes back to the broker, under
which tag.

The runtime tells a :class:`Policy` what happens and asks it what to do; the answers are
numbers and flags, and the runtime sends the messages. The functions below decide on
plain values. ``tests/test_runtime_policy.py`` drives both from tables, with no socket::

    runtime (hub, outbox, handlers)            Policy and the functions here
    -------------------------------            -----------------------------
    a task took t seconds  ---------------->   task_took: the slice estimate
    flush: ask for how many groups? ------->   want(queued, waking) -> n  (READY n)
    the last queued task starts: ask now? ->   asks_ahead(queued)
    TASKS arrived (forced or not)  -------->   received(n, forced)
    the program resumes  ------------------>   withdraw() -> send WITHDRAW?
    a wait with a deadline begins  -------->   stand_by() -> send WITHDRAW 1?
    may the hub start a task now?  -------->   may_run()
    ship the outbox: where to cut it? ----->   guided_groups(weights, plain, size)
    hand the run queue back  -------------->   give_back(runq) -> (stay, groups)
    under which tag does a group go back? ->   return_tag(fid, remaining, n, chunks, fresh)

*Credit.* A worker asks for groups (READY n) while its queued work is estimated to last
less than :data:`PREFETCH_BACKLOG_S`, at most :data:`MAX_CREDIT` ahead; the estimate of
one task slice rises at once on a slow one and decays slowly on fast ones.

*Standby.* While a greenlet waits with a deadline, the worker starts no task (unless it is
the job's only worker): a task could make the wait overrun. It tells the broker so once
(WITHDRAW 1), and again after the broker forced work on it anyway; the standby lasts
until it asks for work again (a program resuming from a timed wait does not end it).

*Grouping.* Guided: each group takes a share of the weight still to ship, so that the
first groups are big (little overhead) and the last ones small (balance); map chunks
never share a group with other futures (see ``scoop._chunks``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from .. import _protocol as P

# -- tuning --------------------------------------------------------------------------------
# A shipped group holds at most this much work (futures, or map items): bigger groups cost
# less per future but balance worse across workers.
MAX_GROUP_WEIGHT = 128
# Guided grouping: a group takes 1/(GROUP_SPLIT * workers) of the weight still to ship.
# Larger values give more, smaller groups (better balance, more messages).
GROUP_SPLIT = 4
# Ship the outbox once this many futures wait in it, even if nobody waits yet, so a long
# stream of submits starts running before the submitter blocks.
OUTBOX_MAX = 1024
# Ask the broker for more groups while the queued work is estimated below this many
# seconds: hides the round trip for short tasks without hoarding long ones.
PREFETCH_BACKLOG_S = 0.002
# At most this many groups requested ahead: more hides more latency for tiny tasks, but a
# worker whose tasks turn out long holds more work that others could have run.
MAX_CREDIT = 4
# After the first group, shipped groups leave in messages of this many: the first one
# leaves alone, so other workers start while the rest is still being pickled.
SHIP_BATCH = 8
# When a future runs inline, the rest of the outbox ships only while fewer than this many
# (per worker) of this worker's futures are away: enough to keep the others busy; beyond
# that, small futures (the leaves of a tree) run here without any message.
IN_FLIGHT_PER_WORKER = 4
# Inline runs nest in the waiting greenlet's stack; past this depth, futures ship instead.
MAX_INLINE_DEPTH = 100
# Workers that may die running a task before it fails (the broker's WELCOME says the job's).
MAX_ATTEMPTS = 3


class Policy:
    """The credit and standby state of one worker, and the decisions made from it."""

    __slots__ = ("size", "credit_out", "standby", "forced_since", "avg_slice_s",
                 "timed_waits", "runs_tasks", "leaving")

    def __init__(self, size: int = 1) -> None:
        self.size = size  # workers of the job
        self.credit_out = 0  # groups asked of the broker and not received yet
        self.standby = False  # the broker knows this worker waits with a deadline
        self.forced_since = False  # work was forced on it since it said so
        # Estimated run time of one task slice; starts pessimistic (no prefetch).
        self.avg_slice_s = PREFETCH_BACKLOG_S
        self.timed_waits = 0  # parked greenlets that wait with a deadline
        # False: a client that submits and waits but never runs a task (scoop.Executor's
        # runtime thread): no credit, nothing kept or run inline, never on standby.
        self.runs_tasks = True
        # This worker leaves the job (SIGTERM): it starts no task and hands back what it
        # holds, forced groups too (see Hub.leave).
        self.leaving = False

    def may_run(self) -> bool:
        """Whether the hub may start tasks now (not while a wait has a deadline, unless
        this is the job's only worker; never once it leaves)."""
        return (self.runs_tasks and not self.leaving
                and (not self.timed_waits or self.size == 1))

    def task_took(self, seconds: float) -> None:
        """A task slice ran this long: a slow one stops prefetching at once."""
        if seconds > self.avg_slice_s:
            self.avg_slice_s = seconds
        else:
            self.avg_slice_s += (seconds - self.avg_slice_s) * 0.1

    def want(self, queued: int, waking: bool) -> int:
        """How many more groups to ask for, with ``queued`` tasks in the run queue and
        (``waking``) greenlets about to resume; counted as asked. Asking ends a standby
        at the broker too."""
        if waking or not self.may_run() or queued * self.avg_slice_s >= PREFETCH_BACKLOG_S:
            return 0
        target = min(MAX_CREDIT, max(1, int(PREFETCH_BACKLOG_S / max(self.avg_slice_s, 1e-9))))
        want = max(0, target - self.credit_out)
        if want:
            self.credit_out += want
            self.standby = False
        return want

    def asks_ahead(self, queued: int) -> bool:
        """Before a task starts with ``queued`` more in the run queue: whether to ask for
        work now, not after it. Only for long tasks (short ones are prefetched) before the
        last queued one: the next group arrives while it runs, so the worker does not
        wait for it after (a round trip, and in an in-process root a broker thread that
        waits for the GIL: 5 ms gaps per group in bench line 5)."""
        return not queued and self.avg_slice_s > PREFETCH_BACKLOG_S and self.may_run()

    def received(self, groups: int, forced: bool) -> None:
        """``groups`` task groups arrived; ``forced``: sent while every worker stood by."""
        self.credit_out = max(0, self.credit_out - groups)
        self.forced_since |= forced

    def withdraw(self) -> bool:
        """The program's main greenlet resumes: it takes no work until it waits again.
        Whether to tell the broker (WITHDRAW): only if it asked for work (the credit is
        dropped).

        A standby is left standing: the broker forces work only on workers that all
        stand by, so at worst it sends this one a group while its program runs, which
        runs at its next wait (where it would have run had the program kept waiting).
        Ending the standby here cost two messages per timed wait (WITHDRAW 0 now,
        WITHDRAW 1 at the next), a third of a remote round trip's messages (issue 12).
        """
        if self.credit_out:
            self.credit_out = 0
            self.standby = False
            return True
        return False

    def stand_by(self) -> bool:
        """A wait with a deadline begins: whether to tell the broker (WITHDRAW 1), which
        then sends work only if no one else can; again after it was sent work anyway,
        which may be what waits now."""
        if self.runs_tasks and (not self.standby or self.forced_since):
            self.credit_out = 0
            self.standby = True
            self.forced_since = False
            return True
        return False

    def keeps_first(self, queued: int) -> bool:
        """Whether the first shipped group stays here (run without a round trip): only
        if nothing else is queued and this worker may run tasks now."""
        return not queued and self.may_run()

    def ships_on_inline(self, away: int) -> bool:
        """When a future runs inline: whether the rest of the outbox ships now, with
        ``away`` of this worker's futures already away."""
        return away < IN_FLIGHT_PER_WORKER * self.size


def guided_groups(weights: Sequence[int], plain: Sequence[bool], size: int,
                  alone: Sequence[bool] | None = None) -> Iterator[tuple[int, int]]:
    """Cut futures of these ``weights`` into groups: ``(start, stop)`` index ranges, in
    order. ``plain``: a future that is not a map chunk (the two never share a group);
    ``alone``: a future with a time limit, a group of its own (its timeout fails its
    group: no other task may share that fate)."""
    remaining = sum(weights)
    i, n = 0, len(weights)
    alone = alone or [False] * n
    while i < n:
        target = min(MAX_GROUP_WEIGHT, -(-remaining // (GROUP_SPLIT * size)))
        j, weight, kind = i, 0, plain[i]
        while j < n and (j == i or (weight + weights[j] <= target and plain[j] == kind
                                    and not alone[i] and not alone[j])):
            weight += weights[j]
            j += 1
        remaining -= weight
        yield i, j
        i = j


def give_back(runq: Iterable[tuple], everything: bool = False
              ) -> tuple[list, list[tuple[object, list]]]:
    """Split a run queue of ``(group, tid, call)`` entries: those that stay (groups the
    broker forced on this worker run anyway, unless ``everything`` goes: the worker
    leaves) and, per group, the ``(tid, call)`` items that go back to the broker."""
    stay = []
    groups: dict[int, tuple[object, list]] = {}
    for group, tid, call in runq:
        if group.forced and not everything:
            stay.append((group, tid, call))
        else:
            groups.setdefault(id(group), (group, []))[1].append((tid, call))
    return stay, list(groups.values())


def return_tag(fid: int, remaining: int, n: int, chunks: bool, fresh: int) -> int:
    """The tag under which ``n`` unstarted tasks of a received group go back (RETURN).

    The whole group, as the broker sent it (``fid`` set, no task of it started): its own
    fid, and the broker drops this worker's hold on it. Otherwise (part of it runs here,
    or the owner kept it without the broker: ``fid`` 0) a group of its own, ``fresh``
    (see ``_protocol.returned_tag``), so that the broker tracks both: RESUMABLE if it
    holds map chunks, SUSPECT if the group was (it killed a worker: never for the root),
    LIMITED if it was (a task with a time limit: never for the root either).
    """
    if fid and remaining <= n:
        return fid
    tag = fresh
    if fid & P.RESUMABLE or (not fid and chunks):
        tag |= P.RESUMABLE
    return tag | (fid & (P.SUSPECT | P.LIMITED))
