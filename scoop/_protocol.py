"""The wire format: every message between the broker and the workers.

Frames of one message (the broker's ROUTER socket sees the peer's routing id first)::

    [sig kind hdr] [payload frame 0] ... [payload frame n-1]

The first frame, the *envelope*, holds three fields (one frame: each frame is a ZeroMQ
call, and a release of the GIL, at each end of every hop; three frames cost a remote
round trip 16 calls more, issue 12):

``sig``
    32 bytes, HMAC-SHA256(job key, kind || hdr). It is checked before anything else is
    read; a message that fails is dropped. The key is random per job and reaches the
    workers on their standard input, never on a command line.
``kind``
    One byte naming the message (the constants below).
``hdr``
    ``seq u64, sender u32, arg u32, nparcels u32, ndone u32, nsplit u32`` (seq rises with
    every message of a sender; a receiver drops one that is not newer: no replays), then
    ``nparcels`` parcel records ``(tag u64, peer u32, nframes u32, mac 32s)``, then
    ``ndone`` records ``(owner u32, fid u64)``, then ``nsplit`` records ``(frame u32,
    pieces u32)``, then an optional JSON body (control messages only). At most
    :data:`MAX_HEADER_BYTES`: a longer one is refused before it is hashed.
``payload``
    The frames of the parcels, in order. A frame larger than :data:`MAX_FRAME_BYTES`
    travels as ``pieces`` wire frames (a split record names it), because every socket
    refuses longer frames before reading them (``_transport``). The broker forwards the
    pieces as they came; a worker joins them.

A task group's ``tag`` (its fid, unique per owner) is a u64::

    bit 63     RETURNED   tasks a worker handed back (RETURN) as a group the broker did
                          not hold as such (part of one, the rest runs there; or one the
                          owner kept for itself): bits 32-59 hold that worker's id, bits
                          0-31 its count of such groups (:func:`returned_tag`), so that
                          they never collide with an owner's own fids (counted from 1)
    bit 62     RESUMABLE  only map chunks, whose owner keeps their items and resumes them
                          itself after a worker loss (``LOST``)
    bit 61     SUSPECT    items that may have killed a worker: the broker never gives the
                          group to the root worker (whose death would end the job)
    bit 60     LIMITED    a task with a time limit (``task_timeout``), alone in its group:
                          only a worker that can be ended runs it, never the root
    bits 0-59  the owner's group count (a group the owner shipped itself)

A *parcel* is pickled user data: a group of tasks, a batch of results, or shared
constants. It is one pickle frame followed by its out-of-band buffers (pickle protocol
5), so a large array travels as its own frame without being copied into the pickle. A
task group's parcel opens with one more frame, its *task ids*: ``u64`` each,
little-endian, one per task in the order of the pickled calls (:func:`task_ids_frame`,
:func:`task_ids`). It is scoop's own, not user data: the broker reads it to fail the
tasks of a group, or to name a lost group's tasks to their owner. Its
``mac`` (HMAC-SHA256 over the frame lengths and frames) is computed once by the worker
that made it and checked by the worker that unpickles it. The broker checks only the
envelope and routes parcels without reading them: it never unpickles user data, and a
10 MB argument is hashed twice per trip instead of four times. Swapping a parcel's frames
is caught by its mac, swapping a mac by the envelope ``sig``. A receiver unpickles only
the parcels :meth:`Codec.authentic` lets through.

A frame may arrive as ``bytes``, a buffer or a zero-copy ``zmq.Frame``: every reader
takes its bytes with :func:`buffer_of`.

Messages (w: worker, b: broker)::

    HELLO    w->b  body {version, wid, pid, host}: join the job
    WELCOME  b->w  body {size, max_attempts, elastic}; parcels: the shared constants so far
    REFUSED  b->w  body {reason}: wrong protocol version or duplicate worker id
    TASKS    w->b  parcels (tag=fid): task groups submitted by the sender
             b->w  parcels (tag=fid, peer=owner): task groups to run; arg=1: run them
                   even while waiting with a deadline (every worker is on standby)
    READY    w->b  arg=n: the sender can take n more task groups
    WITHDRAW w->b  the sender's credit drops to 0 (its program runs; it takes no work);
                   arg=1: it waits with a deadline (standby: work only if no one else can)
    RETURN   w->b  parcels (tag=fid, peer=owner): unstarted tasks handed back, to be
                   queued first (the sender waits with a deadline and will not run them);
                   also the pieces an owner cut from the map chunks of a dead worker
    LOST     b->w  body {how, groups: [[running, [tid...]], ...]}: the receiver's map-chunk
                   groups (tag bit RESUMABLE) that a dead worker held; running: it was the
                   group that worker was running. The owner sends their unfinished items
                   back itself (see scoop._chunks); the broker does not queue them again
    RESULTS  w->b  parcels (peer=owner): results for that owner; done: finished groups;
                   arg=n: as READY n (a credit request riding along)
             b->w  parcels: results of the receiver's futures; arg (an elastic job's): the
                   number of workers connected now
    CONST    w->b, b->w  parcels: shared constants (shared.setConst)
    SHUTDOWN w->b  arg=exit status: the root's program ended; stop the job
    STOP     b->w  leave now (the job is over)
    BYE      w->b  the sender leaves on purpose (never read as a crash): the groups the
                   broker sent it that it never took are queued again first, uncharged
    LEAVE    w->b  from a worker's watchdog connection (routing id "h<wid>"): arg=0:
                   the worker leaves (SIGTERM): no more work to it, and what it holds
                   when it goes runs again uncharged; arg=1: it goes now, its grace
                   over with a task still running, which runs again elsewhere
    JOIN     w->b  from a worker started by another launcher (routing id "j<random>",
                   sender ANY_WORKER): which worker id may I take?
    ASSIGN   b->w  body {wid}: take this id, then reconnect as "w<wid>" and say HELLO
    PING     w->b  from a worker's watchdog connection (routing id "h<wid>"): alive?
    PONG     b->w  the broker is alive (a worker that hears none for a while exits)
    TIMEOUT  w->b  from a worker's watchdog connection: body {owner, fid, tid, error}: that
                   task ran past its time limit; the worker ends itself once answered
                   (STOP: its other work was taken back)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import sys
import time
from array import array
from collections.abc import Callable, Sequence

from ._errors import AuthError

VERSION = 5  # 5: sig, kind and hdr in one frame (issue 12); 4: TIMEOUT, LEAVE, LIMITED
ANY_WORKER = 0xFFFFFFFE  # the sender id of a JOIN: the worker has no id yet
RETURNED = 1 << 63  # tag bit of the part of a group a worker handed back (RETURN)
RESUMABLE = 1 << 62  # tag bit of a group of map chunks that its owner resumes (LOST)
SUSPECT = 1 << 61  # tag bit of a group holding items charged with a worker's death
LIMITED = 1 << 60  # tag bit of a group of one task with a time limit: never for the root

HELLO = b"H"
WELCOME = b"W"
REFUSED = b"X"
TASKS = b"T"
READY = b"R"
RETURN = b"U"
LOST = b"L"
WITHDRAW = b"N"
RESULTS = b"D"
CONST = b"C"
SHUTDOWN = b"Q"
STOP = b"S"
BYE = b"B"
LEAVE = b"V"
JOIN = b"J"
ASSIGN = b"A"
PING = b"P"
PONG = b"O"
TIMEOUT = b"Z"

KIND_NAMES = {value: name for name, value in list(globals().items())
              if name.isupper() and isinstance(value, bytes) and len(value) == 1}

_HEAD = struct.Struct("<QIIIII")
_PARCEL = struct.Struct("<QII32s")
_DONE = struct.Struct("<IQ")
_SPLIT = struct.Struct("<II")
_LEN = struct.Struct("<Q")
# The header of the commonest messages, one parcel (a task group, a batch of results)
# and at most one finished group: read and written in one call (and one more for the
# finished group) instead of a loop of records.
_HEAD_ONE = struct.Struct("<QIIIIIQII32s")
# A parcel of at most this many bytes is hashed in one call over its joined frames:
# copying a small parcel costs less than an update per frame (on every parcel made and
# checked: four per remote round trip); a larger one is hashed frame by frame, never
# copied. The mac is the same either way.
MAC_JOIN_BYTES = 1 << 16
SIG_SIZE = 32
_BLOCK = 64  # SHA-256's block size: HMAC pads its key to it
_ENV = SIG_SIZE + 1  # where the header starts in the envelope frame (after sig and kind)
_ONE_SIZE = _ENV + _HEAD_ONE.size  # the envelope of a one-parcel message, in bytes
_ONE_DONE_SIZE = _ONE_SIZE + _DONE.size  # the same with one finished group
# The largest wire frame; a socket drops a peer that announces a longer one (checked by
# ZeroMQ from the length prefix, before the frame is read or any signature checked).
MAX_FRAME_BYTES = 64 * 2**20
# The largest header: records of a few dozen bytes per parcel, finished group and split,
# and a small control body. A longer one is refused before it is hashed.
MAX_HEADER_BYTES = 2**20
# Frame types whose len() is their size in bytes (besides bytes and memoryview, checked
# first): a whole frame of these is sent as it is without _split's buffer and size calls
# (0.7 us a frame: the broker forwards four received zmq.Frames per remote round trip).
# scoop._transport adds zmq.Frame (this module does not import ZeroMQ).
BYTE_SIZED: set[type] = {bytearray}


def routing_id(role: bytes, wid: int) -> bytes:
    """A connection's name at the broker: its role (``w`` worker, ``h`` watchdog, ``j``
    joiner), its worker id, and a random part, so that no one can take the name of a
    worker that has not connected yet (ZeroMQ refuses a name that is in use)."""
    return b"%s%d.%s" % (role, wid, os.urandom(8).hex().encode())


def peer_name(ident: bytes) -> bytes:
    """The role and worker id of a routing id (``b"w3"``): what messages must match, and
    what the replay window is kept by, whichever connection it came on. A joiner has no
    id yet: its whole routing id names it (joiners' clocks differ; they must not share
    a replay window)."""
    return ident if ident.startswith(b"j") else ident.split(b".", 1)[0]


class Parcel:
    """Pickled user data: frames (pickle + out-of-band buffers) and their mac."""

    __slots__ = ("tag", "peer", "frames", "mac")

    def __init__(self, tag: int, peer: int, frames: Sequence, mac: bytes) -> None:
        self.tag = tag
        self.peer = peer
        self.frames = frames
        self.mac = mac

    def __repr__(self) -> str:
        size = sum(len(memoryview(f)) for f in self.frames)
        return f"<Parcel tag={self.tag} peer={self.peer} frames={len(self.frames)} {size}B>"


def returned_tag(wid: int, n: int) -> int:
    """The fid of the ``n``-th part of a group that worker ``wid`` hands back (RETURN);
    see the tag layout in the module doc (``wid`` < 2**28, ``n`` < 2**32)."""
    return RETURNED | (wid << 32) | n


def task_ids_frame(tids) -> bytes:
    """The first frame of a task group's parcel: its task ids (see the module doc)."""
    frame = array("Q", tids)
    if sys.byteorder != "little":
        frame.byteswap()
    return frame.tobytes()


def task_ids(parcel: Parcel) -> array:
    """The task ids of a task group's parcel, read from its first frame."""
    tids = array("Q")
    frame = parcel.frames[0]  # bytes or a buffer (a zmq.Frame is one: .buffer costs more)
    tids.frombytes(frame if type(frame) is bytes else memoryview(frame))
    if sys.byteorder != "little":
        tids.byteswap()
    return tids


class Message:
    """A decoded, authenticated message."""

    __slots__ = ("kind", "seq", "sender", "arg", "parcels", "done", "body")

    def __init__(self, kind, seq, sender, arg, parcels, done, body) -> None:
        self.kind = kind
        self.seq = seq
        self.sender = sender
        self.arg = arg
        self.parcels = parcels
        self.done = done
        self.body = body

    def __repr__(self) -> str:
        return (f"<{KIND_NAMES.get(self.kind, self.kind)} from {self.sender} seq={self.seq} "
                f"arg={self.arg} parcels={len(self.parcels)} done={len(self.done)}>")


class Pieces(tuple):
    """One logical frame received as several wire frames (kept apart while forwarded)."""

    __slots__ = ()


def buffer_of(frame) -> memoryview | bytes:
    """The bytes of a frame, whether it is bytes, a buffer, or a zmq.Frame (no copy)."""
    b = getattr(frame, "buffer", None)
    return frame if b is None else b


def _nbytes(b) -> int:
    return len(b) if isinstance(b, bytes) else memoryview(b).nbytes


def _split(frame, limit: int) -> list:
    """The wire frames of one logical frame: itself, or slices of at most ``limit``."""
    if isinstance(frame, Pieces):
        return list(frame)
    b = buffer_of(frame)
    n = _nbytes(b)
    if n <= limit:
        return [frame]
    view = memoryview(b).cast("B")
    return [view[i:i + limit] for i in range(0, n, limit)]


class Hmac:
    """HMAC-SHA256 (RFC 2104) with one key, whose padded forms are hashed once.

    ``hmac.digest(key, msg, "sha256")`` looks the digest up by name and hashes the key's
    pads again on every call: 2.1 us for a 100-byte message here, OpenSSL 3's lookup most
    of it; copying two prepared SHA-256 states costs 0.6 us. The result is the same
    bytes (tests/test_protocol.py compares them), for the dozen macs and signatures of
    every remote round trip (issue 12).
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digest(self, *parts) -> bytes:
        """The HMAC of the concatenation of ``parts`` (bytes-like)."""
        inner = self._inner.copy()
        for part in parts:
            inner.update(part)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class Codec:
    """Signs and checks messages with one job key; one per socket owner."""

    def __init__(self, key: bytes, sender: int, max_frame: int = MAX_FRAME_BYTES) -> None:
        if len(key) < 16:
            raise ValueError("the job key must be at least 16 bytes")
        self.key = key
        self._hmac = Hmac(key)
        self.sender = sender
        self.max_frame = max_frame
        # Sequence numbers start at the clock, so they keep rising across restarts: a
        # receiver rejects any message not newer than the last from that connection.
        self._seq = time.time_ns()
        self._last_seen: dict = {}

    # -- parcels ---------------------------------------------------------------------
    def mac(self, frames: Sequence) -> bytes:
        """The mac of a parcel's frames (lengths are hashed so frames cannot shift)."""
        parts: list = []
        total = 0
        for f in frames:
            # One whole frame is the common case. Frames are hashed as they are: a
            # zmq.Frame is a buffer itself (its .buffer, a new memoryview per call, cost
            # more than the hash of a small frame; issue 12).
            t = type(f)
            if t is bytes or t in BYTE_SIZED:
                n = len(f)
            elif t is memoryview:
                n = f.nbytes
            elif t is Pieces:
                pieces = [buffer_of(p) for p in f]
                n = sum(_nbytes(b) for b in pieces)
                parts.append(_LEN.pack(n))
                parts.extend(pieces)
                total += n
                continue
            else:
                f = buffer_of(f)
                n = _nbytes(f)
            parts.append(_LEN.pack(n))
            parts.append(f)
            total += n
        if total <= MAC_JOIN_BYTES:  # the same HMAC, over the same bytes, in one call
            # (Hmac.digest inline: a Python call less on each parcel made or checked)
            inner = self._hmac._inner.copy()
            inner.update(b"".join(parts))
            outer = self._hmac._outer.copy()
            outer.update(inner.digest())
            return outer.digest()
        return self._hmac.digest(*parts)

    def parcel(self, frames: Sequence, tag: int = 0, peer: int = 0) -> Parcel:
        """Wrap freshly pickled frames as a parcel, computing its mac."""
        return Parcel(tag, peer, frames, self.mac(frames))

    def check(self, parcel: Parcel) -> None:
        """Raise AuthError unless the parcel's frames match its mac (call before unpickling)."""
        if not self.valid(parcel):
            raise AuthError("parcel mac mismatch")

    def valid(self, parcel: Parcel) -> bool:
        """Whether the parcel's frames match its mac (:meth:`check`, without raising)."""
        return hmac.compare_digest(self.mac(parcel.frames), parcel.mac)

    def authentic(self, parcels: Sequence[Parcel], reject: Callable[[str, AuthError], None],
                  source: str) -> list[Parcel]:
        """The parcels that pass :meth:`check`, in order; each other one goes to
        ``reject(source, error)`` (which logs it) and is skipped: the rest of the message
        still counts. (A plain loop: no generator or partial per message, issue 12.)"""
        good = []
        mac = self.mac
        for parcel in parcels:
            if hmac.compare_digest(mac(parcel.frames), parcel.mac):
                good.append(parcel)
            else:
                reject(source, AuthError("parcel mac mismatch"))
        return good

    # -- messages --------------------------------------------------------------------
    def encode(self, kind: bytes, arg: int = 0, parcels: Sequence[Parcel] = (),
               done: Sequence[tuple[int, int]] = (), body: dict | None = None) -> list:
        """Build the frames of one signed message."""
        self._seq += 1
        parts = [b""]
        frames: list = []
        splits: list[tuple[int, int]] = []
        index = 0
        limit = self.max_frame
        for p in parcels:
            parts.append(_PARCEL.pack(p.tag, p.peer, len(p.frames), p.mac))
            for f in p.frames:
                t = type(f)  # most frames are small and whole: bytes, a pickle's view
                if ((t is bytes and len(f) <= limit) or (t is memoryview and f.nbytes <= limit)
                        or (t in BYTE_SIZED and len(f) <= limit)):
                    frames.append(f)
                else:
                    wire = _split(f, limit)
                    if len(wire) > 1:
                        splits.append((index, len(wire)))
                    frames.extend(wire)
                index += 1
        if len(parts) == 2 and len(done) <= 1 and not splits and body is None:
            # one parcel (a task group, a batch of results), maybe one finished group
            p = parcels[0]
            signed = kind + _HEAD_ONE.pack(self._seq, self.sender, arg, 1, len(done), 0,
                                           p.tag, p.peer, len(p.frames), p.mac)
            if done:
                signed += _DONE.pack(*done[0])
        else:
            parts[0] = _HEAD.pack(self._seq, self.sender, arg, len(parcels), len(done),
                                  len(splits))
            for owner, fid in done:
                parts.append(_DONE.pack(owner, fid))
            for split in splits:
                parts.append(_SPLIT.pack(*split))
            if body is not None:
                parts.append(json.dumps(body, separators=(",", ":")).encode())
            signed = kind + b"".join(parts)
        inner = self._hmac._inner.copy()  # (Hmac.digest inline, as in mac)
        inner.update(signed)
        outer = self._hmac._outer.copy()
        outer.update(inner.digest())
        return [outer.digest() + signed, *frames]

    def decode(self, frames: Sequence, peer=None, join: bool = True) -> Message:
        """Authenticate and parse a message's frames; raise AuthError if they are not ours.

        With ``peer`` (the connection it came from), a message not newer than the last one
        accepted from that peer is rejected as a replay. Payload frames are returned as
        received (zero-copy zmq.Frame objects stay so); a frame that came split is joined
        into one bytearray, or with ``join`` false kept as :class:`Pieces` (to forward).
        """
        if not frames:
            raise AuthError("no frames")
        # Sizes first, on the received buffer: a forged message is dropped without its
        # large frames being copied or hashed. A zmq.Frame's len() is its size, and
        # bytes() copies it without the memoryview that its .buffer makes.
        env = frames[0]
        t = type(env)
        if t is bytes or t in BYTE_SIZED:
            n = len(env)
        else:
            env = buffer_of(env)
            n = _nbytes(env)
        if not _ENV + _HEAD.size <= n <= _ENV + MAX_HEADER_BYTES:
            raise AuthError("malformed envelope" + (
                " (three frames: a worker of an older scoop version? install the same "
                "scoop version on every host)" if n == SIG_SIZE else ""))
        if t is not bytes:
            env = bytes(env)
        inner = self._hmac._inner.copy()  # (Hmac.digest inline, as in mac)
        inner.update(env[SIG_SIZE:])
        outer = self._hmac._outer.copy()
        outer.update(inner.digest())
        if not hmac.compare_digest(outer.digest(), env[:SIG_SIZE]):
            raise AuthError("bad signature")
        # From here on the header was written by a holder of the job key.
        kind = env[SIG_SIZE:_ENV]
        if n == _ONE_SIZE or n == _ONE_DONE_SIZE:  # maybe one parcel (and one done)
            seq, sender, arg, nparcels, ndone, nsplit, tag, to, nfr, mac = \
                _HEAD_ONE.unpack_from(env, _ENV)
            if (nparcels == 1 and ndone == (n != _ONE_SIZE) and not nsplit
                    and nfr == len(frames) - 1):
                if peer is not None:  # (inline: _check_seq)
                    if seq <= self._last_seen.get(peer, 0):
                        raise AuthError(f"replayed or reordered message (seq {seq})")
                    self._last_seen[peer] = seq
                return Message(kind, seq, sender, arg, [Parcel(tag, to, frames[1:], mac)],
                               [_DONE.unpack_from(env, _ONE_SIZE)] if ndone else [], None)
        try:
            seq, sender, arg, nparcels, ndone, nsplit = _HEAD.unpack_from(env, _ENV)
            off = _ENV + _HEAD.size
            records = []
            for _ in range(nparcels):
                records.append(_PARCEL.unpack_from(env, off))
                off += _PARCEL.size
            done = []
            for _ in range(ndone):
                done.append(_DONE.unpack_from(env, off))
                off += _DONE.size
            splits = []
            for _ in range(nsplit):
                splits.append(_SPLIT.unpack_from(env, off))
                off += _SPLIT.size
            body = json.loads(env[off:]) if off < len(env) else None
        except (struct.error, ValueError) as exc:
            # Signed with the job key, yet not our layout: a worker of this job that runs
            # another scoop version.
            raise AuthError(f"malformed header ({exc}): is the same scoop version "
                            "installed on every host?") from None
        payload = _join(frames[1:], splits, join) if splits else frames[1:]
        parcels = []
        pos = 0
        for tag, to, nfr, mac in records:
            parcels.append(Parcel(tag, to, payload[pos:pos + nfr], mac))
            pos += nfr
        if pos != len(payload):
            raise AuthError("frame count does not match header")
        self._check_seq(peer, seq)
        return Message(kind, seq, sender, arg, parcels, done, body)

    def _check_seq(self, peer, seq: int) -> None:
        """Reject a message not newer than the last one accepted from ``peer``."""
        if peer is not None:
            if seq <= self._last_seen.get(peer, 0):
                raise AuthError(f"replayed or reordered message (seq {seq})")
            self._last_seen[peer] = seq


def _join(wire: Sequence, splits: list[tuple[int, int]], join: bool) -> list:
    """The logical payload frames of a message whose header lists ``splits``."""
    out: list = []
    pos = 0
    for index, pieces in splits:
        if index < len(out) or pieces < 2:
            raise AuthError("malformed split record")
        take = index - len(out)
        out.extend(wire[pos:pos + take])
        pos += take
        group = wire[pos:pos + pieces]
        if len(group) != pieces:
            raise AuthError("frame count does not match header")
        pos += pieces
        out.append(bytearray().join(buffer_of(f) for f in group) if join else Pieces(group))
    out.extend(wire[pos:])
    return out
