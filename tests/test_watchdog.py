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
        dog = _watchdog(ctx, period=0.05)
        dog.run = _recording(dog.run, errors)
        dog.start()
        ctx.term()  # returns once the watchdog has closed its socket
        dog.join(10)
        assert not dog.is_alive() and errors == []


def test_a_watchdog_stopped_by_its_worker_closing_the_context_ends_quietly():
    ctx = zmq.Context()
    errors: list[BaseException] = []
    dog = _watchdog(ctx, period=0.05)
    dog.run = _recording(dog.run, errors)
    dog.start()
    time.sleep(0.3)  # it is pinging (nobody answers)
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


def test_a_watchdog_that_cannot_connect_says_so_to_its_worker():
    with pytest.raises(zmq.ZMQError):  # at once, in the worker's thread
        Watchdog("nosuchtransport://x", Credentials.new(), 1)


def _recording(run, errors):
    def wrapped():
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever escaped
            errors.append(exc)
    return wrapped
