"""Shared constants (``shared.setConst`` / ``getConst``): set once, sent to every worker.

::

    setConst(x=1) on any worker -> the table here -> CONST [parcel] -> broker -> every
                                                     other worker, and each that joins
                                                     later (with its WELCOME)
    getConst("x") -> the table; not there yet: park until a CONST arrives (or timeout)

A constant that cannot be unpickled on some worker is kept there as :class:`Unloaded`:
``getConst`` raises its error there only.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from greenlet import getcurrent

from .. import _protocol as P
from .. import _serialize
from .hub import Waiter

if TYPE_CHECKING:
    from .._errors import SerializationError
    from .worker import Worker

log = logging.getLogger("scoop")


class Unloaded:
    """A shared constant that arrived but could not be unpickled on this worker."""

    __slots__ = ("error",)

    def __init__(self, error: SerializationError) -> None:
        self.error = error


class Constants:
    """This worker's table of shared constants, and the greenlets waiting for one."""

    def __init__(self, rt: Worker) -> None:
        self.rt = rt
        self.values: dict[str, object] = {}
        self.waiters: list[Waiter] = []

    def set(self, values: dict) -> None:
        """Record shared constants here and broadcast them to every worker."""
        for name in values:
            if name in self.values:
                raise TypeError(f"constant {name!r} is already defined; constants are "
                                "immutable")
        frames = _serialize.dumps(list(values.items()))  # items load one by one
        self.values.update(values)
        link = self.rt.link
        if link is not None:
            link.send(P.CONST, parcels=[link.codec.parcel(frames)])

    def get(self, name: str, timeout: float | None):
        """The constant ``name``, waiting up to ``timeout`` for it (None if it never came)."""
        rt = self.rt
        deadline = None if timeout is None else time.monotonic() + timeout
        while name not in self.values and rt.link is not None and rt.flags.broken is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            waiter = Waiter(getcurrent(), 1)
            self.waiters.append(waiter)
            rt.hub.park(waiter, deadline)
        value = self.values.get(name)
        if isinstance(value, Unloaded):
            raise value.error
        return value

    def receive(self, parcels, unpickling_error) -> None:
        """Take in constants (authentic parcels); wake the greenlets waiting for one."""
        for parcel in parcels:
            try:
                items, broken = _serialize.loads_items(parcel.frames)
            except Exception as exc:  # noqa: BLE001 - the names are inside: log, go on
                log.error("%s: dropped shared constants that could not be unpickled: "
                          "%s: %s", self.rt.where, type(exc).__name__, exc)
                continue
            for i, (name, value) in enumerate(items):
                if i in broken:  # getConst(name) raises this error here
                    value = Unloaded(unpickling_error(f"the shared constant {name!r}",
                                                      broken[i]))
                self.values.setdefault(name, value)
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            w.wake(self.rt)
