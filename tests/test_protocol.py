"""The wire format: signing, tampering, fuzzing, and hostile traffic at a live broker."""

from __future__ import annotations

import os
import pickle
import sys
import time

import cloudpickle
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from scoop import _protocol as P
from scoop import _serialize, futures

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.timeout(60)

KEY = os.urandom(32)


def test_round_trip_with_parcels_done_and_body():
    codec = P.Codec(KEY, 7)
    parcel = codec.parcel(_serialize.dumps({"x": 1}), tag=5, peer=3)
    frames = codec.encode(P.RESULTS, arg=9, parcels=[parcel], done=[(1, 2), (3, 4)],
                          body={"k": "v"})
    msg = P.Codec(KEY, 0).decode(frames)
    assert (msg.kind, msg.sender, msg.arg, msg.done, msg.body) == (
        P.RESULTS, 7, 9, [(1, 2), (3, 4)], {"k": "v"})
    (got,) = msg.parcels
    assert (got.tag, got.peer) == (5, 3)
    codec.check(got)
    assert _serialize.loads(got.frames) == {"x": 1}


def test_wrong_key_rejected():
    frames = P.Codec(os.urandom(32), 1).encode(P.READY, arg=1)
    with pytest.raises(P.AuthError, match="bad signature"):
        P.Codec(KEY, 0).decode(frames)


def test_tampered_header_rejected():
    frames = P.Codec(KEY, 1).encode(P.READY, arg=1)
    hdr = bytearray(frames[2])
    hdr[12] ^= 1
    frames[2] = bytes(hdr)
    with pytest.raises(P.AuthError):
        P.Codec(KEY, 0).decode(frames)


def test_tampered_parcel_caught_before_unpickling():
    codec = P.Codec(KEY, 1)
    parcel = codec.parcel(_serialize.dumps([1, 2, 3]))
    evil = pickle.dumps(os.system)  # a pickle that would run code
    frames = codec.encode(P.CONST, parcels=[parcel])
    frames[3] = evil
    msg = codec.decode(frames)  # the envelope is intact...
    with pytest.raises(P.AuthError, match="mac"):
        codec.check(msg.parcels[0])  # ...the parcel is not


def test_frame_count_must_match_header():
    codec = P.Codec(KEY, 1)
    frames = codec.encode(P.CONST, parcels=[codec.parcel([b"a", b"b"])])
    with pytest.raises(P.AuthError):
        codec.decode(frames[:-1])
    with pytest.raises(P.AuthError):
        codec.decode([*frames, b"extra"])


def test_out_of_band_buffers_travel_as_frames():
    np = pytest.importorskip("numpy")
    big = np.arange(_serialize.OOB_MIN, dtype=np.int64)
    frames = _serialize.dumps({"big": big, "small": np.zeros(10)})
    assert len(frames) == 2 and memoryview(frames[1]).nbytes == big.nbytes
    out = _serialize.loads(frames)
    assert (out["big"] == big).all() and (out["small"] == 0).all()
    out["big"][0] = -1  # writable, like any unpickled array


def test_main_exports_skip_the_guarded_block():
    src = (
        "import os\n"
        "def top(): pass\n"
        "class C: pass\n"
        "try:\n    def in_try(): pass\nexcept ImportError:\n    pass\n"
        "if os.name:\n    def conditional(): pass\n"
        "if __name__ == '__main__':\n    def guarded(): pass\nelse:\n    def other(): pass\n"
    )
    assert _serialize.main_exports(src) == {"top", "C", "in_try", "conditional", "other"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_decoder_never_accepts_random_frames(frames):
    with pytest.raises(P.AuthError):
        P.Codec(KEY, 0).decode(frames)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.integers(min_value=1, max_value=255))
def test_decoder_rejects_bit_flips_of_valid_messages(pos, mask):
    codec = P.Codec(KEY, 1)
    frames = codec.encode(P.TASKS, parcels=[codec.parcel([b"tids", b"pickle"], tag=1)])
    target = pos % 3
    data = bytearray(frames[target])
    data[pos % len(data)] ^= mask  # a real change: mask is never 0
    frames[target] = bytes(data)
    with pytest.raises(P.AuthError):
        codec.decode(frames)


def _square(x):
    return x * x


def test_hostile_traffic_at_the_broker_port_changes_nothing(pool, caplog):
    """Garbage, forged and wrong-key messages while the job computes: results intact."""
    ctx = zmq.Context()
    socks = []
    try:
        def attacker(identity: bytes):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, identity)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(pool.broker.address)
            socks.append(s)
            return s

        forger = P.Codec(os.urandom(32), 1)
        evil = pickle.dumps(os.system)
        with caplog.at_level("WARNING", logger="scoop"):
            results = futures.map(_square, range(20_000))
            for n in range(30):
                s = attacker(b"x%d" % n)
                s.send_multipart([os.urandom(32), b"T", os.urandom(20), evil])
                s.send(os.urandom(n * 10 + 1))
                s.send_multipart(forger.encode(P.HELLO, body={"version": 1, "wid": 1}))
            # impersonate the real worker 1 (its routing id) with a wrong key
            imp = attacker(b"w1x")
            imp.send_multipart(forger.encode(P.TASKS, parcels=[forger.parcel([b"\0" * 8, evil])]))
            assert list(results) == [x * x for x in range(20_000)]
        warnings = [r for r in caplog.records if "failed authentication" in r.getMessage()
                    or "dropped a message" in r.getMessage()]
        assert warnings, "hostile messages were not reported"
        # 31 bad connections sent 91 messages: one line per connection, not per message
        assert len(warnings) <= 31
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    assert list(futures.map(_square, range(10))) == [x * x for x in range(10)]


def test_replayed_message_rejected():
    sender, receiver = P.Codec(KEY, 1), P.Codec(KEY, 0)
    first = sender.encode(P.READY, arg=1)
    second = sender.encode(P.READY, arg=2)
    assert receiver.decode(first, peer=b"w1").arg == 1
    assert receiver.decode(second, peer=b"w1").arg == 2
    with pytest.raises(P.AuthError, match="replayed"):
        receiver.decode(first, peer=b"w1")
    # a restarted sender starts above its old sequence numbers
    assert receiver.decode(P.Codec(KEY, 1).encode(P.READY), peer=b"w1").kind == P.READY


def test_replay_at_a_live_broker_is_dropped(pool, caplog):
    """A peer's captured message, sent again on a new connection under its identity."""
    codec = P.Codec(pool.key, 7)
    hello = codec.encode(P.HELLO, body={"version": P.VERSION, "wid": 7, "pid": 0,
                                        "host": "test"})
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, b"w7")
        s.setsockopt(zmq.LINGER, 0)
        s.connect(pool.broker.address)
        s.send_multipart(hello)
        assert s.poll(5000), "no WELCOME"
        assert P.Codec(pool.key, 0).decode(s.recv_multipart()).kind == P.WELCOME
        s.send_multipart(codec.encode(P.BYE))  # leave on purpose
        time.sleep(0.3)  # until the broker has let go of the identity "w7"
        s.close(0)
        time.sleep(0.3)
        with caplog.at_level("WARNING", logger="scoop"):
            again = ctx.socket(zmq.DEALER)
            again.setsockopt(zmq.IDENTITY, b"w7")
            again.setsockopt(zmq.LINGER, 0)
            again.connect(pool.broker.address)
            again.send_multipart(hello)  # the replay
            assert not again.poll(1000), "the broker answered a replayed HELLO"
            again.close(0)
        assert "replayed" in caplog.text
    finally:
        ctx.term()
    assert list(futures.map(_square, range(10))) == [x * x for x in range(10)]


def test_replay_window_is_per_connection_not_per_parcel_owner():
    receiver = P.Codec(KEY, 0)
    older, newer = P.Codec(KEY, 1), P.Codec(KEY, 2)  # older's clock-based seq is lower
    late = older.encode(P.RESULTS, parcels=[older.parcel([b"x"], peer=0)])
    early = newer.encode(P.RESULTS, parcels=[newer.parcel([b"y"], peer=0)])
    assert receiver.decode(early, peer=b"w2").parcels[0].peer == 0
    assert receiver.decode(late, peer=b"w1").parcels[0].peer == 0  # not a replay
