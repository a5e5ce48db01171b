"""A real SLURM cluster over the test hosts (tests/testhosts.py), for one test session.

Debian's ``slurm-wlm`` 22.05 and ``munge``; everything lives in a throwaway state dir::

    head (root namespace, 10.213.77.1)          test hosts (network namespaces)
      munged  --socket STATE/munge.socket         sct1: slurmd -N sct1   (hostname sct1)
      slurmctld (own UTS + mount namespace:       sct2: slurmd -N sct2   (hostname sct2)
        hostname "head", /etc/hosts = the         ...   each: ip netns exec sctN, its
        head's view of the test names)                  /etc/hosts, port 6818
      clients: sbatch, salloc, sinfo ... through :meth:`SlurmCluster.head_cmd`
               with SLURM_CONF=STATE/slurm.conf (the machine's /etc/slurm is never read)

*Names.* slurm.conf gives every address (``SlurmctldHost=head(10.213.77.1)``,
``NodeName=sctN NodeAddr=10.213.77.(N+1)``): no daemon resolves a name through DNS, and
the clients run with the head's /etc/hosts and a resolv.conf pointing at 127.0.0.1.

*Auth.* One munged on a socket of the state dir, with a key made for the session; the
slurmds reach it through the shared filesystem (a Unix socket path crosses network
namespaces). ``AuthInfo=socket=...`` points slurm at it.

*No cgroups.* ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``,
``JobAcctGatherType=jobacct_gather/none``: nothing needs systemd or a writable
cgroup tree, which a container or a test machine may not have.

*Ports.* slurmctld listens on every address of the root namespace, so its port is picked
free at :meth:`up` (two sessions on one machine each get their own); a slurmd listens in
its host's namespace, where 6818 is always free.

*Leftovers.* Every daemon gets ``SCOOP_TEST_DAEMON`` in its environment (the session's
mark, see conftest.py); :meth:`down` stops them (TERM, then KILL) and raises if one is
left, and the session's end checks the mark once more.

Timings on the development VM (2 vCPU, loaded): :meth:`up` ~2-4 s (munged, slurmctld,
3 slurmd registered and idle), :meth:`down` ~0.5 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from testhosts import TestHosts

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
MUNGEKEY = "/usr/sbin/mungekey"
CLIENTS = ("sbatch", "salloc", "srun", "sinfo", "scontrol", "scancel", "squeue")
SLURMD_PORT = 6818
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Run in a new UTS and mount namespace: its own hostname, /etc/hosts and resolv.conf,
# then the daemon.
_NAMED = ('echo "$1" > /proc/sys/kernel/hostname && mount --bind "$2" /etc/hosts'
               ' && mount --bind "$3" /etc/resolv.conf || exit 125; shift 3; exec "$@"')


def supported() -> str | None:
    """None if a SLURM cluster can run here, else why not (for pytest.skip)."""
    import testhosts

    reason = testhosts.supported()
    if reason:
        return f"no test hosts here: {reason}"
    for path, package in ((SLURMCTLD, "slurmctld"), (SLURMD, "slurmd"),
                          (MUNGED, "munge"), (MUNGEKEY, "munge")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install {package})"
    for tool in CLIENTS:
        if shutil.which(tool, path=_SYSTEM_PATH) is None:
            return f"{tool} not found (apt-get install slurm-client)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """slurmctld on the head and one slurmd per test host of ``hosts`` (already up).

    A context manager: leaving it calls :meth:`down`.

    Args:
        hosts: the test hosts; every one of them becomes a node.
        mark: put in each daemon's environment as ``SCOOP_TEST_DAEMON`` (leak checks).
        cpus: CPUs each node says it has (they all share this machine's).
    """

    __test__ = False

    def __init__(self, hosts: TestHosts, mark: str = "", cpus: int = 2) -> None:
        self.hosts = hosts
        self.mark = mark
        self.cpus = cpus
        self.state = Path(tempfile.mkdtemp(prefix="scoop-slurm-"))
        self.conf = self.state / "slurm.conf"
        self.port = 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, timeout: float = 60) -> SlurmCluster:
        """Start munged, slurmctld and the slurmds; return once every node is idle.

        Raises:
            RuntimeError: a daemon did not start; the message ends with its log's tail.
        """
        t0 = time.monotonic()
        try:
            self._write_files()
            self._start_munged()
            self._start_slurmctld()
            for name in self.hosts.names:
                self._start_slurmd(name)
            self._wait_idle(timeout)
        except BaseException:
            self.down()
            raise
        self.timings["up"] = time.monotonic() - t0
        return self

    def down(self) -> None:
        """Stop every daemon (TERM, then KILL) and remove the state dir.

        Raises:
            RuntimeError: a daemon survived SIGKILL.
        """
        t0 = time.monotonic()
        # slurmds first (their steps end with them), the controller, then munge
        order = [n for n in self.procs if n.startswith("slurmd")] + [
            n for n in ("slurmctld", "munged") if n in self.procs]
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = [n for n in order if self.procs[n].poll() is None]
            for name in alive:
                try:
                    os.kill(self.procs[name].pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while any(self.procs[n].poll() is None for n in alive) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
        left = [f"{n} (pid {p.pid})" for n, p in self.procs.items() if p.poll() is None]
        self.procs.clear()
        left += [f"process {pid}: {cmd}" for pid, cmd in self.leftovers().items()]
        shutil.rmtree(self.state, ignore_errors=True)
        self.timings["down"] = time.monotonic() - t0
        if left:
            raise RuntimeError(f"slurm daemons left running: {left}")

    def leftovers(self) -> dict[int, str]:
        """pid -> command line of the live processes that run with this state dir."""
        needle = f"{self.state}/".encode()
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            shown = cmdline.replace(b"\0", b" ")
            if needle in shown and int(entry) != os.getpid():
                found[int(entry)] = shown.decode(errors="replace")
        return found

    # ------------------------------------------------------------------ using it
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a client: SLURM_CONF set, no variable of another job."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SLURM_", "SALLOC_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def head_cmd(self, argv: Sequence[str]) -> list[str]:
        """argv that runs a client on the head, with the test names resolvable there."""
        return self.hosts.head_cmd(argv)

    def run(self, argv: Sequence[str], timeout: float = 60, env: dict | None = None,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a client command on the head; text output captured, stdin empty.

        ``env`` is the whole environment (default: :meth:`env`)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.head_cmd(argv), capture_output=True, text=True,
                              timeout=timeout, env=self.env() if env is None else env,
                              **kwargs)

    def log_tail(self, chars: int = 1500) -> str:
        """The end of every daemon log, for an error or a skip reason."""
        parts = []
        for log in sorted(self.state.glob("*.log")):
            text = log.read_text(errors="replace")[-chars:].strip()
            parts.append(f"--- {log.name}:\n{text or '(empty)'}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ internals
    def _daemon_env(self) -> dict[str, str]:
        env = {"PATH": _SYSTEM_PATH, "LANG": "C.UTF-8", "SLURM_CONF": str(self.conf)}
        if self.mark:
            env["SCOOP_TEST_DAEMON"] = self.mark
        return env

    def _start(self, name: str, argv: list[str]) -> None:
        with open(self.state / f"{name}.out", "ab") as out:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, env=self._daemon_env())

    def _write_files(self) -> None:
        s, th = self.state, self.hosts
        os.chmod(s, 0o700)
        (s / "spool").mkdir()
        (s / "ctld").mkdir()
        self.port = _free_port()
        nodes = [f"NodeName={n} NodeAddr={th.address(n)} CPUs={self.cpus} Sockets=1 "
                 f"CoresPerSocket={self.cpus} ThreadsPerCore=1 State=UNKNOWN"
                 for n in th.names]
        self.conf.write_text("\n".join([
            "# generated by tests/slurmcluster.py",
            "ClusterName=scooptest",
            f"SlurmctldHost=head({th.head})",
            f"SlurmctldPort={self.port}",
            f"SlurmdPort={SLURMD_PORT}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={s / 'munge.socket'}",
            f"StateSaveLocation={s / 'ctld'}",
            f"SlurmdSpoolDir={s / 'spool'}/%n",
            f"SlurmctldPidFile={s / 'slurmctld.pid'}",
            f"SlurmdPidFile={s / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={s / 'slurmctld.log'}",
            f"SlurmdLogFile={s / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MailProg=/bin/true",
            # quick turnover: a test waits on these, nothing here is slow or far away
            "MessageTimeout=10",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=2",
            "UnkillableStepTimeout=20",
            *nodes,
            "PartitionName=scoop Nodes=ALL Default=YES MaxTime=10 State=UP",
        ]) + "\n")

    def _start_munged(self) -> None:
        s = self.state
        key = s / "munge.key"
        _check(subprocess.run([MUNGEKEY, "--create", f"--keyfile={key}"],
                              capture_output=True, text=True, timeout=20), "mungekey")
        key.chmod(0o400)
        self._start("munged", [MUNGED, "--foreground", "--force",
                               f"--socket={s / 'munge.socket'}", f"--key-file={key}",
                               f"--pid-file={s / 'munged.pid'}",
                               f"--log-file={s / 'munged.log'}",
                               f"--seed-file={s / 'munged.seed'}"])
        self._wait_for(lambda: (s / "munge.socket").exists(), "munged", 10)

    def _start_slurmctld(self) -> None:
        s = self.hosts.state
        self._start("slurmctld", [
            shutil.which("unshare", path=_SYSTEM_PATH) or "unshare", "--uts", "--mount",
            "sh", "-c", _NAMED, "sh", "head", str(s / "head-hosts"),
            str(s / "head-resolv.conf"), SLURMCTLD, "-D", "-i", "-f", str(self.conf)])

        def answers() -> bool:
            try:
                with socket.create_connection((self.hosts.head, self.port), timeout=1):
                    return True
            except OSError:
                return False
        self._wait_for(answers, "slurmctld", 20)

    def _start_slurmd(self, name: str) -> None:
        # nsenter, not "ip netns exec": that one mounts a fresh /sys, which hides
        # /sys/fs/cgroup, and slurmd 22.05 will not start without a cgroup file system
        # (it initialises its cgroup plugin even with proctrack/linuxproc, task/none).
        (self.state / "spool" / name).mkdir()
        etc = Path("/etc/netns") / name
        self._start(f"slurmd-{name}", [
            shutil.which("nsenter", path=_SYSTEM_PATH) or "nsenter", f"--net=/run/netns/{name}",
            shutil.which("unshare", path=_SYSTEM_PATH) or "unshare", "--uts", "--mount",
            "sh", "-c", _NAMED, "sh", name, str(etc / "hosts"), str(etc / "resolv.conf"),
            SLURMD, "-D", "-N", name, "-f", str(self.conf)])

    def _wait_for(self, ready, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                break
            if ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start (exit status {self.procs[name].poll()}):\n"
                           f"{self.log_tail()}")

    def _wait_idle(self, timeout: float) -> None:
        """Until sinfo shows every node idle (registered with the controller)."""
        deadline = time.monotonic() + timeout
        out = None
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {p.returncode}:\n"
                                       f"{self.log_tail()}")
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=20)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if out.returncode == 0 and all(states.get(n) == "idle" for n in self.hosts.names):
                return
            time.sleep(0.2)
        said = out and (out.stdout + out.stderr).strip()
        raise RuntimeError(f"the nodes never became idle (sinfo: {said}):\n{self.log_tail()}")


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")
