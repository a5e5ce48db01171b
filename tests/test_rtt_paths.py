"""The round trip's short cuts (issue 12): the in-process root reaches the broker through
the broker's own context (inproc://), and a task greenlet whose task ended runs the next
task."""

from __future__ import annotations

import os

import pytest
import zmq
from greenlet import getcurrent

from scoop import futures
from scoop._runtime.link import Link
from scoop._runtime.worker import Worker
from scoop._transport import Credentials

pytestmark = pytest.mark.timeout(60)


@pytest.mark.usefixtures("pool")
def test_in_process_root_reaches_the_broker_in_process(pool):
    link = pool.root_worker.link
    assert link.sock.get(zmq.LAST_ENDPOINT).startswith(b"inproc://")
    assert link.ctx is pool.broker.ctx
    # a timed wait runs nothing on the root: the call crosses to the other worker and back
    f = futures.submit(os.getpid)
    futures.wait([f], timeout=30)
    assert f.result() != os.getpid()
    # the workers' own connections still go through the handshake and TCP
    assert pool.broker.address.startswith("tcp://")


def test_an_unknown_inproc_address_is_refused():
    with pytest.raises(ValueError, match="no broker of this process listens at"):
        Link("inproc://scoop-router-nowhere", Credentials.new(), 1)


def test_task_greenlets_are_kept_for_the_next_task():
    w = Worker(0)  # in-process: no broker, the hub runs everything here
    ran_on = []

    def leaf(i):
        ran_on.append(getcurrent())  # kept alive: distinct greenlets keep distinct ids
        return i

    def parent(i):  # parks until its children are done; other tasks run meanwhile
        kids = [w.submit(leaf, (10 * i + k,), {}) for k in range(3)]
        w.wait_many(kids, len(kids), False, None)
        return sum(k.result() for k in kids)

    futs = [w.submit(parent, (i,), {}) for i in range(1, 4)]
    futs += [w.submit(leaf, (i,), {}) for i in range(5)]
    w.wait_many(futs, len(futs), False, None)
    assert [f.result() for f in futs] == [33, 63, 93, 0, 1, 2, 3, 4]
    assert len(ran_on) == 14
    assert len({id(g) for g in ran_on}) < len(ran_on)  # greenlets were reused


def test_a_timed_wait_that_ends_early_leaves_no_timer():
    w = Worker(0)  # in-process, the job's only worker: it runs tasks while it waits
    for i in range(50):
        f = w.submit(abs, (-i,), {})
        w.wait_many([f], 1, False, 60.0)
        assert f.result() == i
    assert w.hub.timers == []  # each kept its waiter and future alive for 60 s before


def test_one_parcel_messages_decode_as_the_general_layout():
    """The one-parcel short cut of encode/decode reads and writes the same header as the
    general path: every other layout beside it still decodes."""
    from scoop import _protocol as P

    key = os.urandom(32)
    tx, rx = P.Codec(key, 3), P.Codec(key, 0)
    frames = [zmq.Frame(b"ids"), zmq.Frame(b"pickle")]
    one = tx.parcel(frames, tag=7, peer=2)
    for parcels, done, body in (([one], (), None), ([one], [(1, 9)], None),
                                ([one, one], (), None), ((), (), {"a": 1}),
                                ([one], (), {"b": 2})):
        wire = [zmq.Frame(bytes(f)) for f in tx.encode(P.RESULTS, 5, parcels, done, body)]
        msg = rx.decode(wire, peer="w3")
        assert (msg.kind, msg.sender, msg.arg, msg.done, msg.body) == (
            P.RESULTS, 3, 5, [tuple(d) for d in done], body)
        assert [(p.tag, p.peer, p.mac) for p in msg.parcels] == [(7, 2, one.mac)] * len(parcels)
        assert all(rx.valid(p) for p in msg.parcels)
        assert [bytes(f) for p in msg.parcels for f in p.frames] == (
            [b"ids", b"pickle"] * len(parcels))
    with pytest.raises(P.AuthError, match="replayed"):
        rx.decode(wire, peer="w3")
    # a frame missing from a one-parcel message is refused, as before
    wire = tx.encode(P.TASKS, parcels=[one])
    with pytest.raises(P.AuthError, match="frame count"):
        rx.decode(wire[:-1])


def test_a_rebound_function_name_is_sent_by_value(tmp_path, monkeypatch):
    """cloudpickle's "by reference" verdict is remembered per function only while the
    function's name still finds it in its module: once rebound, it travels by value (as
    cloudpickle decides), and a module registered by value is honoured at once."""
    import pickle
    import sys

    import cloudpickle

    from scoop import _serialize

    (tmp_path / "rebind_mod.py").write_text("def f(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import rebind_mod

    f = rebind_mod.f
    assert b"rebind_mod" in _serialize.dumps(f)[0]
    assert _serialize.loads(_serialize.dumps(f)) is f  # by reference (remembered now)
    rebind_mod.f = lambda x: x
    frames = _serialize.dumps(f)  # its name finds another object: by value
    g = pickle.loads(frames[0])
    assert g is not f and g(1) == 2
    rebind_mod.f = f
    assert _serialize.loads(_serialize.dumps(f)) is f
    cloudpickle.register_pickle_by_value(rebind_mod)
    try:
        g = _serialize.loads(_serialize.dumps(f))
        assert g is not f and g(2) == 3
    finally:
        cloudpickle.unregister_pickle_by_value(rebind_mod)
        sys.modules.pop("rebind_mod", None)


def test_a_pickler_kept_per_thread_pickles_each_object_alone():
    """dumps reuses its thread's pickler: nothing of one pickle (memo, buffers) leaks
    into the next, a failed pickle leaves it usable, and a dumps from inside a pickle
    (a reducer's) gets a pickler of its own."""
    import pickle
    import threading

    from scoop import _serialize

    shared = ["x" * 100]
    a = _serialize.dumps([shared, shared])
    b = _serialize.dumps(shared)
    assert _serialize.loads(a) == [shared, shared] and _serialize.loads(b) == shared
    with pytest.raises(TypeError):
        _serialize.dumps([1, threading.Lock()])
    assert _serialize.loads(_serialize.dumps([1, 2])) == [1, 2]
    big = bytearray(_serialize.OOB_MIN)
    frames = _serialize.dumps([pickle.PickleBuffer(big), 3])
    assert len(frames) == 2 and _serialize.loads(frames) == [big, 3]
    assert len(_serialize.dumps([4])) == 1  # the last one's buffers are gone
    long = list(range(_serialize.KEEP_BYTES))  # a pickle larger than the kept buffer
    frames = _serialize.dumps(long)
    assert _serialize.loads(_serialize.dumps([8])) == [8]
    assert _serialize.loads(frames) == long  # its view is its own, not the next one's

    class Nested:
        def __reduce__(self):
            return _serialize.loads, (_serialize.dumps([5]),)

    assert _serialize.loads(_serialize.dumps([Nested(), 6])) == [[5], 6]
    out = []
    t = threading.Thread(target=lambda: out.append(_serialize.loads(_serialize.dumps([7]))))
    t.start()
    t.join(30)
    assert out == [[7]]
