"""Progress of a job's program, shown where its user looks.

The root worker counts (it is where the program's maps and submits start and where their
results arrive, so counting costs the other workers nothing) and a reporter thread of
the root draws the counts every few tenths of a second::

    futures.map / submit (root)      Progress (counts)          Reporter thread
    ---------------------------      -----------------          ---------------
    input read, call submitted --->  total += n
    result arrived             --->  done += n       <------   every TICK_S: snapshot,
                                                                 rate, time left
    program prints             ---------------------------->   Display.clear, write,
                                                                 redraw (one lock)

*What is counted.* ``D/T``: items of maps and submitted calls, not chunks. ``T`` is an
input's length where it has one, otherwise what has been read so far (shown with a
``+``, and no time left).

*Displays.* On a terminal, one live line on stderr, redrawn in place; the program's
own writes to ``sys.stdout``/``sys.stderr`` clear it first, so output is never garbled.
Where stderr is not a terminal (a batch job's output file), one line every
:data:`LOG_EVERY_S` seconds while the counts move, and a final one. In a notebook,
tqdm's notebook bar where tqdm is installed.
"""

from __future__ import annotations

import collections
import functools
import sys
import threading
import time
from typing import TextIO

from ._future import never_waits

# How often the live line is redrawn (s): smoother costs the root a wakeup more often.
TICK_S = 0.2
# How often a line is written where stderr is not a terminal (s): a batch job's output
# file gets a trace of the run, not a flood.
LOG_EVERY_S = 5.0
# The rate is measured over this many seconds: long enough to smooth chunked results,
# short enough to follow a change of pace.
RATE_WINDOW_S = 10.0
_CLEAR = "\r\x1b[K"


class Progress:
    """Counts of one program's work: items and calls submitted (``total``) and done.

    Updated by the program's thread, read by the reporter's: plain integer updates, each
    atomic under the GIL.
    """

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.total = 0
        self.done = 0
        self.open_ended = 0  # inputs being read whose length is not known
        self.workers = 0

    def add_total(self, n: int) -> None:
        """``n`` more items to do (a whole input's length, or items just read)."""
        self.total += n

    def add_done(self, n: int = 1) -> None:
        """``n`` more items finished (results arrived, or failed)."""
        self.done += n

    def reading(self, delta: int) -> None:
        """An input without a length starts (+1) or ends (-1) being read."""
        self.open_ended += delta


class Meter:
    """Rate and time left, from snapshots of :class:`Progress` over :data:`RATE_WINDOW_S`."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._samples: collections.deque = collections.deque()

    def line(self) -> str:
        """The progress as one line of text, e.g. ``scoop: 1,234/10,000 items 12% ...``."""
        p = self.progress
        now = p.clock()
        done, total = p.done, p.total
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        t0, d0 = self._samples[0]
        if now - t0 < 1.0:  # too short a window (a short job's end): the whole run's rate
            t0, d0 = p.started, 0
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        open_ended = p.open_ended > 0
        parts = [f"scoop: {done:,}/{total:,}{'+' if open_ended else ''} items"]
        if total and not open_ended:
            parts.append(f"{100 * done // total}%")
        parts.append(f"{_rate(rate)}/s")
        if p.workers:
            parts.append(f"{p.workers} worker{'s' if p.workers != 1 else ''}")
        parts.append(_clock(now - p.started))
        if not open_ended and rate > 0 and total > done:
            parts.append(f"{_clock((total - done) / rate)} left")
        return "  ".join(parts)


def _rate(rate: float) -> str:
    return f"{rate:,.1f}" if rate < 10 else f"{rate:,.0f}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Display:
    """Where the lines go. The default writes nothing."""

    def show(self, line: str) -> None:
        """Show the current line (called every :data:`TICK_S`)."""

    def clear(self) -> None:
        """Take the line away before the program writes."""

    def close(self, line: str) -> None:
        """Show the final line for good."""


class TerminalLine(Display):
    """One live line on a terminal, redrawn in place."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.drawn = False

    def show(self, line: str) -> None:
        self.stream.write(_CLEAR + line)
        self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            self.stream.write(_CLEAR)
            self.stream.flush()
            self.drawn = False

    def close(self, line: str) -> None:
        self.stream.write(_CLEAR + line + "\n")
        self.stream.flush()
        self.drawn = False


class LogLines(Display):
    """A line every ``every`` seconds while the counts move, for files and pipes."""

    def __init__(self, stream: TextIO, every: float = LOG_EVERY_S,
                 clock=time.monotonic) -> None:
        self.stream = stream
        self.every = every
        self.clock = clock
        self._next = clock() + every
        self._last = ""

    def show(self, line: str) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.every
        counts = line.split("  ", 1)[0]  # only when the counts moved, not the clock
        if counts != self._last:
            self._last = counts
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class NotebookBar(Display):
    """tqdm's notebook bar (requires tqdm and ipywidgets where the kernel runs)."""

    def __init__(self, progress: Progress) -> None:
        from tqdm.notebook import tqdm  # only here: optional, and heavy to import

        self.progress = progress
        self.bar = tqdm(total=0, unit="item", desc="scoop")

    def show(self, line: str) -> None:
        p = self.progress
        if p.total != self.bar.total:
            # the widget's own maximum follows only reset(), which also zeroes the count
            started = self.bar.start_t
            self.bar.reset(total=p.total)
            self.bar.start_t = started
        self.bar.n = p.done
        self.bar.refresh()

    def close(self, line: str) -> None:
        self.show(line)
        self.bar.close()


def in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (IPython's shell there has a kernel)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def display_for(stream: TextIO, progress: Progress) -> Display:
    """The display that fits ``stream``: a notebook bar, a live line, or log lines."""
    if in_notebook():
        try:
            return NotebookBar(progress)
        except Exception:  # noqa: BLE001 - no tqdm or widgets: plain lines still work
            return LogLines(stream)
    isatty = getattr(stream, "isatty", None)
    return TerminalLine(stream) if isatty is not None and isatty() else LogLines(stream)


class _Guarded:
    """A text stream whose writes first take the progress line away (same lock)."""

    def __init__(self, stream: TextIO, reporter: Reporter) -> None:
        self._stream = stream
        self._reporter = reporter

    def write(self, text: str) -> int:
        with self._reporter.lock:
            self._reporter.display.clear()
            if text:  # print() writes the text and its newline separately: no line between
                self._reporter.mid_line = not text.endswith("\n")
            return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class Reporter:
    """Draws a :class:`Progress` on a :class:`Display` from a daemon thread."""

    def __init__(self, progress: Progress, display: Display, tick: float = TICK_S) -> None:
        self.progress = progress
        self.display = display
        self.meter = Meter(progress)
        self.tick = tick
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved: tuple | None = None
        self.mid_line = False  # the program's last write did not end its line

    def start(self, guard_streams: bool = True) -> Reporter:
        """Start drawing; with ``guard_streams``, the program's prints clear the line."""
        if guard_streams:
            self._saved = (sys.stdout, sys.stderr)
            sys.stdout = _Guarded(sys.stdout, self)
            sys.stderr = _Guarded(sys.stderr, self)
        self._thread = threading.Thread(target=self._run, name="scoop-progress", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            line = self.meter.line()
            with self.lock:
                if not self.mid_line:
                    self.display.show(line)

    def stop(self) -> None:
        """Stop drawing and leave the final line; give the streams back."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
            self._saved = None
        with self.lock:
            self.display.close(self.meter.line())


# The root's progress while it is shown (None: not asked for; counting is then skipped).
active: Progress | None = None
_reporter: Reporter | None = None


def start(workers: int, stream: TextIO | None = None, guard_streams: bool = True) -> Reporter:
    """Count and show the program's progress from now on (the root, or an Executor);
    ``guard_streams``: the program's prints clear the live line first (see Reporter)."""
    global active, _reporter
    stop()
    progress = Progress()
    progress.workers = workers
    _reporter = Reporter(progress, display_for(stream or sys.stderr, progress))
    _reporter.start(guard_streams)
    active = progress
    return _reporter


def stop(reporter: Reporter | None = None) -> bool:
    """Leave the final line and stop counting (only if ``reporter``, when given, is the
    one showing); whether it stopped."""
    global active, _reporter
    if _reporter is None or (reporter is not None and reporter is not _reporter):
        return False
    _reporter.stop()
    active = _reporter = None
    return True


@never_waits
def count_done(fut) -> None:
    """A future's done-callback: its one submitted call ended (or was cancelled)."""
    if active is not None:
        active.add_total(-1) if fut.cancelled() else active.add_done(1)


class MapCount:
    """What one map adds to the counts: its input's length up front where it has one,
    else the items as they are read; each chunk's items when it ends."""

    def __init__(self, progress: Progress, length: int | None) -> None:
        self.progress = progress
        self.length = length
        self.read = 0
        self.reading = True
        if length is None:
            progress.reading(+1)
        else:
            progress.add_total(length)

    @classmethod
    def start(cls, length: int | None) -> MapCount | None:
        """The count of a map starting now; None when progress is not shown."""
        return None if active is None else cls(active, length)

    def submitted(self, fut, n: int) -> None:
        """A chunk of ``n`` items was submitted as ``fut``."""
        self.read += n
        if self.length is None:
            self.progress.add_total(n)
        if fut is None:  # nothing to run: stored by an earlier run (checkpoint)
            self.progress.add_done(n)
        else:
            fut.add_done_callback(functools.partial(self._ended, n))

    def _ended(self, n: int, fut) -> None:
        if fut.cancelled():
            self.progress.add_total(-n)
        else:
            self.progress.add_done(n)

    def stopped_reading(self) -> None:
        """The input is exhausted, or the map was stopped: what was not read is not to
        be done (idempotent)."""
        if self.reading:
            self.reading = False
            if self.length is None:
                self.progress.reading(-1)
            elif self.read < self.length:
                self.progress.add_total(self.read - self.length)
