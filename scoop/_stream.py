"""Messages over a Unix stream socket: the local workers' wire (no ZeroMQ I/O thread).

A message is its frames, length-prefixed by one header: the frame count, then each
frame's length (little-endian u32s), then the frames' bytes::

    | n | len 1 | ... | len n | frame 1 | ... | frame n |

*Sending.* ``socket.sendmsg`` with the header and the frames' own buffers: a big frame is
not copied in Python. :func:`send_all` blocks (a worker's link); a :class:`Outgoing`
never does (the broker's side): what the kernel does not take is queued, and written
when the socket can take more (its owner polls for POLLOUT meanwhile).

*Receiving.* A :class:`Reader` takes what a socket has and returns the complete messages;
a big frame is received straight into a buffer of its size. A header that announces more
frames or bigger ones than allowed raises :class:`FramingError` before anything is
allocated for them: the connection is garbage, or a stranger's, and is closed.
"""

from __future__ import annotations

import collections
import os
import socket
import struct

from . import _protocol as P

_COUNT = struct.Struct("<I")
# Frames of one message: many parcels (a batch of results) each of a few frames.
MAX_FRAMES = 1 << 20
# Bytes read per receive: the few small messages of a round trip come in one call; under
# glibc's mmap threshold (128 KiB), so the buffer of each receive is not an mmap.
CHUNK_BYTES = 1 << 16
# A frame at least this long that is not all in yet is received into its own buffer
# (no copy through the chunks); shorter ones wait in the chunk buffer.
BIG_FRAME_BYTES = 1 << 16
# Buffers per sendmsg: the kernel's IOV_MAX.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class FramingError(Exception):
    """A header announces too many frames, or a frame too big: not a peer of this job."""


def buffers(frames) -> list:
    """The buffers that write a message of ``frames``: its header, then the frames (bytes
    as they are: a memoryview costs more than the frame's few bytes; an empty frame
    left out, as sendmsg would never count it sent)."""
    lens = []
    bufs: list = [b""]
    for f in frames:
        if type(f) is not bytes:
            f = memoryview(f).cast("B")
        n = len(f)
        lens.append(n)
        if n:
            bufs.append(f)
    bufs[0] = struct.pack(f"<{len(lens) + 1}I", len(lens), *lens)
    return bufs


def send_all(sock: socket.socket, frames) -> None:
    """Write one message on a blocking socket (OSError if the peer is gone)."""
    bufs = buffers(frames)
    while bufs:
        sent = sock.sendmsg(bufs[:_IOV_MAX])
        _consume(bufs, sent)


def _consume(bufs: list | collections.deque, sent: int) -> None:
    """Drop ``sent`` bytes from the front of ``bufs`` (bytes, or memoryviews of bytes)."""
    while sent:
        first = bufs[0]
        if sent >= len(first):
            sent -= len(first)
            if isinstance(bufs, list):
                del bufs[0]
            else:
                bufs.popleft()
        else:
            bufs[0] = memoryview(first)[sent:]  # no copy of the rest
            sent = 0


class Outgoing:
    """The unsent bytes of a non-blocking socket (the broker's side: it never waits)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._queue: collections.deque = collections.deque()

    @property
    def waiting(self) -> bool:
        """Whether bytes wait for the socket to take them (poll it for POLLOUT)."""
        return bool(self._queue)

    def send(self, frames) -> None:
        """Write one message, or queue what the socket does not take now (OSError if the
        peer is gone)."""
        bufs = buffers(frames)
        if self._queue:
            self._queue.extend(bufs)
            return
        try:
            sent = self.sock.sendmsg(bufs[:_IOV_MAX])
        except BlockingIOError:
            sent = 0
        _consume(bufs, sent)
        self._queue.extend(bufs)

    def flush(self) -> bool:
        """Write what is queued, as far as the socket takes it; whether all went."""
        queue = self._queue
        while queue:
            try:
                sent = self.sock.sendmsg([queue[i] for i in range(min(len(queue), _IOV_MAX))])
            except BlockingIOError:
                return False
            _consume(queue, sent)
        return True


class Reader:
    """Cuts the bytes of a stream into messages (lists of frames).

    ``max_frames`` and ``max_frame`` bound what a header may announce; raise them once
    the peer has proven to be the job's (see the broker's Unix listener).
    """

    def __init__(self, max_frames: int = MAX_FRAMES,
                 max_frame: int = P.MAX_FRAME_BYTES) -> None:
        self.max_frames = max_frames
        self.max_frame = max_frame
        self._buf = b""  # received bytes not yet cut into frames
        self._lens: tuple | None = None  # the frame lengths of the message being read
        self._frames: list = []  # its frames so far
        self._big: memoryview | None = None  # the big frame being received into, its
        self._filled = 0  # bytes so far

    def read(self, sock: socket.socket) -> list[list]:
        """Receive once and return the messages completed (maybe none). EOFError at the
        end of the stream; FramingError for a header out of bounds; BlockingIOError if a
        non-blocking socket has nothing."""
        big = self._big
        if big is not None:
            n = sock.recv_into(big[self._filled:])
            if not n:
                raise EOFError
            self._filled += n
            if self._filled < big.nbytes:
                return []
            self._frames.append(big.obj)
            self._big = None
        else:
            data = sock.recv(CHUNK_BYTES)
            if not data:
                raise EOFError
            self._buf = self._buf + data if self._buf else data
        return self._cut()

    def _cut(self) -> list[list]:
        out = []
        buf, pos, end = self._buf, 0, len(self._buf)
        while True:
            lens = self._lens
            if lens is None:
                if end - pos < 4:
                    break
                (n,) = _COUNT.unpack_from(buf, pos)
                if not 0 < n <= self.max_frames:
                    raise FramingError(f"a header announces {n} frames")
                if end - pos < 4 + 4 * n:
                    break
                lens = self._lens = struct.unpack_from(f"<{n}I", buf, pos + 4)
                if max(lens) > self.max_frame:
                    raise FramingError(f"a header announces a frame of {max(lens)} bytes")
                pos += 4 + 4 * n
            frames = self._frames
            while len(frames) < len(lens):
                size = lens[len(frames)]
                if end - pos >= size:
                    frames.append(buf[pos:pos + size])
                    pos += size
                elif size >= BIG_FRAME_BYTES:  # the rest straight into its own buffer
                    have = end - pos
                    big = bytearray(size)
                    big[:have] = buf[pos:end]
                    self._big, self._filled = memoryview(big), have
                    self._buf = b""
                    return out
                else:
                    self._buf = buf[pos:]
                    return out
            out.append(frames)
            self._frames, self._lens = [], None
        self._buf = buf[pos:] if pos else buf
        return out


def connect(path: str) -> socket.socket:
    """A blocking connection to the Unix socket at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock
