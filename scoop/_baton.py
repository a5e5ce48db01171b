"""Who runs the broker's loop: its own thread, or a thread of this process that waits for
the broker's messages (the in-process root, idle; issue 12).

A remote round trip from an in-process root used to wake two threads of its process at
each end: the broker's, then the root's. When the root's idle wait runs the loop's turns
itself, the broker's thread sleeps and one thread is woken. The sockets and the
Schedule are used by one thread at a time, the holder of the baton (a lock: ZeroMQ lets a
socket change threads across a full memory barrier)::

    host thread (waiting)                         broker thread
    ---------------------                         -------------
    host(): the baton (a Yield command first  ->  ends its turn, hands it over, then
      if the thread has it); turns until its      looks every HOST_CHECK_S whether the
      own socket is readable                      host came back to its wait meanwhile
    returns; runs the program; comes back
    ... or stays away (a long task)  ---------->  takes the baton, runs the loop

*The host* never sleeps away from its wait with the baton: it holds it only inside
:meth:`Baton.host`. *The thread* takes the loop back when the host was neither inside
nor back between two looks, and at once when the broker is told to stop.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._zpoll import Waiter, readable

if TYPE_CHECKING:
    from ._runtime.link import Link
    from ._runtime.worker import Worker

# While a thread hosts the loop, the broker's thread looks this often whether it came
# back to its wait since the last look; if not (it runs a task, or the program), it takes
# over. Shorter: other workers' messages wait less while the host is away; longer: fewer
# wakeups of the broker's thread.
HOST_CHECK_S = 0.01
# ... and, while the host stays in one long wait (its timed out waits, come back to at
# once, count as one), up to this much less often (twice less at each look): an idle
# job's broker thread wakes a few times a second. A host that leaves such a wait with a
# message says so, and the looks come every HOST_CHECK_S again.
HOST_IDLE_S = 0.16


class Baton:
    """The right to run the broker's loop (see the module doc).

    Args:
        turn: one turn of the loop: ``turn(timeout_ms, check, spin)`` -> the sockets that
            may be readable (see ``Broker._turn``).
        ask_yield: makes the broker's thread end its turn (a command on its queue).
        waiter: the loop's; a host's socket is added to it while the host is inside.
        check: the loop's sockets to ask before each sleep.
        tick_ms: the longest turn (the loop's periodic work comes in time).
    """

    def __init__(self, turn: Callable[[int, tuple], list], ask_yield: Callable[[], None],
                 waiter: Waiter, check: tuple, tick_ms: int) -> None:
        self._turn, self._ask_yield, self._waiter = turn, ask_yield, waiter
        self._check, self._tick_ms = check, tick_ms
        self._lock = threading.Lock()
        self.hosted = False  # a host has the loop (the thread leaves it alone)
        self.inside = False  # the host is inside host() now
        self.visits = 0  # host() calls so far
        self.ended = False  # the loop was told to stop: the thread closes the sockets
        self.stopping = False  # stop() was called: the thread takes over now
        self._interval = HOST_CHECK_S  # between the thread's looks at the host
        self._since = 0.0  # when the host's present wait began
        self._timed_out = False  # the host's last wait timed out (it may come back at once)
        self._nudge = threading.Event()  # a look now: the host left a long wait, or stop()

    def thread_turn(self) -> None:
        """One step of the broker's thread: a turn of the loop, or a look at the host."""
        if self.hosted:
            visits = self.visits
            nudged = self._nudge.wait(self._interval)
            self._nudge.clear()
            if self.stopping or (not self.inside and self.visits == visits and not nudged):
                self.hosted = False  # away since the last look: take the loop over
            elif self.inside and time.monotonic() - self._since > self._interval:
                self._interval = min(2 * self._interval, HOST_IDLE_S)  # a long wait
            else:
                self._interval = HOST_CHECK_S
            return
        with self._lock:
            if not self.hosted and not self.ended:
                self._turn(self._tick_ms, self._check)

    def attach(self, worker: Worker) -> None:
        """Make ``worker`` (the in-process root) host the loop in its idle waits."""
        worker.idle_wait = functools.partial(self.host, worker.link)
        worker.hub.unhost = self.unhost

    def unhost(self) -> None:
        """The host goes to run a long task: the broker's thread takes the loop now, after
        a turn here, so that what the host sent leaves at once (the thread waits for the
        GIL while the task computes: up to 5 ms per message, 10-20 ms at a start)."""
        if self.hosted and not self.inside:
            if self._lock.acquire(blocking=False):
                try:
                    if not self.ended:
                        self._turn(0, self._check)
                finally:
                    self._lock.release()
            self.hosted = False
            self._nudge.set()

    def stop(self) -> None:
        """The broker is told to stop: the thread takes the loop over at once (a host may
        have left for good)."""
        self.stopping = True
        self._nudge.set()

    def host(self, link: Link, timeout_ms: int) -> bool:
        """Run the loop in this thread until a message waits on ``link`` or ``timeout_ms``
        passed; whether one waits."""
        if self.ended:  # (the thread closes the sockets)
            return link._readable(timeout_ms)
        if not self._lock.acquire(blocking=False):
            self.hosted = True  # before asking: the thread must not take the baton again
            self._ask_yield()
            self._lock.acquire()
        sock = link.sock
        now = time.monotonic()
        deadline = now + timeout_ms / 1000
        if not self._timed_out:
            self._since = now
        self._waiter.add(sock, link.fd)  # (only while inside: the thread must not wake for it)
        try:
            self.hosted = self.inside = True
            self.visits += 1
            check, spin = (*self._check, sock), link.spin  # (the host's waits may spin)
            while not self.ended:
                ready = self._turn(min(timeout_ms, self._tick_ms), check, spin)
                if sock in ready and readable(sock):
                    self._timed_out = False
                    if self._interval > HOST_CHECK_S:  # the thread looks seldom, and this
                        self._nudge.set()  # one may now run the program: look soon
                    return True
                timeout_ms = int((deadline - time.monotonic()) * 1000)
                if timeout_ms <= 0:
                    self._timed_out = True
                    return False
        finally:
            self.inside = False
            self._waiter.remove(link.fd)
            self._lock.release()
        return link._readable(max(0, int((deadline - time.monotonic()) * 1000)))
