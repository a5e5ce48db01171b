"""The broker: one per job; routes task groups to free workers and results to owners.

Reimplements SCOOP's ``scoop.broker.brokerzmq``. Deliberate differences: every message
is authenticated before it is read, the broker never unpickles user data (it routes
opaque, mac'ed parcels), work is pulled by workers with credits instead of pushed, and it
remembers which worker holds which task group (the base of worker-loss recovery).

This module is the broker's loop and sockets; its decisions (queue, credits, standby,
worker loss, suspect groups, sandboxes) are made by a :class:`scoop._schedule.Schedule`,
which holds no socket and returns what to send::

    workers (DEALER)          Broker loop (its own thread)               Schedule (no I/O)
    ----------------          ----------------------------               -----------------
    connect  -------------->  Gate: handshake checked (ZAP) first
    messages -------------->  ROUTER: check sig, seq; sender = its
                              connection; JOIN, PING, HELLO, TASKS,
                              READY, RESULTS... ------------------------>  update the state
             <--------------  Send: encode, sign, send  <---------------   [Send, Fail,
             <--------------  Fail: WorkerLostError per task -> RESULTS     AskSandbox]
    launcher <--------------  AskSandbox: sandbox_requests
    launcher (other threads)
    worker_lost(wid, how) ->  control: Lost --------------------------->  lost(): requeue,
    stop_workers(), stop()    StopWorkers, Stop ------------------------>    LOST, fail
                              every TICK_S: tick(now) ------------------>  silent workers,
                                                                           stranded groups

*Gate.* The router's handshake is answered by a ``_transport.Gate`` in this thread: a
connection carries no message until its peer proved it holds the job's credentials.

*Local wire.* With ``local``, the workers of the broker's host reach it over a Unix
socket (``scoop._local``): each connection is a peer as the router's (the routing id it
sends first is its ident, so the Schedule does not change), its messages go through the
same checks and handlers (:meth:`Broker._take`), and ``_send`` writes to it.

*Loop.* Takes up to :data:`MAX_DRAIN` messages at a time, drops any that fail the checks
(logged once per connection), hands the rest to the Schedule, carries out what it returns,
then dispatches queued work once.

*Control.* Other threads talk to the loop with typed commands (:class:`Lost`,
:class:`StopWorkers`, :class:`Stop`) on a queue, woken by an inproc socket.

*Host.* A thread of this process that waits for the broker's messages (the in-process
root's, idle) runs the loop's turns itself (:meth:`Broker.host`) while the broker's thread
sleeps; see :mod:`scoop._baton`.

The loop runs in a thread (:meth:`Broker.start`) or the caller's thread
(:meth:`Broker.run`); :meth:`Broker.stop` may be called from any thread.
"""

from __future__ import annotations

import logging
import queue as _queue
import threading
import time
from typing import NamedTuple

import zmq

from . import _protocol as P
from . import _serialize
from ._baton import Baton
from ._local import listen
from ._schedule import (
    MAX_ATTEMPTS,
    WORKER_SILENCE_S,
    AskSandbox,
    Fail,
    Out,
    Peer,
    Schedule,
    Send,
)
from ._spin import Spin
from ._transport import (
    MAX_UNPROVEN,
    Credentials,
    Gate,
    raise_open_file_limit,
    share_inproc,
)
from ._zpoll import Waiter

log = logging.getLogger("scoop.broker")

BROKER_ID = 0xFFFFFFFF  # the broker's sender id in message headers
# Misbehaving connections named in the log, one line each; the rest are not logged.
MAX_LOGGED_PEERS = 32
# Messages read per turn of the loop before queued work is dispatched and the control
# commands and handshakes get their turn: more costs them latency, fewer costs dispatches.
MAX_DRAIN = 1024
# How often the loop looks for silent workers and stranded groups (s): sooner notices
# them sooner, at the cost of a wakeup of an idle broker.
TICK_S = 0.5
# What each kind of connection sends first (worker, joiner, watchdog): once one has come,
# signed, its connection is the job's (see _transport.Gate, the bound on unproven ones).
_FIRST_KINDS = frozenset((P.HELLO, P.JOIN, P.PING))
# What a worker's watchdog connection sends: PING (alive?), TIMEOUT (a task ran past its
# time limit: the worker ends itself once answered, see Schedule.timed_out), LEAVE
# (it is leaving: no more work for it).
_WATCHDOG_KINDS = {
    P.PING: lambda s, ident, m, now: s.ping(ident, m.sender, now),
    P.TIMEOUT: lambda s, ident, m, now: s.timed_out(ident, m.sender, m.body, now),
    P.LEAVE: lambda s, ident, m, now: s.leaving(m.sender, bool(m.arg), now),
}
# The broker reads and writes a message's frames itself, with plain int flags: pyzmq's
# recv_multipart asks ZeroMQ for RCVMORE after every frame and send_multipart ORs an enum
# flag for every frame, together about three times the ZeroMQ work for the few small
# frames of a message (bench/simulate.py: most of the broker's CPU went there).
_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)
# pyzmq's Socket.send without its Python wrapper (a Python call per frame, for arguments the
# broker never passes); small bytes frames are copied (see Link.send), received frames
# forwarded as they are.
_send = zmq.backend.Socket.send
_COPY_BELOW_BYTES = 1 << 16  # pyzmq's own threshold for frames sent without a copy
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def _source_fd(frame: zmq.Frame) -> int | None:
    """The descriptor of the connection a frame came on; None for one in process
    (inproc://: no descriptor, no handshake)."""
    try:
        return frame.get(zmq.SRCFD)
    except zmq.ZMQError:
        return None


class Lost(NamedTuple):
    """Control command: worker ``wid`` is gone (``how``: its end, in words)."""

    wid: int
    how: str


class StopWorkers(NamedTuple):
    """Control command: STOP every worker, now and as they join; keep routing."""


class Drain(NamedTuple):
    """Control command: start no more task groups (the job's time is nearly up); keep
    routing. With ``time_up``: also tell the root's watchdog that the program must stop."""

    time_up: bool = False


class Stop(NamedTuple):
    """Control command: STOP every worker and end the loop."""


class Yield(NamedTuple):
    """Control command: end this turn, a thread of this process will host the loop."""


Command = Lost | StopWorkers | Drain | Stop | Yield


class _Commands:
    """Commands from other threads to the loop, each with a wakeup on an inproc socket.
    Both ends are made at once: a socket made later could fail once a flood used up the
    descriptors."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self._queue: _queue.SimpleQueue[Command] = _queue.SimpleQueue()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(address)
        self._push = ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 1000)
        self._push.connect(address)
        self._lock = threading.Lock()  # a socket is used by one thread at a time
        self.finished = threading.Event()  # closed: the loop has ended

    def put(self, cmd: Command) -> None:
        with self._lock:
            if not self.finished.is_set():
                self._queue.put(cmd)
                self._push.send(b"")

    def take(self) -> Command | None:
        """The next command (the loop's thread), None when none waits."""
        try:
            self.pull.recv(zmq.NOBLOCK)  # one wakeup per command
        except zmq.Again:
            return None
        return self._queue.get_nowait()

    def close(self) -> None:
        with self._lock:
            self.finished.set()
            self._push.close(0)
        self.pull.close(0)


def _handlers(s: Schedule) -> dict:
    """The Schedule's handler of each kind of worker message: (ident, peer, msg) -> outs."""
    return {
        P.HELLO: lambda ident, peer, m: s.hello(ident, m.sender, m.body),
        P.TASKS: lambda ident, peer, m: s.tasks(peer, m.parcels),
        P.READY: lambda ident, peer, m: s.ready(peer, m.arg),
        P.RETURN: lambda ident, peer, m: s.returned(peer, m.parcels, time.monotonic()),
        P.WITHDRAW: lambda ident, peer, m: s.withdraw(peer, bool(m.arg)),
        P.RESULTS: lambda ident, peer, m: s.results(peer, m.parcels, m.done, m.arg),
        P.CONST: lambda ident, peer, m: s.const(peer, m.parcels),
        P.SHUTDOWN: lambda ident, peer, m: s.shutdown(
            peer, m.arg if m.arg < 2**31 else m.arg - 2**32),  # u32 on the wire
        P.BYE: lambda ident, peer, m: s.bye(peer),
    }


class _Views:
    """What the launcher reads of a broker's schedule."""

    schedule: Schedule

    @property
    def by_wid(self) -> dict[int, Peer]:
        return self.schedule.roster.by_wid

    @property
    def seen(self) -> set[int]:
        return self.schedule.roster.seen

    @property
    def stopping(self) -> bool:
        return self.schedule.stopping

    @property
    def exit_status(self) -> int | None:
        return self.schedule.exit_status

    @property
    def sandbox_budget(self) -> int:
        """Sandbox workers the launcher may still start (0, the default: it cannot)."""
        return self.schedule.recovery.sandbox_budget

    @sandbox_budget.setter
    def sandbox_budget(self, n: int) -> None:
        self.schedule.recovery.sandbox_budget = n


class Broker(_Views):
    """Routes one job's futures between its workers.

    Args:
        creds: the job's secrets (see ``_transport.Credentials``).
        size: the number of workers the job was started with; workers are told it less
            ``clients``, those that run no task (``scoop.Executor``'s caller).
        host: the address to bind; loopback when every worker is local.
        port: the port to bind (0: any free port).
        first_free_wid: the first id handed to workers that join on their own.
        max_attempts: workers that may die holding a task group before its tasks fail.
        local: also listen on a Unix socket (``local_address``) for the workers of this
            host (``scoop._local``); else ``local_address`` is None.
    """

    def __init__(self, creds: Credentials, size: int = 1, host: str = "127.0.0.1",
                 port: int = 0, first_free_wid: int | None = None,
                 max_attempts: int = MAX_ATTEMPTS, clients: int = 0,
                 local: bool = False) -> None:
        self.codec = P.Codec(creds.key, BROKER_ID)
        self.schedule = Schedule(size, first_free_wid, max_attempts, clients)
        open_files = raise_open_file_limit()  # every connection, hostile ones too, holds one
        self.ctx = zmq.Context()
        # First: it checks every connection's handshake; strangers get half the fds at most.
        unproven = min(max(MAX_UNPROVEN, 4 * size), open_files // 2)
        self.gate = Gate(self.ctx, creds, unproven)
        self.router, self.address = creds.listen(self.ctx, host, port)
        self.gate.watch(self.router)
        # For a worker of this process (the in-process root): no I/O thread, no kernel,
        # no handshake (only this process reaches it); messages are checked as any other.
        self.inproc_address = f"inproc://scoop-router-{id(self)}"
        self.router.bind(self.inproc_address)
        share_inproc(self.inproc_address, self.ctx)
        self._commands = _Commands(self.ctx, f"inproc://scoop-broker-{id(self)}")
        self._ctl = self._commands.pull
        # The ids of the sandbox workers the launcher is asked to start (see Recovery).
        self.sandbox_requests: _queue.SimpleQueue[int] = _queue.SimpleQueue()
        self.finished = self._commands.finished  # the loop has ended
        self._thread: threading.Thread | None = None
        self._bad_peers: set[bytes] = set()
        self._handlers = _handlers(self.schedule)  # kind -> (ident, peer, msg) -> outs
        self._waiter = Waiter([self.router, self._ctl, *self.gate.sockets])
        self.local = listen(self._waiter, self._take, unproven) if local else None
        self.local_address = self.local.address if self.local else None
        self._local_peers = self.local.peers if self.local else {}  # ident -> connection
        # The loop's state between turns, and who runs them (see scoop._baton).
        self._more: list = []  # gate sockets left with requests waiting (a bounded turn)
        self._next_tick = time.monotonic() + WORKER_SILENCE_S
        self.baton = Baton(self._turn, lambda: self._command(Yield()), self._waiter,
                           (self.router,), int(TICK_S * 1000))

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> Broker:
        """Run the broker loop in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="scoop-broker", daemon=True)
        self._thread.start()
        return self

    def stop_workers(self) -> None:
        """Send STOP to every worker, now and as they join; keep routing (any thread)."""
        self._command(StopWorkers())

    def drain(self, time_up: bool = False) -> None:
        """Start no more task groups; results still travel (any thread). ``time_up``: also
        tell the root its program must stop (its watchdog's next PONG says so: for a root
        on another host, which the launcher cannot signal)."""
        self._command(Drain(time_up))

    def worker_lost(self, wid: int, how: str) -> None:
        """Report that worker ``wid`` is gone (``how``: its end, in words; any thread)."""
        self._command(Lost(wid, how))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every worker, end the loop, close the sockets (any thread); until then the
        loop answers, even after SHUTDOWN: a late worker is told to stop, not left waiting."""
        if self._thread is None:
            if not self.finished.is_set():
                self._carry_out(self.schedule.stop_workers())
                self._close()
            return
        self._command(Stop())
        self.baton.stop()
        self._thread.join(timeout)

    def _command(self, cmd: Command) -> None:
        self._commands.put(cmd)

    def run(self) -> None:
        """The broker loop; returns after :meth:`stop`."""
        try:
            while not self.baton.ended:
                self.baton.thread_turn()
        finally:
            self._close()

    def _turn(self, timeout_ms: int, check: tuple, spin: Spin | None = None) -> list:
        """One turn of the loop: wait up to ``timeout_ms`` (polling first with ``spin``:
        a hosting root's), then handle what came; the sockets that may be readable (Stop:
        marks the broker ended)."""
        # The router is asked first: sends on it may take the command that would have
        # woken the poll for a message that came meanwhile (see _zpoll).
        ready = self._waiter.wait(timeout_ms, check=check, again=self._more, spin=spin)
        now = time.monotonic()
        if now >= self._next_tick:
            self._carry_out(self.schedule.tick(now))
            self._next_tick = now + TICK_S
        if self._ctl in ready and not self._control():
            self.baton.ended = True
            return ready
        if self.router in ready:
            self._drain()
            self._carry_out(self.schedule.dispatch(time.monotonic()))
        if self._waiter.fired:  # Unix connections that spoke, or can take more
            self.local.serve(self._waiter.fired)
            self._carry_out(self.schedule.dispatch(time.monotonic()))
        self.gate.stopping = self.schedule.stopping
        self._more = [s for s in self.gate.sockets if s in ready and self.gate.handle(s)]
        self.gate.settle(now)
        return ready

    def _control(self) -> bool:
        """Carry out the waiting commands of other threads; False once told to stop."""
        while (cmd := self._commands.take()) is not None:
            if isinstance(cmd, Lost):
                self._drain()  # what it sent before it died counts (done, results)
                if self.local:
                    self.local.read_all()
                now = time.monotonic()
                self._carry_out(self.schedule.lost(cmd.wid, cmd.how, now))
                self._carry_out(self.schedule.dispatch(now))
                continue
            if isinstance(cmd, Yield):
                continue
            if isinstance(cmd, Drain):
                self.schedule.draining = True
                self.schedule.time_up |= cmd.time_up
            else:
                self._carry_out(self.schedule.stop_workers())
            if isinstance(cmd, Stop):
                return False
        return True

    def _close(self) -> None:
        share_inproc(self.inproc_address, None)
        self._commands.close()
        if self.local:  # first: ctx.term() waits for sockets of others in this process
            self.local.close()
        self.gate.close()
        self.router.close(0)
        self.ctx.term()

    # -- sockets ---------------------------------------------------------------------------
    def _drain(self) -> None:
        """Read, check and handle the messages waiting (at most MAX_DRAIN)."""
        recv, get = self.router.recv, self.router.getsockopt
        for _ in range(MAX_DRAIN):
            if not get(_EVENTS) & _POLLIN:  # asking beats zmq.Again, an exception per turn
                return
            frame = recv(_NOBLOCK, copy=False)
            frames = [frame]
            while frame.more:  # the rest of a message is there with its first frame
                frame = recv(_NOBLOCK, copy=False)
                frames.append(frame)
            if self._take(frames[0].bytes, frames[1:]):
                self.gate.proven(_source_fd(frames[1]))

    def _take(self, ident: bytes, frames: list) -> bool:
        """Check and handle one message of connection ``ident`` (the router's or a Unix
        one); whether it was a signed first message (its connection is the job's)."""
        name = P.peer_name(ident)
        try:
            msg = self.codec.decode(frames, peer=name, join=False)
        except Exception as exc:  # noqa: BLE001 - AuthError, or anything a peer caused
            self._reject(ident, exc)
            return False
        try:
            self._carry_out(self._handle(ident, name, msg))
        except P.AuthError as exc:
            self._reject(ident, exc)
        except Exception as exc:  # noqa: BLE001 - one peer's message never ends the job
            log.exception("broker: failed to handle %r from worker %d: %s",
                          msg.kind, msg.sender, exc)
        return msg.kind in _FIRST_KINDS

    def _handle(self, ident: bytes, name: bytes, msg: P.Message) -> list[Out]:
        """What to do about one authentic message; AuthError if its sender is not who its
        connection says, or it is not a message the broker takes."""
        schedule = self.schedule
        if msg.kind == P.JOIN and name.startswith(b"j") and msg.sender == P.ANY_WORKER:
            return schedule.join(ident, msg.seq)
        if msg.kind in _WATCHDOG_KINDS and name == b"h%d" % msg.sender:  # (its own socket)
            return _WATCHDOG_KINDS[msg.kind](schedule, ident, msg, time.monotonic())
        peer = schedule.roster.peers.get(ident)
        if peer is None and msg.kind != P.HELLO and name == b"w%d" % msg.sender:
            return [Send(ident, P.STOP)]  # counted as lost, it speaks: its work ran elsewhere
        if msg.kind != P.HELLO and (peer is None or peer.wid != msg.sender):
            raise P.AuthError("sender does not match its connection")
        handler = self._handlers.get(msg.kind)
        if handler is None:
            raise P.AuthError(f"unexpected message {msg!r}")
        return handler(ident, peer, msg)

    def _carry_out(self, outs: list[Out]) -> None:
        """Send what the schedule decided; pass sandbox requests to the launcher."""
        for out in outs:
            if isinstance(out, Send):
                self._send(out.to, out.kind, arg=out.arg, parcels=out.parcels, body=out.body)
            elif isinstance(out, Fail):
                err = out.error(out.reason)
                # The broker pickles its own error objects; it still never unpickles user data.
                frames = _serialize.dumps([(tid, False, err) for tid in out.tids])
                self._send(out.to, P.RESULTS,
                           parcels=[self.codec.parcel(frames, peer=out.owner)])
            elif isinstance(out, AskSandbox):
                self.sandbox_requests.put(out.wid)

    def _send(self, ident: bytes, kind: bytes, **kw) -> None:
        frames = self.codec.encode(kind, **kw)
        conn = self._local_peers.get(ident)
        if conn is not None:  # a worker of this host (scoop._local)
            self.local.send(conn, frames)
            return
        router, last = self.router, len(frames) - 1
        try:
            _send(router, ident, _SNDMORE)  # unknown peer: raises here, nothing sent
            for i, frame in enumerate(frames):
                _send(router, frame, 0 if i == last else _SNDMORE,
                      type(frame) is bytes and len(frame) < _COPY_BELOW_BYTES)
        except zmq.ZMQError as exc:  # the peer disconnected
            log.debug("broker: cannot send to %r: %s", P.peer_name(ident), exc)

    def _reject(self, ident: bytes, exc: Exception) -> None:
        # One line per bad peer, not per message, and only for the first few peers.
        if ident not in self._bad_peers and len(self._bad_peers) < MAX_LOGGED_PEERS:
            self._bad_peers.add(ident)
            log.warning("broker: dropped a message from connection %r: %s", ident, exc)
