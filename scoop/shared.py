"""Constants shared by every worker of a job (SCOOP's ``scoop.shared``).

``setConst(name=value)`` sends each value once to every worker, current and later ones,
instead of with every task. Values may be any picklable object, functions and closures
included. Constants cannot be redefined.
"""

from __future__ import annotations

from typing import Any

from . import _worker

__all__ = ["setConst", "getConst"]


def setConst(**kwargs: Any) -> None:  # noqa: N802 - SCOOP's name
    """Define shared constants, broadcast to every worker of the job.

    A future submitted after this call sees the constants wherever it runs.

    Raises:
        TypeError: if a name is already defined (constants are immutable).
    """
    _worker.current().set_const(kwargs)


def getConst(name: str, timeout: float | None = 0.1) -> Any:  # noqa: N802 - SCOOP's name
    """Return the shared constant ``name``.

    Waits up to ``timeout`` seconds (None: forever) for a constant another worker is
    still broadcasting, running other futures meanwhile.

    Returns:
        The value, or None if it is not defined after the timeout (as in SCOOP).
    """
    return _worker.current().get_const(name, timeout)
