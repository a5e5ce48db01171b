"""The link of a worker on the broker's host: a Unix stream socket, no ZeroMQ.

Same interface as :class:`.link.Link` (send, request, drain, close), the same signed
messages; the bytes go straight between this thread and the broker's (``scoop._stream``
frames them), where ZeroMQ TCP woke an I/O thread on each side of every hop (issue 12).

The connection first sends its routing id (``P.routing_id``): the broker names it so, as
its ROUTER names a ZeroMQ peer. Sends block (the broker reads all it is sent). If the
broker goes away the link goes quiet: sends are dropped and nothing arrives, as with a
ZeroMQ link whose broker is gone, and the watchdog's silence ends the worker.
"""

from __future__ import annotations

import collections
import logging
import select
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .. import _protocol as P
from .. import _stream
from .._errors import BrokenJobError
from .link import MAX_DRAIN, UNIX_SCHEME, Link

if TYPE_CHECKING:
    from .._transport import Credentials

log = logging.getLogger("scoop")


class StreamLink(Link):
    """A link over the broker's Unix socket (``unix:///path``); see :class:`.link.Link`.

    ``linger_ms`` and ``ctx`` are taken for the same signature and unused: a send has
    left when it returns, and there is no ZeroMQ context (``ctx`` is None).
    """

    def __init__(self, address: str, creds: Credentials, wid: int, role: bytes = b"w",
                 sender: int | None = None, linger_ms: int = 0, ctx=None) -> None:
        self.wid = wid
        self.codec = P.Codec(creds.key, wid if sender is None else sender)
        self.ctx = None  # a watchdog sharing it makes a connection of its own
        self._bad_sources: set[str] = set()
        try:
            self.sock = _stream.connect(address[len(UNIX_SCHEME):])
            _stream.send_all(self.sock, [P.routing_id(role, wid)])
        except OSError as exc:
            raise BrokenJobError(f"cannot reach the broker at {address}: {exc}") from None
        self._reader = _stream.Reader()
        self._inbox: collections.deque[list] = collections.deque()
        self._fd_poll: select.poll | None = select.poll()
        self._fd_poll.register(self.sock.fileno(), select.POLLIN)

    def _readable(self, timeout_ms: int) -> bool:
        """Whether a message is waiting, after waiting up to ``timeout_ms`` for one."""
        if self._inbox:
            return True
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            if self._fd_poll is None:  # the broker is gone: nothing will come
                time.sleep(max(0.0, timeout_ms / 1000))
                return False
            poll = self._fd_poll.poll
            if self.spin.poll(poll, timeout_ms) if self.spin else poll(timeout_ms):
                self._fill()
                if self._inbox:
                    return True
            timeout_ms = int((deadline - time.monotonic()) * 1000)
            if timeout_ms <= 0:
                return False

    def _fill(self) -> None:
        """Receive what has arrived (one call)."""
        try:
            self._inbox.extend(self._reader.read(self.sock))
        except (OSError, EOFError, _stream.FramingError) as exc:
            self._gone(exc)

    def _gone(self, exc: BaseException) -> None:
        if self._fd_poll is not None:
            self._fd_poll = None
            log.debug("worker %d: the broker's connection ended: %r", self.wid, exc)

    def send(self, kind: bytes, **kw) -> None:
        """Sign and send one message (see ``Codec.encode`` for the fields)."""
        frames = self.codec.encode(kind, **kw)
        if self._fd_poll is None:
            return
        try:
            _stream.send_all(self.sock, frames)
        except OSError as exc:
            self._gone(exc)

    def _recv(self) -> list:
        return self._inbox.popleft()

    def drain(self, timeout_ms: int,
              wait: Callable[[int], bool] | None = None) -> Iterator[P.Message]:
        """The authentic messages that have arrived (at most MAX_DRAIN), after waiting up
        to ``timeout_ms`` for the first one (``wait(ms)``: see :meth:`Link.drain`)."""
        if timeout_ms and wait is not None:
            if not wait(timeout_ms) or not self._readable(0):
                return
        elif not self._readable(timeout_ms):
            return
        inbox = self._inbox
        for _ in range(MAX_DRAIN):
            msg = self._decode(inbox.popleft())
            if msg is not None:
                yield msg
            if not inbox:
                return

    def close(self, linger_ms: int | None = None) -> None:
        """Close the connection (what was sent has left: sends block)."""
        self._fd_poll = None
        self.sock.close()
