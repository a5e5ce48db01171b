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

