"""The watchdog thread: it ends quietly when its worker leaves, and notices a broker gone.

A worker that leaves early (a missing ``-m`` module, say) ends the ZeroMQ context it
shares with its watchdog while the watchdog may still be starting; that used to print a
thread traceback into the job's stderr.
"""

from __future__ import annotations

import socket
import threading
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


def test_a_watchdog_whose_worker_has_closed_the_context_ends_quietly():
    ctx = zmq.Context()
    ctx.term()
    _watchdog(ctx).run()  # returns, raises nothing


def test_a_watchdog_starting_while_the_context_is_ending_ends_quietly():
    ctx = zmq.Context()
    held = ctx.socket(zmq.PAIR)  # keeps term() waiting, as the worker's own socket would
    ending = threading.Thread(target=ctx.term)
    ending.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # term() has begun once new sockets are refused
        try:
            ctx.socket(zmq.PAIR).close(0)
        except zmq.ZMQError:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the context never began to end")
    try:
        _watchdog(ctx).run()
    finally:
        held.close(0)
        ending.join(10)
    assert not ending.is_alive()


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


def test_a_real_error_of_its_own_context_is_not_swallowed():
    dog = Watchdog("nosuchtransport://x", Credentials.new(), 1)
    with pytest.raises(zmq.ZMQError):
        dog.run()


def _recording(run, errors):
    def wrapped():
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever escaped
            errors.append(exc)
    return wrapped
