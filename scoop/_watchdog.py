"""A worker's watchdog: a thread that ends the process when the broker is gone.

A worker on another host cannot rely on its parent or its ssh connection to learn that
the job is over (the launcher may be SIGKILLed, its host may vanish). Its hub cannot
check either while a long task runs. So every worker process runs this thread, with its
own socket (ZeroMQ sockets are not shared between threads): it sends a signed PING every
``PING_PERIOD_S`` and exits the process if no PONG has come for ``BROKER_TIMEOUT_S``.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from . import _protocol as P
from . import _reaper
from ._transport import Credentials

log = logging.getLogger("scoop")

# How often the watchdog asks: a small cost per worker per period.
PING_PERIOD_S = 1.0
# Silence after which the broker counts as gone: long enough to ride out a loaded machine
# or network hiccup, short enough that orphans vanish quickly.
BROKER_TIMEOUT_S = 10.0


class Watchdog(threading.Thread):
    """Pings the broker; calls ``on_lost`` (default: exit the process) when it is gone."""

    def __init__(self, address: str, creds: Credentials, wid: int, on_lost=None,
                 timeout: float = BROKER_TIMEOUT_S, period: float = PING_PERIOD_S) -> None:
        super().__init__(name="scoop-watchdog", daemon=True)
        self.address = address
        self.creds = creds
        self.codec = P.Codec(creds.key, wid)
        self.wid = wid
        self.timeout = timeout
        self.period = period
        self.on_lost = on_lost or self._exit
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        import zmq

        ctx = zmq.Context()
        sock = self.creds.connect(ctx, P.routing_id(b"h", self.wid), self.address)
        heard = time.monotonic()
        try:
            while not self._stop_event.is_set():
                sock.send_multipart(self.codec.encode(P.PING))
                deadline = time.monotonic() + self.period
                while (left := deadline - time.monotonic()) > 0:
                    if sock.poll(int(left * 1000) + 1):
                        try:
                            msg = self.codec.decode(sock.recv_multipart(), "broker")
                            if msg.kind == P.PONG:
                                heard = time.monotonic()
                        except P.AuthError:
                            pass
                if time.monotonic() - heard > self.timeout:
                    self.on_lost(time.monotonic() - heard)
                    return
        finally:
            sock.close(0)
            ctx.term()

    def _exit(self, silence: float) -> None:
        log.error("worker %d: the broker at %s has not answered for %.0f s; the job is gone, "
                  "exiting", self.wid, self.address, silence)
        _reaper.end_marked(_reaper.WORKER, os.environ.get(_reaper.WORKER, ""), grace=0.5)
        os._exit(1)
