"""The test hosts of tests/testhosts.py: network namespaces with their own sshd.

Skipped (with the reason) where this machine cannot host them: not root, no ``ip`` or
``sshd``, no network namespaces.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import threading

import pytest
from testhosts import TestHosts, claim, slot, supported

from conftest import running

pytestmark = pytest.mark.timeout(120)

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def hosts():
    reason = supported()
    if reason:
        pytest.skip(reason)
    # Other sessions may run this module at the same time on this machine: each takes a
    # slot of its own (prefix and network), the spare prefix of the slot included.
    th = claim()
    try:
        th.up(3)
        yield th
    finally:
        th.down()
    with th.locked():  # no other process can bring up these hosts while we look
        assert th.leftovers() == []


def wrapper(hosts, *args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([str(hosts.ssh_wrapper), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_ssh_runs_in_each_hosts_namespace(hosts):
    p, net = hosts.prefix, hosts.net
    assert hosts.names == [f"{p}1", f"{p}2", f"{p}3"]
    assert hosts.addresses == [f"{net}.2", f"{net}.3", f"{net}.4"]
    root_ns = os.readlink("/proc/self/ns/net")
    py = shlex.quote(sys.executable)  # the same filesystem: this interpreter runs there too
    command = ("readlink /proc/self/ns/net; cat /proc/sys/kernel/hostname;"
               f" {py} -c 'import socket; print(socket.gethostname())';"
               ' echo "mark=$SCOOP_TEST_RUN"; ip -o -4 addr show dev eth0')
    for name, addr in zip(hosts.names, hosts.addresses):
        r = wrapper(hosts, name, command)
        assert r.returncode == 0, r.stderr
        ns, hostname, py_hostname, mark, ip_addr = r.stdout.splitlines()
        assert ns == f"net:[{hosts.ns_inode(name)}]"
        assert ns != root_ns
        assert hostname == py_hostname == name
        # SendEnv: remote processes carry the run's mark, so conftest's leak check sees them
        assert mark == f"mark={os.environ.get('SCOOP_TEST_RUN', '')}"
        assert f" {addr}/24 " in ip_addr
        assert hosts.alive(name)
        assert hosts.pids_in(name)  # its sshd
    # by address as well; run() uses the same config
    r = wrapper(hosts, hosts.addresses[0], "cat /proc/sys/kernel/hostname")
    assert (r.returncode, r.stdout.strip()) == (0, hosts.names[0]), r.stderr
    r = hosts.run(hosts.names[1], ["echo", "a b"])
    assert (r.returncode, r.stdout) == (0, "a b\n"), r.stderr


def test_hosts_reach_each_other_and_the_head_only(hosts):
    # A server on the head's test address, as a broker for remote workers would be.
    server = socket.create_server((hosts.head, 0))
    port = server.getsockname()[1]
    server.settimeout(20)

    def serve():
        try:
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"HEAD")
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        for name in hosts.names:
            # every other host's sshd by address, and the head by name ("head" and this
            # machine's hostname resolve to the head address inside the hosts)
            targets = [f"{a}:22" for a in hosts.addresses if a != hosts.address(name)]
            targets += [f"head:{port}", f"{socket.gethostname()}:{port}"]
            script = ("import socket, sys\n"
                      "for t in sys.argv[1:]:\n"
                      "    a, p = t.rsplit(':', 1)\n"
                      "    with socket.create_connection((a, int(p)), 3) as s:\n"
                      "        print(t, s.recv(4).decode())\n")
            r = hosts.run(name, [sys.executable, "-c", script, *targets])
            assert r.returncode == 0, r.stderr
            got = dict(line.split() for line in r.stdout.splitlines())
            assert got == {t: ("HEAD" if t.endswith(f":{port}") else "SSH-") for t in targets}
    finally:
        server.close()
    # No route out of the test /24 (asking the routing table sends no packet), not even
    # to this machine's own other addresses.
    own = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True).stdout.split("\n")
    own = [line.split()[3].split("/")[0] for line in own if line]
    own = [a for a in own if not a.startswith("10.213.")]
    for name in hosts.names:
        assert subprocess.run(["ip", "-n", name, "route", "show", "default"],
                              capture_output=True, text=True).stdout == ""
        for outside in ("10.99.99.99", "8.8.8.8", f"{slot(hosts.slot)[3]}.2", *own):
            r = subprocess.run(["ip", "-n", name, "route", "get", outside],
                               capture_output=True, text=True)
            assert r.returncode != 0, r.stdout
            assert "unreachable" in r.stderr
        r = subprocess.run(["ip", "-n", name, "route", "get", hosts.head],
                           capture_output=True, text=True)
        assert r.returncode == 0 and " dev eth0 " in r.stdout, r.stderr


def test_the_head_resolves_test_names_without_dns(hosts):
    second, third = hosts.names[1:3]
    code = (f"import socket; print(socket.gethostbyname({second!r}),"
            " socket.gethostbyname('head'))")
    r = subprocess.run(hosts.head_cmd([sys.executable, "-c", code]), capture_output=True,
                       text=True, timeout=30)
    assert (r.returncode, r.stdout.split()) == (0, [f"{hosts.net}.3", hosts.head]), r.stderr
    # the plain "ssh" of hosts.env() is the wrapper
    r = subprocess.run(["ssh", third, "cat /proc/sys/kernel/hostname"], env=hosts.env(),
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout) == (0, f"{third}\n"), r.stderr


def test_a_host_outside_the_config_is_refused_quickly(hosts):
    for target in ("nosuchhost.invalid", f"{hosts.prefix}99", "203.0.113.7",
                   f"{hosts.net}.200"):
        # refused by the config's ProxyCommand: no name lookup, no connection attempt
        r = wrapper(hosts, target, "true", timeout=10)
        assert r.returncode == 255, (target, r.stdout, r.stderr)
        assert f"refusing to ssh to {target}" in r.stderr


def test_cut_and_heal(hosts):
    name = hosts.names[2]
    addr = hosts.address(name)
    hosts.cut(name)
    try:
        assert not hosts.alive(name)
        with pytest.raises(OSError):
            socket.create_connection((addr, 22), timeout=1).close()
        assert hosts.run(hosts.names[0], "true").returncode == 0  # the others are unaffected
    finally:
        hosts.heal(name)
    assert hosts.alive(name)
    r = hosts.run(name, "cat /proc/sys/kernel/hostname")
    assert (r.returncode, r.stdout) == (0, f"{name}\n"), r.stderr


def test_crash_kills_everything_and_up_restores(hosts):
    name = hosts.names[1]
    inode = hosts.ns_inode(name)
    r = hosts.run(name, "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!")
    assert r.returncode == 0, r.stderr
    sleeper = int(r.stdout)
    before = hosts.pids_in(name)
    assert sleeper in before and len(before) >= 2  # sshd and the sleeper
    killed = hosts.crash(name)
    assert sleeper in killed
    assert hosts.pids_in(name) == []
    assert not any(running(pid) for pid in before + killed)
    assert not hosts.alive(name)
    r = hosts.run(name, "true", timeout=10)
    assert r.returncode == 255, r.stderr
    assert "Connection refused" in r.stderr, r.stderr  # no sshd there, not a timeout
    assert hosts.run(hosts.names[0], "true").returncode == 0  # the others are unaffected

    hosts.up(3)
    assert hosts.alive(name)
    assert hosts.ns_inode(name) == inode  # repaired in place
    r = hosts.run(name, "cat /proc/sys/kernel/hostname")
    assert (r.returncode, r.stdout) == (0, f"{name}\n"), r.stderr


def test_leftovers_of_a_crashed_run_are_removed(hosts):
    """A run that died without down(): the next up() of its prefix clears it all."""
    _, _, prefix, net = slot(hosts.slot)  # this session's spare prefix and network
    links_before = {x for x in os.listdir("/sys/class/net") if x.startswith(prefix)}
    code = ("import os, sys\n"
            f"sys.path.insert(0, {TESTS!r})\n"
            "from testhosts import TestHosts\n"
            f"TestHosts({prefix!r}, {net!r}).up(2)\n"
            "os._exit(0)\n")  # no down(), no atexit: everything is left behind
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    th = TestHosts(prefix, net)
    try:
        left = th.leftovers()
        assert {f"namespace {prefix}1", f"namespace {prefix}2", f"namespace {prefix}-sw",
                f"link {prefix}-head"} <= set(left)
        old_sshd = [int(x.split()[1].rstrip(":")) for x in left if x.startswith("process ")]
        assert len(old_sshd) == 2
        th.up(1)
        assert th.names == [f"{prefix}1"]
        assert not any(running(pid) for pid in old_sshd)
        assert f"namespace {prefix}2" not in th.leftovers()
        r = th.run(f"{prefix}1", "cat /proc/sys/kernel/hostname")
        assert (r.returncode, r.stdout) == (0, f"{prefix}1\n"), r.stderr
        assert hosts.run(hosts.names[0], "true").returncode == 0  # the other is untouched
    finally:
        th.down()
    assert th.leftovers() == []
    assert {x for x in os.listdir("/sys/class/net") if x.startswith(prefix)} == links_before
    th.down()  # idempotent


def test_down_leaves_nothing(hosts):
    pids = [pid for name in hosts.names for pid in hosts.pids_in(name)]
    assert pids
    hosts.down()
    assert not any(running(pid) for pid in pids)
    p = hosts.prefix
    with hosts.locked():  # another process could bring up these hosts once we let go
        assert hosts.leftovers() == []
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not [line for line in netns.splitlines()
                    if line.split()[0] == f"{p}-sw" or re.fullmatch(p + r"\d+", line.split()[0])]
        assert subprocess.run(["ip", "link", "show", "dev", f"{p}-head"],
                              capture_output=True).returncode != 0
        assert not os.path.exists(hosts.state)
        assert not os.path.exists(f"/etc/netns/{p}1")
    hosts.down()  # idempotent
