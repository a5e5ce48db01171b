"""The runtime of this process: ``current()`` and ``install()``, and the :class:`Worker`
they hand out (built in :mod:`scoop._runtime`, whose docstring draws its flow).

    futures / shared  --current()-->  the Worker installed by the bootstrap (a job), or
                                      an in-process one (``python program.py``: futures
                                      run one at a time here, with one warning)
    _bootstrap        --install(w)->  w serves this process; None: back to in-process
"""

from __future__ import annotations

import os
import sys
import warnings

from ._errors import BrokenJobError, JobOver
from ._runtime import Worker

__all__ = ["Worker", "current", "install", "BrokenJobError", "JobOver"]

_current: Worker | None = None
_warned_serial = False


def current() -> Worker:
    """This process's runtime; outside a job, an in-process one (with a warning once)."""
    global _current, _warned_serial
    if _current is None or (_current.flags.stopped and _current.link is None):
        if not _warned_serial:
            _warned_serial = True
            warnings.warn("scoop is not running: futures run one at a time in this process. "
                          "Start the program with `python -m scoop program.py` to run them "
                          "in parallel.", RuntimeWarning, stacklevel=_caller_level())
        _current = Worker()
    return _current


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside scoop."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def install(worker: Worker | None) -> None:
    """Make ``worker`` this process's runtime (None: back to in-process mode)."""
    global _current
    _current = worker
