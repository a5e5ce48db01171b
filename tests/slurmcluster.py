"""A real SLURM cluster over the test hosts (tests/testhosts.py), for one test session.

Debian's ``slurm-wlm`` 22.05 and ``munge``; everything lives in a throwaway state dir::

    head (root namespace, 10.213.77.1)          test hosts (network namespaces)
      munged  --socket STATE/munge.socket         sct1: slurmd -N sct1   (hostname sct1)
      slurmctld (hostname "head", the head's      sct2: slurmd -N sct2   (hostname sct2)
        /etc/hosts: tests/daemons.py)             ...   each in its host's namespaces
                                                        (tests/daemons.py), port 6818
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

*Leftovers.* :meth:`down` stops the daemons (TERM, then KILL) and raises if one of them
or a child (a slurmstepd) is left; the session's end checks once more (tests/daemons.py).

Timings on the development VM (2 vCPU, loaded): :meth:`up` 0.5-2 s (munged, slurmctld,
3 slurmd registered and idle), :meth:`down` 1-3 s.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from daemons import Daemons, check, free_port, missing
from testhosts import TestHosts

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
MUNGEKEY = "/usr/sbin/mungekey"
CLIENTS = ("sbatch", "salloc", "srun", "sinfo", "scontrol", "scancel", "squeue")
SLURMD_PORT = 6818


def supported() -> str | None:
    """None if a SLURM cluster can run here, else why not (for pytest.skip)."""
    return missing(((SLURMCTLD, "slurmctld"), (SLURMD, "slurmd"), (MUNGED, "munge"),
                    (MUNGEKEY, "munge")), CLIENTS, "slurm-client")


class SlurmCluster(Daemons):
    """slurmctld on the head and one slurmd per test host of ``hosts`` (already up).

    A context manager: leaving it calls :meth:`down`.

    Args:
        hosts: the test hosts; every one of them becomes a node.
        mark: put in each daemon's environment as ``SCOOP_TEST_DAEMON`` (leak checks).
        cpus: CPUs each node says it has (they all share this machine's).
    """

    def __init__(self, hosts: TestHosts, mark: str = "", cpus: int = 2) -> None:
        super().__init__(hosts, mark, "scoop-slurm-")
        self.cpus = cpus
        self.conf = self.state / "slurm.conf"
        self.port = 0

    def start(self, timeout: float) -> None:
        """Start munged, slurmctld and the slurmds; return once every node is idle."""
        self._write_files()
        self._start_munged()
        self.start_on_head("slurmctld", [SLURMCTLD, "-D", "-i", "-f", str(self.conf)])
        self.wait_for("slurmctld", self._controller_answers, 20)
        for name in self.hosts.names:
            (self.state / "spool" / name).mkdir()
            self.start_in_host(f"slurmd-{name}", name,
                               [SLURMD, "-D", "-N", name, "-f", str(self.conf)])
        self._wait_idle(timeout)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a client: SLURM_CONF set, no variable of another job."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SLURM_", "SALLOC_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def logs(self) -> list[Path]:
        """Each daemon's log file; its stdout and stderr where it has no log (yet)."""
        logs = sorted(self.state.glob("*.log"))
        return logs + [out for out in super().logs()
                       if not any(log.stem == out.stem and log.stat().st_size
                                  for log in logs)]

    def _write_files(self) -> None:
        s, th = self.state, self.hosts
        os.chmod(s, 0o700)
        (s / "spool").mkdir()
        (s / "ctld").mkdir()
        self.port = free_port()
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
            # cred_expire: how long a job requeued while it ran waits before it may run
            # again (its old credential is revoked until then; starting it sooner fails
            # with "Job credential revoked"); the default 120 s is too long for a test
            f"AuthInfo=socket={s / 'munge.socket'},cred_expire=10",
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
        check(subprocess.run([MUNGEKEY, "--create", f"--keyfile={key}"],
                             capture_output=True, text=True, timeout=20), "mungekey")
        key.chmod(0o400)
        self.start_on_head("munged", [
            MUNGED, "--foreground", "--force", f"--socket={s / 'munge.socket'}",
            f"--key-file={key}", f"--pid-file={s / 'munged.pid'}",
            f"--log-file={s / 'munged.log'}", f"--seed-file={s / 'munged.seed'}"])
        self.wait_for("munged", (s / "munge.socket").exists, 10)

    def _controller_answers(self) -> bool:
        try:
            with socket.create_connection((self.hosts.head, self.port), timeout=1):
                return True
        except OSError:
            return False

    def _wait_idle(self, timeout: float) -> None:
        """Until sinfo shows every node idle (registered with the controller)."""
        deadline = time.monotonic() + timeout
        out = None
        while time.monotonic() < deadline:
            self.check_alive()
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=20)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if out.returncode == 0 and all(states.get(n) == "idle" for n in self.hosts.names):
                return
            time.sleep(0.2)
        said = out and (out.stdout + out.stderr).strip()
        raise RuntimeError(f"the nodes never became idle (sinfo: {said}):\n{self.log_tail()}")

