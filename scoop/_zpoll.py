"""Waiting on ZeroMQ sockets with fewer system calls than ``zmq_poll``.

``zmq_poll`` (pyzmq's ``Poller``) asks every socket for ``ZMQ_EVENTS`` before it sleeps
and again after it wakes, and each such question is a ``poll(2)`` of the socket's
mailbox: a blocking poll of the broker's four sockets made ten system calls, about 28
per remote round trip in the broker's thread alone (``strace -f``, issue 12).

:class:`Waiter` sleeps in one ``poll(2)`` on the sockets' descriptors (``ZMQ_FD``) and
names the sockets that may be readable: those whose descriptor fired, those its caller
says may still hold messages (``again``), and those whose ``ZMQ_EVENTS`` it must ask
first (``check``). A descriptor only fires when a socket's mailbox gets a command, which
ZeroMQ sends when a message arrives at a pipe its reader had found empty; any call on a
socket (a send too) may take that command. So a caller asks (``check``) for the
sockets it sent on or did not read to the end, and its handlers read without blocking,
as a named socket may hold nothing. When the poll times out with nothing fired, every
socket is named: a missed wakeup costs at most one timeout.

Plain descriptors (the broker's Unix sockets, ``scoop._local``) are polled with them
(:meth:`Waiter.watch`); those that fired, with their events, are left in
:attr:`Waiter.fired`.
"""

from __future__ import annotations

import select
from collections.abc import Iterable
from typing import TYPE_CHECKING

import zmq

if TYPE_CHECKING:
    from ._spin import Spin

_EVENTS, _POLLIN, _FD = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.FD)


def readable(sock: zmq.Socket) -> bool:
    """Whether a message waits on ``sock`` now (one question to ZeroMQ)."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


class Waiter:
    """Waits on a fixed set of ZeroMQ sockets (see the module doc)."""

    def __init__(self, sockets: Iterable[zmq.Socket]) -> None:
        self.sockets = list(sockets)
        self._poll = select.poll()
        self._by_fd: dict[int, zmq.Socket] = {}
        self.fired: list[tuple[int, int]] = []  # plain descriptors ready at the last wait
        for sock in self.sockets:
            fd = sock.getsockopt(_FD)
            self._by_fd[fd] = sock
            self._poll.register(fd, select.POLLIN)

    def watch(self, fd: int, events: int) -> None:
        """Poll plain descriptor ``fd`` for ``events`` (again: replaces them)."""
        self._poll.register(fd, events)

    def unwatch(self, fd: int) -> None:
        """Poll ``fd`` no more."""
        try:
            self._poll.unregister(fd)
        except KeyError:
            pass

    def add(self, sock: zmq.Socket, fd: int) -> None:
        """Wait on ``sock`` (whose ``ZMQ_FD`` is ``fd``) too, until :meth:`remove`."""
        self._by_fd[fd] = sock
        self._poll.register(fd, select.POLLIN)
        self.sockets.append(sock)

    def remove(self, fd: int) -> None:
        """Wait no more on the socket added with ``fd``."""
        self.sockets.remove(self._by_fd.pop(fd))
        self._poll.unregister(fd)

    def wait(self, timeout_ms: int, check: Iterable[zmq.Socket] = (),
             again: Iterable[zmq.Socket] = (), spin: Spin | None = None) -> list[zmq.Socket]:
        """The sockets that may be readable, after sleeping up to ``timeout_ms`` unless
        one of ``again`` or ``check`` (asked first) is (polling first with ``spin``)."""
        ready = list(again)
        for sock in check:
            if sock not in ready and readable(sock):
                ready.append(sock)
        if ready or spin is None:
            fired = self._poll.poll(0 if ready else timeout_ms)
        else:
            fired = spin.poll(self._poll.poll, timeout_ms)
        plain = self.fired = []
        if not fired and not ready:
            return list(self.sockets)  # timed out: look at every socket once
        by_fd = self._by_fd
        for fd, events in fired:
            sock = by_fd.get(fd)
            if sock is None:
                plain.append((fd, events))
            elif sock not in ready:
                ready.append(sock)
        return ready
