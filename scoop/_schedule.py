"""The broker's decisions: which worker runs which task group, and what a worker's death costs.

No socket, no clock, no thread: :class:`Schedule` is told what happened (a worker's
message, a worker lost, the time now) and returns what to do, as values: messages to send
(:class:`Send`), groups whose tasks fail (:class:`Fail`), a sandbox worker to ask the
launcher for (:class:`AskSandbox`). The broker's loop (``scoop._broker``) owns the sockets
and carries them out; unit tests and simulations drive a Schedule directly.

Flow of task groups (opaque parcels; tag=fid, peer=owner)::

    worker A (owner)                 Schedule                          worker B
    ----------------                 --------                          --------
    TASKS [g1 g2 g3] -------------->  queue: g1 g2 g3
                                      credits: B=1   <---------------  READY 1
                                      g1 -> B, held[B] += g1  ------->  TASKS [g1]
                                      held[B] -= g1  <---------------  RESULTS [for A] done g1
    RESULTS [for A] <--------------   forward parcel to its owner
                                      B lost: g2' (SUSPECT) first in line; map chunks:
    LOST [[running, tids]] <-------   their owner resumes them (RETURN, pieces)
    CONST {...} ------------------->  keep; forward to every worker ->  CONST {...}
    SHUTDOWN status --------------->  STOP to every worker --------->  (exits)

*Queue.* Task groups wait in one FIFO queue, whoever submitted them.

*Credits.* A worker sends READY(n) when its own queue runs low; it is sent up to n groups,
workers with credit taking turns, the one that has waited longest first. Work therefore
goes to whoever is free, and a busy worker does not hoard work. The roster keeps the
workers with credit, and counts those on standby, so that a dispatch costs what it
sends, not a scan of every worker (``bench/simulate.py dispatch``, every worker busy and
work queued: a finished group cost 100 us with 2,000 workers and 440 with 10,000, 5 with
10; now 5 at any count).

*Standby.* A worker waiting with a deadline takes no work (WITHDRAW 1) unless every worker
is on standby: then each gets one group to run anyway ("forced"), so the job never stalls.
Sandbox workers do not count: they take no ordinary work, so the root on standby with
only a sandbox beside it is forced work too (else a task the root was forced, or one
whose group a dead worker had, would wait forever for its children).

*Routing.* A RESULTS message carries one parcel per owner; each is forwarded to its owner
untouched. Finished groups listed in it are dropped from the sender's held set.

*Worker loss.* The groups a dead worker held go back first in line; only the one it was
running (its oldest unfinished group: a worker starts its groups in the order it got
them) is charged an attempt. Groups of map chunks (tag bit RESUMABLE) are not queued
again: their owner is told (LOST) and sends back what they had not finished, in pieces,
charging the items that were running (``scoop._chunks``). The groups a dead worker
submitted are dropped, queued or held by another dead worker: nobody waits for them.

*Suspect groups.* What a dead worker held is marked SUSPECT (which group killed it is a
guess): the root, whose death ends the job, never gets it. With no other worker left,
the launcher is asked for a sandbox worker that takes only suspect groups, the groups
their tasks submit (their children: they are its to run, not the root's), and limited
ones (which the root never takes either: beside a sandbox, nobody else would); when it
cannot start one (any more), they fail with WorkerLostError and the program goes on.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from . import _protocol as P
from ._errors import TaskTimeoutError, WorkerLostError

log = logging.getLogger("scoop.broker")

# A worker whose watchdog has not pinged for this long counts as dead and its work runs
# elsewhere. Pings come every second, even while the worker runs a long task, so this
# only has to ride out a stalled machine or a network hiccup.
WORKER_SILENCE_S = 5.0
# A gap this long between two ticks means the broker itself did not run (its process was
# stopped or starved, or its thread kept from the GIL): the pings sent meanwhile wait
# unread in its socket, so the gap does not count as the workers' silence. Shorter would
# excuse a loop that is merely busy (it ticks every half second); longer would let a
# pause of the broker pass for the silence of every worker at once.
BROKER_PAUSE_S = 2.0
# A task group whose worker dies running it is queued again this many times at most; then
# its tasks fail with WorkerLostError, so a task that kills every worker cannot take the
# job down. A group also fails once this many times as many workers died merely holding
# it (a bound even if the one that ran it was mistaken for another).
MAX_ATTEMPTS = 3
HELD_FACTOR = 2
# While some of the job's workers have not joined yet, they get this long before workers
# that wait with a deadline run work anyway (see Schedule._to_standby): longer waits less
# for the missing ones, shorter lets timed waits overrun less.
STANDBY_GRACE_S = 2.0
# How long a sandbox worker asked of the launcher may take to join before the groups it
# was for fail after all: a slow start must not be taken for a failed one, yet a launcher
# that cannot start one must not hold the program for long.
SANDBOX_JOIN_S = 30.0

Key = tuple[int, int]  # a task group: (owner, fid)


class Send(NamedTuple):
    """A message to send to the connection ``to`` (a routing id)."""

    to: bytes
    kind: bytes
    arg: int = 0
    parcels: Sequence[P.Parcel] = ()
    body: dict | None = None


# Send(...) of the round trip's two messages without the NamedTuple's __new__, a Python
# call each (issue 12): the fields in order, all given.
_send = tuple.__new__


class Fail(NamedTuple):
    """The tasks ``tids`` of a group fail with ``error(reason)`` (WorkerLostError unless
    said): the loop sends their errors to the group's owner (worker ``owner``,
    connection ``to``) as RESULTS."""

    to: bytes
    owner: int
    tids: list[int]
    reason: str
    error: type[Exception] = WorkerLostError


class AskSandbox(NamedTuple):
    """Ask the launcher to start worker ``wid``: a sandbox worker (its id is in
    ``Roster.sandbox_wids``), or a worker that replaces one a task's time limit ended."""

    wid: int


Out = Send | Fail | AskSandbox


class Peer:
    """What the broker knows of one connected worker."""

    __slots__ = ("wid", "ident", "credit", "standby", "forced", "held", "pid", "host",
                 "sandbox", "leaving")

    def __init__(self, wid: int, ident: bytes, pid: int = 0, host: str = "?") -> None:
        self.wid = wid
        self.ident = ident
        self.credit = 0
        # Waiting with a deadline: it takes work only when no worker else can (then
        # ``forced`` holds the groups it was sent that way).
        self.standby = False
        self.forced: set[Key] = set()
        self.held: dict[Key, P.Parcel] = {}  # in the order it got them
        self.pid = pid
        self.host = host
        self.sandbox = False  # started to run suspect groups (see Schedule._take)
        self.leaving = False  # it leaves on purpose (LEAVE): gets no work, charged nothing

    def __repr__(self) -> str:
        return f"<Peer {self.wid} credit={self.credit} held={len(self.held)}>"


class Roster:
    """The job's workers: who is connected, who ever joined or was lost, the ids still
    free, the JOINs answered, when each watchdog last pinged."""

    def __init__(self, size: int, first_free_wid: int | None = None) -> None:
        self.size = size  # the number of workers the job was started with
        self.peers: dict[bytes, Peer] = {}  # by routing id
        self.by_wid: dict[int, Peer] = {}
        self.seen: set[int] = set()  # ids of the workers that joined or were lost
        # Ids handed to workers that join on their own (python -m scoop.join).
        self.next_free_wid = size if first_free_wid is None else first_free_wid
        # wid -> when its watchdog last pinged (None: joined, silent since the next tick)
        self.last_ping: dict[int, float | None] = {}
        # Connected workers with credit, in the order they got it (an ordered set), and
        # those waiting with a deadline: kept as they change, read at every dispatch.
        self.ready: dict[Peer, None] = {}
        self.standing_by: set[Peer] = set()
        self.sandboxes: set[Peer] = set()  # connected sandbox workers (few)
        self.joins_seen: set[int] = set()  # seq of every JOIN answered (see assign)
        self.sandbox_wids: set[int] = set()  # ids asked of the launcher for sandboxes

    def refusal(self, ident: bytes, sender: int, body: dict) -> str | None:
        """Why a HELLO is refused, or None."""
        wid = body.get("wid")
        if body.get("version") != P.VERSION:
            return (f"protocol version {body.get('version')} does not match the broker's "
                    f"{P.VERSION}: install the same scoop version on every host")
        if wid != sender or P.peer_name(ident) != b"w%d" % sender:
            return "worker id does not match its connection"
        if wid in self.by_wid:
            return f"worker {wid} is already connected"
        return None

    def add(self, ident: bytes, body: dict) -> Peer:
        peer = Peer(body["wid"], ident, body.get("pid", 0), body.get("host", "?"))
        peer.sandbox = peer.wid in self.sandbox_wids
        if peer.sandbox:
            self.sandboxes.add(peer)
        self.peers[ident] = peer
        self.by_wid[peer.wid] = peer
        self.seen.add(peer.wid)
        # Its silence counts from the next tick (see silent): its watchdog pings later.
        self.last_ping.setdefault(peer.wid, None)
        return peer

    def remove(self, peer: Peer) -> None:
        self.peers.pop(peer.ident, None)
        self.by_wid.pop(peer.wid, None)
        self.last_ping.pop(peer.wid, None)  # else one entry per worker ever gone
        self.ready.pop(peer, None)
        self.standing_by.discard(peer)
        self.sandboxes.discard(peer)

    def set_credit(self, peer: Peer, credit: int) -> None:
        peer.credit = credit
        if credit > 0:
            self.ready[peer] = None  # one that had credit keeps its turn
        else:
            self.ready.pop(peer, None)

    def set_standby(self, peer: Peer, standby: bool) -> None:
        peer.standby = standby
        if standby:
            self.standing_by.add(peer)
        else:
            self.standing_by.discard(peer)

    @property
    def all_standby(self) -> bool:
        """Whether every connected worker but the sandboxes waits with a deadline (and
        there is one). A sandbox does not count: it never takes ordinary work, so a
        sandbox at work must not keep the root, on standby, from running it."""
        regular = len(self.peers) - len(self.sandboxes)
        standing = len(self.standing_by) - sum(p.standby for p in self.sandboxes)
        return regular > 0 and standing == regular

    def assign(self, seq: int) -> int:
        """The id for a worker that asks with a JOIN of sequence number ``seq``.

        Each joiner's connection has its own replay window, so a JOIN read off the network
        could be replayed from new connections to use up worker ids: a JOIN is answered
        once, whichever connection it comes on."""
        if seq in self.joins_seen:
            raise P.AuthError(f"replayed JOIN (seq {seq})")
        self.joins_seen.add(seq)
        while self.next_free_wid in self.by_wid:
            self.next_free_wid += 1
        self.next_free_wid += 1
        return self.next_free_wid - 1

    def sandbox_wid(self) -> int:
        """A fresh id for a sandbox worker: one no worker ever had or will be assigned."""
        wid = self.fresh_wid()
        self.sandbox_wids.add(wid)
        return wid

    def fresh_wid(self) -> int:
        """An id no worker ever had or will be assigned (a worker the launcher starts)."""
        wid = max(self.next_free_wid, max(self.seen, default=0) + 1)
        self.next_free_wid = wid + 1
        return wid

    def silent(self, now: float) -> list[tuple[int, float]]:
        """(wid, seconds) of the connected workers, the root excepted (losing it ends the
        job, which its launcher sees), whose watchdog has not pinged for too long; they
        are forgotten here."""
        found = []
        for wid, last in self.last_ping.items():
            if last is None:  # joined since the last tick, not pinged yet
                self.last_ping[wid] = now
            elif wid and now - last > WORKER_SILENCE_S and wid in self.by_wid:
                found.append((wid, now - last))
        for wid, _ in found:
            del self.last_ping[wid]
        return found

    def excuse(self, seconds: float) -> None:
        """The broker did not run for ``seconds``: that long is nobody's silence."""
        for wid, last in self.last_ping.items():
            if last is not None:
                self.last_ping[wid] = last + seconds

    @property
    def all_started(self) -> bool:
        """Whether every worker the job was started with has joined (or was lost)."""
        return len(self.seen) >= self.size


class _WatchdogTalk:
    """What a worker's watchdog connection says, besides being alive (part of
    :class:`Schedule`): PING, TIMEOUT (a task ran past its time limit), LEAVE."""

    roster: Roster
    recovery: Recovery
    stopping: bool
    time_up: bool

    def ping(self, ident: bytes, wid: int, now: float) -> list[Out]:
        """A worker's watchdog asks whether the broker lives; note when it last asked."""
        self.roster.last_ping[wid] = now
        if wid == 0 and self.time_up:
            return [Send(ident, P.PONG, body={"time_up": True})]
        return [Send(ident, P.PONG)]

    def timed_out(self, ident: bytes, wid: int, body: dict | None, now: float) -> list[Out]:
        """A task of worker ``wid`` ran past its time limit (its watchdog says so, on
        connection ``ident``): see :meth:`Recovery.timed_out`; STOP answers the watchdog,
        whose worker then ends."""
        peer = self.roster.by_wid.get(wid)
        if peer is None or self.stopping:
            return [Send(ident, P.STOP)]
        self.roster.remove(peer)
        return ([Send(ident, P.STOP)] + self.recovery.timed_out(peer, body or {})
                + self._stranded("its worker ran a task past its time limit", now))

    def leaving(self, wid: int, gone: bool, now: float) -> list[Out]:
        """Worker ``wid`` leaves (SIGTERM; its watchdog says so): it gets no more work,
        and what it holds when it goes runs again, uncharged. ``gone``: it goes now, its
        grace over with a task still running."""
        peer = self.roster.by_wid.get(wid)
        if peer is None:
            return []
        peer.leaving = True
        self.roster.set_credit(peer, 0)
        if gone:
            return self.lost(wid, "it left (SIGTERM) before its running task ended", now)
        return []


class Schedule(_WatchdogTalk):
    """The broker's state and decisions for one job; every method returns what to do.

    Args:
        size: the number of workers the job was started with (sent to each worker).
        first_free_wid: the first id handed to workers that join on their own.
        max_attempts: workers that may die running a task group before its tasks fail.
        clients: how many of ``size`` run no task: not in the size workers are told.
    """

    def __init__(self, size: int = 1, first_free_wid: int | None = None,
                 max_attempts: int = MAX_ATTEMPTS, clients: int = 0) -> None:
        self.roster = Roster(size, first_free_wid)
        self.clients = clients
        self.told_size = max(1, size - clients)  # the WELCOME's: workers running tasks
        self.max_attempts = max(1, max_attempts)
        self.queue: deque[P.Parcel] = deque()  # parcels: tag=fid, peer=owner
        self.recovery = Recovery(self.roster, self.queue, self.max_attempts)
        self.consts: list[P.Parcel] = []
        self.stopping = False  # STOP sent; workers that join now are stopped at once
        self.draining = False  # the job's time is up: start nothing more (see dispatch)
        self.time_up = False  # and the root's program must stop (told with its PONGs)
        # An elastic job: results forwarded to a worker carry how many workers there are
        # now (arg), so that its maps cut chunks for the pool as it is, not as it started.
        self.report_size = False
        self.exit_status: int | None = None
        self._all_standby_since: float | None = None
        self._last_tick: float | None = None

    # -- workers joining and leaving -------------------------------------------------------
    def hello(self, ident: bytes, sender: int, body: dict | None) -> list[Out]:
        """A worker joins: welcome it with the constants so far, or refuse it, or stop it."""
        body = body or {}
        reason = self.roster.refusal(ident, sender, body)
        if reason is None and self.stopping:
            return [Send(ident, P.STOP)]
        if reason:
            log.warning("broker: refused a worker: %s", reason)
            return [Send(ident, P.REFUSED, body={"reason": reason})]
        peer = self.roster.add(ident, body)
        if peer.wid:  # a worker that can take stranded groups (maybe the one asked for)
            self.recovery.sandbox_asked = None
        log.debug("broker: worker %d joined (pid %s on %s)", peer.wid, peer.pid, peer.host)
        return [Send(ident, P.WELCOME, parcels=tuple(self.consts),
                     body={"size": self.told_size, "max_attempts": self.max_attempts,
                           "elastic": self.report_size})]

    def join(self, ident: bytes, seq: int) -> list[Out]:
        """A worker started by another launcher asks for an id: the next free one (raises
        AuthError for a replayed JOIN)."""
        if self.stopping:
            return [Send(ident, P.STOP)]
        return [Send(ident, P.ASSIGN, body={"wid": self.roster.assign(seq)})]

    def bye(self, peer: Peer) -> list[Out]:
        """A worker leaves on purpose: what it was sent and never took (still on its way
        when it said goodbye) goes first in line again, no attempt charged."""
        self.roster.remove(peer)
        self.queue.extendleft(reversed(list(peer.held.values())))
        return []

    def shutdown(self, peer: Peer, status: int) -> list[Out]:
        """The root's program ended with ``status``: stop every worker."""
        self.exit_status = status
        log.debug("broker: the root ended with status %d; stopping", status)
        self.roster.remove(peer)  # the root closes its socket right after
        return self.stop_workers()

    def stop_workers(self) -> list[Out]:
        """STOP to every worker; workers that join later are stopped as they join.

        Once is enough: a worker that gets STOP leaves, so a second STOP could only fail."""
        if self.stopping:
            return []
        self.stopping = True
        return [Send(peer.ident, P.STOP) for peer in self.roster.peers.values()]

    # -- work and results ------------------------------------------------------------------
    def tasks(self, peer: Peer, parcels: Iterable[P.Parcel]) -> list[Out]:
        """``peer`` submits task groups: queued last."""
        for parcel in parcels:
            parcel.peer = peer.wid  # the owner: results of this group go back to it
            self.queue.append(parcel)
        return []

    def ready(self, peer: Peer, n: int) -> list[Out]:
        if peer.leaving:  # a READY sent before its LEAVE came
            return []
        self.roster.set_credit(peer, peer.credit + n)
        self.roster.set_standby(peer, False)
        return []

    def withdraw(self, peer: Peer, standby: bool) -> list[Out]:
        self.roster.set_credit(peer, 0)
        self.roster.set_standby(peer, standby)
        # Standing by again: what it was sent anyway waits too, so it may take more.
        peer.forced.clear()
        return []

    def returned(self, peer: Peer, parcels: Sequence[P.Parcel], now: float) -> list[Out]:
        """``peer`` hands groups back, first in line again: a whole group under its own id
        (dropped from its hold), a partial one under a fresh id (it still holds the
        original), or the pieces an owner cut from its lost map chunks. Those of an
        owner gone meanwhile are dropped (see Recovery.lost)."""
        for parcel in reversed(parcels):
            peer.held.pop((parcel.peer, parcel.tag), None)
            peer.forced.discard((parcel.peer, parcel.tag))
            if parcel.peer in self.roster.by_wid:
                self.queue.appendleft(parcel)
        return self._stranded("a worker died running it or a task sent with it", now)

    def results(self, peer: Peer, parcels: Iterable[P.Parcel], done: Iterable[Key],
                credit: int = 0) -> list[Out]:
        """Forward each results parcel to its owner; drop the finished groups from the
        sender's hold; ``credit``: a READY riding along."""
        if credit:
            self.ready(peer, credit)
        for key in done:
            peer.held.pop(key, None)
            peer.forced.discard(key)
            self.recovery.losses.pop(key, None)
        out: list[Out] = []
        size = max(1, len(self.roster.peers) - self.clients) if self.report_size else 0
        for parcel in parcels:
            owner = self.roster.by_wid.get(parcel.peer)
            if owner is None:
                log.debug("broker: results for departed worker %d dropped", parcel.peer)
                continue
            out.append(_send(Send, (owner.ident, P.RESULTS, size, (parcel,), None)))
        return out

    def const(self, peer: Peer, parcels: Sequence[P.Parcel]) -> list[Out]:
        """Shared constants: kept for workers that join later, forwarded to the others."""
        self.consts.extend(parcels)
        return [Send(other.ident, P.CONST, parcels=parcels)
                for other in self.roster.peers.values() if other is not peer]

    # -- worker loss -----------------------------------------------------------------------
    def lost(self, wid: int, how: str, now: float) -> list[Out]:
        """Worker ``wid`` is gone (``how``: its end, in words): see :class:`Recovery`."""
        self.roster.seen.add(wid)
        peer = self.roster.by_wid.pop(wid, None)
        if peer is None or self.stopping:
            return []
        self.roster.remove(peer)
        self.roster.last_ping.pop(wid, None)
        return self.recovery.lost(peer, how) + self._stranded(how, now)

    def tick(self, now: float) -> list[Out]:
        """Every half second or so: count silent workers as lost, see to stranded groups,
        then dispatch (once).

        A long gap since the last tick is the broker's own pause, not its workers'
        silence (:data:`BROKER_PAUSE_S`; bench/simulate.py ``--pause-s 7``: 129 of 200
        healthy workers were counted as lost, and told to stop when they spoke again).
        """
        if self._last_tick is not None and now - self._last_tick > BROKER_PAUSE_S:
            log.warning("broker: it did not run for %.1f s (its process stopped or "
                        "starved?); that time is not counted as the workers' silence",
                        now - self._last_tick)
            self.roster.excuse(now - self._last_tick)
        self._last_tick = now
        out: list[Out] = []
        for wid, silence in self.roster.silent(now):
            out += self.lost(wid, f"no heartbeat for {silence:.0f} s", now)
        out += self._stranded("no sandbox worker joined to run it", now)
        return out + self.dispatch(now)

    def _stranded(self, how: str, now: float) -> list[Out]:
        return [] if self.stopping else self.recovery.stranded(how, now)

    # -- dispatch --------------------------------------------------------------------------
    def dispatch(self, now: float) -> list[Out]:
        """Hand queued groups to workers with credit, taking turns (none while draining:
        what runs finishes, what waits in the queue stays there)."""
        if self.draining:
            return []
        out: list[Out] = []
        queue, roster = self.queue, self.roster
        sent = True
        while queue and sent and roster.ready:
            sent = False
            for peer in list(roster.ready):
                parcels = self._take(peer, peer.credit)
                if not parcels:
                    continue
                sent = True
                roster.set_credit(peer, peer.credit - len(parcels))
                for parcel in parcels:
                    peer.held[(parcel.peer, parcel.tag)] = parcel
                out.append(_send(Send, (peer.ident, P.TASKS, 0, parcels, None)))
        # What is left may be what no worker with credit may take (a sandbox's credit
        # never takes ordinary work): it may have to be forced on those standing by.
        return out + self._to_standby(now) if queue else out

    def _take(self, peer: Peer, n: int, forced: bool = False) -> list[P.Parcel]:
        """Up to ``n`` queued groups for ``peer``, first in line first; for the root, only
        groups that killed no worker (not SUSPECT) and have no time limit (not LIMITED):
        its death would end the job; for a sandbox worker, only SUSPECT or LIMITED ones
        and those it submitted itself (a suspect task's children: nobody else may be
        free for them). ``forced`` (``peer`` stands by): none that a sandbox at work
        takes itself."""
        queue = self.queue
        if peer.wid != 0 and not peer.sandbox and not forced:
            if len(queue) <= n:  # (the common case, without a comprehension: a call)
                taken = list(queue)
                queue.clear()
                return taken
            return [queue.popleft() for _ in range(n)]
        taken = []
        for parcel in queue:
            if len(taken) == n:
                break
            if _may_take(peer, parcel) and not (forced and self._sandbox_runs(parcel)):
                taken.append(parcel)
        for parcel in taken:
            queue.remove(parcel)
        return taken

    def _sandbox_runs(self, parcel: P.Parcel) -> bool:
        """Whether ``parcel`` is a sandbox's own, and that sandbox will ask for it."""
        owner = self.roster.by_wid.get(parcel.peer)
        return owner is not None and owner.sandbox and not owner.standby

    def _to_standby(self, now: float) -> list[Out]:
        """When every worker waits with a deadline (sandboxes aside), nobody would ever
        ask for the queued work, and each wait would time out for want of the work it
        waits for (the root alone, or beside a sandbox, after losing every other worker;
        or all workers in nested timed waits). Then each worker on standby is sent one
        group it runs anyway, at the cost of its wait perhaps overrunning: progress
        beats a certain timeout."""
        if not self.roster.all_standby:
            self._all_standby_since = None
            return []
        peers = [peer for peer in self.roster.peers.values() if peer.standby]
        if self._all_standby_since is None:
            self._all_standby_since = now
        if not self.roster.all_started and now - self._all_standby_since < STANDBY_GRACE_S:
            return []  # workers still starting will take the work
        out: list[Out] = []
        for peer in peers:
            if self.queue and not peer.forced:
                taken = self._take(peer, 1, forced=True)
                if not taken:
                    continue
                key = (taken[0].peer, taken[0].tag)
                peer.held[key] = taken[0]
                peer.forced.add(key)
                out.append(Send(peer.ident, P.TASKS, arg=1, parcels=taken))
        return out


def _may_take(peer: Peer, parcel: P.Parcel) -> bool:
    """Whether ``peer`` may run ``parcel`` (see :meth:`Schedule._take`)."""
    if peer.sandbox:
        return bool(parcel.tag & (P.SUSPECT | P.LIMITED)) or parcel.peer == peer.wid
    return peer.wid != 0 or not parcel.tag & (P.SUSPECT | P.LIMITED)


class Recovery:
    """What a worker's death costs: attempts charged, groups queued again or failed, map
    chunks handed to their owners, sandbox workers asked for stranded suspect groups.

    Shares the :class:`Schedule`'s roster and queue."""

    def __init__(self, roster: Roster, queue: deque[P.Parcel], max_attempts: int) -> None:
        self.roster = roster
        self.queue = queue
        self.max_attempts = max_attempts
        # (owner, fid) -> (workers lost running it, workers lost holding it)
        self.losses: dict[Key, tuple[int, int]] = {}
        # Sandbox workers the launcher may still start (0: it cannot), and when the last
        # one was asked for (None: none is on its way).
        self._budget = 0
        self.sandbox_asked: float | None = None
        # Whether the launcher starts workers (it was ever given a sandbox budget): then a
        # worker that a time limit ended is replaced, and a limited task stranded with
        # the root alone gets a worker.
        self.replaces = False

    @property
    def sandbox_budget(self) -> int:
        return self._budget

    @sandbox_budget.setter
    def sandbox_budget(self, n: int) -> None:
        self._budget = n
        self.replaces |= n > 0

    def timed_out(self, peer: Peer, body: dict) -> list[Out]:
        """A task of ``peer`` ran past its time limit: that task fails (TaskTimeoutError
        to its owner; for a map chunk, LOST ``timeouts``: its owner keeps the results
        that came); ``peer`` ends itself, and what else it held runs again elsewhere,
        charged no attempt (``lost(blame=False)``); the launcher is asked for a worker
        in its place."""
        error = str(body.get("error", "a task exceeded its task_timeout"))
        try:
            key, tid = (int(body["owner"]), int(body["fid"])), int(body["tid"])
        except (KeyError, TypeError, ValueError):  # not from this version: end it anyway
            key, tid = None, 0
        parcel = peer.held.pop(key, None)  # None: it finished meanwhile
        owner = self.roster.by_wid.get(parcel.peer) if parcel is not None else None
        out: list[Out] = []
        if owner is not None and parcel.tag & P.RESUMABLE:
            out.append(Send(owner.ident, P.LOST, body={
                "how": error, "groups": [], "timeouts": [[tid, error]]}))
        elif owner is not None:
            out.append(Fail(owner.ident, owner.wid, P.task_ids(parcel).tolist(), error,
                            TaskTimeoutError))
        out += self.lost(peer, f"ended: {error}", blame=False)
        if self.replaces:
            wid = self.roster.fresh_wid()
            log.info("broker: asked for worker %d in place of worker %d", wid, peer.wid)
            out.append(AskSandbox(wid))
        return out

    def lost(self, peer: Peer, how: str, blame: bool = True) -> list[Out]:
        """Queue again (first in line) what a dead worker held; fail what keeps killing;
        tell the owners of map chunks, which resume them. Without ``blame`` (a time
        limit ended it: what killed it is known) no group is charged an attempt or
        marked SUSPECT; a group is still charged as held (a bound on loops). A worker
        that was leaving (LEAVE) was not killed by its work: nothing is charged at all.
        Groups whose owner is gone (this worker, or one lost before) are dropped."""
        clean = peer.leaving
        running = next(iter(peer.held), None) if blame and not clean else None
        requeued = []
        out: list[Out] = []
        chunks: dict[int, list] = {}  # owner -> [[running, tids], ...]
        for key, parcel in peer.held.items():
            if parcel.peer not in self.roster.by_wid:
                self.losses.pop(key, None)
                continue
            if parcel.tag & P.RESUMABLE:
                chunks.setdefault(parcel.peer, []).append(
                    [int(key == running), P.task_ids(parcel).tolist()])
                continue
            if clean:
                requeued.append(parcel)
                continue
            ran, held = self.losses.pop(key, (0, 0))
            ran, held = ran + (key == running), held + 1
            # Which group killed it is a guess (its last messages may have died with it):
            # the root runs none of them, nor what is handed back of them.
            parcel.tag |= P.SUSPECT if blame else 0
            self.losses[(parcel.peer, parcel.tag)] = (ran, held)
            if ran < self.max_attempts and held < HELD_FACTOR * self.max_attempts:
                requeued.append(parcel)
            else:
                out += self._fail(parcel, ran, held, how)
        self.queue.extendleft(reversed(requeued))
        for owner_wid, groups in chunks.items():
            out.append(Send(self.roster.by_wid[owner_wid].ident, P.LOST, body={
                "how": how, "groups": groups, "blameless": not blame, "clean": clean}))
        dropped = self._drop_orphans(peer.wid)
        log.warning("broker: worker %d (pid %s on %s) is gone (%s); %d task group(s) it "
                    "held will run again%s", peer.wid, peer.pid, peer.host, how,
                    len(requeued) + sum(len(g) for g in chunks.values()),
                    f"; {dropped} queued group(s) it submitted are dropped" if dropped else "")
        return out

    def _drop_orphans(self, wid: int) -> int:
        """Drop the queued groups that worker ``wid``, gone, submitted: their results
        would have nowhere to go (run anyway, they kept a sandbox, or the root forced
        them one at a time, from the work still wanted). Returns how many."""
        keep = [parcel for parcel in self.queue if parcel.peer != wid]
        dropped = len(self.queue) - len(keep)
        if dropped:
            self.queue.clear()
            self.queue.extend(keep)
            for key in [key for key in self.losses if key[0] == wid]:
                del self.losses[key]
        return dropped

    def stranded(self, how: str, now: float) -> list[Out]:
        """Suspect or limited groups, once no worker but the root is left to run them: a
        worker the launcher starts runs them (a sandbox for suspect ones: its death ends
        nothing), or, when it cannot start one (any more), they fail with
        WorkerLostError and the program goes on."""
        barred = P.SUSPECT | P.LIMITED
        if (any(wid != 0 for wid in self.roster.by_wid)
                or not self.roster.all_started  # workers still starting will take them
                or not any(p.tag & barred for p in self.queue)):
            return []
        if self.sandbox_asked is not None and now - self.sandbox_asked < SANDBOX_JOIN_S:
            return []  # one is on its way
        if self.replaces and any((p.tag & barred) == P.LIMITED for p in self.queue):
            self.sandbox_asked = now
            wid = self.roster.fresh_wid()
            log.info("broker: asked for worker %d: the root never runs a task with a "
                     "time limit", wid)
            return [AskSandbox(wid)]
        if self.sandbox_budget > 0 and any(p.tag & P.SUSPECT for p in self.queue):
            self.sandbox_budget -= 1
            self.sandbox_asked = now
            wid = self.roster.sandbox_wid()
            log.info("broker: asked for sandbox worker %d, for tasks that may kill it", wid)
            return [AskSandbox(wid)]
        out: list[Out] = []
        for parcel in [p for p in self.queue if p.tag & barred]:
            self.queue.remove(parcel)
            if not parcel.tag & P.SUSPECT:
                out += self._fail(parcel, 0, 0, "no worker but the root is left to run it, "
                                  "and the root never runs a task with a time limit")
                continue
            ran, held = self.losses.get((parcel.peer, parcel.tag), (1, 1))
            out += self._fail(parcel, max(ran, 1), held, f"{how}; no worker but the root is "
                              "left to run it, and the root never runs a task that may have "
                              "killed a worker")
        return out

    def _fail(self, parcel: P.Parcel, ran: int, held: int, how: str) -> list[Out]:
        """The tasks of ``parcel`` fail (nothing to do if its owner is gone)."""
        owner = self.roster.by_wid.get(parcel.peer)
        if owner is None:
            return []
        if not ran and not held:
            return [Fail(owner.ident, owner.wid, P.task_ids(parcel).tolist(), how)]
        what = f"{ran} workers died running this task"
        if held > ran:
            what += f" ({held} holding it)"
        return [Fail(owner.ident, owner.wid, P.task_ids(parcel).tolist(),
                     f"{what} (the last: {how})")]
