"""The job's host list: which machines get how many workers.

Reimplements the host handling of SCOOP's ``scoop.utils`` and ``scoop.launcher``: the
hostfile, the ``--hosts a a b b`` list, the ``-n`` distribution rules, the test for "is
this host this machine" and the host lists of batch schedulers. Pure logic: nothing here
starts ssh or touches the network.

Deliberate differences from the original:

* Hostfiles also accept ``name slots=N`` (Open MPI style; ``max_slots`` is tolerated and
  ignored), trailing ``#`` comments, and a bare ``name`` meaning "as many workers as that
  host has CPUs". A host on several lines gets the sum of its counts. A bad line is an
  error naming the file, the line and the expected syntax.
* ``--host a a b b prog.py`` no longer takes ``prog.py`` for a host: the launcher's
  command line (:func:`scoop._launch.cli.split_host_args`) ends the host list at the
  program before argparse sees it.
* Batch allocations are read natively, without ``scontrol`` or other scheduler tools:
  SLURM, PBS/Torque, SGE and LSF, each a row of :data:`SCHEDULERS`.
* :func:`is_local` never resolves a host name it is given; it compares it textually
  against this machine's own names and addresses, so a made-up name costs no DNS wait.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ._errors import HostfileError
from ._files import read_regular

SYNTAX_HINT = "expected 'hostname', 'hostname COUNT' or 'hostname slots=COUNT'"


@dataclass(frozen=True)
class Host:
    """A machine of the job and its number of workers.

    Attributes:
        name: host name or address, as the user wrote it.
        workers: number of workers; None means "as many as the host has CPUs", which
            :func:`distribute` replaces by a number.
    """

    name: str
    workers: int | None


def _merge(entries: Iterable[tuple[str, int | None]], where: str = "") -> list[Host]:
    """Hosts in order of first appearance, the counts of repeated names added.

    A name given both with and without a count is an error: "all its CPUs" plus 4 has no
    sensible meaning. ``where`` prefixes that message (e.g. the file name).
    """
    counts: dict[str, int | None] = {}
    for name, workers in entries:
        problem = _bad_name(name)
        if problem:  # every source passes here: hostfile, --hosts and schedulers
            raise ValueError(f"{where}{problem}")
        if name not in counts:
            counts[name] = workers
        elif (counts[name] is None) != (workers is None):
            raise HostfileError(f"{where}host {name!r} is listed both with and without a "
                                "worker count; give a count on every line or on none")
        elif workers is not None:
            counts[name] += workers  # type: ignore[operator]
    return [Host(name, workers) for name, workers in counts.items()]


def _positive(text: str) -> int | None:
    return int(text) if re.fullmatch(r"[0-9]+", text) and int(text) > 0 else None


# A host as ssh takes it: an optional ``user@``, then a DNS name, an IPv4 address or an
# IPv6 address (bare or in brackets, with an optional %zone). Nothing else reaches ssh:
# names also come from batch-scheduler variables, which are not the user's own input.
_HOST_NAME = re.compile(r"""
    (?:[A-Za-z0-9_][A-Za-z0-9_.+~-]*@)?          # user@
    (?: [A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?   # name or IPv4
      | \[?[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9_.-]+)?\]?  # IPv6
    )""", re.VERBOSE)


def _bad_name(name: str) -> str | None:
    """Why ``name`` cannot be a host name, or None."""
    if name.startswith("-"):
        return f"host name cannot start with '-', got {name!r}"
    if "=" in name or "," in name:
        return f"host name cannot contain '=' or ',', got {name!r}"
    if len(name) > 255 or not _HOST_NAME.fullmatch(name):
        return (f"not a host name: {name!r} (expected letters, digits, '.', '-' and '_', "
                "an IPv4 or IPv6 address, optionally after 'user@')")
    return None


# -- hostfile ----------------------------------------------------------------------------
def _parse_line(line: str) -> tuple[str, int | None]:
    """One hostfile line (comment already removed) -> (name, workers); ValueError if bad."""
    name, *rest = line.split()
    problem = _bad_name(name)
    if problem:
        raise ValueError(problem)
    if not rest:
        return name, None
    if "=" not in rest[0]:
        if len(rest) > 1:
            raise ValueError(f"too many fields after the worker count: {' '.join(rest[1:])!r}")
        count = _positive(rest[0])
        if count is None:
            raise ValueError(f"worker count must be a positive integer, got {rest[0]!r}")
        return name, count
    slots = None
    for field in rest:
        key, _, value = field.partition("=")
        if key not in ("slots", "max_slots", "max-slots"):
            raise ValueError(f"unknown field {field!r}")
        count = _positive(value)
        if count is None:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if key == "slots":
            slots = count
    if slots is None:
        raise ValueError("max_slots without slots=COUNT")
    return name, slots


def parse_hostfile(path: str | os.PathLike[str]) -> list[Host]:
    """Read a hostfile.

    Each line is ``name``, ``name COUNT`` or ``name slots=COUNT [max_slots=M]``; blank
    lines and ``#`` comments (whole-line or trailing) are skipped. A bare ``name`` gets
    ``workers=None`` (its CPU count). Example::

        # the cluster
        node01 4
        node02 slots=2     # Open MPI style
        node03             # all its CPUs

    Args:
        path: the hostfile.

    Returns:
        The hosts in order of first appearance; a host on several lines gets the sum.

    Raises:
        HostfileError: unreadable file, a bad line (``hosts:3: worker count must be a
            positive integer, got 'four'; expected ...``) or no host at all.
    """
    try:
        lines = read_regular(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise HostfileError(f"{os.fspath(path)}: cannot read hostfile: {reason}") from e
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            entries.append(_parse_line(line))
        except ValueError as e:
            raise HostfileError(f"{os.fspath(path)}:{number}: {e}; {SYNTAX_HINT}") from None
    if not entries:
        raise HostfileError(f"{os.fspath(path)}: no host in hostfile; {SYNTAX_HINT}")
    return _merge(entries, f"{os.fspath(path)}: ")


def hosts_from_list(names: Iterable[str]) -> list[Host]:
    """The ``--hosts a a b b`` form: one worker per mention of a host.

    Entries may also hold comma-separated names (``--hosts=a,a,b,b``, the form that
    :func:`scoop._launch.cli.split_host_args` produces); empty names are skipped.

    Example:
        ``hosts_from_list(["a", "a", "b,b"])`` -> ``[Host("a", 2), Host("b", 2)]``.

    Raises:
        ValueError: no name at all (``--hosts prog.py`` gives ``--hosts=``), or a name
            that starts with '-' or contains '='.
    """
    flat = [name.strip() for entry in names for name in entry.split(",") if name.strip()]
    if not flat:
        raise ValueError("--hosts: no host name given; expected --hosts NAME [NAME ...]")
    for name in flat:
        problem = _bad_name(name)
        if problem:
            raise ValueError(f"--hosts: {problem}")
    return _merge((name, 1) for name in flat)


# -- -n ----------------------------------------------------------------------------------
def distribute(hosts: list[Host], n: int | None,
               cpu_count: Callable[[str], int]) -> list[Host]:
    """Apply ``-n`` to a host list, as the original launcher does.

    Hosts with ``workers=None`` first get ``cpu_count(name)``; hosts with 0 workers are
    then left out. Then:

    * ``n`` None: the counts as they are;
    * ``n`` below the total: hosts are filled in order, up to ``n``; later hosts are left
      out (A:4 B:2 C:2, n=5 -> A:4 B:1);
    * ``n`` above the total: the extra workers go round-robin, one per host from the
      first (A:4 B:2 C:2, n=11 -> A:5 B:3 C:3).

    Args:
        hosts: the hosts, the first of which runs the root.
        n: the total number of workers, or None.
        cpu_count: the CPU count of a host, for hosts without a count.

    Returns:
        New hosts, every one with at least one worker, in the given order.

    Raises:
        ValueError: ``n`` below 1, or ``n`` given with no host to put workers on.
    """
    if n is not None and n < 1:
        raise ValueError(f"the number of workers must be at least 1, got {n}")
    counts = [(h.name, cpu_count(h.name) if h.workers is None else h.workers) for h in hosts]
    counts = [(name, workers) for name, workers in counts if workers > 0]
    if n is None:
        return [Host(name, workers) for name, workers in counts]
    if not counts:
        raise ValueError(f"no host to start {n} workers on")
    total = sum(workers for _, workers in counts)
    result = []
    left = min(n, total)
    for name, workers in counts:
        if left == 0:
            break
        result.append([name, min(workers, left)])
        left -= result[-1][1]
    extra, rest = divmod(max(n - total, 0), len(result))
    for i, entry in enumerate(result):
        entry[1] += extra + (i < rest)
    return [Host(name, workers) for name, workers in result]


def format_hosts(hosts: Iterable[Host]) -> str:
    """For logs: ``"A:4 B:2"``; a host without a count shows ``A:cpus``."""
    text = " ".join(f"{h.name}:{'cpus' if h.workers is None else h.workers}" for h in hosts)
    return text or "(no host)"


# -- is this host this machine? ----------------------------------------------------------
def _addresses_from_proc() -> set[str]:
    """This machine's addresses from /proc (Linux): IPv4 LOCAL routes and IPv6 addresses."""
    found = set()
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            last = None
            for line in f:
                # "|-- 10.0.0.5" followed by "/32 host LOCAL" is an address of ours.
                if "|--" in line:
                    last = line.split("|--", 1)[1].strip()
                elif "/32 host LOCAL" in line and last:
                    found.add(last)
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if fields and len(fields[0]) == 32:
                    found.add(str(ipaddress.IPv6Address(int(fields[0], 16))))
    except (OSError, ValueError):
        pass
    return found


def _addresses_from_ip() -> set[str]:
    """This machine's addresses from ``ip -o addr`` (lines ``2: eth0 inet 10.0.0.5/24 ...``)."""
    ip = shutil.which("ip")
    if not ip:
        return set()
    try:
        text = subprocess.run([ip, "-o", "addr"], capture_output=True, text=True,
                              timeout=2, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    found = set()
    for line in text.splitlines():
        fields = line.split()
        for key, value in itertools.pairwise(fields):
            if key in ("inet", "inet6"):
                found.add(value.split("/", 1)[0])
    return found


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=1)
def _local_identity() -> tuple[frozenset[str], frozenset[IPAddress]]:
    """(names, addresses) of this machine. Resolves only this machine's own hostname."""
    names = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
    addresses = _addresses_from_proc() or _addresses_from_ip()
    hostname = socket.gethostname()
    if hostname:
        names.add(hostname)
        try:
            canonical, aliases, addrs = socket.gethostbyname_ex(hostname)
            names.update([canonical, *aliases])
            addresses.update(addrs)
        except OSError:
            pass
        try:
            names.add(socket.getfqdn(hostname))
        except OSError:
            pass
    parsed = set()
    for address in addresses:
        try:
            parsed.add(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            continue
    return frozenset(n.lower().rstrip(".") for n in names if n), frozenset(parsed)


def is_local(name: str) -> bool:
    """Whether ``name`` is this machine, so its workers need no ssh.

    True for ``localhost`` (and ``*.localhost``), loopback addresses (127.0.0.0/8, ::1),
    this machine's host name, FQDN and aliases, and the addresses of its interfaces.

    The given name is never looked up: resolving made-up or unreachable names can block
    for seconds per name. It is compared, without case and trailing dot, against the
    local names and addresses, which come from ``socket.gethostname()``, the resolution
    of that one name, ``/proc/net`` (or ``ip -o addr``), computed once. So an alias of
    this machine known only to DNS or /etc/hosts counts as remote.
    """
    name = name.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        names, _ = _local_identity()
        return name in names or name.endswith(".localhost")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback or address in _local_identity()[1]


# -- batch schedulers --------------------------------------------------------------------
def _read_lines(path: str, variable: str) -> list[str]:
    try:
        return read_regular(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise HostfileError(f"{path} (from ${variable}): cannot read: {reason}") from e


def _expand_brackets(item: str) -> list[str]:
    """``a[1-2]-ib[3-4]`` -> a1-ib3, a1-ib4, a2-ib3, a2-ib4 (padding of ``01`` kept)."""
    parts: list[list[str]] = []
    for text, group in re.findall(r"([^\[\]]+)|\[([^\[\]]*)\]", item):
        if text:
            parts.append([text])
            continue
        choices = []
        for piece in group.split(","):
            lo, dash, hi = piece.partition("-")
            if (not re.fullmatch(r"[0-9]+", lo) or (dash and not re.fullmatch(r"[0-9]+", hi))
                    or (dash and int(hi) < int(lo))):
                raise ValueError(f"bad range {piece!r} in {item!r}")
            end = int(hi) if dash else int(lo)
            choices += [str(i).zfill(len(lo)) for i in range(int(lo), end + 1)]
        parts.append(choices)
    return ["".join(p) for p in itertools.product(*parts)]


def parse_slurm_nodelist(text: str) -> list[str]:
    """SLURM's compressed node list, expanded without ``scontrol``.

    Example:
        ``n[01-03,07],gpu5`` -> ``["n01", "n02", "n03", "n07", "gpu5"]``; several
        bracket groups give their cartesian product: ``a[1-2]-ib[3-4]`` -> a1-ib3,
        a1-ib4, a2-ib3, a2-ib4.

    Raises:
        ValueError: unbalanced or nested brackets, a bad range.
    """
    # Commas inside brackets separate ranges, outside them nodes.
    items, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in node list {text!r}")
        if char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in node list {text!r}")
    return [node for item in items if item for node in _expand_brackets(item)]


def parse_slurm_counts(text: str) -> list[int]:
    """SLURM's per-node counts: ``2(x3),1`` -> ``[2, 2, 2, 1]``.

    The syntax of ``SLURM_TASKS_PER_NODE`` and ``SLURM_JOB_CPUS_PER_NODE``.

    Raises:
        ValueError: an entry that is not ``COUNT`` or ``COUNT(xREPEAT)``.
    """
    counts = []
    for entry in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", entry)
        if not match:
            raise ValueError(f"bad count {entry!r} in {text!r}; expected like '2(x3),1'")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def _slurm(value: str, env: Mapping[str, str]) -> list[Host]:
    """SLURM: ``SLURM_JOB_NODELIST=n[01-02]``, ``SLURM_TASKS_PER_NODE=4(x2)`` -> n01:4 n02:4.

    Counts from ``SLURM_TASKS_PER_NODE``, else ``SLURM_JOB_CPUS_PER_NODE``, else none (the
    CPU count of each node).
    """
    nodes = parse_slurm_nodelist(value)
    for variable in ("SLURM_TASKS_PER_NODE", "SLURM_JOB_CPUS_PER_NODE"):
        if env.get(variable):
            counts: list[int | None] = list(parse_slurm_counts(env[variable]))
            if len(counts) != len(nodes):
                raise ValueError(f"${variable}={env[variable]!r} gives {len(counts)} counts "
                                 f"for {len(nodes)} nodes of {value!r}")
            break
    else:
        counts = [None] * len(nodes)
    return _merge(zip(nodes, counts))


def _pbs(value: str, env: Mapping[str, str]) -> list[Host]:
    """PBS/Torque: ``$PBS_NODEFILE`` names a file with one line per slot::

        node01
        node01
        node02

    -> node01:2 node02:1.
    """
    return _merge((line.strip(), 1) for line in _read_lines(value, "PBS_NODEFILE")
                  if line.strip())


def _sge(value: str, env: Mapping[str, str]) -> list[Host]:
    """SGE: ``$PE_HOSTFILE`` names a file of ``host slots queue processors`` lines::

        node01.cluster 4 all.q@node01.cluster UNDEFINED
        node02.cluster 2 all.q@node02.cluster UNDEFINED

    -> node01.cluster:4 node02.cluster:2.
    """
    entries = []
    for number, line in enumerate(_read_lines(value, "PE_HOSTFILE"), 1):
        fields = line.split()
        if not fields:
            continue
        slots = _positive(fields[1]) if len(fields) > 1 else None
        if slots is None:
            raise HostfileError(f"{value}:{number}: expected 'host slots queue processors', "
                                f"got {line.strip()!r}")
        entries.append((fields[0], slots))
    return _merge(entries)


def _lsf_mcpu(value: str, env: Mapping[str, str]) -> list[Host]:
    """LSF: ``LSB_MCPU_HOSTS="hostA 4 hostB 2"`` -> hostA:4 hostB:2."""
    fields = value.split()
    counts = [_positive(c) for c in fields[1::2]]
    if len(fields) % 2 or None in counts:
        raise ValueError(f"$LSB_MCPU_HOSTS={value!r}: expected 'host count host count ...'")
    return _merge(zip(fields[::2], counts))


def _lsf_hosts(value: str, env: Mapping[str, str]) -> list[Host]:
    """LSF: ``LSB_HOSTS="hostA hostA hostB"`` (one name per slot) -> hostA:2 hostB:1."""
    return _merge((name, 1) for name in value.split())


@dataclass(frozen=True)
class Scheduler:
    """A row of :data:`SCHEDULERS`: a batch system, the variable it sets, its parser."""

    name: str
    variable: str
    parse: Callable[[str, Mapping[str, str]], list[Host]]


# Scheduler differences are data: the first row whose variable is set wins.
SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("SLURM", "SLURM_JOB_NODELIST", _slurm),
    Scheduler("SLURM", "SLURM_NODELIST", _slurm),
    Scheduler("PBS", "PBS_NODEFILE", _pbs),
    Scheduler("SGE", "PE_HOSTFILE", _sge),
    Scheduler("LSF", "LSB_MCPU_HOSTS", _lsf_mcpu),
    Scheduler("LSF", "LSB_HOSTS", _lsf_hosts),
)


def hosts_from_environment(
        env: Mapping[str, str] | None = None) -> tuple[str, list[Host]] | None:
    """The hosts of the batch allocation this process runs in.

    Args:
        env: the environment to read (default ``os.environ``).

    Returns:
        ``(scheduler name, hosts)``, e.g. ``("SLURM", [Host("n01", 4), ...])``, or None
        when no scheduler variable of :data:`SCHEDULERS` is set.

    Raises:
        ValueError: the scheduler's data cannot be parsed (:class:`HostfileError` for
            its files); the message names the variable or file.
    """
    env = os.environ if env is None else env
    for row in SCHEDULERS:
        value = env.get(row.variable, "").strip()
        if value:
            try:
                return row.name, row.parse(value, env)
            except HostfileError:
                raise
            except ValueError as e:
                raise ValueError(f"{row.name} allocation (${row.variable}): {e}") from None
    return None
