"""What the real schedulers' fixtures share (tests/slurmcluster.py, tests/sgecell.py).

A :class:`Daemons` is a set of daemon processes of one scheduler: some on the head (the
root namespace, hostname ``head``), one per test host inside its network namespace.
Each daemon starts in its own UTS and mount namespaces, where it has its own hostname,
its host's /etc/hosts (the test names) and a resolv.conf pointing at 127.0.0.1, so no
name it resolves can reach a DNS server::

    head:      unshare --uts --mount sh -c NAMED head HEAD-HOSTS RESOLV  daemon ...
    test host: nsenter --net=/run/netns/NAME unshare --uts --mount sh -c NAMED NAME ...

``nsenter``, not ``ip netns exec``: that one mounts a fresh /sys, which hides
/sys/fs/cgroup (slurmd 22.05 will not start without it). Every link of the chain execs,
so the Popen's pid is the daemon's.

Every daemon's environment holds ``SCOOP_TEST_DAEMON`` (the session's mark, checked
once more at the session's end, see conftest.py) and ``SCOOP_TEST_DAEMONS`` (this set's
state dir): :meth:`Daemons.leftovers` finds whatever of this set is still running,
children included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from testhosts import TestHosts

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Own hostname, /etc/hosts and resolv.conf (new UTS and mount namespaces), then exec.
_NAMED = ('echo "$1" > /proc/sys/kernel/hostname && mount --bind "$2" /etc/hosts'
          ' && mount --bind "$3" /etc/resolv.conf || exit 125; shift 3; exec "$@"')


def free_port() -> int:
    """A TCP port free on every address of the root namespace now."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    return shutil.which(name, path=SYSTEM_PATH) or name


def missing(binaries: Sequence[tuple[str, str]], clients: Sequence[str],
            client_package: str) -> str | None:
    """Why a scheduler cannot run here (test hosts, binaries, clients), or None.

    Args:
        binaries: (absolute path, Debian package) of its daemons and tools.
        clients: commands that must be on the system PATH.
        client_package: the package of the clients.
    """
    import testhosts

    reason = testhosts.supported()
    if reason:
        return f"no test hosts here: {reason}"
    for path, package in binaries:
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install {package})"
    for tool in clients:
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            return f"{tool} not found (apt-get install {client_package})"
    return None


def check(result: subprocess.CompletedProcess, what: str, logs: str = "") -> None:
    """Raise RuntimeError, with the command's words and ``logs``, if it failed."""
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}"
                           + (f"\n{logs}" if logs else ""))


class Daemons:
    """The daemons of one scheduler over ``hosts``, their state in a temp dir.

    Subclasses start their daemons in :meth:`start`, with :meth:`start_on_head` and
    :meth:`start_in_host`, and say which files are logs (:meth:`logs`) and what
    environment a client needs (:meth:`env`). :meth:`up` starts, :meth:`down` stops;
    a context manager: leaving it calls :meth:`down`.

    Args:
        hosts: the test hosts (up already).
        mark: ``SCOOP_TEST_DAEMON`` in each daemon's environment (leak checks).
        prefix: of the temp dir's name.
    """

    __test__ = False
    daemon_vars: dict[str, str] = {}  # more environment for the daemons only

    def __init__(self, hosts: TestHosts, mark: str, prefix: str) -> None:
        self.hosts = hosts
        self.mark = mark
        self.state = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # ------------------------------------------------------------------ to override
    def start(self, timeout: float) -> None:
        """Start the daemons; return once they serve (within ``timeout`` s)."""
        raise NotImplementedError

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a client of these daemons (default: ``base``)."""
        return dict(os.environ if base is None else base)

    def logs(self) -> list[Path]:
        """The daemons' log files, for errors and skip reasons."""
        return sorted(self.state.glob("*.out"))

    # ------------------------------------------------------------------ starting
    def up(self, timeout: float = 60):
        """:meth:`start` the daemons; on failure stop them all again. Returns self.

        Raises:
            RuntimeError: a daemon did not start; the message ends with the logs' tails.
        """
        t0 = time.monotonic()
        try:
            self.start(timeout)
        except BaseException:
            self.down()
            raise
        self.timings["up"] = time.monotonic() - t0
        return self

    def start_on_head(self, name: str, argv: Sequence[str]) -> None:
        """Start daemon ``name`` on the head, as host ``head``."""
        self._start(name, self.head_cmd(argv))

    def start_in_host(self, name: str, host: str, argv: Sequence[str]) -> None:
        """Start daemon ``name`` in test host ``host``'s namespace, as that host."""
        etc = Path("/etc/netns") / host
        self._start(name, [_tool("nsenter"), f"--net=/run/netns/{host}", _tool("unshare"),
                           "--uts", "--mount", "sh", "-c", _NAMED, "sh", host,
                           str(etc / "hosts"), str(etc / "resolv.conf"), *argv])

    def _start(self, name: str, argv: list[str]) -> None:
        env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", **self.env({}), **self.daemon_vars,
               "SCOOP_TEST_DAEMONS": str(self.state)}
        if self.mark:
            env["SCOOP_TEST_DAEMON"] = self.mark
        with open(self.state / f"{name}.out", "ab") as out:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, env=env)

    def wait_for(self, name: str, ready: Callable[[], bool], timeout: float) -> None:
        """Until ``ready()``; raise RuntimeError with the logs if daemon ``name`` exits
        or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                break
            if ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start (exit status {self.procs[name].poll()}):\n"
                           f"{self.log_tail()}")

    def check_alive(self) -> None:
        """Raise RuntimeError with the logs if a daemon has exited."""
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with status {p.returncode}:\n"
                                   f"{self.log_tail()}")

    # ------------------------------------------------------------------ using them
    def head_cmd(self, argv: Sequence[str]) -> list[str]:
        """argv that runs ``argv`` on the head as host ``head``, the test names
        resolvable and no DNS query possible."""
        s = self.hosts.state
        return [_tool("unshare"), "--uts", "--mount", "sh", "-c", _NAMED, "sh", "head",
                str(s / "head-hosts"), str(s / "head-resolv.conf"), *argv]

    def run(self, argv: Sequence[str], timeout: float = 60, env: dict | None = None,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a client command on the head; text output captured, stdin empty.

        ``env`` is the whole environment (default: :meth:`env`)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.head_cmd(argv), capture_output=True, text=True,
                              timeout=timeout, env=self.env() if env is None else env,
                              **kwargs)

    def log_tail(self, chars: int = 1000) -> str:
        """The end of every log, for an error or a skip reason."""
        parts = []
        for log in self.logs():
            text = log.read_text(errors="replace")[-chars:].strip()
            parts.append(f"--- {log.relative_to(self.state)}:\n{text or '(empty)'}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ stopping
    def down(self, patient: Callable[[str], bool] = lambda name: True) -> None:
        """SIGTERM every daemon; wait up to 5 s for the ``patient`` ones, SIGKILL the
        rest; remove the state dir.

        Raises:
            RuntimeError: a process of this set is still running.
        """
        t0 = time.monotonic()
        alive = [p for p in self.procs.values() if p.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in alive:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass
            waited = [p for n, p in self.procs.items() if sig == signal.SIGKILL or patient(n)]
            deadline = time.monotonic() + 5
            while any(p.poll() is None for p in waited) and time.monotonic() < deadline:
                time.sleep(0.02)
            alive = [p for p in alive if p.poll() is None]
        left = [f"{n} (pid {p.pid})" for n, p in self.procs.items() if p.poll() is None]
        self.procs.clear()
        left += [f"process {pid}: {cmd}" for pid, cmd in self.leftovers().items()]
        shutil.rmtree(self.state, ignore_errors=True)
        self.timings["down"] = time.monotonic() - t0
        if left:
            raise RuntimeError(f"daemons left running: {left}")

    def leftovers(self) -> dict[int, str]:
        """pid -> command line of the live processes of this set (daemons and children)."""
        from conftest import marked_processes

        return marked_processes(variable="SCOOP_TEST_DAEMONS", value=str(self.state))
