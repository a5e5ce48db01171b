"""Workers on other hosts: one ssh connection per host running the host agent, or one
srun step; what they print comes back here, and the root's input goes to them.

::

    launcher (this process)                             remote host
      RemoteHost --ssh [setpriv] ... host "cd DIR && exec python -m scoop._start_host"
        stdin  --> {"workers": [cfg, ...]} (one JSON line), then the root's input in
                   frames (_relay_stdin) when the root runs there; EOF: stop
        stderr <-- held until a worker of the host joins (part of the error if the host
                   fails first), then shown as it comes (_relay_stderr)
        stdout <-- this process's own (inherited), or with ``stdout=`` copied to that
                   stream as it comes (_relay_stdout; scoop.Executor in a notebook)
      RemoteHost --srun --ntasks=N python -m scoop.join JOBFILE  (every worker but the root)

*RemoteHost.* One connection and its workers' ids. Before the job runs, a connection that
ends is a launch failure, diagnosed from ssh's status and words (:meth:`check_failed`);
once it runs, it is a lost host whose work the broker gives to the others.

*Host agent.* Starts and watches the host's workers (see :mod:`scoop._agent`).

*CPU probes.* A hostfile's bare host name means "all its CPUs": ``nproc`` over ssh, at
most :data:`MAX_PARALLEL_PROBES` hosts at a time.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from .. import _agent
from .._errors import LaunchError
from .._hosts import is_local
from .job import Job

log = logging.getLogger("scoop")

AGENT_MODULE = "scoop._start_host"
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
# CPU counts asked over ssh at once: a hostfile of thousands of bare names must not take
# thousands of sequential ssh round trips, nor open thousands of connections at once.
MAX_PARALLEL_PROBES = 32


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# What srun says when it finds no controller: no slurm.conf and no DNS record of one,
# or a controller that does not answer (slurm 22.05's words).
SRUN_NO_CONTROLLER = ("configuration source", "fetch_config", "slurm controller",
                      "slurm.conf", "Unable to allocate resources")


class RemoteHost:
    """The workers ``wids`` of one remote host (or srun step): the process that runs them.

    Args:
        name: the host ("srun" for a step).
        argv: the command: ssh running the host agent, or srun.
        spec: what the host agent reads first on its stdin; None for srun.
        stdout: a text stream that what the host prints on stdout is copied to; None:
            this process's descriptor 1, which the command inherits.
    """

    def __init__(self, name: str, wids: list[int], argv: list[str], job: Job,
                 spec: dict | None = None, stdout: TextIO | None = None) -> None:
        self.name = name
        self.wids = wids
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self._held: list[bytes] | None = []  # stderr lines not shown yet (see go_live)
        self._held_lock = threading.Lock()
        self._stdin_lock = threading.Lock()  # the relay of the root's input vs close()
        self._closed = False
        log.debug("host %s: %s", name, shlex.join(argv))
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                stdout=None if stdout is None else subprocess.PIPE, cwd=job.cwd,
                env=_agent.worker_env(job.pythonpath), start_new_session=True)
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
        self._out_relay = None
        if stdout is not None:
            self._out_relay = threading.Thread(target=self._relay_stdout, args=(stdout,),
                                               daemon=True, name=f"scoop-{name}-stdout")
            self._out_relay.start()
        self._failed_reported = False

    def _relay_stdout(self, stream: TextIO) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while data := self.proc.stdout.read1(65536):  # as it comes, not by lines
                stream.write(decoder.decode(data))
                stream.flush()
        except (OSError, ValueError):
            pass  # the stream was closed: nothing more to show
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
        if self.name == "srun":
            return self._diagnose_srun(tail)
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
        return (f"its workers ended with {_agent.describe_status(code)}",
                "if they could not reach the broker, pass --broker-hostname with an "
                "address of this machine that the host can reach")

    @staticmethod
    def _diagnose_srun(tail: list[str]) -> tuple[str, str]:
        if any(w in line for line in tail for w in SRUN_NO_CONTROLLER):
            return ("srun could not reach a SLURM controller (SLURM variables are set, but "
                    "this is not a working SLURM allocation, or its configuration is "
                    "missing here)",
                    "--launcher ssh, to start the workers over ssh on the allocation's "
                    "hosts; or run the job inside salloc or sbatch")
        return ("the srun step that starts the workers failed",
                "check that `srun true` works in this allocation, or pass --launcher ssh "
                "to start the workers over ssh instead")

    def check_ended(self) -> None:
        """Once the job runs, a host whose agent ended is reported, not fatal: the
        broker notices its silent workers and gives their work to the others."""
        code = self.proc.poll()
        if code is not None and not self._failed_reported:
            self._failed_reported = True
            log.warning("host %s: its workers are gone (%s); their work runs elsewhere",
                        self.name, _agent.describe_status(code))

    def finish(self) -> None:
        """Once its connection ended: show what it said that was not shown yet."""
        self._relay.join(1.0)
        if self._out_relay is not None:
            self._out_relay.join(1.0)
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


def ssh_agent(name: str, wids: list[int], job: Job, configs: list[dict],
              broker_port: str, stdout: TextIO | None = None) -> RemoteHost:
    """Start the host agent on ``name`` over ssh, with the configs of its workers
    (``stdout``: see :class:`RemoteHost`; its workers then write unbuffered, so that
    what they print arrives as they print it, as local workers' lines do)."""
    spec = {"host": name, "python": job.python, "cwd": job.cwd,
            "pythonpath": job.pythonpath, "root_stdin": 0 in wids and _stdin_is_ours(),
            "workers": configs, "unbuffered": stdout is not None}
    return RemoteHost(name, wids, ssh_argv(name, job, broker_port), job, spec, stdout)


def srun_step(wids: list[int], job: Job, job_file: str,
              stdout: TextIO | None = None) -> RemoteHost:
    """Start workers ``wids`` as one srun step of joining workers (they read the job file
    and ask the broker for their ids)."""
    argv = [*die_with_launcher(), "srun", f"--ntasks={len(wids)}", "--kill-on-bad-exit=0",
            job.python, "-m", "scoop.join", job_file]
    return RemoteHost("srun", wids, argv, job, stdout=stdout)


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


def ssh_argv(name: str, job: Job, broker_port: str) -> list[str]:
    """The ssh command that runs the host agent on ``name`` (with -e, forwarding the
    broker's port on that host's loopback to this machine's)."""
    command = f"cd {shlex.quote(job.cwd)} && "
    if job.prolog:
        command += f". {shlex.quote(job.prolog)} && "
    command += f"exec {shlex.quote(job.python)} -m {AGENT_MODULE}"
    tunnel = []
    if job.tunnel:
        tunnel = ["-o", "ExitOnForwardFailure=yes",
                  "-R", f"{broker_port}:127.0.0.1:{broker_port}"]
    # "--": whatever a host name holds, ssh never reads it as an option.
    return [*die_with_launcher(), *shlex.split(job.ssh), *SSH_OPTIONS, *tunnel, "--",
            name, command]


def die_with_launcher() -> list[str]:
    """A prefix that kills the ssh client if the launcher dies (Linux util-linux setpriv):
    the agent at the other end then sees its stdin close and stops its workers at once,
    instead of waiting for the watchdogs to notice the broker is gone."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


def host_cpu_count(name: str, ssh: str = "ssh") -> int:
    """The CPUs of ``name``: this machine's, or asked over ssh (``nproc``) for a remote host.

    Raises:
        LaunchError: the remote host could not be asked.
    """
    if is_local(name):
        return cpu_count()
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


def host_cpu_counts(names: list[str], ssh: str = "ssh") -> dict[str, int]:
    """:func:`host_cpu_count` of each host, asked in parallel.

    Raises:
        LaunchError: a host could not be asked (the first in ``names`` order).
    """
    if not names:
        return {}
    with ThreadPoolExecutor(min(MAX_PARALLEL_PROBES, len(names))) as pool:
        futures = {name: pool.submit(host_cpu_count, name, ssh) for name in names}
    return {name: fut.result() for name, fut in futures.items()}
