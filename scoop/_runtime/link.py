"""The link to the broker: one DEALER socket, the codec that signs and checks what goes
over it, and the one way to wait for answers.

Importing this module imports ZeroMQ; the runtime imports it only when a job starts, so
that importing ``scoop.futures`` stays light::

    worker / watchdog                      Link                                    broker
    -----------------                      ----                                    ------
    join: request(JOIN | HELLO | PING) ->  send: encode, sign  ------------------>  ROUTER
          answers until the deadline  <--  poll; decode: check sig, seq; a forged
                                           message is logged (once per source)
                                           and dropped  <-----------------------  replies
    hub:  drain(timeout) ------------->    up to MAX_DRAIN authentic messages <--  TASKS...

*Request.* :meth:`Link.request` sends one message, then yields the authentic messages
that arrive until its deadline: asking for an id (JOIN), joining (HELLO), a watchdog's
PING. The caller looks for the answer it wants and stops there.

*Unix.* :func:`open_link` makes a ``stream_link.StreamLink`` for a ``unix://`` address
(a worker on the broker's host): the same interface, no ZeroMQ.

*Drain.* :meth:`Link.drain` is the hub's: what has arrived (waiting up to a timeout for
the first message), for the handlers (``handlers.py``).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import zmq

from .. import _protocol as P
from .._errors import AuthError, BrokenJobError, JobOver
from .._transport import context_for
from .._zpoll import readable

if TYPE_CHECKING:
    from .._spin import Spin
    from .._transport import Credentials

log = logging.getLogger("scoop")

# Messages handled per poll before the hub goes back to running tasks.
MAX_DRAIN = 256
# A bytes frame shorter than this is copied into ZeroMQ when sent, a longer one lent
# without a copy: lending costs a Python object and a release callback, copying grows
# with the size (pyzmq copies below 64 KiB anyway when asked not to).
COPY_BELOW_BYTES = 1 << 16
# Plain ints: pyzmq's enum flags cost a call each (and an enum result for every `&`)
_MORE, _LAST = int(zmq.SNDMORE), 0
# pyzmq's Socket.send without its Python wrapper: a Python call per frame (0.66 -> 0.32 us
# for a small copied frame over inproc, hot loop), for arguments never passed here.
_send = zmq.backend.Socket.send
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
UNIX_SCHEME = "unix://"  # a local worker's address: the broker's Unix socket


class Link:
    """A connection to the broker (``role``: ``w`` worker, ``h`` watchdog, ``j`` joiner).

    Args:
        address: the broker's address.
        creds: the job's credentials.
        wid: the worker id this connection speaks for.
        sender: the sender id of its messages (default ``wid``).
        linger_ms: how long closing waits for unsent messages.
        ctx: the ZeroMQ context of another link of this process to share (its I/O
            thread serves both); None: a context of its own, ended with the link (or,
            for an inproc:// address, the broker's: ``_transport.context_for``).
    """

    def __init__(self, address: str, creds: Credentials, wid: int, role: bytes = b"w",
                 sender: int | None = None, linger_ms: int = 0,
                 ctx: zmq.Context | None = None) -> None:
        self.wid = wid
        self.codec = P.Codec(creds.key, wid if sender is None else sender)
        ctx = ctx or context_for(address)  # a broker of this process: its own context
        self._own_ctx = ctx is None
        self.ctx = zmq.Context() if ctx is None else ctx
        self.sock = creds.connect(self.ctx, P.routing_id(role, wid), address,
                                  linger_ms=linger_ms)
        # The socket's descriptor, polled directly: see _readable.
        self._fd_poll = select.poll()
        self.fd = self.sock.getsockopt(zmq.FD)
        self._fd_poll.register(self.fd, select.POLLIN)
        self._bad_sources: set[str] = set()

    spin: Spin | None = None  # this worker's idle waits poll before they sleep (enter_job)

    def _readable(self, timeout_ms: int) -> bool:
        """Whether a message is waiting, after waiting up to ``timeout_ms`` for one.

        ZeroMQ's poll asks the socket for ZMQ_EVENTS (a system call) before and after
        each of its sleeps: four calls per wait. Here: one when a message waits, three
        when it sleeps (asked, the descriptor polled, asked again; see scoop._zpoll)."""
        sock = self.sock
        if readable(sock):
            return True
        deadline = time.monotonic() + timeout_ms / 1000
        poll, spin = self._fd_poll.poll, self.spin
        while timeout_ms > 0:
            if spin is None:
                poll(timeout_ms)
            else:
                spin.poll(poll, timeout_ms)
            if readable(sock):
                return True
            # woken by another command of the socket's, not a message: sleep on
            timeout_ms = int((deadline - time.monotonic()) * 1000)
        return False

    def send(self, kind: bytes, **kw) -> None:
        """Sign and send one message (see ``Codec.encode`` for the fields)."""
        frames = self.codec.encode(kind, **kw)
        sock, last = self.sock, len(frames) - 1
        for i, frame in enumerate(frames):
            # Small frames are copied: a zero-copy frame is a Python object of its own
            # (twice the cost of a copy for the envelope's few bytes); buffers and large
            # pickles go zero-copy.
            _send(sock, frame, _LAST if i == last else _MORE,
                  type(frame) is bytes and len(frame) < COPY_BELOW_BYTES)

    def request(self, kind: bytes, timeout: float, **kw) -> Iterator[P.Message]:
        """Send one message, then yield the authentic messages that arrive within
        ``timeout`` seconds (stop iterating once the answer came)."""
        self.send(kind, **kw)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self._readable(int(left * 1000) + 1):
            msg = self._decode(self._recv())
            if msg is not None:
                yield msg

    def _recv(self) -> list:
        """The frames of the next message (one is waiting: see _readable)."""
        return _recv_frames(self.sock)

    def drain(self, timeout_ms: int,
              wait: Callable[[int], bool] | None = None) -> Iterator[P.Message]:
        """The authentic messages that have arrived (at most MAX_DRAIN), after waiting up
        to ``timeout_ms`` for the first one (with ``wait(ms)`` instead of the socket's
        poll when given: it returns whether the socket is ready)."""
        sock = self.sock
        if timeout_ms and wait is not None:  # the receive below must not block
            if not wait(timeout_ms) or not self._readable(0):
                return
        elif not self._readable(timeout_ms):
            return
        for _ in range(MAX_DRAIN):
            # Asking the socket beats a failed receive: zmq.Again is an exception built
            # in Python, on every drain of the hub.
            msg = self._decode(_recv_frames(sock))
            if msg is not None:
                yield msg
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                return

    def _decode(self, frames) -> P.Message | None:
        try:
            return self.codec.decode(frames, peer="broker")
        except AuthError as exc:
            self.reject("broker", exc)
            return None

    def reject(self, source: str, exc: Exception) -> None:
        """Log a message or parcel that failed authentication: once per source, not
        once per message (a flood must not flood the log)."""
        if source not in self._bad_sources:
            self._bad_sources.add(source)
            log.warning("worker %d: dropped a message that failed authentication from %s: %s",
                        self.wid, source, exc)

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket (waiting up to its linger for what is unsent) and the context
        if it is this link's own: ending it makes the blocking calls of links that share
        it raise ``zmq.ContextTerminated``, which ends them (see ``scoop._watchdog``)."""
        self.sock.close(linger_ms)
        if self._own_ctx:
            self.ctx.term()


def open_link(address: str, creds: Credentials, wid: int, **kw) -> Link:
    """A link to the broker at ``address``: over a Unix socket for a ``unix://`` one (see
    ``stream_link``), else ZeroMQ (the arguments of :class:`Link`)."""
    if address.startswith(UNIX_SCHEME):
        from .stream_link import StreamLink

        return StreamLink(address, creds, wid, **kw)
    return Link(address, creds, wid, **kw)


def _recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:
    """The frames of the next message (zero-copy), read frame by frame: pyzmq's
    recv_multipart asks ZeroMQ for RCVMORE after every frame (as the broker does)."""
    frame = sock.recv(copy=False)
    frames = [frame]
    while frame.more:  # the rest of a message is there with its first frame
        frame = sock.recv(copy=False)
        frames.append(frame)
    return frames


def ask_id(address: str, creds: Credentials, timeout: float) -> int:
    """A worker id from the broker, for a worker started by another launcher (JOIN).

    Raises:
        JobOver: the job ended first.
        BrokenJobError: no answer within ``timeout`` seconds.
    """
    link = open_link(address, creds, 0, role=b"j", sender=P.ANY_WORKER)
    try:
        for msg in link.request(P.JOIN, timeout):
            if msg.kind == P.STOP:
                raise JobOver("the job ended before this worker joined")
            if msg.kind == P.ASSIGN:
                return int(msg.body["wid"])
        raise BrokenJobError(f"no answer from the broker at {address} within {timeout:.0f} "
                             "s: is the job running, and reachable from here?")
    finally:
        link.close(0)


def join(link: Link, address: str, timeout: float) -> P.Message:
    """Say HELLO on ``link``; the broker's WELCOME (its body and the constants so far).

    Raises:
        JobOver: the job ended first.
        BrokenJobError: refused (another scoop version, a duplicate id), or no answer
            within ``timeout`` seconds.
    """
    hello = {"version": P.VERSION, "wid": link.wid, "pid": os.getpid(),
             "host": socket.gethostname()}
    for msg in link.request(P.HELLO, timeout, body=hello):
        if msg.kind == P.REFUSED:
            raise BrokenJobError(f"the broker refused worker {link.wid}: "
                                 f"{msg.body.get('reason')}")
        if msg.kind == P.STOP:
            raise JobOver("the job ended before this worker joined")
        if msg.kind == P.WELCOME:
            return msg
        log.debug("worker %d: %r before WELCOME, dropped", link.wid, msg)
    raise BrokenJobError(f"no answer from the broker at {address} within {timeout:.0f} s")
