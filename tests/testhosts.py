"""Throwaway "remote hosts" for tests: network namespaces on this machine, each with its own sshd.

Layout with the defaults (prefix ``sct``, network 10.213.77.0/24)::

    head: the root namespace (the test process), 10.213.77.1 on veth "sct-head"
      |
    namespace "sct-sw": bridge br0 (the switch has its own namespace, so the root
      |        |        |         namespace's firewall never sees host-to-host traffic)
    sct1     sct2     sct3 ...    namespaces: lo, eth0 10.213.77.(i+1)/24, no default
    .2       .3       .4          route, own hostname (UTS), sshd on eth0's address:22

A host shares this machine's filesystem, users, PIDs and Python installs; only the
network, the hostname, /etc/hosts (test names, ``head``, this machine's hostname ->
the head address) and /etc/resolv.conf (nameserver 127.0.0.1: no DNS query can leave)
are its own. Nothing is routed: a host reaches the test /24 and its loopback, nothing
else. Only the head can reach the hosts from the root namespace, through 10.213.77.1:
a server on the head that remote processes must reach has to bind 10.213.77.1 (or
0.0.0.0) and be advertised as 10.213.77.1 (or ``head``, inside the hosts). A remote
command starts in /root with sshd's default PATH (/usr/local/bin:/usr/bin:/bin:...), so
``python3`` there is the system's: run ``sys.executable`` by its absolute path (the
filesystem is shared). To resolve the test names on the head itself without any DNS
query, run the command through :meth:`TestHosts.head_cmd`.

Usage (as root)::

    with TestHosts() as th:
        th.up(3)                                   # sct1..sct3
        th.run("sct1", "hostname")                 # CompletedProcess, via ssh
        subprocess.run([th.ssh_wrapper, "sct2", "true"])
        th.crash("sct2"); th.up(3)                 # kill all in sct2, then repair
    # leaving the block removes everything (namespaces, links, sshd, state dir)

The client side: ``ssh_config`` in the state dir (``Host sctN`` entries, key-only root
login, host keys pre-recorded in its own known_hosts with StrictHostKeyChecking yes,
BatchMode, ConnectTimeout 5, SendEnv SCOOP_TEST_RUN) ends with a rule that refuses,
through a failing ProxyCommand and so without any DNS lookup, every host that is not
one of the test addresses. ``bin/ssh`` in the state dir execs ``/usr/bin/ssh -F
ssh_config "$@"``, for a launcher's ``--ssh-executable`` or the front of PATH.

One user per prefix at a time: ``up`` takes a lock (/tmp/.scoop-testhosts-PREFIX.lock)
that ``down`` releases; a fresh ``up`` first removes whatever a crashed run of the same
prefix left behind. Only names of its own prefix are ever touched.

Several test sessions on one machine (developers and CI sharing it) each take a free
*slot* with :func:`claim`: slot 0 is prefix ``sct`` on 10.213.77.0/24 (and ``sctx`` on
10.213.78.0/24 for a second set, see :func:`slot`), slot k > 0 prefix ``sct`` + a letter
on 10.213.(77 + 2k).0/24. So concurrent sessions never wait for each other's hosts.

Timings on the development VM (2 vCPU AMD EPYC, kernel 6.18, OpenSSH 9.2), 8 rounds:
up(3) 0.12-0.17 s (namespaces and links ~0.10 s, 3 sshd started and answering ~0.04 s),
down() 0.13-0.19 s, an ssh round trip ("true") 0.20-0.25 s, crash() plus the repairing
up(3) ~0.04 s; tests/test_testhosts.py as a whole ~6.5 s. A run that finds the prefix
in use by another process waits for it (up to ``lock_timeout``, 60 s).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_PREFIX = "sct"
DEFAULT_NET = "10.213.77"
SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NETNS_DIR = "/run/netns"
_ETC_NETNS = "/etc/netns"
_MAX_HOSTS = 200
_ACTIVE: set[str] = set()  # prefixes held by a TestHosts of this process

# Run inside the host's namespace: own hostname (new UTS namespace), then sshd.
_SSHD_START = 'echo "$1" > /proc/sys/kernel/hostname || exit 1; shift; exec "$@"'
# Run in a new mount namespace: the head's view of the test names, no DNS off the machine.
_HEAD_START = ('mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf || exit 125;'
               ' shift 2; exec "$@"')


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":" + _SYSTEM_PATH)


def _ip() -> str:
    return _which("ip") or "/usr/sbin/ip"


def _run(*args: str, check: bool = True, input: str | None = None,
         timeout: float = 20) -> subprocess.CompletedProcess:
    """Run a local command; raise RuntimeError with its stderr if it fails and check."""
    r = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout,
                       stdin=None if input is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
    return r


def _ns_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class FileLock:
    """An exclusive lock between processes (flock) on ``path``; the file is removed on release.

    A context manager, or ``acquire()``/``release()``. Released by the kernel when the
    holder dies, so a crashed run never blocks the next one.
    """

    def __init__(self, path: str, timeout: float = 60):
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        deadline = time.monotonic() + self.timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.path} is held by another process for more "
                                       f"than {self.timeout} s") from None
                time.sleep(0.05)
                continue
            # The holder before us removed the file on release: retry on a stale inode.
            if _ns_key(self.path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_supported_cache: list[str | None] = []


def supported() -> str | None:
    """None if this machine can host test hosts, else why not (for pytest.skip)."""
    if not _supported_cache:
        _supported_cache.append(_check_supported())
    return _supported_cache[0]


def _check_supported() -> str | None:
    if os.geteuid() != 0:
        return "test hosts need root (ip netns needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"),
                          ("mount", "mount"), ("umount", "mount")):
        if _which(tool) is None:
            return f"'{tool}' not found (apt-get install {package})"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found (apt-get install openssh-server)"
    for path in (SSH, SSH_KEYGEN):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install openssh-client)"
    try:
        with open("/proc/self/uid_map") as f:
            first = f.readline().split()
        if first != ["0", "0", "4294967295"]:
            return (f"in a non-initial user namespace (uid_map {' '.join(first)}): "
                    "ip netns needs real root")
    except OSError:
        pass
    # Probe netns + veth + bridge in a throwaway namespace (gone when the shell exits).
    probe = "ip link add sctpa type veth peer name sctpb && ip link add sctpbr type bridge"
    try:
        r = subprocess.run([_which("unshare"), "--net", "--mount", "sh", "-c", probe],
                           capture_output=True, text=True, timeout=20,
                           env=dict(os.environ, PATH=_SYSTEM_PATH))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"network namespace probe failed: {e}"
    if r.returncode != 0:
        return ("network namespaces/veth/bridge unavailable "
                f"({(r.stderr or r.stdout).strip()}); needs real root and a kernel with "
                "CONFIG_NET_NS, CONFIG_VETH, CONFIG_BRIDGE")
    return None


SLOTS = 8


def slot(k: int) -> tuple[str, str, str, str]:
    """(prefix, net, spare prefix, spare net) of slot ``k``: the spare pair is for a
    second set of hosts of the same session (free whenever the slot is held)."""
    if not 0 <= k < SLOTS:
        raise ValueError(f"0 <= slot < {SLOTS}, got {k}")
    prefix = DEFAULT_PREFIX + ("" if k == 0 else "abcdefgh"[k - 1])
    third = int(DEFAULT_NET.rsplit(".", 1)[1]) + 2 * k
    base = DEFAULT_NET.rsplit(".", 1)[0]
    return prefix, f"{base}.{third}", prefix + "x", f"{base}.{third + 1}"


def claim(lock_timeout: float = 60) -> TestHosts:
    """A :class:`TestHosts` on the first slot that no other process holds, its lock held
    already (``up`` keeps it, ``down`` releases it): concurrent test sessions on one
    machine get separate hosts at once instead of waiting for each other."""
    for k in range(SLOTS):
        prefix, net, _, _ = slot(k)
        th = TestHosts(prefix, net, lock_timeout=0)
        th.slot = k
        try:
            th.lock.acquire()
        except TimeoutError:
            continue  # held by another session
        th.lock.timeout = lock_timeout
        return th
    raise RuntimeError(f"all {SLOTS} test host slots are in use by other processes")


class TestHosts:
    """Test hosts ``PREFIX1..PREFIXn`` at NET.2..NET.(n+1); the head is NET.1.

    A context manager: leaving it calls :meth:`down`. Every public method that takes a
    host accepts its name (``sct1``) or its address (``10.213.77.2``).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str = DEFAULT_PREFIX, net: str = DEFAULT_NET,
                 state_dir: str | os.PathLike | None = None, lock_timeout: float = 60):
        # The prefix ends with a letter, so host "sct12" cannot read as "sct1" + 2.
        if not re.fullmatch(r"[a-z]([a-z0-9]{0,6}[a-z])?", prefix):
            raise ValueError(f"prefix must be 1-8 of [a-z0-9], start and end with a letter: "
                             f"{prefix!r}")
        m = re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})", net)
        if not m or any(int(x) > 255 for x in m.groups()) or not (
                net.startswith("10.") or net.startswith("192.168.")
                or (m[1] == "172" and 16 <= int(m[2]) <= 31)):
            raise ValueError(f"net must be the first three octets of a private /24: {net!r}")
        self.prefix = prefix
        self.net = net
        self.head = f"{net}.1"
        self.switch = f"{prefix}-sw"
        self.head_if = f"{prefix}-head"
        self.state = Path(state_dir or f"/tmp/scoop-testhosts-{prefix}")
        self.ssh_config = self.state / "ssh_config"
        self.ssh_wrapper = self.state / "bin" / "ssh"
        self.known_hosts = self.state / "known_hosts"
        self.identity = self.state / "id_ed25519"
        self.n = 0
        self.slot: int | None = None  # set by claim()
        self.timings: dict[str, float] = {}
        # Held from the first up() to down(): one user of a prefix at a time on this machine.
        self.lock = FileLock(f"/tmp/.scoop-testhosts-{prefix}.lock", lock_timeout)
        self._sshd: dict[str, subprocess.Popen] = {}
        self._active = False  # between the first up() and down(): the lock is ours

    # ------------------------------------------------------------------ naming
    @property
    def names(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.n + 1)]

    @property
    def addresses(self) -> list[str]:
        return [self._addr(i) for i in range(1, self.n + 1)]

    def address(self, host: str) -> str:
        return self._addr(self._index(host))

    def name(self, host: str) -> str:
        return f"{self.prefix}{self._index(host)}"

    def _addr(self, i: int) -> str:
        return f"{self.net}.{i + 1}"

    def _mac(self, i: int) -> str:
        # Fixed per address, so a re-created host keeps its MAC and ARP caches stay right.
        a, b, c = (int(x) for x in self.net.split("."))
        return f"02:{a:02x}:{b:02x}:{c:02x}:00:{i + 1:02x}"

    def _index(self, host: str) -> int:
        m = re.fullmatch(re.escape(self.prefix) + r"(\d{1,3})", host)
        if m:
            i = int(m[1])
        elif host.startswith(self.net + ".") and host[len(self.net) + 1:].isdigit():
            i = int(host[len(self.net) + 1:]) - 1
        else:
            raise ValueError(f"not a test host of {self.prefix!r}: {host!r}")
        if not 1 <= i <= max(self.n, _MAX_HOSTS):
            raise ValueError(f"not a test host of {self.prefix!r}: {host!r}")
        return i

    def _our_etc_netns(self) -> list[str]:
        try:
            entries = os.listdir(_ETC_NETNS)
        except OSError:
            return []
        return sorted(e for e in entries if re.fullmatch(re.escape(self.prefix) + r"\d{1,3}", e))

    def _our_hosts(self) -> list[tuple[int, str]]:
        """(index, name) of every namespace of this prefix, leftovers included."""
        try:
            entries = os.listdir(_NETNS_DIR)
        except OSError:
            return []
        found = []
        for entry in entries:
            m = re.fullmatch(re.escape(self.prefix) + r"(\d{1,3})", entry)
            if m:
                found.append((int(m[1]), entry))
        return sorted(found)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> TestHosts:
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, n: int = 3) -> TestHosts:
        """Create (or repair: restart a dead sshd, re-plug a cut host) hosts 1..n.

        Hosts above n are removed. The first ``up`` of this object removes leftovers of
        a crashed run of the same prefix. On failure everything is removed again.
        """
        if not 1 <= n <= _MAX_HOSTS:
            raise ValueError(f"1 <= n <= {_MAX_HOSTS}, got {n}")
        reason = supported()
        if reason:
            raise RuntimeError(f"test hosts unsupported here: {reason}")
        t0 = time.monotonic()
        fresh = not self._active
        if fresh:
            if self.prefix in _ACTIVE:
                raise RuntimeError(f"test hosts {self.prefix!r} are already up in this process")
            self._acquire()
            self._active = True
            _ACTIVE.add(self.prefix)
            atexit.register(self.down)
        try:
            if fresh:
                self._remove_everything()  # leftovers of a crashed run
            self._check_subnet_free()
            self._prepare_state(n)
            self._ensure_switch()
            for i, name in self._our_hosts():
                if i > n:
                    self._remove_host(i, name)
            for i in range(1, n + 1):
                self._ensure_host_net(i)
            self.n = n
            self._write_files()
            t1 = time.monotonic()
            started = [i for i in range(1, n + 1) if self._ensure_sshd(i)]
            for i in started:
                self._wait_sshd(i)
            t2 = time.monotonic()
        except BaseException:
            self.down()
            raise
        self.timings.update(up=t2 - t0, net=t1 - t0, sshd=t2 - t1)
        return self

    def down(self) -> None:
        """Remove everything of this prefix (processes, links, namespaces, files).

        Idempotent; also cleans up after a crashed run when called on a new object.
        """
        t0 = time.monotonic()
        try:
            self._acquire()
            self._remove_everything()
        finally:
            self.n = 0
            if self._active:
                _ACTIVE.discard(self.prefix)
                self._active = False
            atexit.unregister(self.down)
            self.lock.release()
        self.timings["down"] = time.monotonic() - t0

    # ------------------------------------------------------------------ using hosts
    def ssh_cmd(self, host: str, command: str | Sequence[str]) -> list[str]:
        """argv that runs ``command`` (a shell string, or an argv to quote) on ``host``."""
        if not isinstance(command, str):
            command = shlex.join(command)
        return [SSH, "-F", str(self.ssh_config), host, command]

    def run(self, host: str, command: str | Sequence[str], timeout: float = 30,
            **kwargs) -> subprocess.CompletedProcess:
        """Run ``command`` on ``host`` over ssh; text output captured, stdin empty."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.ssh_cmd(host, command), capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose plain ``ssh`` is the wrapper (its bin dir first on PATH)."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.ssh_wrapper.parent}:{env.get('PATH', _SYSTEM_PATH)}"
        return env

    def head_cmd(self, argv: Sequence[str]) -> list[str]:
        """argv that runs ``argv`` as the head, with the test names resolvable.

        Root namespace, but a private mount namespace where /etc/hosts is the system's
        plus the test hosts and /etc/resolv.conf points at 127.0.0.1, so resolving a
        test name (or a typo) never sends a DNS query off the machine.
        """
        return [_which("unshare") or "unshare", "--mount", "sh", "-c", _HEAD_START, "sh",
                str(self.state / "head-hosts"), str(self.state / "head-resolv.conf"), *argv]

    def ns_inode(self, host: str) -> int:
        """Inode of the host's network namespace (as in ``readlink /proc/self/ns/net``)."""
        return os.stat(f"{_NETNS_DIR}/{self.name(host)}").st_ino

    def pids_in(self, host: str) -> list[int]:
        """PIDs of the live processes whose network namespace is the host's."""
        return self._pids_in_ns(self.name(host))

    def crash(self, host: str) -> list[int]:
        """SIGKILL every process in the host's namespace, sshd included; return them.

        The host stays down until the next ``up``.
        """
        name = self.name(host)
        killed: list[int] = []
        deadline = time.monotonic() + 5
        while pids := self._pids_in_ns(name):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes survive SIGKILL in {name}: {pids}")
            time.sleep(0.01)
        self._reap(name)
        return sorted(set(killed))

    def cut(self, host: str) -> None:
        """Pull the host's cable: its port on the switch goes down (packets are lost)."""
        self._port(host, "down")

    def heal(self, host: str) -> None:
        """Plug the host's cable back in (undo :meth:`cut`)."""
        self._port(host, "up")

    def alive(self, host: str) -> bool:
        """The host exists, its sshd runs in its namespace and its cable is plugged in."""
        i = self._index(host)
        name = f"{self.prefix}{i}"
        if not os.path.exists(f"{_NETNS_DIR}/{name}") or not self._sshd_running(name):
            return False
        r = _run(_ip(), "-n", self.switch, "-o", "link", "show", "dev", f"h{i}", check=False)
        flags = re.search(r"<([^>]*)>", r.stdout)
        return r.returncode == 0 and bool(flags) and "UP" in flags[1].split(",")

    @contextlib.contextmanager
    def locked(self):
        """Hold this prefix's lock (as between up and down) without creating anything.

        For looking at the machine (e.g. :meth:`leftovers`) while no other process can
        bring up or remove hosts of this prefix.
        """
        if self.lock.held:  # between up() and down(), or nested
            yield self
            return
        self._acquire()
        try:
            yield self
        finally:
            self.lock.release()

    def leftovers(self) -> list[str]:
        """What of this prefix exists now (empty after ``down``)."""
        left = [f"namespace {name}" for _, name in self._our_hosts()]
        if os.path.exists(f"{_NETNS_DIR}/{self.switch}"):
            left.append(f"namespace {self.switch}")
        if os.path.exists(f"/sys/class/net/{self.head_if}"):
            left.append(f"link {self.head_if}")
        if self.state.exists():
            left.append(f"state dir {self.state}")
        left += [f"{_ETC_NETNS}/{name}" for name in self._our_etc_netns()]
        needle = f"{self.state}/".encode()  # the slash: ".../sct" begins ".../scta"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if needle in cmdline and b"sshd" in cmdline:
                shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
                left.append(f"process {entry}: {shown}")
        return left

    # ------------------------------------------------------------------ internals
    def _acquire(self) -> None:
        try:
            self.lock.acquire()
        except TimeoutError as e:
            raise RuntimeError(f"test hosts {self.prefix!r} are in use by another process "
                               f"({e})") from None

    def _pids_in_ns(self, ns: str) -> list[int]:
        key = _ns_key(f"{_NETNS_DIR}/{ns}")
        if key is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _ns_key(f"/proc/{entry}/ns/net") == key:
                found.append(int(entry))  # a zombie has no namespace any more: not listed
        return sorted(found)

    def _kill_ns(self, ns: str) -> None:
        """TERM, then KILL, every process in namespace ``ns``."""
        for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 3.0)):
            pids = self._pids_in_ns(ns)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self._pids_in_ns(ns) and time.monotonic() < deadline:
                self._reap(ns)
                time.sleep(0.01)
        self._reap(ns)
        left = self._pids_in_ns(ns)
        if left:
            raise RuntimeError(f"processes survive SIGKILL in {ns}: {left}")

    def _reap(self, name: str) -> None:
        p = self._sshd.get(name)
        if p is not None and p.poll() is not None:
            del self._sshd[name]

    def _sshd_running(self, name: str) -> bool:
        p = self._sshd.get(name)
        return p is not None and p.poll() is None and p.pid in self._pids_in_ns(name)

    def _port(self, host: str, state: str) -> None:
        i = self._index(host)
        _run(_ip(), "-n", self.switch, "link", "set", "dev", f"h{i}", state)

    def _check_subnet_free(self) -> None:
        """Refuse a /24 that the root namespace already uses for something else."""
        r = _run(_ip(), "-4", "-o", "addr", "show", "to", f"{self.net}.0/24", check=False)
        for line in r.stdout.splitlines():
            if line.split()[1] != self.head_if:
                raise RuntimeError(f"{self.net}.0/24 already in use here ({line.strip()}); "
                                   "pick another net")
        r = _run(_ip(), "-4", "route", "show", "match", self.head, check=False)
        for line in r.stdout.splitlines():
            if line.startswith("default") or f" dev {self.head_if} " in f"{line} ":
                continue
            raise RuntimeError(f"{self.net}.0/24 is routed here already ({line.strip()}); "
                               "pick another net")

    def _prepare_state(self, n: int) -> None:
        new = not self.state.exists()
        (self.state / "bin").mkdir(parents=True, exist_ok=True)
        (self.state / "hostkeys").mkdir(exist_ok=True)
        os.chmod(self.state, 0o700)
        if new:  # what we create outside the state dir, so down() removes only that
            for marker, path in ((".created-run-netns", _NETNS_DIR),
                                 (".created-etc-netns", _ETC_NETNS)):
                if not os.path.exists(path):
                    (self.state / marker).touch()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation
        keys = [self.identity] + [self.state / "hostkeys" / f"{self.prefix}{i}"
                                  for i in range(1, n + 1)]
        procs = [subprocess.Popen([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C",
                                   f"scoop-testhosts-{k.name}", "-f", str(k)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
                 for k in keys if not k.exists()]
        for p in procs:
            out = p.communicate(timeout=30)[0]
            if p.returncode != 0:
                raise RuntimeError(f"ssh-keygen failed: {out.decode(errors='replace')}")
        auth = self.state / "authorized_keys"
        auth.write_text(Path(f"{self.identity}.pub").read_text())
        auth.chmod(0o600)

    def _ensure_switch(self) -> None:
        ip, sw = _ip(), self.switch
        if not os.path.exists(f"{_NETNS_DIR}/{sw}"):
            self._add_ns(sw)
            _run(ip, "-n", sw, "-batch", "-",
                 input="link set lo up\nlink add br0 type bridge\nlink set br0 up\n")
        if not os.path.exists(f"/sys/class/net/{self.head_if}"):
            _run(ip, "link", "add", self.head_if, "address", self._mac(0), "type", "veth",
                 "peer", "name", "head", "netns", sw)
            v6 = f"/proc/sys/net/ipv6/conf/{self.head_if}/disable_ipv6"
            if os.path.exists(v6):
                with open(v6, "w") as f:
                    f.write("1")
            _run(ip, "addr", "add", f"{self.head}/24", "dev", self.head_if)
            _run(ip, "-n", sw, "link", "set", "head", "master", "br0", "up")
            _run(ip, "link", "set", self.head_if, "up")
        r = _run(ip, "-4", "-o", "addr", "show", "dev", self.head_if)
        if f" {self.head}/24 " not in r.stdout:
            raise RuntimeError(f"{self.head_if} exists without {self.head}/24")

    def _add_ns(self, name: str) -> None:
        _run(_ip(), "netns", "add", name)
        # No IPv6 at all (no link-local chatter); set before any interface exists.
        _run(_ip(), "netns", "exec", name, "sh", "-c",
             "for f in all default; do p=/proc/sys/net/ipv6/conf/$f/disable_ipv6;"
             ' [ -e "$p" ] && echo 1 > "$p"; done; true')

    def _ensure_host_net(self, i: int) -> None:
        ip, sw, name, port = _ip(), self.switch, f"{self.prefix}{i}", f"h{i}"
        if not os.path.exists(f"{_NETNS_DIR}/{name}"):
            self._add_ns(name)
        if _run(ip, "-n", name, "link", "show", "dev", "eth0", check=False).returncode != 0:
            _run(ip, "-n", sw, "link", "del", port, check=False)
            _run(ip, "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", name)
            _run(ip, "-n", sw, "link", "set", port, "master", "br0", "up")
            _run(ip, "-n", name, "-batch", "-",
                 input=(f"link set lo up\nlink set eth0 address {self._mac(i)}\n"
                        f"addr add {self._addr(i)}/24 dev eth0\nlink set eth0 up\n"))
        else:
            _run(ip, "-n", sw, "link", "set", port, "up")  # re-plug a host left cut

    def _remove_host(self, i: int, name: str) -> None:
        self._kill_ns(name)
        self._sshd.pop(name, None)
        _run(_ip(), "-n", self.switch, "link", "del", f"h{i}", check=False)
        _run(_ip(), "netns", "del", name, check=False)
        shutil.rmtree(f"{_ETC_NETNS}/{name}", ignore_errors=True)
        for suffix in ("conf", "pid", "log"):
            (self.state / f"sshd-{name}.{suffix}").unlink(missing_ok=True)
        (self.state / "hostkeys" / name).unlink(missing_ok=True)
        (self.state / "hostkeys" / f"{name}.pub").unlink(missing_ok=True)

    def _write_files(self) -> None:
        s = self.state
        hosts = [(self._addr(i), f"{self.prefix}{i}") for i in range(1, self.n + 1)]
        allowed = ",".join([self.head] + [a for a, _ in hosts])
        lines = [f"# generated by tests/testhosts.py; use: ssh -F {self.ssh_config} HOST"]
        for addr, name in hosts:
            lines += [f"Host {name}", f"  HostName {addr}"]
        lines += [
            "Host *",
            "  User root",
            f"  IdentityFile {self.identity}",
            "  IdentitiesOnly yes",
            "  IdentityAgent none",
            "  StrictHostKeyChecking yes",
            f"  UserKnownHostsFile {self.known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "  UpdateHostKeys no",
            "  CheckHostIP no",
            "  AddressFamily inet",
            "  KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org",  # ~0.08 s faster
            "  BatchMode yes",
            "  ConnectTimeout 5",
            "  ServerAliveInterval 2",
            "  ServerAliveCountMax 3",
            "  ControlMaster no",
            "  ControlPath none",
            "  ForwardAgent no",
            "  ForwardX11 no",
            "  SendEnv SCOOP_TEST_RUN",
            "  LogLevel ERROR",
            "# Safety net: a host that does not map to a test address is refused by a failing",
            "# ProxyCommand, so ssh never resolves its name (no DNS query) nor connects.",
            f"Match !host {allowed}",
            "  ProxyCommand /bin/sh -c 'echo \"testhosts: refusing to ssh to %h:"
            " not a test host\" >&2; exit 255'",
        ]
        self.ssh_config.write_text("\n".join(lines) + "\n")
        known = []
        for addr, name in hosts:
            key = (s / "hostkeys" / f"{name}.pub").read_text().split()
            known.append(f"{name},{addr} {key[0]} {key[1]}")
        self.known_hosts.write_text("\n".join(known) + "\n")
        self.ssh_wrapper.write_text(
            "#!/bin/sh\n# ssh to the test hosts (generated by tests/testhosts.py)\n"
            f'exec {SSH} -F {shlex.quote(str(self.ssh_config))} "$@"\n')
        self.ssh_wrapper.chmod(0o755)
        names = [f"{self.head} head"] + [f"{a} {n}" for a, n in hosts]
        # Inside the hosts this machine's own hostname is the head, as on a real cluster.
        ns_hosts = ["127.0.0.1 localhost", f"{self.head} head {socket.gethostname()}"]
        ns_hosts += [f"{a} {n}" for a, n in hosts]
        for _, name in hosts:  # "ip netns exec NAME" bind-mounts these over /etc/*
            d = Path(_ETC_NETNS) / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text("\n".join(ns_hosts) + "\n")
            (d / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        system = Path("/etc/hosts").read_text() if os.path.exists("/etc/hosts") else ""
        (s / "head-hosts").write_text(system.rstrip("\n") + "\n# scoop testhosts\n"
                                      + "\n".join(names) + "\n")
        (s / "head-resolv.conf").write_text("nameserver 127.0.0.1\n")

    def _sshd_conf(self, i: int) -> Path:
        name, s = f"{self.prefix}{i}", self.state
        conf = s / f"sshd-{name}.conf"
        conf.write_text("\n".join([
            f"# generated by tests/testhosts.py for {name}",
            f"ListenAddress {self._addr(i)}:22",
            f"HostKey {s / 'hostkeys' / name}",
            f"PidFile {s / f'sshd-{name}.pid'}",
            f"AuthorizedKeysFile {s / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowAgentForwarding no",
            "AcceptEnv SCOOP_*",
            "MaxStartups 200",
            "MaxSessions 200",
            "LoginGraceTime 20",
            "ClientAliveInterval 2",
            "ClientAliveCountMax 3",
            "LogLevel INFO",
        ]) + "\n")
        return conf

    def _ensure_sshd(self, i: int) -> bool:
        """Start host i's sshd unless it runs; True if started."""
        name = f"{self.prefix}{i}"
        if self._sshd_running(name):
            return False
        # Whatever is left in the namespace is ours (e.g. a crashed run's sshd holding
        # port 22): clear it first.
        self._kill_ns(name)
        self._sshd.pop(name, None)
        conf = self._sshd_conf(i)
        (self.state / f"sshd-{name}.pid").unlink(missing_ok=True)
        log = self.state / f"sshd-{name}.log"
        with open(log, "ab") as logf:
            # ip netns exec, unshare and sh all exec: the Popen's pid is sshd's (-D: no fork).
            self._sshd[name] = subprocess.Popen(
                [_ip(), "netns", "exec", name, _which("unshare") or "unshare", "--uts",
                 "sh", "-c", _SSHD_START, "sh", name, SSHD, "-D", "-f", str(conf),
                 "-E", str(log)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                # a clean environment: the test run's mark stays off the daemon
                env={"PATH": _SYSTEM_PATH, "LANG": "C.UTF-8"})
        return True

    def _wait_sshd(self, i: int, timeout: float = 10) -> None:
        """Wait until host i's sshd has written its pid file and answers with a banner."""
        name = f"{self.prefix}{i}"
        p = self._sshd[name]
        pidfile = self.state / f"sshd-{name}.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                break
            if pidfile.exists():
                try:
                    with socket.create_connection((self._addr(i), 22), timeout=1) as s:
                        if s.recv(8).startswith(b"SSH-"):
                            return
                except OSError:
                    pass
            time.sleep(0.005)
        log = self.state / f"sshd-{name}.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        check = _run(SSHD, "-t", "-f", str(self.state / f"sshd-{name}.conf"), check=False)
        raise RuntimeError(f"sshd for {name} did not start (exit {p.poll()}); log:\n{tail}\n"
                           f"sshd -t: {check.stderr.strip() or 'config ok'}")

    def _remove_everything(self) -> None:
        """Remove all of this prefix, leftovers of other runs included; collect errors."""
        errors: list[str] = []

        def attempt(what, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # keep going: remove as much as possible
                errors.append(f"{what}: {e}")

        s = self.state
        created = {m: (s / m).exists() for m in
                   (".created-run-netns", ".created-etc-netns")}
        ip = _which("ip")
        hosts = self._our_hosts()
        # 1. processes: everything inside our namespaces (sshd, sessions, remote commands)
        for _, name in hosts:
            attempt(f"stopping processes in {name}", self._kill_ns, name)
        attempt(f"stopping processes in {self.switch}", self._kill_ns, self.switch)
        for name, p in list(self._sshd.items()):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"sshd of {name} (pid {p.pid}) did not exit")
            del self._sshd[name]
        # 2. links (deleting one end of a veth pair removes both), then namespaces
        if ip and os.path.exists(f"/sys/class/net/{self.head_if}"):
            attempt(f"deleting {self.head_if}", _run, ip, "link", "del", self.head_if)
        for i, name in hosts:
            if ip and os.path.exists(f"{_NETNS_DIR}/{self.switch}"):
                _run(ip, "-n", self.switch, "link", "del", f"h{i}", check=False)
            if ip:
                attempt(f"deleting namespace {name}", _run, ip, "netns", "del", name)
        if ip and os.path.exists(f"{_NETNS_DIR}/{self.switch}"):
            attempt(f"deleting namespace {self.switch}", _run, ip, "netns", "del", self.switch)
        for name in self._our_etc_netns():  # also those of namespaces already gone
            shutil.rmtree(f"{_ETC_NETNS}/{name}", ignore_errors=True)
        # 3. what we created outside the state dir, only if now unused; then the state dir
        if created[".created-etc-netns"]:
            try:
                os.rmdir(_ETC_NETNS)
            except OSError:
                pass
        shutil.rmtree(s, ignore_errors=True)
        if s.exists():
            errors.append(f"could not remove {s}")
        # /run/sshd stays: every sshd (other sessions' test hosts too) needs it at each
        # connection, and removing it under them breaks their ssh.
        if created[".created-run-netns"] and os.path.isdir(_NETNS_DIR) \
                and not os.listdir(_NETNS_DIR):
            _run(_which("umount") or "umount", _NETNS_DIR, check=False)
            try:
                os.rmdir(_NETNS_DIR)
            except OSError:
                pass
        if errors:
            raise RuntimeError("test hosts cleanup incomplete: " + "; ".join(errors))
