"""Start-up of a worker process: read the config, join the broker, run or import the program.

The launcher writes one JSON line on a pipe the worker inherits (its descriptor number is
the worker's only argument, so the job key never shows on a command line or in ``ps``):
the broker address, the key, the worker id, the program and its arguments, and the
process settings (directory, nice, log level). A line ``{"template": true}`` on a socket
makes the process the job's template instead: it forks the local workers, each of which
then reads its own config from a pipe the same way (``scoop._template``). The
root's stdin is the launcher's, so the program can read a pipe, ``input()`` or
``breakpoint()``; other workers read nothing.

The root worker (id 0) runs the program (a path, or a module as ``python -m`` runs it) as
``__main__`` and reports its exit status to the broker; every other worker imports the
program as ``__scoop_main__`` (its guarded block does not run, its module-level data
exists) and serves tasks until told to stop. A futures call reached while a worker imports
the program (main code without the ``if __name__ == "__main__":`` guard) ends that import
there, and the root names the line once, instead of every worker running the program.
"""

from __future__ import annotations

import ast
import atexit
import builtins
import contextlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
import traceback
import types
from collections.abc import Iterable, Sequence
from typing import NoReturn

import scoop

from . import _progress, _reaper, _serialize, _shm, _spin, _worker
from ._errors import (
    BrokenJobError,
    JobOver,
    JobStopped,
    ProgramError,
    UnguardedCall,
    WallTimeReached,
)
from ._files import create_private
from ._transport import Credentials
from ._watchdog import BROKER_TIMEOUT_S, Watchdog

log = logging.getLogger("scoop")

MAIN_RUN_NAME = "__scoop_main__"  # the program's module name on non-root workers
# How long a worker tries to reach the broker: the handshake takes milliseconds, so this
# only has to cover a loaded machine; an unreachable broker is reported this quickly.
CONNECT_TIMEOUT_S = 10.0
# The exit status of a job stopped because its time was up (EX_TEMPFAIL of sysexits.h:
# "try again later"): a job script tests it to requeue itself.
EXIT_WALLTIME = 75
# This worker's parent when it started (the launcher, an agent or the template): a
# SIGTERM after it changed came from its death (PDEATHSIG).
_parent = 0
_prctl = None  # libc's prctl, once loaded (ctypes)


def load_program(path: str, run_name: str) -> types.ModuleType:
    """Create the program's module and register it; return it before running it.

    The module is reachable as both ``__main__`` and ``__scoop_main__`` so that a function
    pickled by reference on any worker resolves on every other.
    """
    mod = types.ModuleType(run_name)
    mod.__file__ = path
    mod.__builtins__ = builtins
    mod.__loader__ = None
    mod.__spec__ = None
    sys.modules["__main__"] = mod
    sys.modules[MAIN_RUN_NAME] = mod
    return mod


def _compile(source: bytes | str, path: str) -> types.CodeType:
    try:
        return compile(source, path, "exec")
    except SyntaxError as exc:  # no traceback through scoop: Python's own form
        text = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
        raise ProgramError(text) from None


def run_program(path: str, args: list[str], run_name: str) -> None:
    """Execute the program in a fresh module named ``run_name`` with ``sys.argv`` set."""
    with open(path, "rb") as f:
        source = f.read()
    code = _compile(source, path)
    if run_name == "__main__":
        _serialize.set_main_exports(_serialize.main_exports(source))
        _watch_guard(path, source)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    mod = load_program(path, run_name)
    exec(code, mod.__dict__)


def find_module(name: str) -> importlib.machinery.ModuleSpec:
    """The spec of the module ``python -m name`` runs (of a package: its ``__main__``).

    Raises:
        ProgramError: no such module, or nothing in it to run.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:  # a parent package is missing or broken
        raise ProgramError(f"scoop: error while finding module {name!r}: {exc}") from None
    if spec is None:
        raise ProgramError(f"scoop: no module named {name!r}")
    if spec.submodule_search_locations is not None:
        if name.endswith("__main__"):
            raise ProgramError(f"scoop: {name!r} is a package without a __main__ module")
        return find_module(name + ".__main__")
    if spec.loader is None or not hasattr(spec.loader, "get_code"):
        raise ProgramError(f"scoop: {name!r} has no code to run")
    return spec


def run_module(name: str, args: list[str], run_name: str) -> None:
    """Run module ``name`` as ``python -m`` does, in a fresh module named ``run_name``:
    found on ``sys.path`` with the working directory first, relative imports working."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    spec = find_module(name)
    try:
        source = spec.loader.get_source(spec.name)
    except ImportError:
        source = None
    code = _compile(source, spec.origin) if source is not None else spec.loader.get_code(
        spec.name)
    if run_name == "__main__" and source is not None:
        _serialize.set_main_exports(_serialize.main_exports(source))
        _watch_guard(spec.origin, source)
    sys.argv = [spec.origin, *args]
    mod = load_program(spec.origin, run_name)
    mod.__spec__, mod.__loader__, mod.__package__ = spec, spec.loader, spec.parent
    exec(code, mod.__dict__)


def run_main(cfg: dict, run_name: str) -> None:
    """Run the job's program (a path or ``-m`` module) as ``run_name``."""
    if cfg.get("module"):
        run_module(cfg["module"], cfg.get("args", []), run_name)
    else:
        run_program(cfg["program"], cfg.get("args", []), run_name)


def exit_status(exc: SystemExit) -> int:
    """The process status ``sys.exit(code)`` asks for, as Python itself computes it."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _die_with_parent(ppid: int) -> None:
    """Ask the kernel to end this worker if the launcher dies (Linux), then check.

    SIGTERM, not SIGKILL: the worker then ends what its tasks started (see
    :func:`_end_on_sigterm`); the watchdog ends it anyway if the handler cannot run.
    """
    global _prctl
    try:
        if _prctl is None:  # once: the template's, inherited by every worker it forks
            import ctypes  # only here: workers that join on their own never load it

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if ppid and os.getppid() != ppid:
        os._exit(1)  # the launcher died before we could ask


def main() -> None:
    """A worker started by the launcher or a host agent: its config comes as one JSON
    line on the descriptor named by its argument (stdin, the program's, is left alone)."""
    if len(sys.argv) > 1:
        fd = int(sys.argv[1])
        cfg = json.loads(_read_line(fd))
        if cfg.get("template"):  # the job's template: it forks the local workers
            from . import _template

            run_forked(_template.serve(fd, cfg))  # returns in a forked worker only
        os.close(fd)
    else:  # a launcher of scoop 0.9.0 or older writes it on stdin
        cfg = json.loads(sys.stdin.readline())
        sys.stdin.close()
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the program sees an empty input
    start(cfg)


def run_forked(fd: int) -> NoReturn:
    """Run a worker forked from the template, its config on ``fd``, then leave as
    multiprocessing's forked children do: threads joined, atexit handlers run, output
    flushed, then ``os._exit``.

    The interpreter's own finalization would tear down every module inherited from the
    template, writing to (and so copying) most of its memory: ~45 ms of CPU per worker
    at the end of a job, seconds for 128 workers on 2 cores.
    """
    cfg = json.loads(_read_line(fd))
    os.close(fd)
    status = 0
    try:
        start(cfg)
    except SystemExit as exc:
        status = exit_status(exc)
    finally:
        _before_exit()
    os._exit(status)


def exit_now(status: int) -> NoReturn:
    """End this process with ``status`` as Python's exit would, less the teardown of
    every module (~30 ms of CPU for the launcher): what :func:`run_forked` does."""
    _before_exit()
    os._exit(status)


def _before_exit() -> None:
    """What Python's exit does first: non-daemon threads joined, atexit handlers run
    (logging's flush), then the standard streams flushed."""
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()


def _read_line(fd: int) -> bytes:
    """The first line on ``fd``, read without buffering past it: on a template's socket,
    what follows is not the config's."""
    data = b""
    while b"\n" not in data and (chunk := os.read(fd, 65536)):
        data += chunk
    return data


def start(cfg: dict) -> bool:
    """Set this process up as the worker ``cfg`` describes and run it until the job ends;
    False if the job had ended before it could join.

    ``cfg["wid"]`` None: the worker was started by another launcher (python -m
    scoop.join) and takes the id the broker gives it (``cfg["job_file"]``: where it read
    its config, marked once an elastic job ended).
    """
    if cfg.get("die_with_parent"):
        _die_with_parent(cfg.get("ppid", 0))
    if cfg.get("log_file"):
        with contextlib.suppress(OSError):  # basicConfig says why it cannot open it
            create_private(cfg["log_file"])  # on a remote host, its first worker makes it
    logging.basicConfig(level=cfg.get("log_level", logging.WARNING),
                        filename=cfg.get("log_file"),
                        format="[%(asctime)s] %(levelname)-7s scoop %(message)s")
    if cfg.get("nice"):
        os.nice(cfg["nice"])
    if cfg.get("cwd"):
        os.chdir(cfg["cwd"])
    creds = Credentials.from_config(cfg)
    worker = _worker.Worker(cfg["wid"] or 0)  # the job's size comes with the WELCOME
    worker.shm = _shm.usable(cfg.get("shm"))
    global _parent
    _parent = cfg.get("ppid", 0)
    timeout = cfg.get("connect_timeout", CONNECT_TIMEOUT_S)
    try:
        if cfg["wid"] is None:
            worker.ask_id(cfg["address"], creds, timeout)
        enter_job(worker, cfg["address"], creds, debug=bool(cfg.get("debug")),
                  hosts=cfg.get("hosts", []), timeout=timeout,
                  spin_us=cfg.get("spin_us", _spin.SPIN_US),
                  broker_apart=cfg.get("broker_apart", True))
    except JobOver:
        return False  # started too late to matter: leave quietly
    except BrokenJobError as exc:
        if _job_file_ended(cfg):
            return False
        print(f"scoop: {worker.where}: {exc}. If this host cannot reach that address, "
              "start the job with --broker-hostname ADDRESS (one it can reach) or -e; "
              "if it runs another scoop version than the launcher's, install the same.",
              file=sys.stderr, flush=True)
        sys.exit(1)
    wid, root = worker.wid, worker.wid == 0
    if cfg.get("job"):
        os.environ[_reaper.JOB] = cfg["job"]  # a joining worker was not started with it
    _reaper.mark_worker(wid)
    watchdog = Watchdog(
        cfg["address"], creds, wid, ctx=worker.link.ctx, deadlines=worker.deadlines,
        timeout=cfg.get("broker_timeout", BROKER_TIMEOUT_S),
        on_time_up=_signal_time_up if root else None)
    parent = cfg.get("ppid") if cfg.get("die_with_parent") else None
    signal.signal(signal.SIGTERM, _end_on_sigterm if root else _leave_on_sigterm(
        worker, watchdog, parent))
    worker.on_close = watchdog.retire
    watchdog.start()
    try:
        if root:
            sys.exit(_run_root(worker, cfg))
        _run_worker(worker, cfg)
    finally:
        _reaper.end_own()  # what the tasks started ends with us
        _shm.sweep_own(worker.shm)  # the job is over: nobody maps them any more
    return True


def _job_file_ended(cfg: dict) -> bool:
    """Whether the job file a joining worker read now says that its job ended."""
    from .join import job_has_ended  # joining workers only

    return bool(cfg.get("job_file")) and job_has_ended(cfg["job_file"])


def set_job_globals(worker: _worker.Worker | None, debug: bool = False,
                    hosts: Iterable[Sequence] = ()) -> None:
    """Describe this process's part in the job in the ``scoop.*`` globals (see
    :mod:`scoop`); with None, give them back their values outside a job."""
    if worker is None:
        scoop.IS_RUNNING, scoop.IS_ORIGIN, scoop.worker, scoop.SIZE = False, True, None, 1
        scoop.DEBUG, scoop.HOSTS = False, []
        return
    scoop.IS_RUNNING, scoop.IS_ORIGIN = True, worker.wid == 0
    scoop.worker, scoop.SIZE = worker.wid, worker.size
    scoop.DEBUG, scoop.HOSTS = debug, [tuple(h) for h in hosts]


def enter_job(worker: _worker.Worker, address: str, creds: Credentials, *, debug: bool,
              hosts: Iterable[Sequence], timeout: float = CONNECT_TIMEOUT_S,
              spin_us: int = 0, broker_apart: bool = True) -> None:
    """Join the broker at ``address`` and make ``worker`` this process's runtime: what
    a started worker and the launcher's in-process root both do.

    The globals are set before connecting too: the constants that come with the WELCOME
    are unpickled at once, and their reducers may ask where they run. ``scoop.SIZE`` is
    the WELCOME's. If the worker cannot join, the globals are given back. Its idle waits
    poll for up to ``spin_us`` before they sleep, where that takes no one's CPU
    (``scoop._spin``; ``broker_apart``: the broker is not in the root's process).
    """
    set_job_globals(worker, debug, hosts)
    try:
        worker.connect(address, creds, timeout)
    except BaseException:
        set_job_globals(None)
        raise
    set_job_globals(worker, debug, hosts)
    # (after the globals: it reads scoop.HOSTS)
    worker.link.spin = _spin.for_this_host(spin_us, address, broker_apart)
    _worker.install(worker)


def leave_job() -> None:
    """Undo :func:`enter_job` (the worker is already shut down): back to in-process mode."""
    _worker.install(None)
    set_job_globals(None)


def _end_on_sigterm(signum: int, frame) -> None:
    """SIGTERM (the launcher's stop, or its death): end what this worker's tasks started,
    then die of the signal, as without this handler."""
    _reaper.end_own(grace=0.5)
    if _parent and os.getppid() != _parent:
        # PDEATHSIG: the launcher (or template) is dead and cannot sweep /dev/shm. Not
        # otherwise: results in flight to their owner must stay readable.
        _shm.sweep_own(os.environ.get(_reaper.JOB))
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _leave_on_sigterm(worker: _worker.Worker, watchdog: Watchdog, parent: int | None):
    """The SIGTERM handler of a worker other than the root: the first one makes it leave
    the job cleanly (its queued work goes back, its running task finishes within the
    watchdog's grace, then BYE and exit 0: ``Hub.leave``); a second one, one once the
    job is over, or the parent-death signal (its launcher ``parent`` died) ends it as
    :func:`_end_on_sigterm` does."""
    def handler(signum: int, frame) -> None:
        if (worker.policy.leaving or worker.flags.stopped or worker.link is None
                or (parent is not None and os.getppid() != parent)):
            _end_on_sigterm(signum, frame)
            return
        worker.policy.leaving = True  # the hub sees it at its next turn
        watchdog.leave()

    return handler


def _time_is_up(signum: int, frame) -> None:
    """SIGUSR1 from the launcher, once the wall-time grace period is over."""
    signal.signal(signum, signal.SIG_IGN)  # once
    raise WallTimeReached("the job's time is up")


def _signal_time_up() -> None:
    """The broker says the job's time is up (a root on another host than the launcher's):
    raise it in the program as the launcher's SIGUSR1 does for a local root."""
    os.kill(os.getpid(), signal.SIGUSR1)


def _run_root(worker: _worker.Worker, cfg: dict) -> int:
    status = 0
    reporter = _progress.start(worker.size) if cfg.get("progress") else None
    signal.signal(signal.SIGUSR1, _time_is_up)
    try:
        run_main(cfg, "__main__")
    except SystemExit as exc:
        status = exit_status(exc)
    except WallTimeReached:
        print(f"scoop: the job's time is up: stopped early, results recorded (exit status "
              f"{EXIT_WALLTIME}: run it again to resume a checkpointed map)", file=sys.stderr)
        status = EXIT_WALLTIME
    except ProgramError as exc:
        print(exc, file=sys.stderr)
        status = 1
    except BaseException as exc:  # noqa: BLE001 - report like Python would, then exit 1
        status = 1
        if not _stopped(exc):  # if it was, the launcher says so: no traceback
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None and \
                    tb.tb_frame.f_code.co_filename == __file__:
                tb = tb.tb_next  # the program's frames only
            traceback.print_exception(type(exc), exc, tb)
    if reporter is not None:
        _progress.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    worker.shutdown(status)
    return status


def _stopped(exc: BaseException | None) -> bool:
    """Whether ``exc`` comes from the launcher stopping the job."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, JobStopped):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _run_worker(worker: _worker.Worker, cfg: dict) -> None:
    if cfg.get("program") or cfg.get("module"):  # neither: an in-process pool's worker
        _import_program(worker, cfg)
    worker.serve()
    worker.close()


def _import_program(worker: _worker.Worker, cfg: dict) -> None:
    """Import the program as ``__scoop_main__``, so that its functions exist here."""
    what = cfg.get("module") or cfg["program"]
    worker.submit_hook = _refuse_unguarded
    try:
        run_main(cfg, MAIN_RUN_NAME)
    except SystemExit:
        pass
    except ProgramError as exc:  # the root says it too, and the job ends
        log.debug("worker %d: %s", worker.wid, exc)
    except UnguardedCall:  # the root explains it (see _watch_guard)
        log.debug("worker %d: the program calls scoop.futures as it is imported: the "
                  "rest of it is not imported here", worker.wid)
    except BaseException:  # noqa: BLE001 - tasks that need the failed names will say
        log.error("worker %d: importing %s failed; tasks that need it will fail:\n%s",
                  worker.wid, what, traceback.format_exc())
    finally:
        worker.submit_hook = None


def _refuse_unguarded() -> None:
    raise UnguardedCall()


def _guarded_lines(source: bytes | str) -> list[tuple[int, int]]:
    """The line ranges of the program's top-level ``if __name__ == "__main__":`` blocks."""
    return [(node.lineno, node.body[-1].end_lineno or node.lineno)
            for node in ast.parse(source).body
            if isinstance(node, ast.If) and _serialize._is_main_guard(node.test)]


def _watch_guard(path: str, source: bytes | str) -> None:
    """Warn if the root's first futures call comes from the program's top level outside
    its ``__main__`` guard: the other workers, which import the program, reach that call
    too; they stop importing there (see :func:`_import_program`) and this explains it."""
    guarded = _guarded_lines(source)
    rt = _worker.current()

    def check() -> None:
        rt.submit_hook = None  # the first call tells; later ones cost nothing
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if code.co_name == "<module>" and code.co_filename == path:
                if not any(start <= frame.f_lineno <= end for start, end in guarded):
                    log.warning(
                        "%s, line %d calls scoop.futures outside `if __name__ == "
                        "\"__main__\":`. Every worker imports the program, so code outside "
                        "that guard runs on each of them: the others stop importing at "
                        "this line. Put the program's main code under the guard.",
                        path, frame.f_lineno)
                return
            frame = frame.f_back

    rt.submit_hook = check
