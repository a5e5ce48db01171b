"""A real Grid Engine cell over the test hosts (tests/testhosts.py), for one test session.

Debian's ``gridengine-master``/``gridengine-exec``/``gridengine-client`` 8.1.9 (Son of
Grid Engine); a cell of its own in a throwaway SGE_ROOT, never Debian's ``default``::

    head (root namespace, 10.213.77.1)            test hosts (network namespaces)
      sge_qmaster (own UTS + mount namespace:       sct1: sge_execd (hostname sct1)
        hostname "head", /etc/hosts = the           sct2: sge_execd (hostname sct2)
        head's view of the test names)              ...   each with its host's /etc/hosts
      clients: qconf, qsub, qstat ... through :meth:`SGECell.head_cmd` (hostname "head"
               too: the qmaster knows hosts by the names their addresses resolve to)
    (each daemon in its host's namespaces, as tests/daemons.py starts them)

*Cell.* SGE_ROOT is a temp dir, SGE_CELL ``scoop``: ``common/bootstrap`` with classic
(flat file) spooling, no admin user (the daemons stay root), ``act_qmaster`` = ``head``.
The spool is made with Debian's ``spoolinit``/``spooldefaults``, as its postinst makes
the default cell, then configured with ``qconf``: the exec hosts, a queue ``scoop.q``
with :attr:`SGECell.slots` slots on each, and a parallel environment ``scoop`` that
gives 2 slots per host (``qsub -pe scoop 4``: 2 hosts).

*Names.* Grid Engine resolves every host name it meets (its own, its peers', the
clients'): the qmaster and the clients read the head's /etc/hosts (the test names),
each execd its host's; resolv.conf points at 127.0.0.1 in all of them, so no DNS query
leaves. ``ignore_fqdn``, ``default_domain none``.

*Ports.* The qmaster listens on every address of the root namespace: its port is picked
free at :meth:`up`; an execd listens in its host's namespace (port 6445).

*Leftovers.* :meth:`down` stops the daemons and raises if one of them or a child (a
shepherd) is left; the session's end checks once more (tests/daemons.py). The qmaster
is not waited for: it can take 10 s or more over SIGTERM (and over ``qconf -km``), and
its state is thrown away, so it gets SIGKILL once the execds have ended.

Timings on the development VM (2 vCPU, loaded): :meth:`up` 2-3 s (cell made, qmaster
configured, 3 execds registered), :meth:`down` ~1 s; a ``qsub -sync y`` job 1-3 s.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from daemons import Daemons, check, free_port, missing
from testhosts import TestHosts

SGE_LIB = "/usr/lib/gridengine"  # Debian: the real binaries (the /usr/bin ones wrap them)
QMASTER = f"{SGE_LIB}/sge_qmaster"
EXECD = f"{SGE_LIB}/sge_execd"
SPOOLINIT = f"{SGE_LIB}/spoolinit"
SPOOLDEFAULTS = f"{SGE_LIB}/spooldefaults"
SHARE = "/usr/share/gridengine"
CLIENTS = ("qconf", "qsub", "qstat", "qdel")
CELL = "scoop"
EXECD_PORT = 6445


def supported() -> str | None:
    """None if a Grid Engine cell can run here, else why not (for pytest.skip)."""
    return missing(((QMASTER, "gridengine-master"), (EXECD, "gridengine-exec"),
                    (SPOOLINIT, "gridengine-master")), CLIENTS, "gridengine-client")


class SGECell(Daemons):
    """sge_qmaster on the head and one sge_execd per test host of ``hosts`` (up already).

    A context manager: leaving it calls :meth:`down`.

    Args:
        hosts: the test hosts; every one becomes an exec host.
        mark: put in each daemon's environment as ``SCOOP_TEST_DAEMON`` (leak checks).
        slots: the queue's slots on each host.
    """

    daemon_vars = {"SGE_ND": "1"}  # stay in the foreground: the Popen is the daemon

    def __init__(self, hosts: TestHosts, mark: str = "", slots: int = 2) -> None:
        super().__init__(hosts, mark, "scoop-sge-")
        self.slots = slots
        self.root = self.state  # SGE_ROOT
        self.common = self.root / CELL / "common"
        self.spool = self.root / "spool"
        self.port = 0

    def start(self, timeout: float) -> None:
        """Make the cell, start the qmaster, configure it, start the execds; return once
        every exec host's queue instance is up (its execd registered)."""
        self._make_cell()
        self.start_on_head("qmaster", [QMASTER])
        self.wait_for("qmaster", lambda: self.run(["qconf", "-sh"], timeout=20)
                      .returncode == 0, 30)
        self._configure()
        for name in self.hosts.names:
            self.start_in_host(f"execd-{name}", name, [EXECD])
        self._wait_hosts(timeout)

    def down(self) -> None:
        """Stop every daemon and remove the cell (see *Leftovers* above).

        Raises:
            RuntimeError: a daemon or a child of one is left.
        """
        super().down(patient=lambda name: name.startswith("execd"))

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a client of this cell (no variable of another job)."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SGE_", "PE_", "JOB_", "NSLOTS", "NHOSTS"))}
        env.update(SGE_ROOT=str(self.root), SGE_CELL=CELL,
                   SGE_QMASTER_PORT=str(self.port), SGE_EXECD_PORT=str(EXECD_PORT))
        return env

    def logs(self) -> list[Path]:
        return [*self.spool.glob("qmaster/messages"), *sorted(self.spool.glob(
            "execd/*/messages")), *super().logs()]

    def _make_cell(self) -> None:
        os.chmod(self.root, 0o755)
        self.common.mkdir(parents=True)
        for d in ("qmaster", "qmaster/job_scripts", "execd"):
            (self.spool / d).mkdir(parents=True)
        for d in ("bin", "lib", "util", "utilbin"):
            (self.root / d).symlink_to(f"/var/lib/gridengine/{d}")
        self.port = free_port()
        qspool = self.spool / "qmaster"
        (self.common / "bootstrap").write_text(_table({
            "admin_user": "none", "default_domain": "none", "ignore_fqdn": "true",
            "spooling_method": "classic", "spooling_lib": "libspoolc",
            "spooling_params": f"{self.common};{qspool}", "binary_path": "/usr/sbin",
            "qmaster_spool_dir": str(qspool), "security_mode": "none",
            "listener_threads": "2", "worker_threads": "2", "scheduler_threads": "1",
        }, head="# Version: 8.1.9\n"))
        (self.common / "act_qmaster").write_text("head\n")
        conf = (Path(SHARE) / "default-configuration").read_text()
        # login_shells none: a job's shell is no login shell, so no profile resets the
        # PATH that qsub -V exported (the test hosts' ssh comes first on it)
        conf = _set(conf, execd_spool_dir=str(self.spool / "execd"), min_uid="0",
                    min_gid="0", login_shells="none", load_report_time="00:00:02",
                    max_unheard="00:01:00",
                    mailer="/bin/true", reporting_params="accounting=false "
                    "reporting=false flush_time=00:00:15 joblog=false sharelog=00:00:00")
        (self.root / "global.conf").write_text(conf)
        env = self.env({})
        for argv in ([SPOOLINIT, "classic", "libspoolc", f"{self.common};{qspool}", "init"],
                     [SPOOLDEFAULTS, "configuration", str(self.root / "global.conf")],
                     [SPOOLDEFAULTS, "complexes", f"{SHARE}/util/resources/centry"],
                     [SPOOLDEFAULTS, "usersets", f"{SHARE}/util/resources/usersets"],
                     [SPOOLDEFAULTS, "managers", "root"],
                     [SPOOLDEFAULTS, "adminhosts", "head"]):
            check(subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                 env=env), " ".join(argv[:2]))

    def _configure(self) -> None:
        names = self.hosts.names
        files = self.root / "objects"
        files.mkdir()
        steps = [["qconf", "-as", "head"], ["qconf", "-ah", ",".join(names)]]
        for name in names:
            (files / name).write_text(_table({
                "hostname": name, "load_scaling": "NONE", "complex_values": "NONE",
                "user_lists": "NONE", "xuser_lists": "NONE", "projects": "NONE",
                "xprojects": "NONE", "usage_scaling": "NONE", "report_variables": "NONE"}))
            steps.append(["qconf", "-Ae", str(files / name)])
        (files / "pe").write_text(_table({
            "pe_name": "scoop", "slots": "999", "user_lists": "NONE", "xuser_lists": "NONE",
            "start_proc_args": "NONE", "stop_proc_args": "NONE", "allocation_rule": "2",
            "control_slaves": "FALSE", "job_is_first_task": "TRUE",
            "urgency_slots": "min", "accounting_summary": "FALSE", "qsort_args": "NONE"}))
        steps.append(["qconf", "-Ap", str(files / "pe")])
        (files / "queue").write_text(_queue(names, self.slots))
        steps.append(["qconf", "-Aq", str(files / "queue")])
        for argv in steps:
            check(self.run(argv, timeout=30), " ".join(argv), self.log_tail())
        # The scheduler runs every 15 s by default: every second, and at once on a
        # submit or a job's end, here.
        shown = self.run(["qconf", "-ssconf"], timeout=30)
        check(shown, "qconf -ssconf", self.log_tail())
        (files / "sconf").write_text(_set(shown.stdout, schedule_interval="0:0:1",
                                          flush_submit_sec="1", flush_finish_sec="1"))
        check(self.run(["qconf", "-Msconf", str(files / "sconf")], timeout=30),
              "qconf -Msconf", self.log_tail())

    def _wait_hosts(self, timeout: float) -> None:
        """Until qstat shows every host's queue instance without a state (alive)."""
        deadline = time.monotonic() + timeout
        out = None
        while time.monotonic() < deadline:
            self.check_alive()
            out = self.run(["qstat", "-f", "-q", "scoop.q"], timeout=20)
            ok = set()
            for line in out.stdout.splitlines():
                fields = line.split()
                if fields and fields[0].startswith("scoop.q@") and len(fields) == 5:
                    ok.add(fields[0].split("@", 1)[1])  # no sixth field: no state flags
            if out.returncode == 0 and ok >= set(self.hosts.names):
                return
            time.sleep(0.2)
        said = out and (out.stdout + out.stderr).strip()
        raise RuntimeError(f"the exec hosts never came up (qstat -f: {said}):\n"
                           f"{self.log_tail()}")


def _table(fields: dict[str, str], head: str = "") -> str:
    return head + "".join(f"{k:<24}{v}\n" for k, v in fields.items())


def _set(conf: str, **values: str) -> str:
    """A Grid Engine config with some lines' values replaced."""
    lines = []
    for line in conf.splitlines():
        key = line.split(None, 1)[0] if line.strip() and not line.startswith("#") else ""
        lines.append(f"{key:<23}{values[key]}" if key in values else line)
    return "\n".join(lines) + "\n"


def _queue(names: list[str], slots: int) -> str:
    fields = {
        "qname": "scoop.q", "hostlist": " ".join(names), "seq_no": "0",
        "load_thresholds": "NONE", "suspend_thresholds": "NONE", "nsuspend": "1",
        "suspend_interval": "00:05:00", "priority": "0", "min_cpu_interval": "00:05:00",
        "processors": "UNDEFINED", "qtype": "BATCH INTERACTIVE", "ckpt_list": "NONE",
        "pe_list": "scoop", "rerun": "FALSE", "slots": str(slots), "tmpdir": "/tmp",
        "shell": "/bin/sh", "prolog": "NONE", "epilog": "NONE",
        "shell_start_mode": "posix_compliant", "starter_method": "NONE",
        "suspend_method": "NONE", "resume_method": "NONE", "terminate_method": "NONE",
        "notify": "00:00:60", "owner_list": "NONE", "user_lists": "NONE",
        "xuser_lists": "NONE", "subordinate_list": "NONE", "complex_values": "NONE",
        "projects": "NONE", "xprojects": "NONE", "calendar": "NONE",
        "initial_state": "default", "s_rt": "INFINITY", "h_rt": "INFINITY",
        "s_cpu": "INFINITY", "h_cpu": "INFINITY", "s_fsize": "INFINITY",
        "h_fsize": "INFINITY", "s_data": "INFINITY", "h_data": "INFINITY",
        "s_stack": "INFINITY", "h_stack": "INFINITY", "s_core": "INFINITY",
        "h_core": "INFINITY", "s_rss": "INFINITY", "h_rss": "INFINITY",
        "s_vmem": "INFINITY", "h_vmem": "INFINITY",
    }
    return _table(fields)

