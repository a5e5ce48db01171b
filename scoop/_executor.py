"""``scoop.Executor``: a ``concurrent.futures.Executor`` over a scoop pool started from Python.

No SCOOP module is replaced: the original had no executor. It is a new entry point to the
same job a launcher runs: a broker and worker processes (local, over ssh, in a batch
allocation, or joining through a job file), started by a :class:`~scoop._launch.Launcher`
that has no program to run. The caller's process takes the root's place as a *client*:
it submits and waits but runs no task.

Flow of one ``submit`` and of the module-level API inside ``with``::

    caller's threads                   runtime thread (owns every socket and greenlet)
    ----------------                   -----------------------------------------------
    Executor.submit(fn, *a)
      cf = concurrent Future -------> requests (deque) + one byte on the wake pipe
      returns cf at once                hub's idle wait (Worker.idle_wait) sees the pipe
                                        backlog -> in flight (about AHEAD_S of work, at
                                          least 4 per worker; the rest stays here,
                                          where cancel() still stops it)
                                        cf.set_running_or_notify_cancel()
                                        Worker.submit(fn, a) -> TASKS ------> broker
                                                                    workers <-'  |
                                        RESULTS <----------------------------- broker
    cf.result() wakes  <-------------   done-callback: cf.set_result / set_exception
                                          (worker-side traceback as __cause__)

    futures.map / submit / wait /      _Relay (what _worker.current() returns inside
    shared.* inside `with`  -------->    `with`): each runtime call runs in a greenlet
      waits on a threading.Event         of the runtime thread, which may park there
      (Ctrl-C interrupts the wait)       while the hub keeps serving everything else

*Caller.* Any thread. ``submit`` only appends to a thread-safe deque and writes a byte
on a pipe; a wait is a wait on a ``threading`` primitive, so a KeyboardInterrupt (the
notebook's interrupt button) ends it without touching the runtime.

*Runtime thread.* A scoop :class:`~scoop._worker.Worker` with ``policy.runs_tasks`` False, joined
to the broker as worker 0, whose hub greenlet is the thread's loop. Its idle wait polls
the broker's socket and the wake pipe, takes in requests, feeds the backlog into the
Worker and, every :data:`WATCH_S`, has the launcher check its processes (dead
workers reported to the broker, sandbox workers started). It completes the standard
futures from the scoop futures' done-callbacks, so ``concurrent.futures.wait``,
``as_completed`` and asyncio's ``wrap_future``/``run_in_executor`` work unchanged.

*Relay.* Inside ``with Executor()``, :func:`scoop._worker.current` returns a :class:`_Relay`
for the caller's threads: the module-level ``futures.*`` and ``shared.*`` then use this
pool. It runs each runtime call in a greenlet of the runtime thread and hands back the
outcome; futures it returns are bound to it, so their ``result()``/``cancel()`` come back
through it. Tasks running on the workers use their own runtime, as in any scoop job, so
they can submit and wait at any depth.

*Launcher.* Starts the broker (a thread of this process) and the workers, and stops them
all at ``shutdown``; the runtime thread calls it when it ends, so ``shutdown(wait=False)``
cleans up too. An ``atexit`` hook shuts every live executor down (waiting for its work,
as the standard library does), and workers die with this process (``prctl``) or notice
within seconds that their broker is gone: a notebook kernel's restart leaves nothing.

*Map.* ``Executor.map`` is :func:`scoop.futures.map`'s engine (:class:`scoop._mapping.Feed`,
in the caller's thread) driving this pool through a :class:`_MapClient`: each chunk is a
work item of the backlog above, the chunks read by one fill posted together.

Deliberate differences from ``ProcessPoolExecutor``: ``map``'s default ``chunksize``
(None) batches by itself (a failing item still raises at its place, after the results
before it) and its input is read as the results are consumed; ``mp_context`` is
accepted and ignored (scoop starts its own workers); ``initializer`` runs once per
worker process, before its first task of this pool; the workers' ``sys.path`` gets the
caller's extra folders (through PYTHONPATH); a lost worker does not break the pool (its
tasks run again elsewhere), and a pool that does break raises
:class:`~scoop.futures.BrokenJobError`.

Hooks this module uses outside itself: ``Worker.policy.runs_tasks``, ``Worker.idle_wait``
(:mod:`scoop._worker`), and ``Launcher._join_as_root``, overridden to start the runtime
thread instead of making the calling thread the root.
"""

from __future__ import annotations

import atexit
import codecs
import collections
import concurrent.futures as cf
import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import tty
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import SimpleNamespace
from typing import Any

from greenlet import getcurrent, greenlet

import scoop

from . import _bootstrap, _mapping, _progress, _shm, _worker
from ._errors import BrokenJobError
from ._future import Future, never_waits
from ._launch import Launcher
from ._launch import cli as _cli
from ._launch.launcher import SANDBOXES_PER_ATTEMPT

log = logging.getLogger("scoop")

# Tasks sent to the broker ahead of their results: at least IN_FLIGHT_PER_WORKER per
# worker, more when tasks complete quickly, up to AHEAD_S seconds of work at the observed
# completion rate (at most MAX_IN_FLIGHT). More hides round trips and lets tasks travel in
# groups; less keeps more of a backlog here, where cancel() (shutdown's cancel_futures,
# an interrupted map) still stops it. CPython's ProcessPoolExecutor keeps 1 extra.
IN_FLIGHT_PER_WORKER = 4
AHEAD_S = 0.05
MAX_IN_FLIGHT = 4096
# How often the completion rate is measured (s): shorter adapts sooner, noisier.
RATE_WINDOW_S = 0.02
# How often the runtime thread has the launcher look at its processes (s): sooner
# reports a dead worker sooner (the broker's heartbeat would within seconds anyway).
WATCH_S = 0.25
# How long the runtime thread may take to join its broker.
CONNECT_TIMEOUT_S = 30.0

_live: set = set()  # the runtimes of the pools still running (see _at_exit)
_exiting = False
_active: list = []  # (relay, what it replaced) of the `with` blocks open, innermost last


# ======================================================================================
# The caller's side
# ======================================================================================
class Executor(cf.Executor):
    """A pool of scoop worker processes behind the ``concurrent.futures`` interface.

    ``Executor`` is a drop-in for ``ProcessPoolExecutor``: ``submit``, ``map``,
    ``shutdown`` and ``with`` behave the same, and its futures are
    ``concurrent.futures.Future`` objects. Functions, lambdas and classes defined in
    ``__main__`` or a notebook travel by value; the others by reference, found on the
    workers' ``sys.path``, which has the caller's folders. Inside ``with Executor(...):``
    the module-level :mod:`scoop.futures` and :mod:`scoop.shared` calls use this pool too,
    and the ``scoop.*`` job attributes describe it (``scoop.SIZE`` is :attr:`size`, as
    the workers see it; ``scoop.worker`` is 0, the caller's; see :mod:`scoop`).

    Args:
        max_workers: worker processes to start (default: this machine's CPUs, or the
            counts of ``hosts``/``hostfile``/the batch allocation; with only
            ``external`` workers, none). Must be greater than 0 if given.
        mp_context: accepted for ``ProcessPoolExecutor`` code; ignored.
        initializer: called with ``initargs`` once in each worker process, before its
            first task of this pool.
        initargs: the arguments of ``initializer``.
        hosts: worker hosts, as names (one worker per mention) or ``(name, count)`` pairs;
            remote ones start over ssh, like ``python -m scoop --hosts``.
        hostfile: a file of ``host count`` lines, like ``python -m scoop --hostfile``.
        external: workers that another launcher starts with ``python -m scoop.join
            JOBFILE``; the job file is written to ``job_file`` (see :attr:`job_file`).
        elastic: workers may also join at any time with ``python -m scoop.join JOBFILE``
            (:attr:`job_file`: a job array, ``sbatch`` again) and leave on SIGTERM,
            handing their work back; :attr:`size` follows them, and maps cut their
            chunks for the pool as it is.
        launcher: "ssh" or "srun" (default: srun inside a SLURM allocation, as the CLI).
        progress: show the progress of this pool's work (items of maps and submitted
            calls): tqdm's bar in a notebook, else lines on stderr as ``--progress``
            does. None (the default): when ``SCOOP_PROGRESS=1`` is set.
        **options: the launcher's other settings: ``python``, ``cwd``, ``pythonpath``,
            ``nice``, ``ssh``, ``broker_hostname``, ``prolog``, ``tunnel``,
            ``max_attempts``, ``encrypt``, ``debug``, ``log_level``, ``log_file``.

    Raises:
        ValueError: ``max_workers`` is 0 or less, or a bad host list.
        scoop._launch.LaunchError: the workers could not start.
    """

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable | None = None, initargs: tuple = (), *,
                 hosts: Iterable | None = None, hostfile: str | None = None,
                 external: int = 0, job_file: str | None = None, elastic: bool = False,
                 launcher: str | None = None, ssh: str = "ssh", progress: bool | None = None,
                 **options: Any) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._shutdown_lock = threading.Lock()
        self._shutdown_called = False
        self._initializer = (initializer, tuple(initargs)) if initializer else None
        workers = _worker_hosts(max_workers, hosts, hostfile, external, ssh)
        options["pythonpath"] = os.pathsep.join(
            [*filter(None, [options.get("pythonpath")]),
             *_caller_paths(options.get("python", sys.executable))]) or None
        ns = SimpleNamespace(hosts=hosts, hostfile=hostfile)
        self._launcher = _PoolLauncher(
            # the client takes the root's slot, here; it runs no task
            hosts=[("127.0.0.1", 1), *workers], external=external, job_file=job_file,
            elastic=elastic, launcher=launcher or _cli._default_launcher(ns), ssh=ssh,
            **options)
        self._runtime = _Runtime(self._launcher, sum(c for _, c in workers) + external)
        self._launcher.runtime = self._runtime
        try:
            self._launcher.start(root_in_process=True)
        except BaseException:
            self._runtime.close_pipe()
            raise
        self._relay = _Relay(self._runtime)
        _live.add(self._runtime)
        _register_at_exit()
        if progress is None:
            progress = os.environ.get("SCOOP_PROGRESS", "") not in ("", "0")
        # a notebook kernel's streams stay as they are (a bar there garbles nothing)
        self._progress = _progress.start(
            self.size, guard_streams=not _progress.in_notebook()) if progress else None
        # An executor dropped without shutdown() finishes its work, then stops its pool.
        weakref.finalize(self, self._runtime.finish, False)

    @property
    def job_file(self) -> str | None:
        """The job file joining workers read (with ``external`` or ``elastic``), else
        None."""
        return self._launcher.job_file if self._launcher.job.accepts_joiners else None

    @property
    def size(self) -> int:
        """The worker processes of the pool (``external`` ones included; ``elastic``:
        those in it as of the last result received)."""
        return self._runtime.workers

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> cf.Future:
        """Schedule ``fn(*args, **kwargs)`` on a worker; return a ``concurrent.futures.Future``.

        Raises:
            RuntimeError: after :meth:`shutdown` (or interpreter exit).
            BrokenJobError: the pool broke (its broker or runtime is gone).
        """
        with self._shutdown_lock:
            self._check_open()
            fut = cf.Future()
            self._runtime.post(_WorkItem(fut, self._initialized(fn), args, kwargs))
        if _progress.active is not None:
            _progress.active.add_total(1)
            fut.add_done_callback(_progress.count_done)
        return fut

    def _check_open(self) -> None:
        if self._shutdown_called:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _initialized(self, fn: Callable) -> Callable:
        """``fn``, run after the pool's initializer where that has not run yet."""
        if self._initializer is None:
            return fn
        return _Initialized(self._launcher.job.id, *self._initializer, fn)

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int | None = None, buffersize: int | None = None,
            checkpoint: str | os.PathLike | None = None, retries: int = 0,
            retry_on: type[BaseException] | tuple = Exception,
            task_timeout: float | None = None) -> Iterator:
        """Like ``Executor.map``: ``fn`` over the zipped iterables, results in order.

        The map of :func:`scoop.futures.map`, on this pool: the input is read as the
        results are consumed, with at most ``buffersize`` items in flight (read and not
        yet yielded); the work starts at the call. Closing the iterator (or dropping it,
        or an interrupt while it waits) cancels the chunks not sent to a worker yet. The
        iterator has a ``len()`` when every iterable has one.

        Args:
            fn: the function.
            *iterables: its arguments; zipped, the shortest wins.
            timeout: seconds from this call after which a result not yet there raises
                TimeoutError.
            chunksize: items per task; by default chosen for balance and low overhead:
                guided (big first chunks, small last ones) when the input has a length,
                growing with the speed seen so far when it has none. A failing item
                raises at its place, after the results before it.
            buffersize: the most items in flight (as Python 3.14's ``Executor.map``, but
                counted in items, not tasks; an explicit ``chunksize`` above it is cut
                down to it). None: 4 chunks per worker, and 262,144 items at most.
            checkpoint: a file (sqlite) where every result is recorded as it arrives;
                run the program again and the items finished before (a kill, the
                wall-time limit) come back from it in their places, only the rest runs.
                A result is used again only for the same function (its code, defaults
                and closure), the same call (the n-th map of it in the program) and the
                same item at the same place; exceptions and results that cannot be
                pickled are not recorded. A kill loses at most the last half second of
                results. See :mod:`scoop._checkpoint` and docs/guarantees.md.
            retries: a call that raises one of ``retry_on`` is tried again, where it
                ran, up to this many times before its exception is delivered.
            retry_on: the exception class (or tuple of them) that is retried.
            task_timeout: seconds each item may run, as in :func:`scoop.futures.map`:
                past them its worker is ended (and replaced) and the item raises
                ``TaskTimeoutError`` at its place.

        Raises:
            ValueError: ``chunksize`` or ``buffersize`` below 1, ``task_timeout`` not
                above 0.
            TypeError: ``buffersize`` is not an integer, ``task_timeout`` not a number.
            RuntimeError: after :meth:`shutdown`.
        """
        from . import futures  # (futures imports this module on first use)

        _mapping.check_sizes(chunksize, buffersize)
        # the limit outside the initializer's wrapper: the broker must see it
        func = futures.with_options(self._initialized(fn), task_timeout=task_timeout,
                                    retries=retries, retry_on=retry_on)
        return futures._map(func, iterables, timeout, chunksize, buffersize, ordered=True,
                            checkpoint=checkpoint, key_of=fn, rt=_MapClient(self))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work; stop the pool once its work is done (or cancelled).

        Args:
            wait: return only once every future is done and every process of the pool
                is gone; False: return now, the pool stops by itself when done.
            cancel_futures: cancel the futures that have not been sent to a worker yet.
        """
        with self._shutdown_lock:
            self._shutdown_called = True
        self._runtime.finish(cancel_futures)
        if wait:
            self._runtime.join()
        if self._progress is not None and _progress.stop(self._progress):
            self._progress = None

    def __enter__(self) -> Executor:
        """Route the module-level ``futures``/``shared`` calls of this process to this pool
        until the block ends (not in a worker of another job, whose tasks share it)."""
        if scoop.IS_ORIGIN:
            _active.append((self._relay, _route(self._relay)))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for i, (relay, before) in enumerate(_active):
            if relay is self._relay:
                del _active[i]
                # what the block replaced; a block still open inside keeps its own
                _restore(before if i == len(_active) else None, i == len(_active))
                break
        # An interrupted `with` stops what is still waiting to run; otherwise, as the
        # standard library: wait for everything submitted.
        self.shutdown(wait=True, cancel_futures=exc_type is KeyboardInterrupt)
        return False


_JOB_GLOBALS = ("IS_RUNNING", "IS_ORIGIN", "worker", "SIZE", "DEBUG", "HOSTS")


def _route(relay: _Relay) -> tuple:
    """Make ``relay`` this process's runtime for the module-level API; return what it
    replaces: the runtime (None outside a job) and the ``scoop.*`` job globals."""
    before = (_worker.current() if scoop.IS_RUNNING else None,
              {name: getattr(scoop, name) for name in _JOB_GLOBALS})
    launcher = relay._rt_owner.launcher
    _worker.install(relay)
    _bootstrap.set_job_globals(relay, launcher.job.debug, launcher.job.hosts)
    return before


def _restore(before: tuple | None, innermost: bool) -> None:
    """Undo :func:`_route` (only for the innermost block: an outer one keeps routing)."""
    if innermost and before is not None:
        runtime, job_globals = before
        _worker.install(runtime)
        for name, value in job_globals.items():
            setattr(scoop, name, value)


_inits_done: set[str] = set()  # pools whose initializer ran in this (worker) process


class _Initialized:
    """``fn``, called after ``init(*initargs)`` has run once in this worker process for
    the pool ``pool`` (``Executor(initializer=...)``); pickled with its parts."""

    def __init__(self, pool: str, init: Callable, initargs: tuple, fn: Callable) -> None:
        self.pool, self.init, self.initargs, self.fn = pool, init, initargs, fn
        # errors name the user's function (scoop._serialize.call_name)
        self.__qualname__ = getattr(fn, "__qualname__", None) or repr(fn)

    def __call__(self, *args: Any, **kwargs: Any):
        if self.pool not in _inits_done:
            self.init(*self.initargs)
            _inits_done.add(self.pool)
        return self.fn(*args, **kwargs)


class _MapClient:
    """The runtime a map's :class:`~scoop._mapping.Feed` drives for ``Executor.map``
    (its ``submit``, ``ship`` and ``size``): the chunks join the pool's backlog, where
    they stay cancellable until the runtime thread sends them, and complete standard
    futures, which the caller's thread waits on.

    A chunk submitted here waits for :meth:`ship`, which the Feed calls once it has
    added its done-callbacks to every chunk read: the lot then reaches the runtime
    thread with one wake-up, and no callback can be added after the thread took it.
    """

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._batch: list[_WorkItem] = []
        self.elastic = executor._launcher.job.elastic  # see _mapping.pool_size

    @property
    def size(self) -> int:
        return max(1, self._executor.size)

    def submit(self, fn: Callable, args: tuple, kwargs: dict, weight: int = 1,
               state: Any = None) -> cf.Future:
        self._executor._check_open()
        fut = _ChunkFuture()
        self._batch.append(_WorkItem(fut, fn, args, kwargs, weight, state))
        return fut

    def ship(self, keep_first: bool = False) -> None:
        batch, self._batch = self._batch, []
        with self._executor._shutdown_lock:
            self._executor._check_open()
            self._executor._runtime.post(*batch)


class _ChunkFuture(cf.Future):
    """The future of a map chunk. The done-callbacks added before the runtime thread took
    it (the checkpoint's recording, the progress count) move onto its scoop future
    there (:meth:`hand_over`), so they run before the caller can see the result: the
    map cannot end, and close its checkpoint, ahead of its last chunk's record."""

    def __init__(self) -> None:
        super().__init__()
        self._early: list[Callable] = []

    def add_done_callback(self, fn: Callable) -> None:
        with self._condition:
            if self._early is not None and not self.done():
                self._early.append(fn)
                return
        super().add_done_callback(fn)

    def hand_over(self, sfut: Future) -> None:
        """Move the callbacks onto ``sfut`` (in the runtime thread, as it is submitted)."""
        with self._condition:
            early, self._early = self._early, None
        for fn in early:
            sfut.add_done_callback(fn)

    def _invoke_callbacks(self) -> None:
        # never handed over (cancelled in the backlog, or the pool broke): run them now
        with self._condition:
            early, self._early = self._early or [], None
        for fn in early:
            try:
                fn(self)
            except Exception:
                log.exception("exception calling callback for %r", self)
        super()._invoke_callbacks()


def _caller_paths(python: str) -> list[str]:
    """The caller's ``sys.path`` folders that a fresh ``python`` lacks (a project's source
    folder, a notebook's ``sys.path.append``): the workers get them, as multiprocessing's
    spawn gives its children the parent's ``sys.path``; the others stay in the order the
    workers' interpreter gives them."""
    fresh = _fresh_path(python)
    if not fresh:  # cannot be run here (a remote host's path): none of this one's own
        own = [os.path.join(os.path.abspath(p), "") for p in
               (sys.prefix, sys.base_prefix, sys.exec_prefix)]
        fresh = frozenset(p for p in map(os.path.abspath, sys.path)
                          if any(os.path.join(p, "").startswith(o) for o in own))
    paths = [os.path.abspath(p or ".") for p in sys.path]
    return list(dict.fromkeys(p for p in paths if p not in fresh and os.path.isdir(p)))


@functools.cache
def _fresh_path(python: str) -> frozenset[str]:
    """``sys.path`` of ``python -c`` started here (empty if it cannot be asked)."""
    try:
        out = subprocess.run([python, "-c", "import sys, json; print(json.dumps(sys.path))"],
                             capture_output=True, text=True, timeout=30, check=True)
        return frozenset(os.path.abspath(p or ".") for p in json.loads(out.stdout))
    except (OSError, ValueError, subprocess.SubprocessError):
        return frozenset()


def _worker_hosts(max_workers: int | None, hosts, hostfile: str | None, external: int,
                  ssh: str) -> list[tuple[str, int]]:
    """Where the worker processes go, as the launcher's command line decides it.

    Raises:
        ValueError: a bad host list or hostfile.
    """
    if hosts is not None and not isinstance(hosts, str):
        hosts = list(hosts)
        if hosts and not isinstance(hosts[0], str):
            hosts = [name for name, count in hosts for _ in range(count)]
    elif isinstance(hosts, str):
        hosts = hosts.replace(",", " ").split()
    if hosts is not None and not hosts:
        raise ValueError("hosts: no host given (None: this machine)")
    if external and max_workers is None and not (hosts or hostfile):
        return []  # only joining workers
    ns = SimpleNamespace(hosts=hosts, hostfile=hostfile, n=max_workers, ssh=ssh)
    try:
        return _cli.job_hosts(ns)
    except _cli.LaunchError as exc:
        raise ValueError(str(exc)) from None


# ======================================================================================
# The launcher of a pool
# ======================================================================================
class _PoolLauncher(Launcher):
    """A Launcher whose root is the runtime thread's client (see :class:`_Runtime`).

    Where this process's ``sys.stdout``/``sys.stderr`` are not its descriptors 1 and 2
    (a notebook kernel's streams), what workers print is relayed to them: local ones
    through a pseudo-terminal each, remote ones through their ssh connection (or srun
    step), whose stderr goes to ``sys.stderr`` anyway (see :mod:`scoop._launch.remote`).
    """

    runtime: _Runtime

    def start(self, root_in_process: bool = False) -> Launcher:
        # Workers whose output is relayed (a notebook's streams) are each a child of this
        # process. Otherwise they are forked from a template, which dies with this
        # process (its parent-death signal, and the EOF on its socket) and takes them
        # with it (theirs): tests/test_executor.py's killed caller.
        self.forks_workers = _streams_are_fds()
        self.clients = 1  # the runtime thread's client: scoop.SIZE counts the others
        if not _streams_are_fds():
            self.remote_stdout = sys.stdout
        return super().start(root_in_process)

    def _join_as_root(self) -> None:
        # the runtime thread watches the processes, so it can start sandbox workers
        self.broker.sandbox_budget = SANDBOXES_PER_ATTEMPT * self.job.max_attempts
        self.runtime.start()

    def _spawn(self, wid: int):
        if _streams_are_fds():
            return super()._spawn(wid)  # the workers write where this process does
        streams: list = []
        try:
            for stream in (sys.stdout, sys.stderr):
                streams.append((stream, *os.openpty()))
        except OSError:  # no pseudo-terminal here: the workers write where we do
            for _, ours, child in streams:
                os.close(ours)
                os.close(child)
            return super()._spawn(wid)
        try:
            for _, _, child in streams:
                tty.setraw(child)  # no "\r\n"; a terminal, so the worker's lines flush
            self.worker_popen = {"stdout": streams[0][2], "stderr": streams[1][2]}
            return super()._spawn(wid)
        finally:
            self.worker_popen = {}
            for stream, ours, child in streams:
                os.close(child)
                threading.Thread(target=_relay_output, args=(ours, stream), daemon=True,
                                 name=f"scoop-worker-{wid}-output").start()


def _streams_are_fds() -> bool:
    """Whether ``sys.stdout``/``sys.stderr`` are the process's own (descriptors 1, 2)."""
    return sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__


def _relay_output(fd: int, stream) -> None:
    """Copy what a worker writes on ``fd`` to ``stream`` until it closes its end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while data := os.read(fd, 65536):
            stream.write(decoder.decode(data))
            stream.flush()
    except OSError:
        pass  # EIO: every process holding the other end has ended
    finally:
        os.close(fd)


# ======================================================================================
# The runtime thread
# ======================================================================================
class _WorkItem:
    """A call waiting in the backlog; its future is completed by the runtime thread."""

    __slots__ = ("future", "fn", "args", "kwargs", "weight", "state")

    def __init__(self, future: cf.Future, fn: Callable, args: tuple, kwargs: dict,
                 weight: int = 1, state: Any = None) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.weight = weight  # the items of a map chunk (see Worker.submit)
        self.state = state  # a map chunk's, to resume it after a worker's loss

class _Call:
    """A runtime call relayed from another thread, and its outcome."""

    __slots__ = ("fn", "args", "kwargs", "done", "ok", "value")

    def __init__(self, fn: Callable, args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = threading.Event()
        self.ok, self.value = False, None

    def settle(self, ok: bool, value) -> None:
        self.ok, self.value = ok, value
        self.done.set()


def _complete(future: cf.Future, sfut: Future, hub) -> None:
    """Complete a standard future with the outcome of the scoop future it stands for. Its
    own callbacks (the caller's) may wait on scoop futures: where it has any, they run in
    a greenlet of their own, as scoop's done-callbacks do."""
    if getattr(future, "_done_callbacks", True) and getcurrent() is hub.glet:
        greenlet(_set_outcome, parent=hub.glet).switch(future, sfut)
    else:
        _set_outcome(future, sfut)


def _set_outcome(future: cf.Future, sfut: Future) -> None:
    if sfut._exception is None:
        future.set_result(sfut._result)
    else:
        future.set_exception(sfut._exception)


def _watch(launcher: Launcher) -> None:
    """What the launcher's wait loop does: report dead workers, start sandboxes."""
    try:
        launcher.check_workers()
    except Exception as exc:  # noqa: BLE001 - a host failed: its workers are lost
        log.warning("scoop.Executor: %s", exc)


class _Runtime:
    """The client runtime of a pool, in a thread of its own (see the module docstring).

    Args:
        launcher: the pool's launcher (stopped by this thread when it ends).
        workers: the worker processes of the pool.
    """

    def __init__(self, launcher: Launcher, workers: int) -> None:
        self.launcher = launcher
        self._workers = workers
        self.rt: _worker.Worker | None = None
        self.thread: threading.Thread | None = None
        self.requests: collections.deque = collections.deque()
        self.backlog: collections.deque[_WorkItem] = collections.deque()
        self.in_flight: dict[int, tuple[_WorkItem, Any]] = {}  # id(scoop future) -> ...
        self.calls: set[_Call] = set()  # relayed calls under way (parked, most of them)
        self.broken: BaseException | None = None
        self.finishing = False  # shutdown asked: stop once the work is done
        self._open = True  # requests are still taken
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._rfd, self._wfd = os.pipe()
        self._signalled = False  # a byte waits on the pipe: a post need not write one
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._poller = None
        self._next_watch = 0.0
        self.limit = IN_FLIGHT_PER_WORKER * max(1, workers)  # see AHEAD_S
        self._window = (time.monotonic(), 0)  # start, completions since

    @property
    def workers(self) -> int:
        """The worker processes of the pool (elastic: those the broker counts now)."""
        rt = self.rt
        return rt.size if rt is not None and self.launcher.job.elastic else self._workers

    # -- other threads ----------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; return once it has joined the broker (or raise why not)."""
        self.thread = threading.Thread(target=self._main, name="scoop-executor",
                                       daemon=True)  # atexit stops it (see _at_exit)
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def post(self, *requests) -> None:
        """Queue requests (_WorkItem, _Call, or a finish marker) and wake the thread.

        Raises:
            BrokenJobError: the runtime has ended.
        """
        with self._lock:  # the pipe is not closed meanwhile (its number could be reused)
            if not self._open:
                raise BrokenJobError(f"the pool is gone: {self.broken or 'shut down'}")
            self.requests.extend(requests)
            if not self._signalled:  # (a write per submit cost ~19 us: issue 12, line 8a)
                self._signalled = True
                os.write(self._wfd, b"\0")  # never full: one byte at a time

    def call(self, fn: Callable, *args: Any, **kwargs: Any):
        """Run ``fn(*args, **kwargs)`` in a greenlet of the runtime thread; its outcome."""
        if threading.current_thread() is self.thread:
            return fn(*args, **kwargs)
        request = _Call(fn, args, kwargs)
        self.post(request)
        request.done.wait()
        if not request.ok:
            raise request.value
        return request.value

    def finish(self, cancel: bool) -> None:
        """Ask the thread to stop once its work is done (``cancel``: drop the backlog)."""
        try:
            self.post(("finish", cancel))
        except BrokenJobError:
            pass  # already ended

    def join(self) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    # -- the thread ---------------------------------------------------------------------
    def _main(self) -> None:
        try:
            rt = _worker.Worker(0)  # here: its greenlets and sockets belong to this thread
            rt.policy.runs_tasks = False
            rt.where = rt.where.replace("worker 0", "the executor's client", 1)
            rt.shm = _shm.usable(self.launcher.job.shm)
            rt.connect(self.launcher.broker.inproc_address, self.launcher.creds,
                       CONNECT_TIMEOUT_S)
        except BaseException as exc:  # noqa: BLE001 - the caller's start() raises it
            self._error = exc
            self.close_pipe()
            self._ready.set()
            return
        import zmq

        self.rt = rt
        self._poller = zmq.Poller()
        self._poller.register(rt.link.sock, zmq.POLLIN)
        self._poller.register(self._rfd, zmq.POLLIN)
        rt.idle_wait = self._idle_wait
        self._ready.set()
        try:
            rt.serve()  # the hub's loop, until the pool finishes or breaks
        except BaseException as exc:  # noqa: BLE001 - fail the futures below, say why
            log.error("scoop.Executor: its runtime failed: %r", exc)
            rt.stop(exc)
        finally:
            self._end()

    def _idle_wait(self, timeout_ms: int) -> bool:
        """The hub's idle wait (Worker.idle_wait): the broker's socket or a request."""
        if self._wind_down():
            return False
        now = time.monotonic()
        if now >= self._next_watch:
            self._next_watch = now + WATCH_S
            _watch(self.launcher)
        ready = dict(self._poller.poll(timeout_ms))
        if self._rfd in ready:
            with self._lock:  # its one byte; the requests are taken below, and a post
                os.read(self._rfd, 64)  # from now on writes again
                self._signalled = False
        self._serve()
        if self._wind_down():
            return False
        return self.rt.link.sock in ready

    def _serve(self) -> None:
        """Take in the queued requests (in the hub greenlet)."""
        requests = self.requests
        while requests:
            request = requests.popleft()
            if isinstance(request, _WorkItem):
                self.backlog.append(request)
            elif isinstance(request, _Call):
                self.calls.add(request)
                greenlet(self._run_call, parent=self.rt.hub.glet).switch(request)
            else:  # ("finish", cancel): what was submitted before may start first
                self._feed()
                self.finishing = True
                if request[1]:
                    for item in self.backlog:
                        item.future.cancel()
                    self.backlog.clear()
        self._feed()

    def _run_call(self, request: _Call) -> None:
        try:
            value = request.fn(*request.args, **request.kwargs)
        except BaseException as exc:  # noqa: BLE001 - raised in the calling thread
            request.settle(False, exc)
        else:
            request.settle(True, value)
        finally:
            self.calls.discard(request)

    def _feed(self) -> None:
        """Move work from the backlog into the Worker, up to the in-flight limit."""
        rt = self.rt
        while self.backlog and len(self.in_flight) < self.limit and not rt.flags.stopped:
            item = self.backlog.popleft()
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled while it waited here
            try:
                sfut = rt.submit(item.fn, item.args, item.kwargs, item.weight, item.state)
            except BaseException as exc:  # noqa: BLE001 - the pool broke meanwhile
                item.future.set_exception(exc)
                continue
            if type(item.future) is _ChunkFuture:
                item.future.hand_over(sfut)  # before _settle completes it
            self.in_flight[id(sfut)] = (item, sfut)
            sfut.add_done_callback(self._settle)

    @never_waits
    def _settle(self, sfut) -> None:
        """A scoop future is done: complete its standard future (a done-callback)."""
        item, _ = self.in_flight.pop(id(sfut))
        _complete(item.future, sfut, self.rt.hub)
        item.future = item.fn = item.args = item.kwargs = item.state = None  # no stale refs
        self._measure()
        self._feed()

    def _measure(self) -> None:
        """Count a completion; every RATE_WINDOW_S, set the in-flight limit to AHEAD_S
        seconds of work at the rate measured."""
        start, done = self._window
        now, done = time.monotonic(), done + 1
        if now - start < RATE_WINDOW_S:
            self._window = (start, done)
            return
        self._window = (now, 0)
        base = IN_FLIGHT_PER_WORKER * max(1, self.workers)
        self.limit = min(MAX_IN_FLIGHT, max(base, int(done / (now - start) * AHEAD_S)))

    def _wind_down(self) -> bool:
        """Once shutdown was asked and no work is left: leave the job (at the start of an
        idle wait, where no socket is in use). Whether the hub should stop."""
        rt = self.rt
        if rt.flags.stopped:
            return True
        if (self.finishing and not self.backlog and not self.in_flight and not self.requests
                and not rt.pending and not rt.outbox):  # module-level futures too
            rt.shutdown(0)
            return True
        return False

    def _end(self) -> None:
        """The thread ends: fail what is left, stop the launcher's processes."""
        rt = self.rt
        self.broken = None if self.finishing else rt.flags.broken
        with self._lock:
            self._open = False
            left, self.requests = list(self.requests), collections.deque()
        _live.discard(self)
        reason = BrokenJobError(f"the pool is gone: {self.broken or 'shut down'}")
        for item, _ in self.in_flight.values():
            if item.future is not None and not item.future.done():
                item.future.set_exception(reason)
        for item in [*self.backlog, *left, *self.calls]:
            if isinstance(item, _Call):
                item.settle(False, reason)
            elif isinstance(item, _WorkItem) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(reason)
        self.backlog.clear()
        self.in_flight.clear()
        if rt.link is not None:
            rt.close()
        self.close_pipe()
        try:
            self.launcher.stop()
        except Exception:  # noqa: BLE001 - nothing more can be done from here
            log.exception("scoop.Executor: stopping its processes failed")

    def close_pipe(self) -> None:
        """Take no more requests; close the wake pipe."""
        with self._lock:
            if self._rfd < 0:
                return
            self._open = False
            for fd in (self._rfd, self._wfd):
                os.close(fd)
            self._rfd = self._wfd = -1


# ======================================================================================
# The module-level API inside `with`
# ======================================================================================
class _Relay:
    """Stands for the pool's runtime in the caller's threads (``_worker.current()``
    inside ``with Executor()``): every call runs in the runtime thread."""

    def __init__(self, runtime: _Runtime) -> None:
        self._rt_owner = runtime

    @property
    def _rt(self) -> _worker.Worker:
        rt = self._rt_owner.rt
        if rt is None:
            raise BrokenJobError("the pool is gone")
        return rt

    def _call(self, method: str, *args: Any, **kwargs: Any):
        rt = self._rt
        return self._rt_owner.call(lambda: getattr(rt, method)(*args, **kwargs))

    # -- the Worker facade --------------------------------------------------------------
    def submit(self, *args: Any, **kwargs: Any):
        fut = self._call("submit", *args, **kwargs)
        fut._runtime = self  # its result() and cancel() come back through here
        fut.__class__ = _RelayedFuture
        return fut

    def park(self, waiter, deadline: float | None) -> None:
        rt = self._rt

        def park() -> None:
            # Something may have arrived between the caller's check and this call
            # (the waiter is filled by this thread, read by the caller's).
            if waiter.arrived or waiter.remaining <= 0:
                return
            rt.park(waiter, deadline)

        self._rt_owner.call(park)

    def run_callbacks(self, fut, callbacks) -> None:
        for fn in callbacks:  # a future already done: run here, as the standard library
            try:
                fn(fut)
            except Exception:
                log.exception("exception calling callback %r for %r", fn, fut)

    def __getattr__(self, name: str):
        # ship, cancel, wait_one, wait_many, watch, poll_now, poll_messages, set_const,
        # get_const... and whatever the Worker grows: methods run in the runtime thread.
        value = getattr(self._rt, name)
        if callable(value) and hasattr(value, "__self__"):
            return lambda *args, **kwargs: self._call(name, *args, **kwargs)
        return value

    @property
    def size(self) -> int:
        return max(1, self._rt_owner.workers)

    @property
    def wid(self) -> int:
        return 0




class _RelayedFuture(Future):
    """A scoop Future submitted through a :class:`_Relay`: callbacks are added in the
    runtime thread, which completes it (no completion can slip between the check for
    "done" and the append)."""

    __slots__ = ()

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        relay = self._runtime
        relay._rt_owner.call(Future.add_done_callback, self, fn)


# ======================================================================================
# Interpreter exit
# ======================================================================================
_registered = False


def _register_at_exit() -> None:
    global _registered
    if not _registered:
        _registered = True
        atexit.register(_at_exit)


def _at_exit() -> None:
    """Shut every live pool down, waiting for its work, as the standard library does."""
    global _exiting
    _exiting = True
    for runtime in list(_live):
        runtime.finish(False)
    for runtime in list(_live):
        runtime.join()


__all__ = ["Executor"]
