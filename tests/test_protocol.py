"""The wire format: signing, tampering, fuzzing, and hostile traffic at a live broker."""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
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
    env = bytearray(frames[0])  # sig, kind, then the header
    env[P.SIG_SIZE + 1 + 12] ^= 1
    frames[0] = bytes(env)
    with pytest.raises(P.AuthError):
        P.Codec(KEY, 0).decode(frames)


def test_tampered_parcel_caught_before_unpickling():
    codec = P.Codec(KEY, 1)
    parcel = codec.parcel(_serialize.dumps([1, 2, 3]))
    evil = pickle.dumps(os.system)  # a pickle that would run code
    frames = codec.encode(P.CONST, parcels=[parcel])
    frames[1] = evil  # the parcel's first frame, after the envelope
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


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=200), st.lists(st.binary(max_size=300), max_size=5))
def test_prepared_hmac_is_hmac_sha256(key, parts):
    """Codec's HMAC (the key's pads hashed once) gives the standard library's bytes, for
    keys shorter and longer than SHA-256's block."""
    import hmac

    assert P.Hmac(key).digest(*parts) == hmac.digest(key, b"".join(parts), "sha256")


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
    data = bytearray(frames[0])  # the envelope: sig, kind, header
    data[pos % len(data)] ^= mask  # a real change: mask is never 0
    frames[0] = bytes(data)
    with pytest.raises(P.AuthError):
        codec.decode(frames)


def _square(x):
    return x * x


def _plain_client(ctx, identity: bytes, address: str, password: bytes | None):
    """A DEALER with PLAIN credentials (None: none at all, the NULL mechanism)."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 0)
    if password is not None:
        s.plain_username = b"scoop"
        s.plain_password = password
    s.connect(address)
    return s


def test_hostile_traffic_at_the_broker_port_changes_nothing(pool, caplog):
    """While the job computes: connections without credentials, with wrong credentials,
    and with the handshake token but not the job key (someone who read it off the
    network) send garbage, forged, wrong-key and impersonating messages. Results stay
    intact, nothing is unpickled, and each bad peer is logged once."""
    ctx = zmq.Context()
    socks = []
    address = pool.broker.address
    try:
        forger = P.Codec(os.urandom(32), 1)
        evil = pickle.dumps(os.system)

        def attack(s):
            socks.append(s)
            for frames in ([os.urandom(32), b"T", os.urandom(20), evil],
                           [os.urandom(len(socks) * 10 + 1)],
                           forger.encode(P.HELLO, body={"version": P.VERSION, "wid": 1})):
                try:  # a refused connection leaves the socket no peer: a send would block
                    s.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    pass

        with caplog.at_level("WARNING", logger="scoop"):
            results = futures.map(_square, range(20_000))
            for n in range(10):
                attack(_plain_client(ctx, b"x%d" % n, address, None))
                attack(_plain_client(ctx, b"y%d" % n, address, os.urandom(8).hex().encode()))
                attack(_plain_client(ctx, b"z%d" % n, address, pool.creds.token))
            # impersonate the real worker 1 (its routing id) with the token, not the key
            imp = _plain_client(ctx, b"w1", address, pool.creds.token)
            socks.append(imp)
            imp.send_multipart(forger.encode(P.TASKS, parcels=[forger.parcel([b"\0" * 8, evil])]))
            with socket.create_connection(address[6:].rsplit(":", 1)) as raw:
                raw.sendall(os.urandom(4096))  # not even ZeroMQ
            assert list(results) == [x * x for x in range(20_000)]
            time.sleep(0.5)  # let the last refusals reach the log
        lines = [r.getMessage() for r in caplog.records]
        refused = [m for m in lines if "refused" in m]
        dropped = [m for m in lines if "dropped a message" in m]
        assert refused, "connections without the job's credentials were not reported"
        assert dropped, "messages with the token but a wrong key were not reported"
        # 32 bad connections sent 90+ messages: at most one line per peer (one for those
        # that failed the handshake, one per address for wrong credentials, one per
        # connection that passed it)
        assert len(refused) <= 2 and len(dropped) <= 11
    finally:
        for s in socks:
            s.close(0)
        ctx.destroy(linger=0)
    assert list(futures.map(_square, range(10))) == [x * x for x in range(10)]


def test_a_frame_over_the_limit_is_cut_off_before_it_is_read(pool):
    """Even a peer with the handshake token is disconnected by ZeroMQ when it announces
    a frame longer than MAX_FRAME_BYTES; the job goes on."""
    ctx = zmq.Context()
    try:
        s = _plain_client(ctx, b"big", pool.broker.address, pool.creds.token)
        mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        big = bytearray(P.MAX_FRAME_BYTES + 1)
        s.send_multipart([os.urandom(32), P.TASKS, big], copy=False)
        assert mon.poll(10_000), "the broker kept a connection that sent a frame over the limit"
        from zmq.utils.monitor import recv_monitor_message
        assert recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED
        s.disable_monitor()
        mon.close(0)
        s.close(0)
    finally:
        ctx.destroy(linger=0)
    assert list(futures.map(_square, range(10))) == [x * x for x in range(10)]


def test_big_frames_travel_split_and_are_joined():
    sender = P.Codec(KEY, 1, max_frame=100)
    broker, receiver = P.Codec(KEY, 2, max_frame=100), P.Codec(KEY, 3)
    big, small = os.urandom(950), b"tids"
    frames = sender.encode(P.TASKS, parcels=[sender.parcel([small, big, big[:100]], tag=4)])
    # the envelope (at most MAX_HEADER_BYTES after sig and kind) is never split
    assert max(len(f) for f in frames[1:]) <= 100 and len(frames) == 1 + 1 + 10 + 1
    routed = broker.decode(frames, peer=b"w1", join=False)  # kept in pieces, forwarded
    assert isinstance(routed.parcels[0].frames[1], P.Pieces)
    broker.check(routed.parcels[0])
    msg = receiver.decode(broker.encode(P.TASKS, parcels=routed.parcels), peer=b"b")
    (got,) = msg.parcels
    receiver.check(got)
    assert [bytes(f) for f in got.frames] == [small, big, big[:100]]


def test_a_live_broker_forwards_every_frame_of_a_message():
    """The broker reads and writes frames one by one (not with pyzmq's multipart
    helpers): empty frames, pieces of split ones and many frames per message cross it
    intact, in order, to the right peer."""
    with _live_broker(max_frame=64) as (creds, broker, ctx, (c1, s1), (c2, s2)):
        payload = [b"", os.urandom(64 * 5 + 3), b"x", b""]  # the big one goes in 6 pieces
        s1.send_multipart(c1.encode(P.CONST, parcels=[c1.parcel(payload)]))
        s1.send_multipart(c1.encode(P.RESULTS, parcels=[c1.parcel(payload[::-1], peer=2)]))
        for kind, want in ((P.CONST, payload), (P.RESULTS, payload[::-1])):
            assert s2.poll(5000), f"no {kind!r}"
            msg = c2.decode(s2.recv_multipart(), peer="b")
            assert msg.kind == kind
            (parcel,) = msg.parcels
            c2.check(parcel)
            assert [bytes(f) for f in parcel.frames] == want
    assert broker.finished.is_set()


def test_the_broker_never_blocks_on_a_peer_that_does_not_read():
    """Results pile up for an owner that reads nothing (a root busy in its program):
    the broker queues them and goes on serving the others (with ZeroMQ's default send
    limit it blocked, and a root shipping work meanwhile deadlocked the job)."""
    with _live_broker(rcvhwm=1) as (creds, broker, ctx, (c1, s1), (c2, s2)):
        n, blob = 3000, os.urandom(16 * 1024)  # far more than ZeroMQ's queue and TCP's
        parcel = c2.parcel([blob], peer=1)
        for _ in range(n):
            s2.send_multipart(c2.encode(P.RESULTS, parcels=[parcel]))
        watch = creds.connect(ctx, P.routing_id(b"h", 2), broker.address)
        watch.send_multipart(c2.encode(P.PING))
        assert watch.poll(20_000), "the broker stopped answering while worker 1 read nothing"
        assert c2.decode(watch.recv_multipart()).kind == P.PONG
        for i in range(n):  # and worker 1 gets every result once it reads
            assert s1.poll(20_000), f"result {i} of {n} never came"
            assert c1.decode(s1.recv_multipart(), peer="b").kind == P.RESULTS


@contextlib.contextmanager
def _live_broker(max_frame: int = P.MAX_FRAME_BYTES, rcvhwm: int = 1000):
    """A broker in a thread and workers 1 and 2 joined to it: (creds, broker, context,
    (codec, socket) of worker 1, of worker 2); all closed at the end."""
    from scoop._broker import Broker
    from scoop._transport import Credentials

    creds = Credentials.new()
    broker = Broker(creds, size=3).start()
    ctx = zmq.Context()
    try:
        peers = []
        for wid in (1, 2):
            codec = P.Codec(creds.key, wid, max_frame=max_frame)
            sock = creds.connect(ctx, P.routing_id(b"w", wid), broker.address)
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
            sock.send_multipart(codec.encode(P.HELLO, body={"version": P.VERSION,
                                                            "wid": wid}))
            assert sock.poll(5000), "no WELCOME"
            assert codec.decode(sock.recv_multipart(), peer="b").kind == P.WELCOME
            peers.append((codec, sock))
        yield (creds, broker, ctx, *peers)
    finally:
        ctx.destroy(linger=0)
        broker.stop()


def test_a_bad_split_record_is_rejected():
    codec = P.Codec(KEY, 1, max_frame=10)
    frames = codec.encode(P.TASKS, parcels=[codec.parcel([os.urandom(35)], tag=1)])
    with pytest.raises(P.AuthError, match="frame count"):
        P.Codec(KEY, 0).decode(frames[:-1])


def test_large_arguments_cross_a_live_job_in_pieces(pool):
    data = bytearray(os.urandom(1024)) * (P.MAX_FRAME_BYTES // 1024 * 2 + 3)
    assert futures.submit(_digest, data).result() == _digest(data)


def _digest(data) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


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
        s = pool.creds.connect(ctx, b"w7", pool.broker.address)
        s.send_multipart(hello)
        assert s.poll(5000), "no WELCOME"
        assert P.Codec(pool.key, 0).decode(s.recv_multipart()).kind == P.WELCOME
        s.send_multipart(codec.encode(P.BYE))  # leave on purpose
        time.sleep(0.3)  # until the broker has let go of the identity "w7"
        s.close(0)
        time.sleep(0.3)
        with caplog.at_level("WARNING", logger="scoop"):
            again = pool.creds.connect(ctx, b"w7", pool.broker.address)
            again.send_multipart(hello)  # the replay
            assert not again.poll(1000), "the broker answered a replayed HELLO"
            again.close(0)
        assert "replayed" in caplog.text
    finally:
        ctx.destroy(linger=0)
    assert list(futures.map(_square, range(10))) == [x * x for x in range(10)]


def test_replay_window_is_per_connection_not_per_parcel_owner():
    receiver = P.Codec(KEY, 0)
    older, newer = P.Codec(KEY, 1), P.Codec(KEY, 2)  # older's clock-based seq is lower
    late = older.encode(P.RESULTS, parcels=[older.parcel([b"x"], peer=0)])
    early = newer.encode(P.RESULTS, parcels=[newer.parcel([b"y"], peer=0)])
    assert receiver.decode(early, peer=b"w2").parcels[0].peer == 0
    assert receiver.decode(late, peer=b"w1").parcels[0].peer == 0  # not a replay


def test_a_signed_message_in_another_layout_names_a_version_mismatch():
    """What a worker of the same job running an older scoop sends (version 1 header, in
    the three envelope frames of versions 1 to 4)."""
    import hmac
    import struct

    hdr = struct.pack("<QIIII", time.time_ns(), 1, 0, 0, 0)
    frames = [hmac.digest(KEY, P.HELLO + hdr, "sha256"), P.HELLO, hdr]
    with pytest.raises(P.AuthError, match="same scoop version"):
        P.Codec(KEY, 0).decode(frames)


def test_joiners_do_not_share_a_replay_window():
    """Two workers asking for an id at once: the one whose clock is behind is no replay."""
    a, b = P.routing_id(b"j", 0), P.routing_id(b"j", 0)
    assert P.peer_name(a) != P.peer_name(b)
    assert P.peer_name(P.routing_id(b"w", 3)) == b"w3"
    receiver = P.Codec(KEY, 0)
    behind, ahead = P.Codec(KEY, P.ANY_WORKER), P.Codec(KEY, P.ANY_WORKER)
    first = ahead.encode(P.JOIN)
    late = behind.encode(P.JOIN)  # made after, but its clock-based seq is lower
    receiver.decode(first, peer=P.peer_name(a))
    assert receiver.decode(late, peer=P.peer_name(b)).kind == P.JOIN
