"""A worker's watchdog: a thread that ends the process when the broker is gone, or when
a task runs past its time limit.

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
raises ``zmq.ContextTerminated``, then it closes its socket, which lets the context
end). ZeroMQ's I/O thread runs without the GIL, so a task that holds the interpreter
delays the watchdog as it did with a context of its own.

*A late socket.* The socket is made when the first PING is due, ``FIRST_PING_S`` after the
start (at once to speak for a worker that leaves or whose task timed out): a short job's
workers make none, so no handshake, no check by the broker's Gate, no PING, and the
worker's close does not wait for the watchdog to close one. The broker counts a worker's
silence from its HELLO (``scoop._schedule.Roster.silent``), so a worker that dies before
its first PING is still found.

*Time limits* (``scoop._limits``): the watchdog also wakes at the earliest deadline of
the limited calls running here. Past one, it tells the broker (TIMEOUT, on its own
socket: the hub's is busy with the task), waits for the broker's STOP (the broker has
failed that task and taken back this worker's other work), ends what the tasks started,
and ends the process.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import zmq

from . import _protocol as P
from . import _reaper, _shm
from ._errors import BrokenJobError
from ._limits import Deadlines
from ._runtime.link import Link, open_link
from ._transport import Credentials

log = logging.getLogger("scoop")

# How often the watchdog asks: a small cost per worker per period.
PING_PERIOD_S = 1.0
# When the first PING goes (s after the start): a job shorter than this makes no watchdog
# socket at all. Well within the broker's WORKER_SILENCE_S (5 s, counted from the HELLO).
FIRST_PING_S = 2.0
# Silence after which the broker counts as gone: long enough to ride out a loaded machine
# or network hiccup, short enough that orphans vanish quickly.
BROKER_TIMEOUT_S = 10.0
# How often the watchdog looks at the deadlines of the limited calls (s): a call is ended
# this late at most past its limit, on an idle machine; each look is a wakeup of the
# thread (a poll and a lock), nothing sent.
DEADLINE_POLL_S = 0.1
# How long a worker whose task timed out waits for the broker's answer before it ends
# anyway: the broker answers at once unless it is gone (then its work is lost anyway).
TIMEOUT_ACK_S = 5.0
# The exit status of a worker ended because a task ran past its time limit.
EXIT_TASK_TIMEOUT = 3
# How long a worker that leaves (SIGTERM) lets its running task finish before it goes
# anyway (the task then runs again elsewhere): within the notice a preemption gives
# (SLURM's GraceTime, a cloud's spot notice, Kubernetes' 30 s), long enough for most
# tasks. SCOOP_LEAVE_GRACE (seconds) overrides it.
LEAVE_GRACE_S = 20.0



class Watchdog(threading.Thread):
    """Pings the broker; calls ``on_lost`` (default: exit the process) when it is gone,
    and ``on_time_up`` (once) when the broker's PONG says the job's time is up (sent to
    the root only: the way a launcher stops a root on another host, see
    ``scoop._launch.walltime``)."""

    def __init__(self, address: str, creds: Credentials, wid: int, on_lost=None,
                 timeout: float = BROKER_TIMEOUT_S, period: float = PING_PERIOD_S,
                 ctx: zmq.Context | None = None, on_time_up=None,
                 deadlines: Deadlines | None = None, first_ping: float = FIRST_PING_S) -> None:
        super().__init__(name="scoop-watchdog", daemon=True)
        self.address = address
        self.creds = creds
        self.ctx = ctx
        self.first_ping = first_ping
        self.wid = wid
        self.timeout = timeout
        self.period = period
        self.on_lost = on_lost or self._exit
        self.on_time_up = on_time_up
        self.deadlines = deadlines  # of the worker's limited calls (None: none)
        self._stop_event = threading.Event()
        self._leave_by: float | None = None  # leaving: when to go, task or not
        self._leave_said = False  # the broker knows it leaves
        self.leave_grace = leave_grace()
        # The socket is made by the thread, when first needed, under this lock, which
        # retire() takes before the worker ends the shared context: a socket made while
        # zmq_ctx_term runs fails, and one made just after it returns is a use of freed
        # memory that aborts the process.
        self._lock = threading.Lock()
        self._retired = False
        self.link: Link | None = None

    def stop(self) -> None:
        self._stop_event.set()

    def retire(self) -> None:
        """The worker is about to end the shared context (in its own thread): no socket
        is made in it from now on, and the thread ends (at once if it has none yet)."""
        with self._lock:
            self._retired = True
        self._stop_event.set()

    def _connect(self) -> Link | None:
        """The watchdog's link, made at its first use; None once retired."""
        with self._lock:
            if self.link is None and not self._retired:
                self.link = open_link(self.address, self.creds, self.wid, role=b"h",
                                      ctx=self.ctx)
            return self.link

    def leave(self) -> None:
        """The worker leaves (from a signal handler: sets a time, nothing more)."""
        self._leave_by = time.monotonic() + self.leave_grace

    def run(self) -> None:
        heard = time.monotonic()
        try:
            if not self._quiet_start() or (link := self._connect()) is None:
                return
            while not self._stop_event.is_set():
                if self._leave_by is not None:
                    self._speak_for_leaving(link)
                link.send(P.PING)
                end = time.monotonic() + self.period
                # listen until the period is over (one PING per period), looking at the
                # deadlines between waits
                while (left := end - time.monotonic()) > 0:
                    for msg in link.drain(int(self._slice(left) * 1000) + 1):
                        if msg.kind == P.PONG:
                            heard = time.monotonic()
                            self._told(msg.body)
                    late = self.deadlines and self.deadlines.expired(time.monotonic())
                    if late:
                        self._time_out(link, late)
                        return
                if time.monotonic() - heard > self.timeout:
                    self.on_lost(time.monotonic() - heard)
                    return
        except zmq.ContextTerminated:
            pass  # the worker ended the shared context: it is leaving, and so is this thread
        except (zmq.ZMQError, BrokenJobError) as exc:  # no socket, or no broker to reach
            log.error("worker %d: its watchdog cannot reach the broker at %s: %s",
                      self.wid, self.address, exc)
            self.on_lost(time.monotonic() - heard)
        finally:
            if self.link is not None:
                self.link.close(0)

    def _quiet_start(self) -> bool:
        """Until the first PING is due, or the worker leaves: no socket, the deadlines
        watched. False: the thread is done (stopped, or a task timed out)."""
        end = time.monotonic() + self.first_ping
        while self._leave_by is None and (left := end - time.monotonic()) > 0:
            if self._stop_event.wait(self._slice(left)):
                return False
            late = self.deadlines and self.deadlines.expired(time.monotonic())
            if late:
                if (link := self._connect()) is not None:
                    self._time_out(link, late)
                return False
        return True

    def _told(self, body: dict | None) -> None:
        """What a PONG says besides "alive": the job's time is up (to the root only)."""
        if body and body.get("time_up") and self.on_time_up:
            self.on_time_up()
            self.on_time_up = None  # once

    def _speak_for_leaving(self, link: Link) -> None:
        if not self._leave_said:
            self._leave_said = True
            link.send(P.LEAVE, arg=0)
        elif time.monotonic() >= self._leave_by:
            log.warning("worker %d: its task still runs at the end of its grace to leave; "
                        "it leaves anyway (the task runs again elsewhere)", self.wid)
            link.send(P.LEAVE, arg=1)
            link.close(1000)  # the message leaves before the process does
            _reaper.end_own(grace=0.5)
            os._exit(0)

    def _slice(self, left: float) -> float:
        """How long to wait for the broker before looking at the deadlines again: until
        the earliest one, and DEADLINE_POLL_S at most (a task may start meanwhile)."""
        if self.deadlines is None:
            return left
        due = self.deadlines.next_due()
        wait = min(left, DEADLINE_POLL_S)
        return wait if due is None else min(wait, max(0.001, due - time.monotonic()))

    def _time_out(self, link: Link, body: dict) -> None:
        """A task ran past its time limit: tell the broker, then end this worker."""
        log.error("worker %d: %s; ending this worker (its other tasks run elsewhere)",
                  self.wid, body["error"])
        for msg in link.request(P.TIMEOUT, TIMEOUT_ACK_S, body=body):
            if msg.kind == P.STOP:
                break
        _reaper.end_own(grace=0.5)
        os._exit(EXIT_TASK_TIMEOUT)

    def _exit(self, silence: float) -> None:
        log.error("worker %d: the broker at %s has not answered for %.0f s; the job is gone, "
                  "exiting", self.wid, self.address, silence)
        _reaper.end_own(grace=0.5)
        _shm.sweep_own(os.environ.get(_reaper.JOB))  # no launcher is left to sweep them
        os._exit(1)



def leave_grace() -> float:
    """SCOOP_LEAVE_GRACE (seconds), else :data:`LEAVE_GRACE_S`."""
    return seconds_from_env("SCOOP_LEAVE_GRACE", LEAVE_GRACE_S)


def seconds_from_env(name: str, default: float) -> float:
    """The environment variable ``name`` as a number of seconds, else ``default`` (with a
    warning if it is not a number)."""
    text = os.environ.get(name, "")
    try:
        return max(0.0, float(text)) if text else default
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", name, text, default)
        return default
