"""The broker: one per job; routes task groups to free workers and results to owners.

Reimplements SCOOP's ``scoop.broker.brokerzmq``. Deliberate differences: every message
is authenticated before it is read, the broker never unpickles user data (it routes
opaque, mac'ed parcels), work is pulled by workers with credits instead of pushed, and it
remembers which worker holds which task group (the base of worker-loss recovery).

Data flow through the broker (one ROUTER socket; every worker has a DEALER)::

    worker A (owner)                 broker                            worker B
    ----------------                 ------                            --------
    TASKS [g1 g2 g3] -------------->  queue: g1 g2 g3
                                      credits: B=1   <---------------  READY 1
                                      g1 -> B, held[B] += g1  ------->  TASKS [g1]
                                      held[B] -= g1  <---------------  RESULTS [for A] done g1
    RESULTS [for A] <--------------   forward parcel to its owner
    CONST {...} ------------------->  keep; forward to every worker ->  CONST {...}
    SHUTDOWN status --------------->  STOP to every worker --------->  (exits)

*Queue.* Task groups wait in one FIFO queue, whoever submitted them.

*Credits.* A worker sends READY(n) when its own queue runs low; the broker sends it up to
n groups. Work therefore goes to whoever is free, and a busy worker does not hoard work.
A worker waiting with a deadline takes no work (WITHDRAW 1, "standby") unless every
worker is on standby: then each gets one group to run anyway, so the job never stalls.

*Routing.* A RESULTS message carries one parcel per owner; each is forwarded to its owner
untouched. Finished groups listed in it are dropped from the sender's held set.

*Worker loss.* The groups a dead worker held go back first in line; only the one it was
running (its oldest unfinished group: a worker starts its groups in the order it got
them) is charged an attempt. Groups of map chunks (tag bit RESUMABLE) are not queued
again: their owner is told (LOST) and sends back what they had not finished, in pieces,
charging the items that were running (``scoop._chunks``).

The broker runs its loop in a thread (:meth:`Broker.start`) or the caller's thread
(:meth:`Broker.run`); :meth:`Broker.stop` may be called from any thread.
"""

from __future__ import annotations

import logging
import queue as _queue
import threading
import time
from collections import deque

import zmq

from . import _protocol as P
from ._transport import Credentials, Gate, raise_open_file_limit

log = logging.getLogger("scoop.broker")

BROKER_ID = 0xFFFFFFFF  # the broker's sender id in message headers
# A worker whose watchdog has not pinged for this long counts as dead and its work runs
# elsewhere. Pings come every second, even while the worker runs a long task, so this
# only has to ride out a stalled machine or a network hiccup.
WORKER_SILENCE_S = 5.0
# A task group whose worker dies running it is queued again this many times at most; then
# its tasks fail with WorkerLostError, so a task that kills every worker cannot take the
# job down. A group also fails once this many times as many workers died merely holding
# it (a bound even if the one that ran it was mistaken for another).
MAX_ATTEMPTS = 3
HELD_FACTOR = 2
# While some of the job's workers have not joined yet, the broker gives them this long
# before it has workers that wait with a deadline run work anyway (see _dispatch_to_standby).
STANDBY_GRACE_S = 2.0
# How long a sandbox worker asked of the launcher may take to join before the groups it
# was for fail after all.
SANDBOX_JOIN_S = 30.0
# Misbehaving connections named in the log, one line each; the rest are not logged.
MAX_LOGGED_PEERS = 32


class _Peer:
    """What the broker knows of one connected worker."""

    __slots__ = ("wid", "ident", "credit", "standby", "forced", "held", "pid", "host",
                 "sandbox")

    def __init__(self, wid: int, ident: bytes, pid: int, host: str) -> None:
        self.wid = wid
        self.ident = ident
        self.credit = 0
        # Waiting with a deadline: it takes work only when no worker else can (then
        # ``forced`` holds the groups it was sent that way).
        self.standby = False
        self.forced: set[tuple[int, int]] = set()
        self.held: dict[tuple[int, int], P.Parcel] = {}
        self.pid = pid
        self.host = host
        self.sandbox = False  # started to run only groups that may kill it (see _take)


class Broker:
    """Routes one job's futures between its workers.

    Args:
        creds: the job's secrets (see ``_transport.Credentials``).
        max_attempts: workers that may die holding a task group before its tasks fail.
        size: the number of workers the job was started with (sent to each worker).
        host: the address to bind; loopback when every worker is local.
        port: the port to bind (0: any free port).
    """

    def __init__(self, creds: Credentials, size: int = 1, host: str = "127.0.0.1",
                 port: int = 0, first_free_wid: int | None = None,
                 max_attempts: int = MAX_ATTEMPTS) -> None:
        self.codec = P.Codec(creds.key, BROKER_ID)
        self.max_attempts = max(1, max_attempts)
        self.size = size
        # Ids handed to workers that join on their own (python -m scoop.join).
        self.next_free_wid = size if first_free_wid is None else first_free_wid
        raise_open_file_limit()  # every connection, hostile ones too, holds a descriptor
        self.ctx = zmq.Context()
        self.gate = Gate(self.ctx, creds)  # first: it checks every connection's handshake
        self.router, self.address = creds.listen(self.ctx, host, port)
        self.gate.watch(self.router)
        # Commands from other threads. Both ends exist from the start: making a socket
        # later could fail when a flood of connections has used up the descriptors.
        ctl_addr = f"inproc://scoop-broker-{id(self)}"
        self._ctl = self.ctx.socket(zmq.PULL)
        self._ctl.bind(ctl_addr)
        self._ctl_push = self.ctx.socket(zmq.PUSH)
        self._ctl_push.setsockopt(zmq.LINGER, 1000)
        self._ctl_push.connect(ctl_addr)
        self._ctl_lock = threading.Lock()  # a socket is used by one thread at a time
        self.peers: dict[bytes, _Peer] = {}
        self.by_wid: dict[int, _Peer] = {}
        self.queue: deque[P.Parcel] = deque()  # parcels: tag=fid, peer=owner
        self.consts: list[P.Parcel] = []
        # (owner, fid) -> (workers lost running it, workers lost holding it)
        self.losses: dict[tuple[int, int], tuple[int, int]] = {}
        self.last_ping: dict[int, float] = {}  # wid -> when its watchdog last pinged
        self.seen: set[int] = set()  # ids of the workers that joined or were lost
        self._all_standby_since: float | None = None
        self.exit_status: int | None = None
        self.finished = threading.Event()  # the loop has ended
        self.stopping = False  # STOP sent; workers that join now are stopped at once
        self._thread: threading.Thread | None = None
        self._bad_peers: set[bytes] = set()
        self._joins_seen: set[int] = set()  # seq of every JOIN answered (see handle_join)
        # Sandbox workers (see _fail_stranded): how many the launcher may still start
        # (0: it cannot), the ids it is asked to start them with, those ids.
        self.sandbox_budget = 0
        self.sandbox_requests: _queue.SimpleQueue[int] = _queue.SimpleQueue()
        self._sandbox_wids: set[int] = set()
        self._sandbox_asked: float | None = None  # when the last one was asked for
        self._handlers = {
            P.HELLO: self.handle_hello,
            P.TASKS: self.handle_tasks,
            P.READY: self.handle_ready,
            P.RETURN: self.handle_return,
            P.WITHDRAW: self.handle_withdraw,
            P.RESULTS: self.handle_results,
            P.CONST: self.handle_const,
            P.SHUTDOWN: self.handle_shutdown,
            P.BYE: self.handle_bye,
        }

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> Broker:
        """Run the broker loop in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="scoop-broker", daemon=True)
        self._thread.start()
        return self

    def stop_workers(self) -> None:
        """Send STOP to every worker, now and as they join; keep routing (any thread)."""
        self._command(b"stop-workers")

    def worker_lost(self, wid: int, how: str) -> None:
        """Report that worker ``wid`` is gone (``how``: its end, in words; any thread)."""
        self._command(b"lost %d %s" % (wid, how.encode()))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every worker, end the loop and close the sockets (any thread).

        Until then the loop keeps answering, even after the root's SHUTDOWN, so that a
        worker joining late is told to stop instead of waiting for an answer.
        """
        if self._thread is None:
            if not self.finished.is_set():
                self._stop_workers()
                self._close()
            return
        self._command(b"stop")
        self._thread.join(timeout)

    def _command(self, cmd: bytes) -> None:
        with self._ctl_lock:
            if not self.finished.is_set():
                self._ctl_push.send(cmd)

    def run(self) -> None:
        """The broker loop; returns after :meth:`stop` or a SHUTDOWN from the root."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._ctl, zmq.POLLIN)
        for sock in self.gate.sockets:
            poller.register(sock, zmq.POLLIN)
        try:
            next_check = time.monotonic() + WORKER_SILENCE_S
            while True:
                events = dict(poller.poll(500))
                if time.monotonic() >= next_check:
                    self._check_silent()
                    self._fail_stranded("no sandbox worker joined to run it")
                    self.dispatch()
                    next_check = time.monotonic() + 0.5
                if self._ctl in events:
                    cmd = self._ctl.recv()
                    if cmd.startswith(b"lost "):
                        _, wid, how = cmd.decode().split(" ", 2)
                        self._drain()  # what it sent before it died counts (done, results)
                        self.handle_lost(int(wid), how)
                        self.dispatch()
                        continue
                    self._stop_workers()
                    if cmd == b"stop":
                        break
                if self.router in events:
                    self._drain()
                    self.dispatch()
                for sock in self.gate.sockets:
                    if sock in events:
                        self.gate.handle(sock)
        finally:
            self._close()

    def _close(self) -> None:
        with self._ctl_lock:
            self.finished.set()
            self._ctl_push.close(0)
        self.gate.close()
        self.router.close(0)
        self._ctl.close(0)
        self.ctx.term()

    def _stop_workers(self) -> None:
        # Once is enough: a worker that gets STOP leaves, so a second STOP could only
        # fail ("Host unreachable"); workers that join later are stopped as they join.
        if self.stopping:
            return
        self.stopping = True
        for peer in list(self.peers.values()):
            self._send(peer, P.STOP)

    # -- sockets ---------------------------------------------------------------------------
    def _drain(self) -> None:
        router = self.router
        for _ in range(1024):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            ident = frames[0].bytes
            name = P.peer_name(ident)
            try:
                msg = self.codec.decode(frames[1:], peer=name, join=False)
            except Exception as exc:  # noqa: BLE001 - AuthError, or anything a peer caused
                self._reject(ident, exc)
                continue
            if msg.kind == P.JOIN and name.startswith(b"j") and msg.sender == P.ANY_WORKER:
                self.handle_join(ident, msg)
                continue
            if msg.kind == P.PING and name == b"h%d" % msg.sender:
                self.handle_ping(ident, msg)
                continue
            peer = self.peers.get(ident)
            if peer is None and msg.kind != P.HELLO and name == b"w%d" % msg.sender:
                # A worker counted as lost speaks again: its work was queued elsewhere.
                self.router.send_multipart([ident, *self.codec.encode(P.STOP)])
                continue
            if msg.kind != P.HELLO and (peer is None or peer.wid != msg.sender):
                self._reject(ident, P.AuthError("sender does not match its connection"))
                continue
            handler = self._handlers.get(msg.kind)
            if handler is None:
                self._reject(ident, P.AuthError(f"unexpected message {msg!r}"))
                continue
            try:
                handler(ident, peer, msg)
            except Exception as exc:  # noqa: BLE001 - one peer's message never ends the job
                log.exception("broker: failed to handle %r from worker %d: %s",
                              msg.kind, msg.sender, exc)

    def _reject(self, ident: bytes, exc: Exception) -> None:
        # One line per bad peer, not per message, and only for the first few peers.
        if ident not in self._bad_peers and len(self._bad_peers) < MAX_LOGGED_PEERS:
            self._bad_peers.add(ident)
            log.warning("broker: dropped a message from connection %r: %s", ident, exc)

    def _send(self, peer: _Peer, kind: bytes, **kw) -> None:
        try:
            self.router.send_multipart([peer.ident, *self.codec.encode(kind, **kw)],
                                       copy=False)
        except zmq.ZMQError as exc:  # the peer disconnected
            log.debug("broker: cannot send to worker %d: %s", peer.wid, exc)

    # -- handlers --------------------------------------------------------------------------
    def handle_hello(self, ident: bytes, peer: _Peer | None, msg: P.Message) -> None:
        body = msg.body or {}
        wid = body.get("wid")
        if body.get("version") != P.VERSION:
            reason = (f"protocol version {body.get('version')} does not match the broker's "
                      f"{P.VERSION}: install the same scoop version on every host")
        elif wid != msg.sender or P.peer_name(ident) != b"w%d" % msg.sender:
            reason = "worker id does not match its connection"
        elif wid in self.by_wid:
            reason = f"worker {wid} is already connected"
        else:
            reason = None
        if reason is None and self.stopping:
            self.router.send_multipart([ident, *self.codec.encode(P.STOP)])
            return
        if reason:
            log.warning("broker: refused a worker: %s", reason)
            self.router.send_multipart([ident, *self.codec.encode(
                P.REFUSED, body={"reason": reason})])
            return
        peer = _Peer(wid, ident, body.get("pid", 0), body.get("host", "?"))
        if wid in self._sandbox_wids:
            peer.sandbox = True
            self._sandbox_asked = None
        self.peers[ident] = peer
        self.by_wid[wid] = peer
        self.seen.add(wid)
        log.debug("broker: worker %d joined (pid %s on %s)", wid, peer.pid, peer.host)
        self._send(peer, P.WELCOME, parcels=self.consts,
                   body={"size": self.size, "max_attempts": self.max_attempts})

    def handle_tasks(self, ident: bytes, peer: _Peer, msg: P.Message) -> None:
        for parcel in msg.parcels:
            parcel.peer = peer.wid  # the owner: results of this group go back to it
        self.queue.extend(msg.parcels)

    def handle_ready(self, ident: bytes, peer: _Peer, msg: P.Message) -> None:
        peer.credit += msg.arg
        peer.standby = False

    def handle_join(self, ident: bytes, msg: P.Message) -> None:
        """A worker started by another launcher asks for an id: the next free one."""
        if self.stopping:
            self.router.send_multipart([ident, *self.codec.encode(P.STOP)])
            return
        # Each joiner's connection has its own replay window, so a JOIN read off the
        # network could be replayed from new connections to use up worker ids: a JOIN is
        # answered once, whichever connection it comes on.
        if msg.seq in self._joins_seen:
            self._reject(ident, P.AuthError(f"replayed JOIN (seq {msg.seq})"))
            return
        self._joins_seen.add(msg.seq)
        while self.next_free_wid in self.by_wid:
            self.next_free_wid += 1
        wid = self.next_free_wid
        self.next_free_wid += 1
        self.router.send_multipart([ident, *self.codec.encode(P.ASSIGN, body={"wid": wid})])

    def handle_ping(self, ident: bytes, msg: P.Message) -> None:
        """A worker's watchdog asks whether the broker lives; note when it last asked."""
        self.last_ping[msg.sender] = time.monotonic()
        try:
            self.router.send_multipart([ident, *self.codec.encode(P.PONG)])
        except zmq.ZMQError:
            pass

    def handle_withdraw(self, ident: bytes, peer: _Peer, msg: P.Message) -> None:
        peer.credit = 0
        peer.standby = bool(msg.arg)
        # Standing by again: what it was sent anyway waits too, so it may take more.
        peer.forced.clear()

    def handle_return(self, ident: bytes, peer: _Peer, msg: P.Message) -> None:
        # A whole group comes back under its own id (dropped from the sender's hold); a
        # partial one under a fresh id, while the sender still holds the original.
        for parcel in reversed(msg.parcels):
            peer.held.pop((parcel.peer, parcel.tag), None)
            peer.forced.discard((parcel.peer, parcel.tag))
            self.queue.appendleft(parcel)  # first in line again
        self._fail_stranded("a worker died running it or a task sent with it")

    def handle_results(self, ident: bytes, peer: _Peer, msg: P.Message) -> None:
        if msg.arg:  # a READY riding along
            peer.credit += msg.arg
            peer.standby = False
        for key in msg.done:
            peer.held.pop(key, None)
            peer.forced.discard(key)
            self.losses.pop(key, None)
        for parcel in msg.parcels:
            owner = self.by_wid.get(parcel.peer)
            if owner is None:
                log.debug("broker: results for departed worker %d dropped", parcel.peer)
                continue
            self._send(owner, P.RESULTS, parcels=[parcel])

    def handle_const(self, ident: bytes, peer: _Peer, msg: P.Message) -> None:
        self.consts.extend(msg.parcels)
        for other in self.peers.values():
            if other is not peer:
                self._send(other, P.CONST, parcels=msg.parcels)

    def handle_shutdown(self, ident: bytes, peer: _Peer, msg: P.Message) -> None:
        self.exit_status = msg.arg if msg.arg < 2**31 else msg.arg - 2**32
        log.debug("broker: the root ended with status %d; stopping", self.exit_status)
        self.handle_bye(ident, peer, msg)  # the root closes its socket right after
        self._stop_workers()

    def handle_bye(self, ident: bytes, peer: _Peer, msg: P.Message) -> None:
        self.peers.pop(ident, None)
        self.by_wid.pop(peer.wid, None)

    def _check_silent(self) -> None:
        """Count as lost the workers whose watchdog stopped pinging (the root excepted:
        losing it ends the job, which its launcher sees)."""
        now = time.monotonic()
        for wid, last in list(self.last_ping.items()):
            if wid and now - last > WORKER_SILENCE_S and wid in self.by_wid:
                del self.last_ping[wid]
                self.handle_lost(wid, f"no heartbeat for {now - last:.0f} s")
        self.dispatch()

    def handle_lost(self, wid: int, how: str) -> None:
        """Queue again (first in line) what a dead worker held; fail what keeps killing;
        tell the owners of map chunks, which resume them."""
        self.seen.add(wid)
        peer = self.by_wid.pop(wid, None)
        if peer is None or self.stopping:
            return
        self.peers.pop(peer.ident, None)
        self.last_ping.pop(wid, None)
        running = next(iter(peer.held), None)  # its oldest unfinished group
        requeued = []
        chunks: dict[int, list] = {}  # owner -> [[running, tids], ...]
        for key, parcel in peer.held.items():
            if parcel.tag & P.RESUMABLE:
                chunks.setdefault(parcel.peer, []).append(
                    [int(key == running), P.task_ids(parcel).tolist()])
                continue
            ran, held = self.losses.pop(key, (0, 0))
            ran, held = ran + (key == running), held + 1
            # Which group killed it is a guess (its last messages may have died with it):
            # the root runs none of them, nor what is handed back of them.
            parcel.tag |= P.SUSPECT
            self.losses[(parcel.peer, parcel.tag)] = (ran, held)
            if ran < self.max_attempts and held < HELD_FACTOR * self.max_attempts:
                requeued.append(parcel)
            else:
                self._fail_group(parcel, ran, held, how)
        self.queue.extendleft(reversed(requeued))
        self._fail_stranded(how)
        for owner_wid, groups in chunks.items():
            owner = self.by_wid.get(owner_wid)
            if owner is not None:
                self._send(owner, P.LOST, body={"how": how, "groups": groups})
        log.warning("broker: worker %d (pid %s on %s) is gone (%s); %d task group(s) it "
                    "held will run again", wid, peer.pid, peer.host, how,
                    len(requeued) + sum(len(g) for g in chunks.values()))

    def _fail_group(self, parcel: P.Parcel, ran: int, held: int, how: str) -> None:
        from . import _serialize
        from ._errors import WorkerLostError

        owner = self.by_wid.get(parcel.peer)
        if owner is None:
            return
        tids = P.task_ids(parcel)
        what = f"{ran} workers died running this task"
        if held > ran:
            what += f" ({held} holding it)"
        err = WorkerLostError(f"{what} (the last: {how})")
        # The broker pickles its own error objects; it still never unpickles user data.
        frames = _serialize.dumps([(tid, False, err) for tid in tids])
        self._send(owner, P.RESULTS, parcels=[self.codec.parcel(frames, peer=owner.wid)])

    # -- scheduling ------------------------------------------------------------------------
    def dispatch(self) -> None:
        """Hand queued groups to workers with credit, taking turns."""
        queue = self.queue
        sent = True
        while queue and sent:
            ready = [p for p in self.peers.values() if p.credit > 0]
            if not ready:
                self._dispatch_to_standby()
                return
            sent = False
            for peer in ready:
                parcels = self._take(peer, peer.credit)
                if not parcels:
                    continue
                sent = True
                peer.credit -= len(parcels)
                for parcel in parcels:
                    peer.held[(parcel.peer, parcel.tag)] = parcel
                self._send(peer, P.TASKS, parcels=parcels)

    @staticmethod
    def _suspect(parcel: P.Parcel) -> bool:
        """Whether a group may kill the worker that runs it: a worker died running it (or,
        for map chunk pieces, items in it). The root never gets such a group."""
        return bool(parcel.tag & P.SUSPECT)

    def _take(self, peer: _Peer, n: int) -> list[P.Parcel]:
        """Up to ``n`` queued groups for ``peer``, first in line first; for the root, only
        groups that killed no worker; for a sandbox worker, only those."""
        queue = self.queue
        if peer.wid != 0 and not peer.sandbox:
            return [queue.popleft() for _ in range(min(n, len(queue)))]
        taken = []
        for parcel in list(queue):
            if len(taken) == n:
                break
            if self._suspect(parcel) == peer.sandbox:
                taken.append(parcel)
        for parcel in taken:
            queue.remove(parcel)
        return taken

    def _fail_stranded(self, how: str) -> None:
        """Groups that may have killed a worker, once no worker but the root is left to
        run them: a sandbox worker the launcher starts runs them (its death ends nothing),
        or, when it cannot start one (any more), they fail with WorkerLostError and the
        program goes on."""
        if (self.stopping or any(wid != 0 for wid in self.by_wid)
                or len(self.seen) < self.size  # workers still starting will take them
                or not any(self._suspect(p) for p in self.queue)):
            return
        now = time.monotonic()
        if self._sandbox_asked is not None and now - self._sandbox_asked < SANDBOX_JOIN_S:
            return  # one is on its way
        if self.sandbox_budget > 0:
            self.sandbox_budget -= 1
            self._sandbox_asked = now
            wid = max(self.next_free_wid, max(self.seen, default=0) + 1)
            self.next_free_wid = wid + 1
            self._sandbox_wids.add(wid)
            self.sandbox_requests.put(wid)
            log.info("broker: asked for sandbox worker %d, for tasks that may kill it", wid)
            return
        for parcel in [p for p in self.queue if self._suspect(p)]:
            self.queue.remove(parcel)
            ran, held = self.losses.get((parcel.peer, parcel.tag), (1, 1))
            self._fail_group(parcel, max(ran, 1), held, f"{how}; no worker but the root is "
                             "left to run it, and the root never runs a task that may have "
                             "killed a worker")

    def _dispatch_to_standby(self) -> None:
        """When every worker waits with a deadline, nobody would ever ask for the queued
        work, and each wait would time out for want of the work it waits for (the root
        alone after losing every other worker, or all workers in nested timed waits).
        Then each of them is sent one group it runs anyway, at the cost of its wait
        perhaps overrunning: progress beats a certain timeout."""
        peers = list(self.peers.values())
        if not peers or not all(p.standby for p in peers):
            self._all_standby_since = None
            return
        now = time.monotonic()
        if self._all_standby_since is None:
            self._all_standby_since = now
        if len(self.seen) < self.size and now - self._all_standby_since < STANDBY_GRACE_S:
            return  # workers still starting will take the work
        for peer in peers:
            if self.queue and not peer.forced:
                taken = self._take(peer, 1)
                if not taken:
                    continue
                parcel = taken[0]
                key = (parcel.peer, parcel.tag)
                peer.held[key] = parcel
                peer.forced.add(key)
                self._send(peer, P.TASKS, arg=1, parcels=[parcel])

