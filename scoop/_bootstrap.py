"""Start-up of a worker process: read the config, join the broker, run or import the program.

The launcher writes one JSON line on the worker's standard input (so the job key never
shows on a command line or in ``ps``): the broker address, the key, the worker id, the
program and its arguments, and the process settings (directory, nice, log level).

The root worker (id 0) runs the program as ``__main__`` and reports its exit status to
the broker; every other worker imports the program as ``__scoop_main__`` (its guarded
block does not run, its module-level data exists) and serves tasks until told to stop.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import signal
import sys
import traceback
import types

import scoop

from . import _serialize, _worker
from ._transport import Credentials
from ._watchdog import Watchdog

log = logging.getLogger("scoop")

MAIN_RUN_NAME = "__scoop_main__"  # the program's module name on non-root workers
# How long a worker tries to reach the broker: the handshake takes milliseconds, so this
# only has to cover a loaded machine; an unreachable broker is reported this quickly.
CONNECT_TIMEOUT_S = 10.0


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


def run_program(path: str, args: list[str], run_name: str) -> None:
    """Execute the program in a fresh module named ``run_name`` with ``sys.argv`` set."""
    with open(path, "rb") as f:
        source = f.read()
    code = compile(source, path, "exec")
    if run_name == "__main__":
        _serialize.set_main_exports(_serialize.main_exports(source))
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    mod = load_program(path, run_name)
    exec(code, mod.__dict__)


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
    """Ask the kernel to kill this worker if the launcher dies (Linux), then check."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if ppid and os.getppid() != ppid:
        os._exit(1)  # the launcher died before we could ask


def main() -> None:
    """A worker started by the launcher or a host agent: its config comes on stdin."""
    cfg = json.loads(sys.stdin.readline())
    sys.stdin.close()
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the program sees an empty input
    start(cfg)


def start(cfg: dict) -> None:
    """Set this process up as the worker ``cfg`` describes and run it until the job ends.

    ``cfg["wid"]`` None: the worker was started by another launcher (python -m
    scoop.join) and takes the id the broker gives it.
    """
    if cfg.get("die_with_parent"):
        _die_with_parent(cfg.get("ppid", 0))
    logging.basicConfig(level=cfg.get("log_level", logging.WARNING),
                        filename=cfg.get("log_file"),
                        format="[%(asctime)s] %(levelname)-7s scoop %(message)s")
    if cfg.get("nice"):
        os.nice(cfg["nice"])
    if cfg.get("cwd"):
        os.chdir(cfg["cwd"])
    creds = Credentials.from_config(cfg)
    worker = _worker.Worker(cfg["wid"] or 0, cfg["size"])
    timeout = cfg.get("connect_timeout", CONNECT_TIMEOUT_S)
    try:
        if cfg["wid"] is None:
            worker.ask_id(cfg["address"], creds, timeout)
        # Set before connecting: the constants that come with the welcome are unpickled
        # at once, and their reducers may ask where they run.
        scoop.IS_RUNNING, scoop.IS_ORIGIN, scoop.worker = True, worker.wid == 0, worker.wid
        worker.connect(cfg["address"], creds, timeout)
    except _worker.JobOver:
        return  # started too late to matter: leave quietly
    except _worker.BrokenJobError as exc:
        print(f"scoop: {worker.where}: {exc}. If this host cannot reach that address, "
              "start the job with --broker-hostname ADDRESS (one it can reach) or -e; "
              "if it runs another scoop version than the launcher's, install the same.",
              file=sys.stderr, flush=True)
        sys.exit(1)
    wid, root = worker.wid, worker.wid == 0
    _worker.install(worker)
    Watchdog(cfg["address"], creds, wid).start()
    scoop.SIZE, scoop.DEBUG = worker.size, bool(cfg.get("debug"))
    scoop.HOSTS = [tuple(h) for h in cfg.get("hosts", [])]
    if root:
        sys.exit(_run_root(worker, cfg))
    _run_worker(worker, cfg)


def _run_root(worker: _worker.Worker, cfg: dict) -> int:
    status = 0
    try:
        run_program(cfg["program"], cfg.get("args", []), "__main__")
    except SystemExit as exc:
        status = exit_status(exc)
    except BaseException as exc:  # noqa: BLE001 - report like Python would, then exit 1
        tb = exc.__traceback__
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb  # our frame
        traceback.print_exception(type(exc), exc, tb)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    worker.shutdown(status)
    return status


def _run_worker(worker: _worker.Worker, cfg: dict) -> None:
    if cfg.get("program"):  # None for the workers of an in-process pool
        try:
            run_program(cfg["program"], cfg.get("args", []), MAIN_RUN_NAME)
        except SystemExit:
            pass
        except BaseException:  # noqa: BLE001 - tasks that need the failed names will say
            log.error("worker %d: importing %s failed; tasks that need it will fail:\n%s",
                      worker.wid, cfg["program"], traceback.format_exc())
    worker.serve()
    worker.close()
