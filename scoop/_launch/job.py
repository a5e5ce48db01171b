"""The job description: what a job runs and where, the one source of every worker config.

The command line (or a library call) describes the job once; everything a process of
the job is told is read from that description, never copied into variables of its own::

    Launcher(n, program, hosts=..., ...) --> Job (frozen; its size checked here, once)
        |-- Job.size ............... the broker (Broker(size=)), which tells every worker
        |                            in its WELCOME: the worker config does not repeat it
        |-- Job.placements() ....... which worker ids start on which host, and how
        |-- Job.worker_config(wid) . the JSON a worker reads when it starts: on its config
        |                            pipe (local), inside the agent's spec (ssh), or in the
        |                            job file (wid None: joining workers, srun)
        '-- wants_encryption() ..... whether the job's credentials use CURVE

*Job.* Immutable once built: the size, the hosts and the program cannot drift apart
between the broker, the agents, the job file and the workers.

*Placement.* One row per group of workers started together: a local host (one process
per worker), a remote host (one ssh connection running the host agent) or an srun step
(every worker but the root, joining by themselves).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

from .. import _broker, _reaper, _spin
from .._bootstrap import CONNECT_TIMEOUT_S
from .._hosts import is_local
from .._watchdog import BROKER_TIMEOUT_S, seconds_from_env

# The key of the mark an elastic job leaves in its job file when it ends (scoop.join).
ENDED = "ended"


class Placement(NamedTuple):
    """Workers started together: on ``host``, ``how`` ("local", "ssh" or "srun")."""

    host: str
    wids: list[int]
    how: str


@dataclass(frozen=True)
class Job:
    """What a job runs and where (the arguments of :class:`~scoop._launch.Launcher`).

    Attributes:
        hosts: (name, workers) pairs of the workers this launcher places, the first
            running the root; hosts with no worker are left out.
        external: workers another launcher starts (``python -m scoop.join``), waited
            for at start (counted in ``size``).
        elastic: workers may join (``python -m scoop.join``) and leave at any time, none
            waited for: the job file is written and the broker listens for them.
        launcher: how remote workers start: "ssh" (one agent per host) or "srun" (one
            step of every worker but the root).
        id: marks every process of the job (see :mod:`scoop._reaper`).
        connect_timeout: how long a worker tries to reach the broker (s).
        broker_timeout: the broker's silence after which a worker leaves (s).
        spin_us: how long an idle wait polls before it sleeps (``scoop._spin``).
        broker_apart: the broker runs in a process of its own (the launcher's), not in
            the root's (``Launcher.start(root_in_process=True)``).
    """

    hosts: tuple[tuple[str, int], ...]
    program: str | None = None
    module: str | None = None
    args: tuple[str, ...] = ()
    python: str = sys.executable
    cwd: str = field(default_factory=os.getcwd)
    pythonpath: str | None = None
    nice: int = 0
    debug: bool = False
    log_level: int = logging.WARNING
    log_file: str | None = None
    external: int = 0
    elastic: bool = False
    launcher: str = "ssh"
    ssh: str = "ssh"
    broker_hostname: str | None = None
    prolog: str | None = None
    tunnel: bool = False
    max_attempts: int = _broker.MAX_ATTEMPTS
    progress: bool = False
    id: str = field(default_factory=_reaper.new_job_id)
    # Tuning for slow clusters (or quick tests), the same on every host: read once.
    connect_timeout: float = field(default_factory=lambda: seconds_from_env(
        "SCOOP_CONNECT_TIMEOUT", CONNECT_TIMEOUT_S))
    broker_timeout: float = field(default_factory=lambda: seconds_from_env(
        "SCOOP_BROKER_TIMEOUT", BROKER_TIMEOUT_S))
    spin_us: int = field(default_factory=_spin.window_us)
    broker_apart: bool = True

    def __post_init__(self) -> None:
        hosts = tuple((name, count) for name, count in self.hosts if count > 0)
        object.__setattr__(self, "hosts", hosts)
        object.__setattr__(self, "args", tuple(self.args))
        if self.size < 1:
            raise ValueError("a job needs at least one worker")

    @property
    def size(self) -> int:
        """The number of workers, the root and joining workers included."""
        return sum(count for _, count in self.hosts) + self.external

    @property
    def remote(self) -> list[str]:
        """The hosts that are not this machine, in order."""
        return [name for name, _ in self.hosts if not is_local(name)]

    @property
    def accepts_joiners(self) -> bool:
        """Whether workers started elsewhere may join (a job file is written for them)."""
        return bool(self.joiners) or self.elastic

    @property
    def shm(self) -> str | None:
        """The job's id if every worker runs on this host (no remote host, no joining
        worker): then large frames go through shared memory (scoop._shm); else None."""
        return None if self.remote or self.accepts_joiners else self.id

    @property
    def joiners(self) -> int:
        """Workers that ask the broker for their id: --external ones, or srun's step."""
        return self.size - 1 if self.launcher == "srun" else self.external

    def placements(self, root_in_process: bool = False) -> list[Placement]:
        """Which workers start where; the root's row comes last (it starts once every
        remote worker has joined). With ``root_in_process`` the root is left out."""
        if self.launcher == "srun":
            rows = [Placement("srun", list(range(1, self.size)), "srun"),
                    Placement(self.hosts[0][0], [0], "local")]
        else:
            rows, first = [], 0
            for name, count in self.hosts:
                rows.append(Placement(name, list(range(first, first + count)),
                                      "local" if is_local(name) else "ssh"))
                first += count
        rows = [row._replace(wids=[w for w in row.wids if w or not root_in_process])
                for row in rows]
        return sorted((row for row in rows if row.wids), key=lambda row: 0 in row.wids)

    def worker_config(self, wid: int | None, address: str, creds) -> dict:
        """The config a worker reads when it starts (``wid`` None: it asks the broker)."""
        return {
            **creds.for_worker(), "job": self.id, "address": address, "wid": wid,
            "program": self.program, "module": self.module, "args": list(self.args),
            "cwd": self.cwd, "nice": self.nice, "debug": self.debug,
            "log_level": self.log_level, "log_file": self.log_file,
            "hosts": self.hosts, "progress": self.progress, "shm": self.shm,
            "connect_timeout": self.connect_timeout, "broker_timeout": self.broker_timeout,
            "spin_us": self.spin_us, "broker_apart": self.broker_apart,
        }


def wants_encryption(encrypt: bool | None, hosts: list[tuple[str, int]],
                     external: int | bool, tunnel: bool, launcher: str) -> bool:
    """Whether a job's traffic is encrypted: as asked, or by default whenever a worker may
    connect from another machine other than through an ssh tunnel.

    Without encryption the handshake token crosses the network in the clear, and whoever
    reads it may connect and send (unsigned, dropped) messages of any size, which ZeroMQ
    buffers whole before the broker sees them. With CURVE nothing that crosses the
    network lets anyone in.
    """
    if encrypt is not None:
        return encrypt
    if external or launcher == "srun":  # external: a count, or True for an elastic job
        return True  # workers connect to the broker's port from anywhere
    return not tunnel and any(not is_local(name) for name, _ in hosts)
