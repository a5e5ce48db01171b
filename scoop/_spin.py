"""A short busy wait before a wait sleeps (issue 12).

A worker that sleeps in ``poll(2)`` for an answer that comes 50 us later pays twice:
the sender's system call wakes it (an interrupt to another CPU, a VM exit on a virtual
machine), and it starts on a cold CPU. Both ends of a remote round trip sleeping cost
~100 us of its ~220 us here (`bench_rtt.py rtt`, 2 cores). MPI libraries and OpenMP
runtimes poll before they sleep for this reason; so do the in-process root's and the
workers' idle waits here, briefly and only where it takes no CPU from anyone:

* **Briefly.** At most :data:`SPIN_US` (``SCOOP_SPIN_US``) per wait, and only when the
  previous wait was answered within twice that: a worker left idle polls once, then
  sleeps in every wait until answers come quickly again.
* **Nobody's CPU.** Only in a job with no more workers on this host than the CPUs this
  process may use (``scoop.HOSTS``; unknown hosts: no spinning): ``-n 128`` on 2 cores
  never spins. The broker's own thread never does (it shares the root's GIL).

``SCOOP_SPIN_US=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("scoop")

SPIN_ENV = "SCOOP_SPIN_US"
# Polls without sleeping for up to this long (us) before a wait sleeps. Longer: answers
# that take longer come without a wakeup; each miss costs this much CPU.
SPIN_US = 100
_MAX_SPIN_US = 10_000


class Spin:
    """Polls without sleeping for up to ``window_s`` before a wait sleeps, while waits
    are answered quickly (see the module doc)."""

    __slots__ = ("window", "_quick")

    def __init__(self, window_s: float) -> None:
        self.window = window_s
        self._quick = True  # the last wait was answered within 2 windows

    def poll(self, poll: Callable[[int], list], timeout_ms: int) -> list:
        """``poll(timeout_ms)``'s answer (a ``select.poll().poll``), after calling
        ``poll(0)`` for up to the window first (when the last wait was quick)."""
        if not timeout_ms:
            return poll(0)
        start = time.perf_counter()
        if self._quick:
            end = start + self.window
            while True:
                got = poll(0)
                if got:
                    return got
                if time.perf_counter() >= end:
                    break
        got = poll(timeout_ms)
        self._quick = bool(got) and time.perf_counter() - start < 2 * self.window
        return got


def window_us() -> int:
    """The spin window from ``SCOOP_SPIN_US`` (default :data:`SPIN_US`, with a warning
    if it is not 0 to 10,000), read by the launcher and passed to every worker."""
    text = os.environ.get(SPIN_ENV, "").strip()
    try:
        us = int(text) if text else SPIN_US
    except ValueError:
        us = -1
    if not 0 <= us <= _MAX_SPIN_US:
        log.warning("%s=%r is not a number of microseconds from 0 (no spinning) to %d; "
                    "using %d", SPIN_ENV, text, _MAX_SPIN_US, SPIN_US)
        return SPIN_US
    return us


def for_this_host(us: int, address: str, broker_apart: bool = True) -> Spin | None:
    """A Spin of ``us`` microseconds for the idle waits of this process's worker, in a
    job on ``scoop.HOSTS`` whose broker is at ``address`` (``broker_apart``: in a process
    of its own, not the root's); None where spinning could take a CPU another process of
    the job needs (its workers on this host, and such a broker here), where the hosts are
    not known, or ``us`` is 0."""
    import scoop

    from ._mapping import is_here, usable_cpus

    if not us or not scoop.HOSTS:
        return None
    host = address.partition("://")[2].rpartition(":")[0].strip("[]")
    broker_here = broker_apart and (address.startswith("unix://") or (
        not address.startswith("inproc://") and is_here(host)))
    cpus, hosts = usable_cpus(), scoop.HOSTS
    if sum(n for _, n in hosts) + broker_here > cpus:  # (names resolved only then)
        if sum(n for name, n in hosts if is_here(name)) + broker_here > cpus:
            return None
    return Spin(us / 1e6)
