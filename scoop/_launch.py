"""The launcher: ``python -m scoop`` starts a job's broker and workers and ends them all.

Reimplements SCOOP's ``scoop.launcher``. Deliberate differences: the exit status is the
program's, the job key reaches workers on a pipe of their own (the root's stdin is the
launcher's, as mpirun gives rank 0), workers live in their own process group
(Ctrl-C gives one short message, not a traceback per worker), and every process started
is gone when the launcher returns, however the job ended.

Data flow of a job started by the launcher::

    python -m scoop -n 3 prog.py args
      |-- Broker, a thread of this process, bound to 127.0.0.1:<port> (random)
      |-- worker 0 (root)  python -m scoop._start_worker 5  <- fd 5: {address, key, ...}
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
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque

import scoop

from . import _agent, _bootstrap, _broker, _reaper, _worker
from ._files import create_private, read_regular, write_atomically
from ._transport import Credentials

log = logging.getLogger("scoop")

# How long workers get to leave by themselves after STOP before they are killed.
STOP_GRACE_S = 3.0
# How often the launcher checks its processes while the program runs.
WATCH_PERIOD_S = 0.05
# Sandbox workers the launcher may start, per --max-attempts: a task that may have killed
# a worker runs in one when no other worker is left, never in the root (a poison task
# kills at most --max-attempts of them, then fails).
SANDBOXES_PER_ATTEMPT = 4
AGENT_MODULE = "scoop._start_host"
# How long remote workers may take to join before the job is abandoned (ssh, a cold
# Python start on a loaded node, a network file system).
JOIN_TIMEOUT_S = 60.0
# Options every ssh connection gets: never prompt, give up on a host that does not answer
# within 10 s (not the system's TCP timeout, minutes), notice a dead link within ~15 s.
# ssh takes the first value it sees, so --ssh-executable 'ssh -o ConnectTimeout=60' wins.
SSH_CONNECT_TIMEOUT_S = 10
SSH_OPTIONS = ("-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}",
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")
# What ssh says when it cannot reach a host at all (vs. a refusal by a host that answered).
SSH_UNREACHABLE = ("timed out", "No route to host", "Network is unreachable",
                   "Could not resolve hostname", "Name or service not known",
                   "Temporary failure in name resolution")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


describe_status = _agent.describe_status
shell_status = _agent.shell_status


class Launcher:
    """Starts a broker and ``n`` workers on this host; watches and stops them.

    Args:
        n: the number of workers, the root included.
        program: path of the program the root runs (None with ``root_in_process``).
        args: the program's arguments.
        module: instead of ``program``, the module the root runs as ``python -m`` does.
        python: the interpreter for the workers.
        cwd: the workers' working directory.
        pythonpath: prepended to the workers' PYTHONPATH.
        nice: niceness increment for the workers.
        debug: sets ``scoop.DEBUG`` on the workers.
        log_level: the workers' logging level.
        log_file: where the workers write their log records (None: stderr).
        encrypt: encrypt the job's traffic with ZeroMQ CURVE (see ``_transport``); None:
            whenever a worker may connect from another machine (:func:`wants_encryption`).
    """

    def __init__(self, n: int | None = None, program: str | None = None,
                 args: list[str] | None = None, *, hosts: list[tuple[str, int]] | None = None,
                 python: str = sys.executable, cwd: str | None = None,
                 pythonpath: str | None = None, nice: int = 0, debug: bool = False,
                 log_level: int = logging.WARNING, log_file: str | None = None,
                 ssh: str = "ssh", broker_hostname: str | None = None,
                 prolog: str | None = None, tunnel: bool = False, external: int = 0,
                 job_file: str | None = None, launcher: str = "ssh",
                 max_attempts: int = _broker.MAX_ATTEMPTS, encrypt: bool | None = None,
                 module: str | None = None) -> None:
        if hosts is None:
            hosts = [("127.0.0.1", n or 1)]
        hosts = [(name, count) for name, count in hosts if count > 0]
        self.external = external  # workers another launcher starts (python -m scoop.join)
        self.n = sum(count for _, count in hosts) + external
        if self.n < 1:
            raise ValueError("a job needs at least one worker")
        self.hosts = hosts
        self.program = program
        self.module = module
        self.args = list(args or [])
        self.python = python
        self.cwd = cwd or os.getcwd()
        self.pythonpath = pythonpath
        self.nice = nice
        self.debug = debug
        self.log_level = log_level
        self.log_file = log_file
        self.ssh = ssh
        self.broker_hostname = broker_hostname
        self.prolog = prolog
        self.tunnel = tunnel
        self.launcher = launcher
        self.max_attempts = max_attempts
        self.job_file = job_file
        self._wrote_job_file = False
        self.encrypt = wants_encryption(encrypt, hosts, external, tunnel, launcher)
        self.creds = Credentials.new(self.encrypt)
        self.key = self.creds.key
        self.job_id = _reaper.new_job_id()  # marks every process of the job (_reaper)
        self.broker: _broker.Broker | None = None
        self.procs: dict[int, subprocess.Popen] = {}  # local workers by id
        self.agents: dict[str, _RemoteHost] = {}  # remote hosts by name
        self.root_worker: _worker.Worker | None = None
        self._reported: set[int] = set()

    # -- starting --------------------------------------------------------------------------
    def start(self, root_in_process: bool = False) -> Launcher:
        """Start the broker and the workers; with ``root_in_process``, join as the root."""
        from ._hosts import is_local

        if self.launcher == "srun":
            return self._start_with_srun(root_in_process)
        remote = [name for name, _ in self.hosts if not is_local(name)]
        placed = self.n - self.external
        if self.external:
            # Joining workers may run anywhere: listen on every interface.
            self.broker = self._new_broker("0.0.0.0", first_free_wid=placed)
            port = self.broker.address.rsplit(":", 1)[1]
            address = self.broker_hostname or (
                guess_broker_address(remote[0], self.ssh) if remote else socket.getfqdn())
            self.worker_address = f"tcp://{address}:{port}"
            self.write_job_file()
        elif remote and self.tunnel:
            # Remote workers reach the broker through ssh reverse tunnels: it listens on
            # loopback only, and each host forwards the same port on its own loopback.
            self.broker = self._new_broker()
            self.worker_address = self.broker.address
        elif remote:
            address = self.broker_hostname or guess_broker_address(remote[0], self.ssh)
            self.broker = self._new_broker("0.0.0.0")
            port = self.broker.address.rsplit(":", 1)[1]
            self.worker_address = f"tcp://{address}:{port}"
        else:
            self.broker = self._new_broker()
            self.worker_address = self.broker.address
        try:
            placed, wid = [], 0
            for name, count in self.hosts:
                wids = list(range(wid, wid + count))
                wid += count
                if root_in_process and wids[0] == 0:
                    wids = wids[1:]
                if wids:
                    placed.append((name, wids, is_local(name)))
            # The root starts last, once every remote worker has joined: a host that
            # cannot take part stops the job before the program runs, not halfway.
            for name, wids, local in sorted(placed, key=lambda p: 0 in p[1]):
                if 0 in wids:
                    self._await_remote_workers()
                if local:
                    for w in wids:
                        self.procs[w] = self._spawn(w)
                else:
                    self.agents[name] = _RemoteHost(name, wids, self)
            if root_in_process:
                self._await_remote_workers()
                self._join_as_root()
            elif 0 in self.procs:  # this process watches the job: it can start sandboxes
                self.broker.sandbox_budget = SANDBOXES_PER_ATTEMPT * self.max_attempts
        except BaseException:
            self.stop()
            raise
        return self

    def _new_broker(self, host: str = "127.0.0.1", first_free_wid: int | None = None):
        """Start this job's broker in a thread, bound to ``host``."""
        return _broker.Broker(self.creds, size=self.n, host=host, first_free_wid=first_free_wid,
                              max_attempts=self.max_attempts).start()

    def _start_with_srun(self, root_in_process: bool) -> Launcher:
        """Every worker but the root comes from one srun step running scoop.join."""
        others = self.n - 1
        hosts = [name for name, _ in self.hosts]
        self.broker = self._new_broker("0.0.0.0", first_free_wid=1)
        port = self.broker.address.rsplit(":", 1)[1]
        address = self.broker_hostname or guess_broker_address(
            hosts[1] if len(hosts) > 1 else hosts[0], self.ssh)
        self.worker_address = f"tcp://{address}:{port}"
        try:
            self.write_job_file()
            if others:
                argv = [*_die_with_launcher(), "srun", f"--ntasks={others}",
                        "--kill-on-bad-exit=0", self.python, "-m", "scoop.join",
                        self.job_file]
                self.agents["srun"] = _RemoteHost("srun", list(range(1, self.n)), self,
                                                  argv=argv)
            self._await_remote_workers()
            if root_in_process:
                self._join_as_root()
            else:
                self.procs[0] = self._spawn(0)
        except BaseException:
            self.stop()
            raise
        return self

    def write_job_file(self) -> str:
        """Write the job file joining workers read (mode 0600: it holds the key)."""
        if self.job_file is None:
            folder = os.path.join(os.path.expanduser("~"), ".scoop", "jobs")
            os.makedirs(folder, mode=0o700, exist_ok=True)
            self.job_file = os.path.join(folder, f"job-{os.getpid()}-{self.job_id[:8]}.json")
        try:
            write_atomically(self.job_file,
                             json.dumps(self.worker_config(None, self.worker_address)))
        except OSError as exc:
            raise LaunchError(f"cannot write the job file {self.job_file}: "
                              f"{exc.strerror or exc}") from None
        self._wrote_job_file = True
        log.info("job file for joining workers: %s", self.job_file)
        return self.job_file

    def _await_remote_workers(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Wait until every remote worker started so far has joined the broker.

        Raises:
            LaunchError: a host failed, or its workers did not join in time.
        """
        expected = {w for agent in self.agents.values() for w in agent.wids}
        deadline = time.monotonic() + timeout
        while missing := expected - set(self.broker.by_wid):
            for agent in self.agents.values():
                agent.check_failed(ended_early=bool(set(agent.wids) & missing))
            if time.monotonic() > deadline:
                hosts = sorted({a.name for a in self.agents.values() if set(a.wids) & missing})
                raise LaunchError(
                    f"workers on {', '.join(hosts)} did not join the broker within "
                    f"{timeout:.0f} s. If they cannot reach {self.worker_address}, pass "
                    "--broker-hostname with an address of this machine they can reach")
            time.sleep(0.02)
        for agent in self.agents.values():
            agent.go_live()

    def worker_config(self, wid: int | None, address: str) -> dict:
        """The config a worker reads when it starts."""
        return {
            **self.creds.for_worker(), "job": self.job_id, "address": address, "wid": wid,
            "program": self.program, "module": self.module, "args": self.args,
            "cwd": self.cwd, "nice": self.nice, "debug": self.debug,
            "log_level": self.log_level, "log_file": self.log_file, "hosts": self.hosts,
        }

    def _spawn(self, wid: int) -> subprocess.Popen:
        try:
            proc = _agent.spawn_worker(self.worker_config(wid, self.broker.address),
                                       self.python, self.cwd, self.pythonpath,
                                       stdin=None if wid == 0 else subprocess.DEVNULL)
        except _agent.SpawnError as exc:
            raise LaunchError(str(exc)) from None
        log.debug("started worker %d (pid %d)", wid, proc.pid)
        return proc

    def _join_as_root(self) -> None:
        worker = _worker.Worker(0)  # the job's size comes with the WELCOME
        _bootstrap.enter_job(worker, self.broker.address, self.creds, debug=self.debug,
                             hosts=self.hosts)
        self.root_worker = worker

    # -- watching --------------------------------------------------------------------------
    def wait(self) -> int:
        """Wait for the root worker's process; return its status as a shell would.

        Raises:
            LaunchError: a remote host failed (ssh refused, scoop missing there, ...).
        """
        root = self.procs.get(0) or self.agents[self.hosts[0][0]].proc
        while True:
            code = root.poll()
            if code is not None:
                if 0 not in self.procs and 0 not in self.broker.seen:
                    self.agents[self.hosts[0][0]].check_failed()  # it never ran
                elif code < 0:  # a bare 137 tells a user nothing
                    print(f"scoop: {_agent.death_message(0, root.pid, code)}",
                          file=sys.stderr, flush=True)
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
                log.warning("%s", _agent.death_message(wid, proc.pid, code))
                self.broker.worker_lost(wid, describe_status(code))
        for agent in self.agents.values():
            if any(w in self.broker.seen for w in agent.wids):
                agent.go_live()
            agent.check_ended()
        self._start_sandboxes()

    def _start_sandboxes(self) -> None:
        """Start the sandbox workers the broker asked for (see Broker._fail_stranded)."""
        requests = self.broker.sandbox_requests
        while not requests.empty():
            wid = requests.get_nowait()
            log.info("starting sandbox worker %d", wid)
            self.procs[wid] = self._spawn(wid)

    # -- stopping --------------------------------------------------------------------------
    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop the job: STOP every worker, wait ``grace`` seconds, then kill the rest."""
        if self.root_worker is not None:
            self.root_worker.shutdown(0)
            self.root_worker = None
            _bootstrap.leave_job()
        if self.broker is not None:
            self.broker.stop_workers()
        for agent in self.agents.values():
            agent.close()  # EOF on its stdin: it stops its workers if STOP did not
        _agent.reap([*self.procs.values(), *(a.proc for a in self.agents.values())], grace)
        for agent in self.agents.values():
            agent.finish()
        # What tasks started and their workers did not end (a worker killed outright).
        _reaper.end_marked(_reaper.JOB, self.job_id)
        if self.broker is not None:
            self.broker.stop()
        if self._wrote_job_file:
            self._wrote_job_file = False
            try:
                os.unlink(self.job_file)
            except OSError:
                pass

    def __enter__(self) -> Launcher:
        return self.start(root_in_process=True) if self.root_worker is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class _RemoteHost:
    """The workers of one remote host: an ssh connection running the host agent."""

    def __init__(self, name: str, wids: list[int], launcher: Launcher,
                 argv: list[str] | None = None) -> None:
        self.name = name
        self.wids = wids
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self._held: list[bytes] | None = []  # stderr lines not shown yet (see go_live)
        self._held_lock = threading.Lock()
        self._stdin_lock = threading.Lock()  # the relay of the root's input vs close()
        self._closed = False
        spec = None
        if argv is None:  # an ssh connection running the host agent
            spec = {"host": name, "python": launcher.python, "cwd": launcher.cwd,
                    "pythonpath": launcher.pythonpath,
                    "root_stdin": 0 in wids and _stdin_is_ours(),
                    "workers": [launcher.worker_config(w, launcher.worker_address)
                                for w in wids]}
            argv = _ssh_argv(name, launcher)
        log.debug("host %s: %s", name, shlex.join(argv))
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                         cwd=launcher.cwd,
                                         env=_agent.worker_env(launcher.pythonpath),
                                         start_new_session=True)
        except OSError as exc:
            raise LaunchError(f"cannot run {argv[0]!r} to start workers on {name}: {exc}. "
                              "Check --ssh-executable or --launcher.") from None
        if spec is not None:
            self.proc.stdin.write(json.dumps(spec).encode() + b"\n")
            self.proc.stdin.flush()  # kept open: its end tells the agent to stop
            if spec["root_stdin"]:
                threading.Thread(target=self._relay_stdin, daemon=True).start()
        self._relay = threading.Thread(target=self._relay_stderr, daemon=True)
        self._relay.start()
        self._failed_reported = False

    def _relay_stderr(self) -> None:
        for raw in self.proc.stderr:
            with self._held_lock:
                self.stderr_tail.append(raw.decode(errors="replace").rstrip("\n"))
                if self._held is not None:
                    self._held.append(raw)
                    continue
                _write_err(raw)  # as the host wrote it, whatever its encoding

    def go_live(self) -> None:
        """Show what the host said so far and, from now on, as it comes. Until one of its
        workers joins, its lines are held: if it fails, they are part of the error."""
        with self._held_lock:
            if self._held:
                _write_err(b"".join(self._held))
            self._held = None

    def check_failed(self, ended_early: bool = False) -> None:
        """Raise LaunchError if the connection ended in failure before the job did
        (or ended at all, with ``ended_early``: its workers were still expected)."""
        code = self.proc.poll()
        if code is None or (code == 0 and not ended_early) or self._failed_reported:
            return
        self._failed_reported = True
        self._relay.join(1.0)
        with self._held_lock:
            held, self._held = self._held, None  # shown once: in the error
        said = b"".join(held[-40:]).decode(errors="replace").rstrip("\n").replace(
            "\n", "\n    ") if held else (
            "(its output is above)" if held is None else "(nothing on stderr)")
        what, hint = self._diagnose(code)
        raise LaunchError(f"host {self.name}: {what}:\n    {said}\n  Try: {hint}.")

    def _diagnose(self, code: int) -> tuple[str, str]:
        """What went wrong on this host and what to try, from its status and stderr."""
        tail = list(self.stderr_tail)
        if code == 255 and any("forwarding failed" in line for line in tail):
            return ("ssh could not open the tunnel (-e) to the broker's port there",
                    "run again (the port is chosen anew), or drop -e and use --broker-hostname")
        if code == 255 and any(w in line for line in tail for w in SSH_UNREACHABLE):
            return ("could not be reached (ssh gave up)",
                    f"check that {self.name} is up and its name right: `ssh {self.name} "
                    "true` must work. On a slow network, raise ssh's ConnectTimeout "
                    f"(now {SSH_CONNECT_TIMEOUT_S} s): --ssh-executable 'ssh -o "
                    "ConnectTimeout=60'")
        if code == 255:
            return ("ssh could not connect or was refused",
                    f"check that `ssh {self.name} true` works without a password "
                    "(BatchMode), or pass --ssh-executable")
        if missing := [line for line in tail if "No module named" in line]:
            return ("scoop is not installed for the Python interpreter there, or a module "
                    f"it needs is missing ({missing[-1].strip()})",
                    "install scoop on that host, or pass --python-executable, or --prolog "
                    "FILE to activate an environment that has it")
        if code == 127:
            return ("the Python interpreter or scoop was not found there",
                    "pass --python-executable, or --prolog FILE to activate an environment")
        return (f"its workers ended with {describe_status(code)}",
                "if they could not reach the broker, pass --broker-hostname with an "
                "address of this machine that the host can reach")

    def check_ended(self) -> None:
        """Once the job runs, a host whose agent ended is reported, not fatal: the
        broker notices its silent workers and gives their work to the others."""
        code = self.proc.poll()
        if code is not None and not self._failed_reported:
            self._failed_reported = True
            log.warning("host %s: its workers are gone (%s); their work runs elsewhere",
                        self.name, describe_status(code))

    def finish(self) -> None:
        """Once its connection ended: show what it said that was not shown yet."""
        self._relay.join(1.0)
        self.go_live()

    def _relay_stdin(self) -> None:
        """Pass this process's stdin to the root worker on this host, as frames on the
        agent's stdin (raw reads: this daemon thread may still wait for input at exit)."""
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            with self._stdin_lock:
                if self._closed:
                    return
                try:
                    _agent.write_frame(self.proc.stdin, data)
                except (OSError, ValueError):  # the agent is gone
                    return
            if not data:
                return

    def close(self) -> None:
        # A relay blocked on a full ssh channel holds the lock: then the agent learns
        # the end when reap() ends ssh.
        if not self._stdin_lock.acquire(timeout=1.0):
            return
        try:
            self._closed = True
            self.proc.stdin.close()
        except OSError:
            pass
        finally:
            self._stdin_lock.release()


def _write_err(data: bytes) -> None:
    """Write bytes a host sent to this terminal's stderr unchanged."""
    sys.stderr.flush()
    out = getattr(sys.stderr, "buffer", None)
    if out is None:  # a stderr without bytes (replaced by a test harness, say)
        sys.stderr.write(data.decode(errors="replace"))
    else:
        out.write(data)
        out.flush()


def _stdin_is_ours() -> bool:
    """Whether this process may read its stdin for a remote root: it is open and, if a
    terminal, this process is in the foreground (else reading it would stop the job)."""
    try:
        if not os.isatty(0):
            os.fstat(0)
            return True
        return os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _ssh_argv(name: str, launcher: Launcher) -> list[str]:
    """The ssh command that runs the host agent on ``name``."""
    command = f"cd {shlex.quote(launcher.cwd)} && "
    if launcher.prolog:
        command += f". {shlex.quote(launcher.prolog)} && "
    command += f"exec {shlex.quote(launcher.python)} -m {AGENT_MODULE}"
    tunnel = []
    if launcher.tunnel:
        port = launcher.broker.address.rsplit(":", 1)[1]
        tunnel = ["-o", "ExitOnForwardFailure=yes", "-R", f"{port}:127.0.0.1:{port}"]
    # "--": whatever a host name holds, ssh never reads it as an option.
    return [*_die_with_launcher(), *shlex.split(launcher.ssh), *SSH_OPTIONS, *tunnel, "--",
            name, command]


def _die_with_launcher() -> list[str]:
    """A prefix that kills the ssh client if the launcher dies (Linux util-linux setpriv):
    the agent at the other end then sees its stdin close and stops its workers at once,
    instead of waiting for the watchdogs to notice the broker is gone."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


def guess_broker_address(remote: str, ssh: str = "ssh") -> str:
    """The address of this machine that routes to ``remote`` (no packet is sent).

    ``ssh -G`` resolves ssh config aliases to the real host name without connecting.
    """
    target = remote
    try:
        out = subprocess.run([*shlex.split(ssh), "-G", "--", remote], capture_output=True,
                             text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("hostname "):
                target = line.split(None, 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))  # UDP: picks a route and a source address only
            return s.getsockname()[0]
        except OSError:
            return socket.gethostname()


def wants_encryption(encrypt: bool | None, hosts: list[tuple[str, int]], external: int,
                     tunnel: bool, launcher: str) -> bool:
    """Whether a job's traffic is encrypted: as asked, or by default whenever a worker may
    connect from another machine other than through an ssh tunnel.

    Without encryption the handshake token crosses the network in the clear, and whoever
    reads it may connect and send (unsigned, dropped) messages of any size, which ZeroMQ
    buffers whole before the broker sees them. With CURVE nothing that crosses the
    network lets anyone in.
    """
    if encrypt is not None:
        return encrypt
    if external or launcher == "srun":
        return True  # workers connect to the broker's port from anywhere
    from ._hosts import is_local

    return not tunnel and any(not is_local(name) for name, _ in hosts)


class LaunchError(RuntimeError):
    """The job could not start (bad program, interpreter or option)."""


# -- command line ------------------------------------------------------------------------
def _prog_name() -> str:
    """How the user started the launcher: ``python -m scoop`` or ``scoop``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m scoop" if name in ("", "__main__.py", "-c") else name


def build_parser(prog: str = "python -m scoop") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [options] (program.py | -m module) [args ...]",
        description="Run a Python program with its scoop.futures calls spread over "
                    "several worker processes.",
        epilog=f"Example: {prog} -n 4 program.py --its-own-option 1")
    p.add_argument("--version", action="version", version=f"scoop {scoop.__version__}")
    p.add_argument("-n", type=int, metavar="N", default=None,
                   help="number of workers, the root included (default: the hosts' counts, "
                        f"or the CPUs of this machine, {_cpu_count()} here). Fewer than the "
                        "hosts' total fills hosts in order; more adds workers round-robin "
                        "from the first host")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hosts", "--host", nargs="+", metavar="HOST", default=None,
                       help="hosts, each repeated once per worker; the first runs the "
                            "program. The list ends where the program begins")
    where.add_argument("--hostfile", metavar="FILE", default=None,
                       help="a file of 'host count' lines ('host slots=N' too; # comments)")
    p.add_argument("--ssh-executable", dest="ssh", metavar="SSH", default="ssh",
                   help="the ssh command that reaches remote hosts (default: ssh; it "
                        "honours your ~/.ssh/config)")
    p.add_argument("--broker-hostname", "--external-hostname", dest="broker_hostname",
                   metavar="ADDRESS", default=None,
                   help="the address remote workers use to reach this machine (default: "
                        "the local address that routes to the first remote host)")
    p.add_argument("--launcher", choices=("ssh", "srun"), default=None,
                   help="how workers start on other hosts: ssh, or srun (default inside a "
                        "SLURM allocation when srun is on PATH, where ssh between nodes is "
                        "often forbidden)")
    p.add_argument("--external", type=int, metavar="N", default=0,
                   help="N more workers will be started by another launcher (srun, mpirun, "
                        "a container) with `python -m scoop.join JOBFILE`")
    p.add_argument("--job-file", metavar="FILE", default=None,
                   help="where to write the job file joining workers read (default: "
                        "~/.scoop/jobs/; it holds the job key and is made readable only "
                        "by you)")
    p.add_argument("--max-attempts", type=int, metavar="N", default=_broker.MAX_ATTEMPTS,
                   help="workers that may die running a task before it fails with "
                        f"WorkerLostError (default: {_broker.MAX_ATTEMPTS})")
    p.add_argument("--encrypt", action="store_const", const=True, default=None,
                   help="encrypt all job traffic (ZeroMQ CURVE, keys made for this job), "
                        "local workers' too; the default when workers connect from other "
                        "hosts (without -e)")
    p.add_argument("--no-encrypt", dest="encrypt", action="store_const", const=False,
                   help="never encrypt, also across hosts: faster for large data on a "
                        "network you trust, but whoever can read it can flood the job")
    p.add_argument("-e", "--tunnel", action="store_true",
                   help="remote workers reach the broker through ssh reverse tunnels (when "
                        "they cannot reach this machine directly; slower)")
    p.add_argument("--prolog", metavar="FILE", default=None,
                   help="a shell file sourced on remote hosts before the workers start "
                        "(e.g. to activate a virtualenv or `module load`)")
    p.add_argument("--path", "-p", metavar="DIR", default=None,
                   help="working directory of the workers, on every host (default: the "
                        "current one)")
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
    p.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="module",
                   help="run a module, as `python -m module args` does (found from the "
                        "workers' directory and --pythonpath); the rest are its arguments")
    p.add_argument("executable", metavar="program.py", nargs="?", help="the program to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the program's arguments")
    return p


def _log_level(ns: argparse.Namespace) -> int:
    if ns.debug or ns.verbose >= 2:
        return logging.DEBUG
    if ns.quiet:
        return logging.ERROR
    return logging.INFO if ns.verbose == 1 else logging.WARNING


def _check_program(path: str) -> tuple[str, int] | None:
    """Why the program cannot run and the exit status that says so, or None.

    A syntax error reads as Python prints it (``File "...", line N``, the line, the
    caret, ``SyntaxError: ...``), so that editors and CI log parsers recognise it.
    """
    if not os.path.exists(path):
        return f"scoop: {path}: no such file", 2
    if os.path.isdir(path):
        return f"scoop: {path}: is a directory, not a Python program", 2
    try:
        compile(read_regular(path), path, "exec")
    except SyntaxError as exc:  # IndentationError and TabError too
        return "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n"), 1
    except (OSError, ValueError) as exc:
        return f"scoop: {path}: cannot read: {exc}", 1
    return None


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise _Interrupted(signum)


def host_cpu_count(name: str, ssh: str = "ssh") -> int:
    """The CPUs of ``name``: this machine's, or asked over ssh (``nproc``) for a remote host.

    Raises:
        LaunchError: the remote host could not be asked.
    """
    from ._hosts import is_local

    if is_local(name):
        return _cpu_count()
    argv = [*shlex.split(ssh), *SSH_OPTIONS, "--", name, "nproc"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = str(exc)
    else:
        if out.returncode == 0 and out.stdout.strip().isdigit():
            return max(1, int(out.stdout.strip()))
        detail = out.stderr.strip() or f"exit status {out.returncode}"
    raise LaunchError(f"host {name}: cannot count its CPUs over ssh ({detail}); give its "
                      "worker count in the hostfile ('name count')")


# CPU counts asked over ssh at once: a hostfile of thousands of bare names must not take
# thousands of sequential ssh round trips, nor open thousands of connections at once.
MAX_PARALLEL_PROBES = 32


def host_cpu_counts(names: list[str], ssh: str = "ssh") -> dict[str, int]:
    """:func:`host_cpu_count` of each host, asked in parallel.

    Raises:
        LaunchError: a host could not be asked (the first in ``names`` order).
    """
    if not names:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(MAX_PARALLEL_PROBES, len(names))) as pool:
        futures = {name: pool.submit(host_cpu_count, name, ssh) for name in names}
    return {name: fut.result() for name, fut in futures.items()}


def _default_launcher(ns: argparse.Namespace) -> str:
    """srun inside a SLURM allocation (when on PATH) unless hosts were named; else ssh."""
    inside_slurm = "SLURM_JOB_NODELIST" in os.environ or "SLURM_NODELIST" in os.environ
    if inside_slurm and not (ns.hosts or ns.hostfile) and shutil.which("srun"):
        return "srun"
    return "ssh"


def job_hosts(ns: argparse.Namespace) -> list[tuple[str, int]]:
    """The job's hosts and worker counts, from the options or the batch scheduler.

    Raises:
        LaunchError: a bad hostfile or host list.
    """
    from . import _hosts

    try:
        if ns.hostfile:
            hosts = _hosts.parse_hostfile(ns.hostfile)
        elif ns.hosts:
            hosts = _hosts.hosts_from_list(ns.hosts)
        else:
            found = _hosts.hosts_from_environment()
            if found is None:
                return [("127.0.0.1", ns.n or _cpu_count())]
            scheduler, hosts = found
            log.info("hosts from the %s allocation: %s", scheduler, _hosts.format_hosts(hosts))
        counts = host_cpu_counts([h.name for h in hosts if h.workers is None], ns.ssh)
        hosts = _hosts.distribute(hosts, ns.n, counts.__getitem__)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    return [(h.name, h.workers) for h in hosts]


def _parse(argv: list[str]) -> argparse.Namespace:
    """The launcher's options; ``ns.module`` (``-m``) or ``ns.executable`` names what to
    run and ``ns.args`` its arguments. Exits with status 2 on a usage error."""
    from ._hosts import split_host_args

    parser = build_parser(_prog_name())
    ns = parser.parse_args(split_host_args(argv))
    if ns.module is not None:
        if not ns.module:
            parser.error("-m needs a module name")
        ns.module, ns.args = ns.module[0], ns.module[1:]
    elif ns.executable is None:
        parser.error("the program to run is missing: program.py or -m module")
    return ns


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m scoop [options] program.py [args]``; return the exit status."""
    ns = _parse(sys.argv[1:] if argv is None else list(argv))
    level = _log_level(ns)
    if ns.log:
        try:
            create_private(ns.log)  # the log names hosts, paths and addresses
        except OSError as exc:
            print(f"scoop: --log {ns.log}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=level, filename=ns.log,
                        format="[%(asctime)s] %(levelname)-7s scoop %(message)s")
    program = None if ns.module else os.path.abspath(ns.executable)
    problem = program and _check_program(program)
    if problem:
        print(problem[0], file=sys.stderr)
        return problem[1]
    if ns.n is not None and ns.n < 1:
        print("scoop: -n must be at least 1", file=sys.stderr)
        return 2
    try:
        hosts = job_hosts(ns)
    except LaunchError as exc:
        print(f"scoop: {exc}", file=sys.stderr)
        return 2
    launcher = Launcher(program=program, args=ns.args, hosts=hosts, python=ns.python,
                        cwd=os.path.abspath(ns.path) if ns.path else None,
                        pythonpath=ns.pythonpath, nice=ns.nice, debug=ns.debug,
                        log_level=level, log_file=ns.log and os.path.abspath(ns.log),
                        ssh=ns.ssh, broker_hostname=ns.broker_hostname, prolog=ns.prolog,
                        tunnel=ns.tunnel, external=ns.external, job_file=ns.job_file,
                        launcher=ns.launcher or _default_launcher(ns),
                        max_attempts=ns.max_attempts, encrypt=ns.encrypt, module=ns.module)
    return _run(launcher, hosts)


def _run(launcher: Launcher, hosts: list[tuple[str, int]]) -> int:
    """Start the job, wait for its end, stop it whatever happens; return its status."""
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start()
        log.info("started %d workers on %s; broker at %s", launcher.n,
                 " ".join(f"{h}:{c}" for h, c in hosts), launcher.broker.address)
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
