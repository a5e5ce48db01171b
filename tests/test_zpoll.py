"""Waiting on ZeroMQ sockets by their descriptors (scoop/_zpoll.py, ``Link._readable``):
no message is missed, whichever socket it comes to and whatever was done with the socket
before the wait (issue 12). Real sockets over TCP loopback and inproc; deadlines are
generous, no timing is asserted."""

from __future__ import annotations

import threading

import pytest
import zmq

from scoop import _protocol as P
from scoop._runtime.link import Link
from scoop._transport import Credentials, share_inproc
from scoop._zpoll import Waiter, readable

pytestmark = pytest.mark.timeout(60)

LONG_MS = 20_000  # a wait that a missed wakeup would run out (the test then fails)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _pair(ctx: zmq.Context, address: str) -> tuple[zmq.Socket, zmq.Socket]:
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    if address.startswith("tcp"):
        port = server.bind_to_random_port(address)
        client.connect(f"{address}:{port}")
    else:
        server.bind(address)
        client.connect(address)
    return server, client


@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "inproc://zpoll-test"])
def test_waiter_names_the_socket_a_message_came_to(ctx, address):
    server, client = _pair(ctx, address)
    quiet = ctx.socket(zmq.PULL)
    quiet.bind("inproc://zpoll-quiet")
    waiter = Waiter([quiet, server])
    for i in range(20):  # each message after the last was read to the end
        later = threading.Timer(0.01, client.send, (b"%d" % i,))
        later.start()
        ready = waiter.wait(LONG_MS, check=(server,))
        later.join()
        # woken by another command of the socket's (a TCP connection's, under load):
        # named, it holds nothing yet, and the next wait sleeps until the message
        while server not in ready or not readable(server):
            ready = waiter.wait(LONG_MS, check=(server,))
        assert server.recv_multipart(zmq.NOBLOCK)[1] == b"%d" % i
        assert not readable(server)


def test_a_send_between_two_waits_loses_no_wakeup(ctx):
    """A send may take the command that would have woken the poll: the socket named in
    ``check`` is asked first, so a message that came meanwhile is still seen."""
    server, client = _pair(ctx, "tcp://127.0.0.1")
    client.send(b"hello")
    ident, _ = server.recv_multipart()
    waiter = Waiter([server])
    for i in range(50):
        client.send(b"%d" % i)
        server.send_multipart([ident, b"reply"])  # may process the arrival's command
        assert server in waiter.wait(LONG_MS, check=(server,))
        assert server.recv_multipart()[1] == b"%d" % i
        assert client.recv() == b"reply"


def test_a_timed_out_wait_names_every_socket(ctx):
    one, other = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)  # no peer: no command comes
    one.bind("inproc://zpoll-one")
    other.bind("inproc://zpoll-other")
    assert not readable(one) and not readable(other)  # takes the commands of the binds
    waiter = Waiter([one, other])
    assert waiter.wait(10) == [one, other]
    assert waiter.wait(10, again=[other]) == [other]  # again: no sleep, that one named


def test_a_socket_added_for_a_while_is_waited_on_then_left_alone(ctx):
    """Broker.host's socket: in the broker's waiter only while the host is inside."""
    server, client = _pair(ctx, "inproc://zpoll-added")
    quiet = ctx.socket(zmq.PULL)
    quiet.bind("inproc://zpoll-quiet-2")
    waiter = Waiter([quiet])
    waiter.add(server, server.getsockopt(zmq.FD))
    later = threading.Timer(0.01, client.send, (b"x",))
    later.start()
    ready = waiter.wait(LONG_MS, check=(server,))
    later.join()
    while server not in ready:
        ready = waiter.wait(LONG_MS, check=(server,))
    assert server.recv_multipart(zmq.NOBLOCK)[1] == b"x"
    waiter.remove(server.getsockopt(zmq.FD))
    client.send(b"y")  # fires its descriptor: the waiter no longer looks at it
    assert waiter.wait(10) == [quiet]
    assert server.recv_multipart()[1] == b"y"


def test_link_waits_for_a_message_and_times_out_without_one(ctx):
    creds = Credentials.new()
    router = ctx.socket(zmq.ROUTER)
    address = "inproc://zpoll-link"
    router.bind(address)
    share_inproc(address, ctx)
    link = Link(address, creds, 3)
    try:
        assert list(link.drain(10)) == []  # nothing came: the wait ends at its timeout
        link.send(P.READY, arg=1)
        ident = router.recv_multipart()[0]
        codec = P.Codec(creds.key, 0xFFFFFFFF)
        later = threading.Timer(0.05, router.send_multipart, ([ident, *codec.encode(P.STOP)],))
        later.start()
        got = list(link.drain(LONG_MS))
        later.join()
        assert [m.kind for m in got] == [P.STOP]
    finally:
        link.close(0)
        share_inproc(address, None)
