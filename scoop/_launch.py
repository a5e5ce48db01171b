"""The launcher: ``python -m scoop`` starts a job's broker and workers and ends them all.

Reimplements SCOOP's ``scoop.launcher``. Deliberate differences: the exit status is the
program's, the job key reaches workers on stdin, workers live in their own process group
(Ctrl-C gives one short message, not a traceback per worker), and every process started
is gone when the launcher returns, however the job ended.

Data flow of a job started by the launcher::

    python -m scoop -n 3 prog.py args
      |-- Broker, a thread of this process, bound to 127.0.0.1:<port> (random)
      |-- worker 0 (root)  python -m scoop._start_worker  <- stdin: {address, key, ...}
      |       runs prog.py as __main__, sends SHUTDOWN(status) when it ends
      |-- worker 1, 2      same command; import prog.py as __scoop_main__ and serve tasks
      '-- waits for the root -> STOP to every worker -> waits -> kills stragglers
          -> exits with the root's status

*Launcher.* Owns the processes: starts them, watches them, reports a worker that dies,
and on any ending (program done, Ctrl-C, SIGTERM, error) stops them all.

*Broker.* Routes work between the workers (see :mod:`scoop._broker`).

*Workers.* See :mod:`scoop._bootstrap` (start-up) and :mod:`scoop._worker` (runtime).

A :class:`Launcher` can also make the calling interpreter the root worker
(``root_in_process=True``): a library call then gets a pool with no separate program.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time

import scoop

from . import _broker, _worker

log = logging.getLogger("scoop")

# How long workers get to leave by themselves after STOP before they are killed.
STOP_GRACE_S = 3.0
# How often the launcher checks its processes while the program runs.
WATCH_PERIOD_S = 0.05
WORKER_MODULE = "scoop._start_worker"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe_status(code: int) -> str:
    """``Popen.returncode`` in words: 'exit status 3' or 'killed by SIGKILL'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def shell_status(code: int) -> int:
    """A ``Popen.returncode`` as a shell would report it (128 + signal number)."""
    return 128 - code if code < 0 else code


class Launcher:
    """Starts a broker and ``n`` workers on this host; watches and stops them.

    Args:
        n: the number of workers, the root included.
        program: path of the program the root runs (None with ``root_in_process``).
        args: the program's arguments.
        python: the interpreter for the workers.
        cwd: the workers' working directory.
        pythonpath: prepended to the workers' PYTHONPATH.
        nice: niceness increment for the workers.
        debug: sets ``scoop.DEBUG`` on the workers.
        log_level: the workers' logging level.
        log_file: where the workers write their log records (None: stderr).
    """

    def __init__(self, n: int, program: str | None = None, args: list[str] | None = None, *,
                 python: str = sys.executable, cwd: str | None = None,
                 pythonpath: str | None = None, nice: int = 0, debug: bool = False,
                 log_level: int = logging.WARNING, log_file: str | None = None) -> None:
        if n < 1:
            raise ValueError("a job needs at least one worker")
        self.n = n
        self.program = program
        self.args = list(args or [])
        self.python = python
        self.cwd = cwd or os.getcwd()
        self.pythonpath = pythonpath
        self.nice = nice
        self.debug = debug
        self.log_level = log_level
        self.log_file = log_file
        self.key = _broker.new_key()
        self.broker: _broker.Broker | None = None
        self.procs: dict[int, subprocess.Popen] = {}
        self.root_worker: _worker.Worker | None = None
        self._reported: set[int] = set()

    # -- starting --------------------------------------------------------------------------
    def start(self, root_in_process: bool = False) -> Launcher:
        """Start the broker and the workers; with ``root_in_process``, join as the root."""
        self.broker = _broker.Broker(self.key, size=self.n).start()
        first = 1 if root_in_process else 0
        try:
            for wid in range(first, self.n):
                self.procs[wid] = self._spawn(wid)
            if root_in_process:
                self._join_as_root()
        except BaseException:
            self.stop()
            raise
        return self

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.pythonpath:
            old = env.get("PYTHONPATH")
            env["PYTHONPATH"] = self.pythonpath + (os.pathsep + old if old else "")
        return env

    def _spawn(self, wid: int) -> subprocess.Popen:
        cfg = {
            "address": self.broker.address, "key": self.key.hex(), "wid": wid,
            "size": self.n, "program": self.program, "args": self.args, "cwd": self.cwd,
            "nice": self.nice, "debug": self.debug, "log_level": self.log_level,
            "log_file": self.log_file, "ppid": os.getpid(), "die_with_parent": True,
        }
        try:
            proc = subprocess.Popen([self.python, "-m", WORKER_MODULE], stdin=subprocess.PIPE,
                                    cwd=self.cwd, env=self._env(), start_new_session=True)
        except OSError as exc:
            raise LaunchError(f"cannot start a worker with {self.python!r}: {exc}. "
                              "Check --python-executable.") from exc
        proc.stdin.write(json.dumps(cfg).encode() + b"\n")
        proc.stdin.close()
        log.debug("started worker %d (pid %d)", wid, proc.pid)
        return proc

    def _join_as_root(self) -> None:
        worker = _worker.Worker(0, self.n)
        worker.connect(self.broker.address, self.key)
        _worker.install(worker)
        self.root_worker = worker
        scoop.IS_RUNNING, scoop.IS_ORIGIN, scoop.worker, scoop.SIZE = True, True, 0, self.n
        scoop.DEBUG = self.debug

    # -- watching --------------------------------------------------------------------------
    def wait(self) -> int:
        """Wait for the root worker's process; return its status as a shell would."""
        root = self.procs[0]
        while True:
            code = root.poll()
            if code is not None:
                return shell_status(code)
            self.check_workers()
            time.sleep(WATCH_PERIOD_S)

    def check_workers(self) -> None:
        """Report each non-root worker that ended before the job did (once), to the log
        and to the broker, which gives its work to the others."""
        if self.broker is not None and self.broker.stopping:
            return
        for wid, proc in self.procs.items():
            code = proc.poll()
            if wid and code is not None and wid not in self._reported:
                self._reported.add(wid)
                log.warning("worker %d (pid %d) ended early: %s", wid, proc.pid,
                            describe_status(code))
                self.broker.worker_lost(wid, describe_status(code))

    # -- stopping --------------------------------------------------------------------------
    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop the job: STOP every worker, wait ``grace`` seconds, then kill the rest."""
        if self.root_worker is not None:
            self.root_worker.shutdown(0)
            _worker.install(None)
            self.root_worker = None
            scoop.IS_RUNNING, scoop.worker, scoop.SIZE = False, None, 1
        if self.broker is not None:
            self.broker.stop_workers()
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in self.procs.values() if p.poll() is None]
            for proc in alive:
                _signal_group(proc, sig)
            for proc in alive:
                try:
                    proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    pass
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> Launcher:
        return self.start(root_in_process=True) if self.root_worker is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the worker and anything it started
    except (ProcessLookupError, PermissionError):
        pass


class LaunchError(RuntimeError):
    """The job could not start (bad program, interpreter or option)."""


# -- command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scoop",
        description="Run a Python program with its scoop.futures calls spread over "
                    "several worker processes.",
        epilog="Example: python -m scoop -n 4 program.py --its-own-option 1")
    p.add_argument("-n", type=int, metavar="N", default=None,
                   help="number of workers, the root included (default: CPUs of this "
                        f"machine, {_cpu_count()} here)")
    p.add_argument("--path", "-p", metavar="DIR", default=None,
                   help="working directory of the workers (default: the current one)")
    p.add_argument("--nice", type=int, metavar="N", default=0,
                   help="niceness increment of the workers (-20 to 19)")
    p.add_argument("--python-executable", "--python-interpreter", dest="python",
                   metavar="PYTHON", default=sys.executable,
                   help="the Python interpreter of the workers (default: this one)")
    p.add_argument("--pythonpath", metavar="PATH", default=None,
                   help="directories prepended to the workers' PYTHONPATH")
    p.add_argument("--verbose", "-v", action="count", default=0,
                   help="more launcher messages (-vv for debugging)")
    p.add_argument("--quiet", "-q", action="store_true", help="only errors")
    p.add_argument("--log", metavar="FILE", default=None,
                   help="write scoop's log messages (launcher and workers) to FILE; the "
                        "program's own output still goes to the terminal")
    p.add_argument("--debug", action="store_true",
                   help="debug mode: scoop.DEBUG is True and logging is verbose")
    p.add_argument("executable", metavar="program.py", help="the program to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the program's arguments")
    return p


def _log_level(ns: argparse.Namespace) -> int:
    if ns.debug or ns.verbose >= 2:
        return logging.DEBUG
    if ns.quiet:
        return logging.ERROR
    return logging.INFO if ns.verbose == 1 else logging.WARNING


def _check_program(path: str) -> str | None:
    """A reason the program cannot run, or None."""
    if not os.path.exists(path):
        return f"{path}: no such file"
    if os.path.isdir(path):
        return f"{path}: is a directory, not a Python program"
    try:
        with open(path, "rb") as f:
            compile(f.read(), path, "exec")
    except SyntaxError as exc:
        where = f"{exc.filename}, line {exc.lineno}"
        text = (exc.text or "").rstrip()
        return f"syntax error in {where}: {exc.msg}" + (f"\n    {text}" if text else "")
    except (OSError, ValueError) as exc:
        return f"{path}: cannot read: {exc}"
    return None


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise _Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m scoop [options] program.py [args]``; return the exit status."""
    ns = build_parser().parse_args(argv)
    level = _log_level(ns)
    logging.basicConfig(level=level, filename=ns.log,
                        format="[%(asctime)s] %(levelname)-7s scoop %(message)s")
    program = os.path.abspath(ns.executable)
    problem = _check_program(program)
    if problem:
        print(f"scoop: {problem}", file=sys.stderr)
        return 2 if "no such file" in problem or "directory" in problem else 1
    n = ns.n if ns.n is not None else _cpu_count()
    if n < 1:
        print("scoop: -n must be at least 1", file=sys.stderr)
        return 2
    launcher = Launcher(n, program, ns.args, python=ns.python,
                        cwd=os.path.abspath(ns.path) if ns.path else None,
                        pythonpath=ns.pythonpath, nice=ns.nice, debug=ns.debug,
                        log_level=level, log_file=ns.log and os.path.abspath(ns.log))
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start()
        log.info("started %d workers; broker at %s", n, launcher.broker.address)
        status = launcher.wait()
    except _Interrupted as exc:
        name = "Ctrl-C" if exc.signum == signal.SIGINT else signal.Signals(exc.signum).name
        print(f"scoop: {name}, stopping the job", file=sys.stderr)
        status = 128 + exc.signum
    except LaunchError as exc:
        print(f"scoop: {exc}", file=sys.stderr)
        status = 1
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
        try:
            launcher.stop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return status
