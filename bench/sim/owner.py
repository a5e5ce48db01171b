"""The simulated root (worker 0): submits task groups and counts every task's answers.

It joins as a real root does (HELLO, WELCOME; a watchdog connection that pings) but
takes no work: it sends no READY, so the broker never gives it a group. Task ids are
handed out in order, ``group`` per group, so that a count per task id tells whether
each task was answered exactly once and with its own id as value.

With ``resumable``, its groups are map chunks (tag bit RESUMABLE), as ``futures.map``
ships them: when a worker holding some is lost, the broker does not queue them again
but tells their owner (LOST), and the owner hands back what is unanswered (RETURN,
marked SUSPECT), as ``scoop._worker.Worker.handle_lost`` does.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

import zmq

from scoop import _protocol as P
from scoop import _serialize
from scoop._transport import Credentials

from . import child

# Groups per TASKS message, as a real worker ships them (``scoop._worker.SHIP_BATCH``).
SHIP_BATCH = 8
PING_S = 1.0


def _noop(x):
    return x


class Owner:
    """Worker 0 of a simulation, driven by :mod:`.harness` from its own thread."""

    def __init__(self, creds: Credentials, address: str, group: int = 32,
                 resumable: bool = False) -> None:
        self.codec = P.Codec(creds.key, 0)
        self.watch_codec = P.Codec(creds.key, 0)
        self.group = group
        self.ctx = zmq.Context()
        self.sock = creds.connect(self.ctx, P.routing_id(b"w", 0), address, linger_ms=0)
        self.hsock: zmq.Socket | None = None
        self.creds, self.address = creds, address
        # The calls of every group: the simulated workers never unpickle them.
        self.payload = _serialize.dumps([(_noop, (0,), {})] * group)
        self.fids = itertools.count(1)
        self.flags = P.RESUMABLE if resumable else 0
        self.lost_groups = 0  # groups named in LOST messages
        self.returned = 0  # tasks handed back after a LOST
        self.counts = bytearray()  # task id -> answers (saturates at 255)
        self.submitted = 0  # tasks
        self.answered = 0  # tasks answered at least once
        self.duplicates = 0
        self.wrong = 0  # an answer that is not the task's own id, or a failure
        self.failed = 0  # WorkerLostError and other failures
        self.rejected = 0
        self.next_ping = 0.0

    @property
    def outstanding(self) -> int:
        return self.submitted - self.answered

    def join(self, timeout: float = 30.0) -> None:
        """HELLO, then wait for the WELCOME; start pinging as a root's watchdog does."""
        self.sock.send_multipart(self.codec.encode(
            P.HELLO, body={"version": P.VERSION, "wid": 0, "pid": os.getpid(),
                           "host": socket.gethostname()}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sock.poll(100):
                continue
            msg = self.codec.decode(self.sock.recv_multipart(), peer="broker")
            if msg.kind == P.WELCOME:
                self.hsock = self.creds.connect(self.ctx, P.routing_id(b"h", 0), self.address)
                return
            raise RuntimeError(f"the broker answered the owner's HELLO with {msg!r}")
        raise TimeoutError("no WELCOME from the broker")

    def submit(self, groups: int) -> None:
        """Submit ``groups`` task groups, in messages of SHIP_BATCH groups."""
        batch = []
        for _ in range(groups):
            first = self.submitted
            self.submitted += self.group
            tids = P.task_ids_frame(range(first, self.submitted))
            batch.append(self.codec.parcel([tids, *self.payload],
                                           tag=next(self.fids) | self.flags))
            if len(batch) == SHIP_BATCH:
                self.sock.send_multipart(self.codec.encode(P.TASKS, parcels=batch), copy=False)
                batch = []
        if batch:
            self.sock.send_multipart(self.codec.encode(P.TASKS, parcels=batch), copy=False)
        self.counts.extend(bytes(self.submitted - len(self.counts)))

    def poll(self, timeout_ms: int) -> None:
        """Take the results that arrive within ``timeout_ms``; ping when it is time."""
        now = time.monotonic()
        if self.hsock is not None and now >= self.next_ping:
            while self.hsock.poll(0):
                self.hsock.recv_multipart()  # a PONG: the root's watchdog only needs one
            self.hsock.send_multipart(self.watch_codec.encode(P.PING))
            self.next_ping = now + PING_S
        if not self.sock.poll(timeout_ms):
            return
        rejected = [0]
        for msg in child.messages(self.sock, self.codec, 1024, rejected):
            if msg.kind == P.RESULTS:
                for parcel in msg.parcels:
                    self._results(parcel)
            elif msg.kind == P.LOST:
                self._lost(msg.body or {})
        self.rejected += rejected[0]

    def _results(self, parcel: P.Parcel) -> None:
        try:
            self.codec.check(parcel)
            results = _serialize.loads(parcel.frames)
        except Exception:  # noqa: BLE001 - counted: the check reports it
            self.rejected += 1
            return
        counts = self.counts
        for tid, ok, value in results:
            if not ok:
                self.failed += 1
            elif value != tid:
                self.wrong += 1
            n = counts[tid]
            if n == 0:
                self.answered += 1
            else:
                self.duplicates += 1
            if n < 255:
                counts[tid] = n + 1

    def _lost(self, body: dict) -> None:
        """Hand back, in one group each, the unanswered tasks of the map chunks a dead
        worker held: first in line, never for the root (SUSPECT)."""
        parcels = []
        for _running, tids in body.get("groups", ()):
            self.lost_groups += 1
            left = [t for t in tids if not self.counts[t]]
            if left:
                self.returned += len(left)
                payload = _serialize.dumps([(_noop, (0,), {})] * len(left))
                parcels.append(self.codec.parcel(
                    [P.task_ids_frame(left), *payload], peer=0,
                    tag=next(self.fids) | P.RESUMABLE | P.SUSPECT))
        if parcels:
            self.sock.send_multipart(self.codec.encode(P.RETURN, parcels=parcels), copy=False)

    def missing(self) -> int:
        """Tasks submitted and never answered."""
        return self.counts.count(0)

    def shutdown(self) -> None:
        """Tell the broker the program ended (it stops every worker), then close."""
        try:
            self.sock.send_multipart(self.codec.encode(P.SHUTDOWN, arg=0))
        finally:
            self.close()

    def close(self) -> None:
        for sock in (self.sock, self.hsock):
            if sock is not None:
                sock.close(linger=500)  # the SHUTDOWN must still leave
        self.sock = self.hsock = None
        self.ctx.term()
