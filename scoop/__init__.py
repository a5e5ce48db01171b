"""SCOOP: Scalable COncurrent Operations in Python.

Run a program written with :mod:`scoop.futures` on many processes with::

    python -m scoop -n 4 program.py [args...]

The attributes below describe the running job. They are set when this process joins
a job (as the root worker that runs the program, or as another worker) and keep
their "not running" values in a plain ``python program.py`` run.

Attributes:
    IS_RUNNING: True inside a scoop job (launcher or in-process pool).
    IS_ORIGIN: True in the process that runs the program's ``__main__`` block.
    worker: this worker's id (an int; the root worker is 0), None outside a job.
    SIZE: the number of workers the job was started with (1 outside a job).
    HOSTS: the job's hosts as (name, worker count) pairs, in placement order (the first
        runs the program); workers started by another launcher are not listed.
    DEBUG: True when the job was started with ``--debug``.
    logger: the ``logging.Logger`` scoop reports through ("scoop").

``scoop.Executor`` (also in :mod:`scoop.futures`) starts a pool from Python, without the
launcher: a ``concurrent.futures.Executor`` (see :mod:`scoop._executor`). Its workers see
the attributes of any job: ``SIZE`` is the number of worker processes that run tasks
(``Executor.size``; the caller is not one of them), ``worker`` is 1 to ``SIZE`` for those
started with the pool. In the caller, inside ``with scoop.Executor(...):``, they describe
the pool as the program's root would: ``IS_RUNNING`` and ``IS_ORIGIN`` are True,
``worker`` is 0 (the caller takes the root's place, but runs no task), ``SIZE`` is what the
workers see; the block gives back their values before it. Outside a ``with`` block the
caller's attributes are not changed: the module-level API does not use the pool there.
"""

from __future__ import annotations

import logging

__version__ = "0.9.0"
__all__ = ["IS_RUNNING", "IS_ORIGIN", "worker", "SIZE", "HOSTS", "DEBUG", "logger",
           "Executor", "__version__"]

IS_RUNNING: bool = False
IS_ORIGIN: bool = True
worker: int | None = None
SIZE: int = 1
HOSTS: list[tuple[str, int]] = []
DEBUG: bool = False
logger: logging.Logger = logging.getLogger("scoop")


def __getattr__(name: str):
    # Lazy, as concurrent.futures does: the executor brings ZeroMQ and the launcher in.
    if name == "Executor":
        from ._executor import Executor

        return Executor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
