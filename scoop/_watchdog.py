"""A worker's watchdog: a thread that ends the process when the broker is gone.

A worker on another host cannot rely on its parent or its ssh connection to learn that
the job is over (the launcher may be SIGKILLed, its host may vanish). Its hub cannot
check either while a long task runs. So every worker process runs this thread, with its
own socket (ZeroMQ sockets are not shared between threads): it sends a signed PING every
``PING_PERIOD_S`` and exits the process if no PONG has come for ``BROKER_TIMEOUT_S``.

Its socket lives in the worker link's ZeroMQ context (a context is thread-safe): one I/O
thread per worker, not two, and the worker's ``close`` ends the watchdog too (its wait
raises ``zmq.ContextTerminated``, then it closes its socket, which lets the context
end). ZeroMQ's I/O thread runs without the GIL, so a task that holds the interpreter
delays the watchdog as it did with a context of its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import zmq

from . import _protocol as P
from . import _reaper, _shm
from ._runtime.link import Link
from ._transport import Credentials

log = logging.getLogger("scoop")

# How often the watchdog asks: a small cost per worker per period.
PING_PERIOD_S = 1.0
# Silence after which the broker counts as gone: long enough to ride out a loaded machine
# or network hiccup, short enough that orphans vanish quickly.
BROKER_TIMEOUT_S = 10.0


class Watchdog(threading.Thread):
    """Pings the broker; calls ``on_lost`` (default: exit the process) when it is gone,
    and ``on_time_up`` (once) when the broker's PONG says the job's time is up (sent to
    the root only: the way a launcher stops a root on another host, see
    ``scoop._launch.walltime``)."""

    def __init__(self, address: str, creds: Credentials, wid: int, on_lost=None,
                 timeout: float = BROKER_TIMEOUT_S, period: float = PING_PERIOD_S,
                 ctx: zmq.Context | None = None, on_time_up=None) -> None:
        super().__init__(name="scoop-watchdog", daemon=True)
        self.address = address
        self.wid = wid
        self.timeout = timeout
        self.period = period
        self.on_lost = on_lost or self._exit
        self.on_time_up = on_time_up
        self._stop_event = threading.Event()
        # The socket is made here, in the worker's thread, not in run(): the thread then
        # never touches the shared context itself, which the worker may be ending at any
        # moment (a socket made while zmq_ctx_term runs fails, and one made just after it
        # returns is a use of freed memory that aborts the process).
        self.link = Link(address, creds, wid, role=b"h", ctx=ctx)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        heard = time.monotonic()
        try:
            while not self._stop_event.is_set():
                for msg in self.link.request(P.PING, self.period):
                    if msg.kind == P.PONG:
                        heard = time.monotonic()
                        if msg.body and msg.body.get("time_up") and self.on_time_up:
                            self.on_time_up()
                            self.on_time_up = None  # once
                    # then keep listening until the period is over: one PING per period
                if time.monotonic() - heard > self.timeout:
                    self.on_lost(time.monotonic() - heard)
                    return
        except zmq.ContextTerminated:
            pass  # the worker ended the shared context: it is leaving, and so is this thread
        finally:
            self.link.close(0)

    def _exit(self, silence: float) -> None:
        log.error("worker %d: the broker at %s has not answered for %.0f s; the job is gone, "
                  "exiting", self.wid, self.address, silence)
        _reaper.end_marked(_reaper.WORKER, os.environ.get(_reaper.WORKER, ""), grace=0.5)
        _shm.sweep_own(os.environ.get(_reaper.JOB))  # no launcher is left to sweep them
        os._exit(1)

