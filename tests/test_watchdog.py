"""The watchdog thread: it ends quietly when its worker leaves, and notices a broker gone.

A worker that leaves early (a missing ``-m`` module, say) ends the ZeroMQ context it
shares with its watchdog while the watchdog may still be starting; that used to print a
thread traceback into the job's stderr, or abort the process in libzmq.
"""

from __future__ import annotations

import socket
import time

import pytest
import zmq

from scoop._transport import Credentials
from scoop._watchdog import Watchdog

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watchdog(ctx: zmq.Context | None, on_lost=None, **kw) -> Watchdog:
    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    return Watchdog(address, Credentials.new(), 1, on_lost=on_lost, ctx=ctx, **kw)


def test_a_watchdog_whose_worker_ends_the_context_at_once_ends_quietly():
    """The worker may end the shared context at any point of the watchdog's start: the
    watchdog never makes a socket in that context from its own thread (one made while
    the context ends fails; one made just after aborts the process)."""
    for _ in range(50):
        ctx = zmq.Context()
        errors: list[BaseException] = []
        dog = _watchdog(ctx, period=0.05, first_ping=0)  # its socket made at once
        dog.run = _recording(dog.run, errors)
        dog.start()
        dog.retire()  # what the worker's close does first
        ctx.term()  # returns once the watchdog has closed its socket, if it made one
        dog.join(10)
        assert not dog.is_alive() and errors == []


def test_a_watchdog_stopped_by_its_worker_closing_the_context_ends_quietly():
    ctx = zmq.Context()
    errors: list[BaseException] = []
    dog = _watchdog(ctx, period=0.05, first_ping=0)
    dog.run = _recording(dog.run, errors)
    dog.start()
    time.sleep(0.3)  # it is pinging (nobody answers)
    dog.retire()
    ctx.term()  # what the worker's close does
    dog.join(10)
    assert not dog.is_alive() and errors == []


def test_a_watchdog_reports_a_silent_broker_after_its_timeout():
    lost: list[float] = []
    dog = _watchdog(None, on_lost=lost.append, timeout=0.5, period=0.1)
    started = time.monotonic()
    dog.start()
    dog.join(20)
    assert not dog.is_alive()
    assert len(lost) == 1 and lost[0] >= 0.5
    assert time.monotonic() - started >= 0.5


def test_a_watchdog_makes_no_socket_before_its_first_ping_is_due():
    """A short job's workers make no watchdog socket (nor handshake, nor PING): their
    close ends the watchdog at once."""
    ctx = zmq.Context()
    dog = _watchdog(ctx, period=0.05, first_ping=30)
    dog.start()
    time.sleep(0.2)
    assert dog.link is None
    dog.retire()
    dog.join(10)
    assert not dog.is_alive() and dog.link is None
    ctx.term()


def test_a_watchdog_pings_once_its_first_ping_is_due():
    ctx = zmq.Context()
    lost: list[float] = []
    dog = _watchdog(ctx, on_lost=lost.append, timeout=0.6, period=0.1, first_ping=0.2)
    dog.start()
    dog.join(20)  # nobody answers: the broker counts as gone
    assert dog.link is not None and len(lost) == 1 and lost[0] >= 0.6
    ctx.term()


def test_a_watchdog_that_cannot_connect_says_so_and_ends_its_worker(caplog):
    lost: list[float] = []
    dog = Watchdog("nosuchtransport://x", Credentials.new(), 1, on_lost=lost.append,
                   first_ping=0)
    dog.start()
    dog.join(20)
    assert len(lost) == 1 and "cannot reach the broker" in caplog.text


def _recording(run, errors):
    def wrapped():
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever escaped
            errors.append(exc)
    return wrapped
