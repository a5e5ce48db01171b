"""Where the broker listens and the address its workers are given: one row per case.

Every job has one broker, a thread of the launcher; how its workers reach it depends on
where they run. The cases are rows of :data:`ROUTES`, the first whose test holds wins::

    row       when                          broker binds   workers connect to
    srun      --launcher srun               0.0.0.0        --broker-hostname, else this
                                                           machine's address toward the
                                                           second host (the first's)
    external  --external N, --elastic       0.0.0.0        --broker-hostname, else toward
                                                           the first remote host, else
                                                           this machine's FQDN
    tunnel    remote hosts and -e           127.0.0.1      the same loopback port, which
                                                           each ssh forwards (-R) there
    direct    remote hosts                  0.0.0.0        --broker-hostname, else toward
                                                           the first remote host
    local     every worker on this machine  127.0.0.1      the broker's own address

*Broker.* Listens on loopback whenever no worker connects from elsewhere: nothing on the
network can reach it.

*Workers.* Get the address in their config (local and ssh) or the job file (joining
workers). "Toward a host" is the source address the kernel picks to route there
(:func:`guess_broker_address`): no packet is sent.

*Local wire.* Whatever the row, the workers the launcher starts on its own host connect
to the broker's Unix socket (``unix:///dir/b``, ``scoop._local``) instead: no ZeroMQ I/O
thread on either side of a message (issue 12). Not in an encrypted job (CURVE for
everyone), nor with ``SCOOP_LOCAL_WIRE=tcp`` (:func:`local_wire`).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
from collections.abc import Callable
from typing import NamedTuple

from .job import Job

LOOPBACK = "127.0.0.1"
ANY = "0.0.0.0"


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


def _toward(job: Job, hosts: list[str]) -> str:
    """--broker-hostname, else this machine's address toward the first of ``hosts``."""
    if job.broker_hostname:
        return job.broker_hostname
    return guess_broker_address(hosts[0], job.ssh) if hosts else socket.getfqdn()


class Route(NamedTuple):
    """A row of :data:`ROUTES`: when it applies, where the broker binds, and the host
    workers connect to (None: the broker's own address, on loopback)."""

    name: str
    applies: Callable[[Job], bool]
    bind: str
    host: Callable[[Job], str] | None


ROUTES: tuple[Route, ...] = (
    Route("srun", lambda job: job.launcher == "srun", ANY,
          lambda job: _toward(job, [name for name, _ in job.hosts[1:2] or job.hosts[:1]])),
    Route("external", lambda job: job.external > 0 or job.elastic, ANY,
          lambda job: _toward(job, job.remote)),
    Route("tunnel", lambda job: bool(job.remote) and job.tunnel, LOOPBACK, None),
    Route("direct", lambda job: bool(job.remote), ANY, lambda job: _toward(job, job.remote)),
    Route("local", lambda job: True, LOOPBACK, None),
)


def local_wire(encrypted: bool) -> bool:
    """Whether the workers started on the broker's host use its Unix socket: unless the
    job is encrypted or ``SCOOP_LOCAL_WIRE=tcp`` (then ZeroMQ TCP, as remote ones)."""
    wire = os.environ.get("SCOOP_LOCAL_WIRE", "").strip().lower()
    return not encrypted and wire != "tcp" and hasattr(socket, "AF_UNIX")


def route(job: Job) -> Route:
    """The row of :data:`ROUTES` for ``job``."""
    return next(row for row in ROUTES if row.applies(job))


def worker_address(row: Route, job: Job, broker_address: str) -> str:
    """The address ``job``'s workers connect to, given where its broker listens."""
    if row.host is None:
        return broker_address
    return f"tcp://{row.host(job)}:{broker_address.rsplit(':', 1)[1]}"
