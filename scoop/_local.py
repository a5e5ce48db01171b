"""The broker's Unix socket: the wire of the workers on its own host (no ZeroMQ).

A worker started by the launcher on the broker's host gets ``unix:///dir/b`` as its
address (``scoop._runtime.stream_link``); the broker listens there besides its ROUTER::

    local worker                      UnixListener (broker thread)         broker
    ------------                      ----------------------------         ------
    connect, send routing id  ----->  accept (same user only); the id
                                      names the connection (a duplicate
                                      is hung up)
    signed messages  -------------->  cut into frames (scoop._stream) --> the router's
                                                                          checks, handlers
                      <-------------  written, or queued until the   <--  _send(ident)
                                      socket takes more (POLLOUT)

*Never blocking.* Every socket is non-blocking; what one does not take is queued and
written when the broker's poll says it can take more.

*Leftovers.* A broker removes its directory when it closes; one killed outright cannot,
so each broker first removes the user's stale ones (:func:`sweep`).

*Strangers.* The socket lives in a private directory (mode 0700, removed at the end), and
a peer of another user is hung up at once. Until a connection sent a signed first
message (HELLO, JOIN, PING: :meth:`proven`) its headers may announce only a few small
frames, and at most ``max_unproven`` such connections are kept (the oldest is hung up),
as ``_transport.Gate`` bounds the ROUTER's. A connection whose header is out of bounds is
closed; the first few are logged.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import socket
import stat
import struct
import tempfile
import time

from . import _protocol as P
from . import _stream
from ._zpoll import Waiter

log = logging.getLogger("scoop.broker")

# What an unproven connection's header may announce: a worker's first messages are small.
UNPROVEN_MAX_FRAMES = 16
UNPROVEN_MAX_FRAME = 2 * 2**20
MAX_IDENT_BYTES = 64  # a routing id: role, worker id, random part (P.routing_id)
MAX_ACCEPTS_PER_CALL = 256  # the broker's other work goes on meanwhile
MAX_LOGGED = 32  # bad connections named in the log; the rest are counted
# The socket's directory: $TMPDIR unless the path would not fit a sun_path (108 bytes).
_MAX_PATH = 100
_IN, _OUT = select.POLLIN, select.POLLOUT
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# A broker killed outright (SIGKILL) leaves its directory; the next broker of the user
# removes those whose socket refuses connections and that are older than this (s).
STALE_AFTER_S = 60.0


def listen(waiter: Waiter, take, max_unproven: int) -> UnixListener | None:
    """The broker's Unix socket, or None (logged) where none can be made (no writable
    temporary directory): the local workers then use TCP."""
    try:
        sweep(tempfile.gettempdir())
        return UnixListener(waiter, take, max_unproven)
    except OSError as exc:
        log.warning("broker: no Unix socket for the local workers (%s); they use TCP", exc)
        return None


def sweep(folder: str, min_age_s: float = STALE_AFTER_S) -> int:
    """Remove the socket directories in ``folder`` of this user's brokers that are gone
    (killed outright: nothing removed theirs); how many. Gone means that a connection to
    the socket is refused: nothing listens there. A directory younger than ``min_age_s``
    is left alone (its broker may be between bind and listen)."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith("scoop-") or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            path = os.path.join(entry.path, "b")
            if (st.st_uid != os.getuid() or now - st.st_mtime < min_age_s
                    or not stat.S_ISSOCK(os.lstat(path).st_mode)):
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(path)
        except ConnectionRefusedError:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
        except OSError:  # listening, busy, not a broker's, or gone meanwhile
            continue
    return removed


class Conn:
    """One accepted connection: its reader, its unsent bytes, the name it gave."""

    __slots__ = ("sock", "fd", "reader", "out", "ident", "proven", "polls_out")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = _stream.Reader(UNPROVEN_MAX_FRAMES, UNPROVEN_MAX_FRAME)
        self.out = _stream.Outgoing(sock)
        self.ident: bytes | None = None
        self.proven = False
        self.polls_out = False


class UnixListener:
    """The broker's Unix socket and its connections (see the module doc); lives in the
    broker's thread. ``take(ident, frames)`` handles one message and returns whether it
    was a signed first message (the connection is the job's)."""

    def __init__(self, waiter: Waiter, take, max_unproven: int) -> None:
        folder = tempfile.mkdtemp(prefix="scoop-")  # mode 0700
        if len(folder) > _MAX_PATH:
            os.rmdir(folder)
            folder = tempfile.mkdtemp(prefix="scoop-", dir="/tmp")
        self.folder = folder
        path = os.path.join(folder, "b")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            self.sock.listen(1024)
        except BaseException:
            self.sock.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.sock.setblocking(False)
        self.address = "unix://" + path
        self.waiter, self.take, self.max_unproven = waiter, take, max_unproven
        self.by_fd: dict[int, Conn] = {}
        self.peers: dict[bytes, Conn] = {}  # routing id -> its connection
        self._unproven: dict[int, Conn] = {}  # oldest first
        self.hung_up = 0
        self._logged = 0
        waiter.watch(self.sock.fileno(), _IN)

    def serve(self, fired: list[tuple[int, int]]) -> None:
        """Handle the descriptors the broker's poll found ready."""
        for fd, events in fired:
            conn = self.by_fd.get(fd)
            if conn is None:
                if fd == self.sock.fileno():
                    self._accept()
                continue
            if events & _OUT:
                self._flush(conn)
            if events & ~_OUT:  # readable, or hung up / in error: read says which
                self.read(conn)

    def read_all(self) -> None:
        """Read every connection once (a worker was reported lost: what it sent counts)."""
        for conn in list(self.by_fd.values()):
            self.read(conn)

    def read(self, conn: Conn) -> None:
        """Receive what ``conn`` has and handle its complete messages."""
        try:
            messages = conn.reader.read(conn.sock)
        except BlockingIOError:
            return
        except (EOFError, OSError):  # its worker closed it, or died
            self.drop(conn)
            return
        except _stream.FramingError as exc:
            self.drop(conn, str(exc))
            return
        for frames in messages:
            if conn.ident is None:
                if not self._named(conn, frames):
                    return
            elif self.take(conn.ident, frames) and not conn.proven:
                self._prove(conn)
            if conn.fd not in self.by_fd:  # dropped meanwhile (a send to it failed)
                return

    def send(self, conn: Conn, frames) -> None:
        """Write a message to ``conn`` without blocking (queued if need be)."""
        try:
            conn.out.send(frames)
        except OSError:
            self.drop(conn)
            return
        if conn.out.waiting and not conn.polls_out:
            conn.polls_out = True
            self.waiter.watch(conn.fd, _IN | _OUT)

    def _flush(self, conn: Conn) -> None:
        try:
            done = conn.out.flush()
        except OSError:
            self.drop(conn)
            return
        if done and conn.polls_out:
            conn.polls_out = False
            self.waiter.watch(conn.fd, _IN)

    def _named(self, conn: Conn, frames: list) -> bool:
        """Take a connection's first message, its routing id; False if it was dropped."""
        ident = bytes(frames[0]) if len(frames) == 1 else b""
        if not 0 < len(ident) <= MAX_IDENT_BYTES or ident[:1] not in (b"w", b"h", b"j"):
            self.drop(conn, "its first message is not a routing id")
            return False
        if ident in self.peers:
            self.drop(conn, "its routing id is in use")
            return False
        conn.ident = ident
        self.peers[ident] = conn
        return True

    def _prove(self, conn: Conn) -> None:
        conn.proven = True
        self._unproven.pop(conn.fd, None)
        conn.reader.max_frames = _stream.MAX_FRAMES
        conn.reader.max_frame = P.MAX_FRAME_BYTES

    def _accept(self) -> None:
        for _ in range(MAX_ACCEPTS_PER_CALL):
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. out of descriptors: the peer waits in the backlog
                self._log(f"cannot accept a connection: {exc}")
                break
            sock.setblocking(False)
            conn = Conn(sock)
            self.by_fd[conn.fd] = conn
            self._unproven[conn.fd] = conn
            self.waiter.watch(conn.fd, _IN)
            _pid, uid, _gid = _CRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            if uid != os.getuid():
                self.drop(conn, f"it is of another user (uid {uid})")
        while len(self._unproven) > self.max_unproven:
            self.hung_up += 1
            self.drop(next(iter(self._unproven.values())))

    def drop(self, conn: Conn, why: str | None = None) -> None:
        """Close ``conn`` and forget its name (``why``: logged, for the first few)."""
        if self.by_fd.pop(conn.fd, None) is None:
            return
        self._unproven.pop(conn.fd, None)
        if conn.ident is not None and self.peers.get(conn.ident) is conn:
            del self.peers[conn.ident]
        self.waiter.unwatch(conn.fd)
        conn.sock.close()
        if why:
            self._log(f"closed a connection to its Unix socket: {why}")

    def _log(self, text: str) -> None:
        self._logged += 1
        if self._logged <= MAX_LOGGED:
            log.warning("broker: %s%s", text, " (further ones are not logged)"
                        if self._logged == MAX_LOGGED else "")

    def close(self) -> None:
        """Close every connection and the socket; remove its directory."""
        for conn in list(self.by_fd.values()):
            self.drop(conn)
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.hung_up:
            log.info("broker: hung up %d local connection(s) not proven in time",
                     self.hung_up)
