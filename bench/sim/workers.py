"""A process of simulated workers: hundreds of them, each speaking the worker protocol.

Per worker, what a real one does (``scoop._worker``: ``connect``, ``_flush``,
``handle_tasks``; ``scoop._watchdog``), minus running the tasks::

    "go" from the driver
    w<wid> DEALER: HELLO {version, wid, pid, host}  -> broker
                   WELCOME                          <- broker   (registered)
                   READY credit                     -> broker
    h<wid> DEALER: PING every ping_s                -> broker   (its PONGs are read)
                   TASKS [groups]                   <- broker
      one group after the other, task_s per task, then
                   RESULTS [parcel for the owner], done (owner, fid), arg=1 (the credit back)
                   STOP                             <- broker   (the worker leaves)

One Poller holds every worker's main socket; the watchdog sockets are read when they
ping. Each group is answered with a real result parcel (``(tid, True, tid)`` per task,
pickled by ``scoop._serialize``, mac'ed for its owner), so the owner can check that
every task is answered once. The process ends when all of its workers are stopped or
lost, or when its stdin closes.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import sys
import time
from collections import deque

import zmq

from scoop import _protocol as P
from scoop import _serialize
from scoop._transport import Credentials, raise_open_file_limit
from scoop._watchdog import BROKER_TIMEOUT_S

from . import child

# Messages read from one worker's socket per wakeup: more is fewer polls, fewer keeps
# one busy worker from delaying the others' answers.
MAX_DRAIN = 64
# How long a "lose" command may wait for a worker that holds groups.
LOSE_WAIT_S = 5.0
# The longest the loop sleeps: how soon a command of the driver is seen.
MAX_WAIT_S = 0.05


class SimWorker:
    """One simulated worker: its two connections and the groups it holds."""

    __slots__ = ("wid", "codec", "watch_codec", "sock", "hsock", "busy_until", "held",
                 "welcomed", "gone", "heard", "expired")

    def __init__(self, wid: int, key: bytes) -> None:
        self.wid = wid
        self.codec = P.Codec(key, wid)
        # The watchdog has a codec of its own, as in a real worker: PONGs and the main
        # socket's messages may arrive out of order, and each side has a replay window.
        self.watch_codec = P.Codec(key, wid)
        self.sock: zmq.Socket | None = None
        self.hsock: zmq.Socket | None = None
        self.busy_until = 0.0  # when the last group it holds is done
        self.held: dict[tuple[int, int], list[int]] = {}  # (owner, fid) -> task ids
        self.welcomed = False
        self.gone = False  # stopped, refused or lost: it sends nothing more
        self.heard = 0.0  # when its watchdog last had a PONG
        self.expired = False  # a real worker's watchdog would have ended it by now


class Workers:
    """The simulated workers of one process and their loop."""

    def __init__(self, cfg: dict, commands) -> None:
        self.creds = Credentials.from_config(cfg)
        self.address = cfg["address"]
        self.task_s = float(cfg.get("task_s", 0.0))
        self.credit = int(cfg.get("credit", 2))
        self.ping_s = float(cfg.get("ping_s", 1.0))
        self.commands = commands
        self.host = socket.gethostname()
        self.workers = [SimWorker(wid, self.creds.key) for wid in cfg["wids"]]
        raise_open_file_limit()  # two connections per worker, and their mailboxes
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.MAX_SOCKETS, 2 * len(self.workers) + 64)
        self.poller = zmq.Poller()
        self.by_sock: dict[zmq.Socket, SimWorker] = {}
        self.due: list = []  # heap of (when, seq, worker, owner, fid)
        self._seq = itertools.count()
        self.pings: deque[tuple[float, SimWorker]] = deque()  # in the order they are due
        self.live = len(self.workers)
        self.welcomed = 0
        self.losing: float | None = None  # asked to lose a worker: until when to wait
        self.stats = {"groups": 0, "tasks": 0, "pings": 0, "pongs": 0, "stops": 0,
                      "refused": 0, "rejected": 0, "lost": 0, "watchdog_expired": 0}

    # -- life cycle -------------------------------------------------------------------
    def run(self) -> None:
        child.report("ready")
        while (cmd := self.commands.get()) != "go":
            if cmd is None:
                return
        t0 = time.monotonic()
        child.report("going", t0=t0)
        for w in self.workers:
            w.sock = self.creds.connect(self.ctx, P.routing_id(b"w", w.wid), self.address)
            self.by_sock[w.sock] = w
            self.poller.register(w.sock, zmq.POLLIN)
            self._send(w, P.HELLO, body={"version": P.VERSION, "wid": w.wid,
                                         "pid": os.getpid(), "host": self.host})
        try:
            while self.live:
                if not self._step():
                    return
        finally:
            self.close()
            child.report("done", **self.stats)

    def _step(self) -> bool:
        """One turn of the loop; False once the driver is gone."""
        now = time.monotonic()
        wait = MAX_WAIT_S
        if self.due:
            wait = min(wait, self.due[0][0] - now)
        if self.pings:
            wait = min(wait, self.pings[0][0] - now)
        for sock, _ in self.poller.poll(max(0, int(wait * 1000))):
            self._read(self.by_sock[sock])
        now = time.monotonic()
        while self.due and self.due[0][0] <= now:
            _, _, w, owner, fid = heapq.heappop(self.due)
            if not w.gone:
                self._answer(w, owner, fid)
        while self.pings and self.pings[0][0] <= now:
            _, w = self.pings.popleft()
            if not w.gone:
                self._ping(w)
                self.pings.append((now + self.ping_s, w))
        if self.losing is not None:
            self._lose(now)
        while True:
            try:
                cmd = self.commands.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty
                return True
            if cmd is None:
                return False
            if cmd == "lose":
                self.losing = now + LOSE_WAIT_S

    def close(self) -> None:
        for w in self.workers:
            self._close(w)
        self.ctx.term()

    def _close(self, w: SimWorker) -> None:
        for sock in (w.sock, w.hsock):
            if sock is not None:
                if sock in self.by_sock:
                    self.poller.unregister(sock)
                    del self.by_sock[sock]
                sock.close(0)
        w.sock = w.hsock = None
        if not w.gone:
            w.gone = True
            self.live -= 1

    # -- messages ---------------------------------------------------------------------
    def _send(self, w: SimWorker, kind: bytes, **kw) -> None:
        w.sock.send_multipart(w.codec.encode(kind, **kw), copy=False)

    def _read(self, w: SimWorker) -> None:
        if w.sock is None:
            return
        rejected = [0]
        for msg in child.messages(w.sock, w.codec, MAX_DRAIN, rejected):
            if msg.kind == P.TASKS:
                self._tasks(w, msg)
            elif msg.kind == P.WELCOME:
                self._welcome(w)
            elif msg.kind == P.STOP:
                self.stats["stops"] += 1
                self._close(w)
            elif msg.kind == P.REFUSED:
                self.stats["refused"] += 1
                child.report("refused", wid=w.wid, reason=(msg.body or {}).get("reason"))
                self._close(w)
            if w.sock is None:
                break  # stopped or refused: its socket is closed
        self.stats["rejected"] += rejected[0]
            # RESULTS, CONST, LOST: a simulated worker owns no futures and reads no data

    def _welcome(self, w: SimWorker) -> None:
        w.welcomed = True
        self.welcomed += 1
        if self.welcomed == len(self.workers):
            child.report("registered", t=time.monotonic())
        self._send(w, P.READY, arg=self.credit)
        w.heard = time.monotonic()
        # The watchdog starts once the worker joined, as in scoop._bootstrap.
        w.hsock = self.creds.connect(self.ctx, P.routing_id(b"h", w.wid), self.address)
        self._ping(w)
        self.pings.append((time.monotonic() + self.ping_s, w))

    def _tasks(self, w: SimWorker, msg: P.Message) -> None:
        now = time.monotonic()
        for parcel in msg.parcels:
            try:
                w.codec.check(parcel)  # a real worker checks before it unpickles
            except P.AuthError:
                self.stats["rejected"] += 1
                continue
            tids = P.task_ids(parcel).tolist()
            key = (parcel.peer, parcel.tag)
            w.held[key] = tids
            w.busy_until = max(now, w.busy_until) + self.task_s * len(tids)
            if w.busy_until <= now:
                self._answer(w, *key)
            else:
                heapq.heappush(self.due, (w.busy_until, next(self._seq), w, *key))

    def _answer(self, w: SimWorker, owner: int, fid: int) -> None:
        """The results of one group for its owner, with the group done and its credit
        back: what a real worker's flush sends after the group's last task."""
        tids = w.held.pop((owner, fid))
        frames = _serialize.dumps([(tid, True, tid) for tid in tids])
        parcel = w.codec.parcel(frames, peer=owner)
        self._send(w, P.RESULTS, arg=1, parcels=[parcel], done=[(owner, fid)])
        self.stats["groups"] += 1
        self.stats["tasks"] += len(tids)

    def _ping(self, w: SimWorker) -> None:
        sock = w.hsock
        while True:  # the PONGs of earlier pings
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                if w.watch_codec.decode(frames, "broker").kind == P.PONG:
                    self.stats["pongs"] += 1
                    w.heard = time.monotonic()
            except P.AuthError:
                self.stats["rejected"] += 1
        if not w.expired and time.monotonic() - w.heard > BROKER_TIMEOUT_S:
            w.expired = True  # counted only: the simulation goes on
            self.stats["watchdog_expired"] += 1
        sock.send_multipart(w.watch_codec.encode(P.PING))
        self.stats["pings"] += 1

    # -- loss -------------------------------------------------------------------------
    def _lose(self, now: float) -> None:
        """Drop the live worker holding the most groups, as if its host vanished: no BYE,
        no more pings; report the task ids it held. What the broker sent is read first,
        so that it holds what the broker counts; on a loaded machine every worker may be
        idle for a moment: wait for one that holds groups, up to :data:`LOSE_WAIT_S`."""
        live = [w for w in self.workers if not w.gone and w.welcomed]
        for w in live:
            self._read(w)
        live = [w for w in live if not w.gone]
        if not any(w.held for w in live) and now < self.losing:
            return
        self.losing = None
        if not live:
            child.report("lost", wid=None, tids=[])
            return
        w = max(live, key=lambda w: len(w.held))
        tids = [t for group in w.held.values() for t in group]
        self.stats["lost"] += 1
        self._close(w)
        child.report("lost", wid=w.wid, tids=tids, groups=len(w.held), t=time.monotonic(),
                     wall=time.time())


def main() -> None:
    cfg = child.read_config()
    Workers(cfg, child.commands()).run()


if __name__ == "__main__":
    sys.exit(main())
