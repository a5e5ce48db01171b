"""A worker's watchdog: a thread that ends the process when the broker is gone.

A worker on another host cannot rely on its parent or its ssh connection to learn that
the job is over (the launcher may be SIGKILLed, its host may vanish). Its hub cannot
check either while a long task runs. So every worker process runs this thread, with its
own socket (ZeroMQ sockets are not shared between threads): it sends a signed PING every
``PING_PERIOD_S`` and exits the process if no PONG has come for ``BROKER_TIMEOUT_S``.

It also speaks for a worker that leaves (SIGTERM, :meth:`Watchdog.leave`) while its
hub cannot, a task running: LEAVE at once (the broker sends it no more work), and, if
the task still runs when the grace is over, LEAVE "gone" (the task runs again elsewhere,
uncharged) and the process exits 0.

Its socket lives in the worker link's ZeroMQ context (a context is thread-safe): one I/O
thread per worker, not two, and the worker's ``close`` ends the watchdog too (its wait
raises ``zmq.ContextTerminated``). ZeroMQ's I/O thread runs without the GIL, so a task
that holds the interpreter delays the watchdog as it did with a context of its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import zmq

from . import _protocol as P
from . import _reaper
from ._runtime.link import Link
from ._transport import Credentials

log = logging.getLogger("scoop")

# How often the watchdog asks: a small cost per worker per period.
PING_PERIOD_S = 1.0
# Silence after which the broker counts as gone: long enough to ride out a loaded machine
# or network hiccup, short enough that orphans vanish quickly.
BROKER_TIMEOUT_S = 10.0
# How long a worker that leaves (SIGTERM) lets its running task finish before it goes
# anyway (the task then runs again elsewhere): within the notice a preemption gives
# (SLURM's GraceTime, a cloud's spot notice, Kubernetes' 30 s), long enough for most
# tasks. SCOOP_LEAVE_GRACE (seconds) overrides it.
LEAVE_GRACE_S = 20.0


class Watchdog(threading.Thread):
    """Pings the broker; calls ``on_lost`` (default: exit the process) when it is gone."""

    def __init__(self, address: str, creds: Credentials, wid: int, on_lost=None,
                 timeout: float = BROKER_TIMEOUT_S, period: float = PING_PERIOD_S,
                 ctx: zmq.Context | None = None) -> None:
        super().__init__(name="scoop-watchdog", daemon=True)
        self.ctx = ctx  # the worker link's (None: one of its own)
        self.address = address
        self.creds = creds
        self.wid = wid
        self.timeout = timeout
        self.period = period
        self.on_lost = on_lost or self._exit
        self._stop_event = threading.Event()
        self._leave_by: float | None = None  # leaving: when to go, task or not
        self._told = False  # the broker knows it leaves
        self.leave_grace = leave_grace()

    def stop(self) -> None:
        self._stop_event.set()

    def leave(self) -> None:
        """The worker leaves (from a signal handler: sets a time, nothing more)."""
        self._leave_by = time.monotonic() + self.leave_grace

    def run(self) -> None:
        try:
            self._watch()
        except zmq.ZMQError as exc:
            # The worker closed the shared context first (it is leaving: a missing module,
            # the end of the job): depending on where the watchdog was, that surfaces as
            # ContextTerminated or as another error of a socket or context being shut.
            if not self._leaving(exc):
                raise

    def _leaving(self, exc: zmq.ZMQError) -> bool:
        # Probing a context with a new socket while another thread ends it can abort the
        # process in libzmq ("Invalid argument (src/mutex.hpp:125)", seen 8 runs in 90
        # of a two-worker job): the worker stops the watchdog before it ends the context,
        # and ETERM says so by itself.
        if self._stop_event.is_set() or isinstance(exc, zmq.ContextTerminated):
            return True
        return self.ctx is not None and (self.ctx.closed or _terminating(self.ctx))

    def _watch(self) -> None:
        link = Link(self.address, self.creds, self.wid, role=b"h", ctx=self.ctx)
        heard = time.monotonic()
        try:
            while not self._stop_event.is_set():
                if self._leave_by is not None:
                    self._speak_for_leaving(link)
                for msg in link.request(P.PING, self.period):
                    if msg.kind == P.PONG:
                        heard = time.monotonic()
                    # then keep listening until the period is over: one PING per period
                if time.monotonic() - heard > self.timeout:
                    self.on_lost(time.monotonic() - heard)
                    return
        finally:
            link.close(0)

    def _speak_for_leaving(self, link: Link) -> None:
        if not self._told:
            self._told = True
            link.send(P.LEAVE, arg=0)
        elif time.monotonic() >= self._leave_by:
            log.warning("worker %d: its task still runs at the end of its grace to leave; "
                        "it leaves anyway (the task runs again elsewhere)", self.wid)
            link.send(P.LEAVE, arg=1)
            link.close(1000)  # the message leaves before the process does
            _reaper.end_marked(_reaper.WORKER, os.environ.get(_reaper.WORKER, ""), grace=0.5)
            os._exit(0)

    def _exit(self, silence: float) -> None:
        log.error("worker %d: the broker at %s has not answered for %.0f s; the job is gone, "
                  "exiting", self.wid, self.address, silence)
        _reaper.end_marked(_reaper.WORKER, os.environ.get(_reaper.WORKER, ""), grace=0.5)
        os._exit(1)


def leave_grace() -> float:
    """SCOOP_LEAVE_GRACE (seconds), else :data:`LEAVE_GRACE_S`."""
    text = os.environ.get("SCOOP_LEAVE_GRACE", "")
    try:
        return max(0.0, float(text)) if text else LEAVE_GRACE_S
    except ValueError:
        log.warning("SCOOP_LEAVE_GRACE=%r is not a number of seconds; using %g", text,
                    LEAVE_GRACE_S)
        return LEAVE_GRACE_S


def _terminating(ctx: zmq.Context) -> bool:
    """Whether ``ctx`` is being ended (its ``term`` has begun but not returned)."""
    try:
        ctx.socket(zmq.PAIR).close(0)
    except zmq.ZMQError:
        return True
    return False
