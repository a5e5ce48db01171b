"""Retries of a task that raises: ``futures.map(..., retries=N)`` and ``futures.retrying``.

A task that raises one of the chosen exceptions runs again, up to ``retries`` more times,
before its exception is delivered. The retry happens where the task ran, at once: the
call is wrapped (:class:`Retrying`, a picklable callable), so no message, no owner and no
broker is involved, and a map chunk retries only its failing item. A worker that dies
is a different matter: the broker re-runs what it held on other workers, bounded by
``--max-attempts``, and that does not use up ``retries``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("scoop")


class Retrying:
    """``func``, called again up to ``retries`` times while it raises one of ``on``.

    The last attempt's exception (with its traceback) is what the caller gets; each
    earlier one is logged at INFO on the worker.
    """

    __slots__ = ("func", "retries", "on")

    def __init__(self, func: Callable, retries: int,
                 on: type[BaseException] | tuple[type[BaseException], ...] = Exception) -> None:
        if not callable(func):
            raise TypeError("retrying() needs a callable")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError("retries must be an integer >= 0")
        self.func, self.retries, self.on = func, retries, on

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(self.retries):
            try:
                return self.func(*args, **kwargs)
            except self.on as exc:
                log.info("scoop: %s raised %s: %s; trying again (%d of %d)",
                         getattr(self.func, "__qualname__", self.func), type(exc).__name__,
                         exc, attempt + 1, self.retries)
        return self.func(*args, **kwargs)

    def __reduce__(self):
        return Retrying, (self.func, self.retries, self.on)

    def __repr__(self) -> str:
        return f"retrying({self.func!r}, {self.retries})"


def retrying(func: Callable, retries: int,
             on: type[BaseException] | tuple[type[BaseException], ...] = Exception
             ) -> Callable:
    """``func`` tried again up to ``retries`` times when it raises one of ``on`` (any
    ``Exception`` by default): ``futures.submit(futures.retrying(f, 3), x, key=1)``
    passes every argument to ``f``, its keyword arguments included."""
    return func if retries == 0 else Retrying(func, retries, on)
