"""The wire format: every message between the broker and the workers.

Frames of one message (the broker's ROUTER socket sees the peer's routing id first)::

    [sig] [kind] [hdr] [payload frame 0] ... [payload frame n-1]

``sig``
    32 bytes, HMAC-SHA256(job key, kind || hdr). It is checked before anything else is
    read; a message that fails is dropped. The key is random per job and reaches the
    workers on their standard input, never on a command line.
``kind``
    One byte naming the message (the constants below).
``hdr``
    ``seq u64, sender u32, arg u32, nparcels u32, ndone u32`` (seq rises with every message
    of a sender; a receiver drops one that is not newer: no replays), then ``nparcels`` parcel
    records ``(tag u64, peer u32, nframes u32, mac 32s)``, then ``ndone`` records
    ``(owner u32, fid u64)``, then an optional JSON body (control messages only).
``payload``
    The frames of the parcels, in order.

A *parcel* is pickled user data: a group of tasks, a batch of results, or shared
constants. It is one pickle frame followed by its out-of-band buffers (pickle protocol
5), so a large array travels as its own frame without being copied into the pickle. Its
``mac`` (HMAC-SHA256 over the frame lengths and frames) is computed once by the worker
that made it and checked by the worker that unpickles it. The broker checks only the
envelope and routes parcels without reading them: it never unpickles user data, and a
10 MB argument is hashed twice per trip instead of four times. Swapping a parcel's frames
is caught by its mac, swapping a mac by the envelope ``sig``.

Messages (w: worker, b: broker)::

    HELLO    w->b  body {version, wid, pid, host}: join the job
    WELCOME  b->w  body {size, ...}; parcels: the shared constants set so far
    REFUSED  b->w  body {reason}: wrong protocol version or duplicate worker id
    TASKS    w->b  parcels (tag=fid): task groups submitted by the sender
             b->w  parcels (tag=fid, peer=owner): task groups to run
    READY    w->b  arg=n: the sender can take n more task groups
    WITHDRAW w->b  the sender's credit drops to 0 (its program runs; it takes no work)
    RETURN   w->b  parcels (tag=fid, peer=owner): unstarted tasks handed back, to be
                   queued first (the sender waits with a deadline and will not run them)
    RESULTS  w->b  parcels (peer=owner): results for that owner; done: finished groups;
                   arg=n: as READY n (a credit request riding along)
             b->w  parcels: results of the receiver's futures
    CONST    w->b, b->w  parcels: shared constants (shared.setConst)
    SHUTDOWN w->b  arg=exit status: the root's program ended; stop the job
    STOP     b->w  leave now (the job is over)
    BYE      w->b  the sender leaves on purpose (never read as a crash)
    JOIN     w->b  from a worker started by another launcher (routing id "j<random>",
                   sender ANY_WORKER): which worker id may I take?
    ASSIGN   b->w  body {wid}: take this id, then reconnect as "w<wid>" and say HELLO
    PING     w->b  from a worker's watchdog connection (routing id "h<wid>"): alive?
    PONG     b->w  the broker is alive (a worker that hears none for a while exits)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
from collections.abc import Sequence

VERSION = 1
ANY_WORKER = 0xFFFFFFFE  # the sender id of a JOIN: the worker has no id yet

HELLO = b"H"
WELCOME = b"W"
REFUSED = b"X"
TASKS = b"T"
READY = b"R"
RETURN = b"U"
WITHDRAW = b"N"
RESULTS = b"D"
CONST = b"C"
SHUTDOWN = b"Q"
STOP = b"S"
BYE = b"B"
JOIN = b"J"
ASSIGN = b"A"
PING = b"P"
PONG = b"O"

KIND_NAMES = {value: name for name, value in list(globals().items())
              if name.isupper() and isinstance(value, bytes) and len(value) == 1}

_HEAD = struct.Struct("<QIIII")
_PARCEL = struct.Struct("<QII32s")
_DONE = struct.Struct("<IQ")
_LEN = struct.Struct("<Q")
SIG_SIZE = 32


class AuthError(ValueError):
    """A message that is not an authentic message of this job (bad sig, mac or layout)."""


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


def _buf(frame) -> memoryview | bytes:
    """The bytes of a frame, whether it is bytes, a buffer, or a zmq.Frame."""
    b = getattr(frame, "buffer", None)
    return frame if b is None else b


class Codec:
    """Signs and checks messages with one job key; one per socket owner."""

    def __init__(self, key: bytes, sender: int) -> None:
        if len(key) < 16:
            raise ValueError("the job key must be at least 16 bytes")
        self.key = key
        self.sender = sender
        # Sequence numbers start at the clock, so they keep rising across restarts: a
        # receiver rejects any message not newer than the last from that connection.
        self._seq = time.time_ns()
        self._last_seen: dict = {}

    # -- parcels ---------------------------------------------------------------------
    def mac(self, frames: Sequence) -> bytes:
        """The mac of a parcel's frames (lengths are hashed so frames cannot shift)."""
        h = hmac.new(self.key, digestmod=hashlib.sha256)
        for f in frames:
            b = _buf(f)
            h.update(_LEN.pack(len(b) if isinstance(b, bytes) else b.nbytes))
            h.update(b)
        return h.digest()

    def parcel(self, frames: Sequence, tag: int = 0, peer: int = 0) -> Parcel:
        """Wrap freshly pickled frames as a parcel, computing its mac."""
        return Parcel(tag, peer, frames, self.mac(frames))

    def check(self, parcel: Parcel) -> None:
        """Raise AuthError unless the parcel's frames match its mac (call before unpickling)."""
        if not hmac.compare_digest(self.mac(parcel.frames), parcel.mac):
            raise AuthError("parcel mac mismatch")

    # -- messages --------------------------------------------------------------------
    def encode(self, kind: bytes, arg: int = 0, parcels: Sequence[Parcel] = (),
               done: Sequence[tuple[int, int]] = (), body: dict | None = None) -> list:
        """Build the frames of one signed message."""
        self._seq += 1
        parts = [_HEAD.pack(self._seq, self.sender, arg, len(parcels), len(done))]
        frames: list = []
        for p in parcels:
            parts.append(_PARCEL.pack(p.tag, p.peer, len(p.frames), p.mac))
            frames.extend(p.frames)
        for owner, fid in done:
            parts.append(_DONE.pack(owner, fid))
        if body is not None:
            parts.append(json.dumps(body, separators=(",", ":")).encode())
        hdr = b"".join(parts)
        sig = hmac.digest(self.key, kind + hdr, "sha256")
        return [sig, kind, hdr, *frames]

    def decode(self, frames: Sequence, peer=None) -> Message:
        """Authenticate and parse a message's frames; raise AuthError if they are not ours.

        With ``peer`` (the connection it came from), a message not newer than the last one
        accepted from that peer is rejected as a replay. Payload frames are returned as
        received (zero-copy zmq.Frame objects stay so).
        """
        if len(frames) < 3:
            raise AuthError(f"too few frames ({len(frames)})")
        sig, kind, hdr = (bytes(_buf(f)) for f in frames[:3])
        if len(sig) != SIG_SIZE or len(kind) != 1:
            raise AuthError("malformed envelope")
        if not hmac.compare_digest(hmac.digest(self.key, kind + hdr, "sha256"), sig):
            raise AuthError("bad signature")
        # From here on the header was written by a holder of the job key.
        try:
            seq, sender, arg, nparcels, ndone = _HEAD.unpack_from(hdr, 0)
            off = _HEAD.size
            parcels = []
            pos = 3
            for _ in range(nparcels):
                tag, to, nfr, mac = _PARCEL.unpack_from(hdr, off)
                off += _PARCEL.size
                parcels.append(Parcel(tag, to, frames[pos:pos + nfr], mac))
                pos += nfr
            done = []
            for _ in range(ndone):
                done.append(_DONE.unpack_from(hdr, off))
                off += _DONE.size
            body = json.loads(hdr[off:]) if off < len(hdr) else None
        except (struct.error, ValueError) as exc:
            raise AuthError(f"malformed header: {exc}") from None
        if pos != len(frames):
            raise AuthError("frame count does not match header")
        if peer is not None:
            if seq <= self._last_seen.get(peer, 0):
                raise AuthError(f"replayed or reordered message (seq {seq})")
            self._last_seen[peer] = seq
        return Message(kind, seq, sender, arg, parcels, done, body)
