"""The job's host list (scoop._hosts): hostfiles, --hosts, -n, is_local, batch schedulers.

Pure logic: no ssh and no network. The is_local tests check that a made-up name is never
looked up, by making the resolver functions fail for it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scoop._hosts import (
    SCHEDULERS,
    Host,
    HostfileError,
    _local_identity,
    distribute,
    format_hosts,
    hosts_from_environment,
    hosts_from_list,
    is_local,
    parse_hostfile,
    parse_slurm_counts,
    parse_slurm_nodelist,
)
from scoop._launch.cli import OPTIONS_WITH_VALUE, split_host_args

pytestmark = pytest.mark.timeout(30)


def hostfile(tmp_path, text: str, name: str = "hosts") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def pairs(hosts: list[Host]) -> list[tuple[str, int | None]]:
    return [(h.name, h.workers) for h in hosts]


# -- hostfile ----------------------------------------------------------------------------
def test_hostfile_the_documented_format(tmp_path):
    path = hostfile(tmp_path, "hostname_or_ip 4\nother_hostname 5\nthird_hostname 2\n")
    assert parse_hostfile(path) == [Host("hostname_or_ip", 4), Host("other_hostname", 5),
                                    Host("third_hostname", 2)]


def test_hostfile_comments_blank_lines_and_whitespace(tmp_path):
    path = hostfile(tmp_path, "# the cluster\n\n   \nnode01 4   # fast one\n"
                              "\tnode02\t2\t\n#node03 8\n10.0.0.7 1#trailing\n")
    assert pairs(parse_hostfile(path)) == [("node01", 4), ("node02", 2), ("10.0.0.7", 1)]


def test_hostfile_slots_and_max_slots(tmp_path):
    path = hostfile(tmp_path, "a slots=4\nb slots=2 max_slots=8\nc max-slots=8 slots=3\n")
    assert pairs(parse_hostfile(path)) == [("a", 4), ("b", 2), ("c", 3)]


def test_hostfile_bare_name_means_cpu_count(tmp_path):
    path = hostfile(tmp_path, "a\nb 2\na\n")
    assert pairs(parse_hostfile(path)) == [("a", None), ("b", 2)]


def test_hostfile_duplicates_add_up_in_order_of_first_appearance(tmp_path):
    path = hostfile(tmp_path, "b 1\na 2\nb slots=3\nc 1\na 1\n")
    assert pairs(parse_hostfile(path)) == [("b", 4), ("a", 3), ("c", 1)]


def test_hostfile_accepts_pathlike_and_ipv6(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("::1 2\nfe80::1 1\n")
    assert pairs(parse_hostfile(path)) == [("::1", 2), ("fe80::1", 1)]


@pytest.mark.parametrize("line, problem", [
    ("a four", "worker count must be a positive integer, got 'four'"),
    ("a 0", "worker count must be a positive integer, got '0'"),
    ("a -2", "worker count must be a positive integer, got '-2'"),
    ("a 2.5", "worker count must be a positive integer, got '2.5'"),
    ("a 4 5", "too many fields after the worker count: '5'"),
    ("a 4 slots=2", "too many fields after the worker count: 'slots=2'"),
    ("a slots=x", "slots must be a positive integer, got 'x'"),
    ("a slots=0", "slots must be a positive integer, got '0'"),
    ("a slots=", "slots must be a positive integer, got ''"),
    ("a max_slots=4", "max_slots without slots=COUNT"),
    ("a max_slots=y slots=2", "max_slots must be a positive integer, got 'y'"),
    ("a cpus=4", "unknown field 'cpus=4'"),
    ("a slots=2 foo", "unknown field 'foo'"),
    ("slots=4", "host name cannot contain '=' or ',', got 'slots=4'"),
    ("a,b 2", "host name cannot contain '=' or ',', got 'a,b'"),
    ("-n 4", "host name cannot start with '-', got '-n'"),
])
def test_hostfile_bad_line_names_file_line_and_problem(tmp_path, line, problem):
    path = hostfile(tmp_path, f"# header\ngood 1\n{line}\nlater 2\n")
    with pytest.raises(HostfileError) as info:
        parse_hostfile(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: {problem}; ")
    assert "expected 'hostname', 'hostname COUNT' or 'hostname slots=COUNT'" in message


def test_hostfile_error_message_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostfile(tmp_path, "a 1\nb 2\nc four\n")
    with pytest.raises(HostfileError, match=r"^hosts:3: worker count must be a positive "
                                            r"integer, got 'four'; expected "):
        parse_hostfile("hosts")


def test_hostfile_error_is_a_value_error():
    assert issubclass(HostfileError, ValueError)


def test_hostfile_missing(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(HostfileError, match=rf"^{path}: cannot read hostfile: No such file"):
        parse_hostfile(path)


def test_hostfile_directory(tmp_path):
    with pytest.raises(HostfileError, match="cannot read hostfile"):
        parse_hostfile(tmp_path)


def test_hostfile_not_text(tmp_path):
    path = tmp_path / "hosts"
    path.write_bytes(b"a 1\n\xff\xfe 2\n")
    with pytest.raises(HostfileError, match="cannot read hostfile"):
        parse_hostfile(path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_hostfile_without_hosts(tmp_path, text):
    path = hostfile(tmp_path, text)
    with pytest.raises(HostfileError, match=rf"^{path}: no host in hostfile"):
        parse_hostfile(path)


def test_hostfile_host_with_and_without_count(tmp_path):
    path = hostfile(tmp_path, "a 2\na\n")
    with pytest.raises(HostfileError, match=rf"^{path}: host 'a' is listed both with and "
                                            "without a worker count"):
        parse_hostfile(path)


# -- --hosts list ------------------------------------------------------------------------
def test_hosts_from_list_counts_mentions():
    assert hosts_from_list(["machine_a", "machine_a", "machine_b", "machine_b"]) == [
        Host("machine_a", 2), Host("machine_b", 2)]


def test_hosts_from_list_order_of_first_appearance():
    assert pairs(hosts_from_list(["b", "a", "b", "c", "a", "b"])) == [
        ("b", 3), ("a", 2), ("c", 1)]


def test_hosts_from_list_commas_as_produced_by_split_host_args():
    assert pairs(hosts_from_list(["a,a,b", "b", " c , ,a"])) == [("a", 3), ("b", 2), ("c", 1)]


@pytest.mark.parametrize("names", [[], [""], [",,"]])
def test_hosts_from_list_empty(names):
    with pytest.raises(ValueError, match="--hosts: no host name given"):
        hosts_from_list(names)


@pytest.mark.parametrize("name", ["-n", "slots=2"])
def test_hosts_from_list_rejects_non_names(name):
    with pytest.raises(ValueError, match="--hosts: host name cannot"):
        hosts_from_list(["a", name])


# -- split_host_args ---------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    ("--host a a b b prog.py".split(), ["--hosts=a,a,b,b", "prog.py"]),
    ("--hosts a a b b prog.py x y".split(), ["--hosts=a,a,b,b", "prog.py", "x", "y"]),
    # --hosts after the program is the program's own option
    ("--host a a b b prog.py --hosts x".split(),
     ["--hosts=a,a,b,b", "prog.py", "--hosts", "x"]),
    ("prog.py --host a b".split(), ["prog.py", "--host", "a", "b"]),
    ("--hosts=a,b prog.py".split(), ["--hosts=a,b", "prog.py"]),
    ("--hosts=a,b prog.py --host c".split(), ["--hosts=a,b", "prog.py", "--host", "c"]),
    ("-n 4 --host a b prog.py".split(), ["-n", "4", "--hosts=a,b", "prog.py"]),
    ("--host a b -n 4 prog.py".split(), ["--hosts=a,b", "-n", "4", "prog.py"]),
    ("-vv --host a b --nice 5 prog.py -n 2".split(),
     ["-vv", "--hosts=a,b", "--nice", "5", "prog.py", "-n", "2"]),
    ("--nice -5 --host a prog.py".split(), ["--nice", "-5", "--hosts=a", "prog.py"]),
    # a program that does not exist yet, ending in .py, in a subdirectory
    ("--host a b sub/dir/new.py".split(), ["--hosts=a,b", "sub/dir/new.py"]),
    ("--host prog.py".split(), ["--hosts=", "prog.py"]),
    ("--host a b -- prog.py".split(), ["--hosts=a,b", "--", "prog.py"]),
    ("-- --host a prog.py".split(), ["--", "--host", "a", "prog.py"]),
    ("--host a --host b prog.py".split(), ["--hosts=a", "--hosts=b", "prog.py"]),
    # no program: every name is a host; argparse reports the missing program
    ("--host a b c".split(), ["--hosts=a,b,c"]),
    ("--host".split(), ["--hosts="]),
    ("prog.py".split(), ["prog.py"]),
    ([], []),
    # values of options are not the program, even when they name files
    ("--hostfile hosts --log out.txt --host a prog.py".split(),
     ["--hostfile", "hosts", "--log", "out.txt", "--hosts=a", "prog.py"]),
    ("--python-executable /usr/bin/python3 --host a b prog.py".split(),
     ["--python-executable", "/usr/bin/python3", "--hosts=a,b", "prog.py"]),
    ("--ssh-executable myssh --host a prog.py".split(),
     ["--ssh-executable", "myssh", "--hosts=a", "prog.py"]),
])
def test_split_host_args(argv, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no stray files: only .py ends the host list here
    assert split_host_args(argv) == expected


def test_split_host_args_existing_file_is_the_program(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "runme").write_text("print(1)\n")
    (tmp_path / "data.txt").write_text("")
    argv = ["--host", "a", "a", "b", "sub/runme", "data.txt", "--hosts", "x"]
    assert split_host_args(argv) == ["--hosts=a,a,b", "sub/runme", "data.txt", "--hosts", "x"]
    absolute = str(tmp_path / "sub" / "runme")
    assert split_host_args(["--host", "a", absolute]) == ["--hosts=a", absolute]


def test_split_host_args_directory_is_not_the_program(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "node1").mkdir()
    assert split_host_args(["--host", "node1", "prog.py"]) == ["--hosts=node1", "prog.py"]


def test_split_host_args_leaves_argv_alone():
    argv = ["--host", "a", "prog.py"]
    split_host_args(argv)
    assert argv == ["--host", "a", "prog.py"]


def test_split_host_args_custom_options_with_value():
    argv = ["--extra", "x", "--host", "a", "prog.py"]
    assert split_host_args(argv) == argv  # "x" is taken for the program
    assert split_host_args(argv, frozenset({"--extra"})) == [
        "--extra", "x", "--hosts=a", "prog.py"]


def test_split_host_args_knows_every_launcher_option_with_a_value():
    from scoop._launch.cli import build_parser

    takes_value = {option for action in build_parser()._actions
                   if action.option_strings and action.nargs is None
                   for option in action.option_strings}
    assert takes_value - OPTIONS_WITH_VALUE == set()


def test_split_host_args_feeds_the_launcher_parser(tmp_path, monkeypatch):
    from scoop._launch.cli import build_parser

    monkeypatch.chdir(tmp_path)
    argv = ["-n", "4", "--host", "a", "a", "b", "prog.py", "--hosts", "x"]
    ns = build_parser().parse_args(split_host_args(argv))
    assert (ns.n, ns.executable, ns.args) == (4, "prog.py", ["--hosts", "x"])
    assert hosts_from_list(ns.hosts) == [Host("a", 2), Host("b", 1)]


def test_split_host_args_round_trip_through_hosts_from_list():
    out = split_host_args("--host a a b b prog.py".split())
    assert hosts_from_list([out[0].partition("=")[2]]) == [Host("a", 2), Host("b", 2)]


# -- distribute --------------------------------------------------------------------------
ABC = [Host("A", 4), Host("B", 2), Host("C", 2)]


def no_cpu_count(name: str) -> int:
    raise AssertionError(f"cpu_count({name!r}) should not be needed")


@pytest.mark.parametrize("n, expected", [
    (1, "A:1"),
    (3, "A:3"),
    (5, "A:4 B:1"),
    (8, "A:4 B:2 C:2"),
    (9, "A:5 B:2 C:2"),
    (11, "A:5 B:3 C:3"),
    (16, "A:7 B:5 C:4"),
    (None, "A:4 B:2 C:2"),
])
def test_distribute_documented_rules(n, expected):
    assert format_hosts(distribute(ABC, n, no_cpu_count)) == expected


def test_distribute_does_not_change_its_input():
    hosts = list(ABC)
    distribute(hosts, 16, no_cpu_count)
    assert hosts == ABC


def test_distribute_fills_unknown_counts_with_cpu_count():
    hosts = [Host("a", None), Host("b", 1), Host("c", None)]
    cpus = {"a": 3, "c": 5}
    assert pairs(distribute(hosts, None, cpus.__getitem__)) == [("a", 3), ("b", 1), ("c", 5)]
    assert pairs(distribute(hosts, 4, cpus.__getitem__)) == [("a", 3), ("b", 1)]
    assert pairs(distribute(hosts, 11, cpus.__getitem__)) == [("a", 4), ("b", 2), ("c", 5)]


def test_distribute_leaves_out_hosts_with_no_workers():
    hosts = [Host("a", 0), Host("b", 2), Host("c", None), Host("d", 1)]
    assert pairs(distribute(hosts, None, lambda name: 0)) == [("b", 2), ("d", 1)]
    assert pairs(distribute(hosts, 5, lambda name: 0)) == [("b", 3), ("d", 2)]


def test_distribute_single_host():
    assert pairs(distribute([Host("a", 1)], 4, no_cpu_count)) == [("a", 4)]
    assert pairs(distribute([Host("a", 8)], 4, no_cpu_count)) == [("a", 4)]


@pytest.mark.parametrize("n", [0, -1])
def test_distribute_rejects_n_below_one(n):
    with pytest.raises(ValueError, match="at least 1"):
        distribute(ABC, n, no_cpu_count)


def test_distribute_without_hosts():
    assert distribute([], None, no_cpu_count) == []
    with pytest.raises(ValueError, match="no host"):
        distribute([], 2, no_cpu_count)
    with pytest.raises(ValueError, match="no host"):
        distribute([Host("a", 0)], 2, no_cpu_count)


@given(counts=st.lists(st.integers(1, 8), min_size=1, max_size=6),
       n=st.integers(1, 60))
def test_distribute_properties(counts, n):
    hosts = [Host(f"h{i}", c) for i, c in enumerate(counts)]
    result = distribute(hosts, n, no_cpu_count)
    got = [h.workers for h in result]
    assert sum(got) == n
    assert all(w >= 1 for w in got)
    # the hosts kept are the first ones, in their order
    assert [h.name for h in result] == [h.name for h in hosts[:len(result)]]
    if n <= sum(counts):
        # filled in order: every host but the last is full
        assert got[:-1] == counts[:len(got) - 1]
        assert 1 <= got[-1] <= counts[len(got) - 1]
    else:
        # round-robin from the first host: extras never grow along the list, differ by <= 1
        assert len(result) == len(hosts)
        extras = [g - c for g, c in zip(got, counts)]
        assert min(extras) >= 0 and max(extras) - min(extras) <= 1
        assert extras == sorted(extras, reverse=True)


def test_format_hosts():
    assert format_hosts([Host("A", 4), Host("B", 2)]) == "A:4 B:2"
    assert format_hosts([Host("A", None)]) == "A:cpus"
    assert format_hosts([]) == "(no host)"


# -- is_local ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "localhost", "LOCALHOST", "localhost.", "localhost.localdomain", "foo.localhost",
    "127.0.0.1", "127.0.0.5", "127.255.255.254", "::1", "[::1]", "::ffff:127.0.0.1",
])
def test_is_local_loopback(name):
    assert is_local(name)


def test_is_local_own_hostname():
    hostname = socket.gethostname()
    assert is_local(hostname)
    assert is_local(hostname.upper())
    assert is_local(f" {hostname}. ")


@pytest.mark.parametrize("name", [
    "node-that-does-not-exist.invalid", "198.51.100.77", "2001:db8::1", "localhostx",
    "my-localhost", "",
])
def test_is_local_remote(name):
    assert not is_local(name)


@pytest.mark.skipif(not shutil.which("ip"), reason="no ip command")
def test_is_local_interface_addresses():
    text = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True,
                          timeout=5).stdout
    addresses = [fields[fields.index(key) + 1].split("/")[0]
                 for fields in map(str.split, text.splitlines())
                 for key in ("inet", "inet6") if key in fields]
    assert addresses
    for address in addresses:
        assert is_local(address), address


def test_is_local_never_resolves_the_given_name(monkeypatch):
    made_up = "node-that-does-not-exist.invalid"
    asked = []

    def guard(original):
        def resolver(host, *args, **kwargs):
            if isinstance(host, str) and "does-not-exist" in host:
                asked.append((original.__name__, host))
                raise AssertionError(f"DNS query for {host!r}")
            return original(host, *args, **kwargs)
        return resolver

    for function in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                     "getfqdn", "getnameinfo"):
        monkeypatch.setattr(socket, function, guard(getattr(socket, function)))
    _local_identity.cache_clear()  # the local set is built under the guard too
    try:
        assert not is_local(made_up)
        assert not is_local(made_up.upper())
    finally:
        _local_identity.cache_clear()
    assert asked == []


def test_is_local_needs_no_resolver_once_the_local_set_is_known(monkeypatch):
    is_local("localhost")  # builds the local set

    def refuse(*args, **kwargs):
        raise AssertionError(f"resolver called with {args}")

    for function in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                     "getfqdn", "getnameinfo"):
        monkeypatch.setattr(socket, function, refuse)
    for name in ("a.example.com", "node7", "10.1.2.3", "fe80::1234"):
        is_local(name)


# -- batch schedulers --------------------------------------------------------------------
@pytest.mark.parametrize("text, nodes", [
    ("n[01-03,07],gpu5", ["n01", "n02", "n03", "n07", "gpu5"]),
    ("cn[1-2]", ["cn1", "cn2"]),
    ("single", ["single"]),
    ("a[1-2]-ib[3-4]", ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4"]),
    ("node[008-011]", ["node008", "node009", "node010", "node011"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("rack-1.node[1,3],x.y-z", ["rack-1.node1", "rack-1.node3", "x.y-z"]),
    ("[1-2]a", ["1a", "2a"]),
    ("a[5]", ["a5"]),
    ("a, b", ["a", "b"]),
])
def test_slurm_nodelist(text, nodes):
    assert parse_slurm_nodelist(text) == nodes


@pytest.mark.parametrize("text", ["n[1-3", "n1-3]", "n[[1-2]]", "n[]", "n[3-1]", "n[a-b]",
                                  "n[1-]", "n[-2]"])
def test_slurm_nodelist_bad(text):
    with pytest.raises(ValueError):
        parse_slurm_nodelist(text)


@pytest.mark.parametrize("text, counts", [
    ("2(x3),1", [2, 2, 2, 1]),
    ("4(x2)", [4, 4]),
    ("1", [1]),
    ("2(x3),1,4", [2, 2, 2, 1, 4]),
    ("16, 8(x2)", [16, 8, 8]),
])
def test_slurm_counts(text, counts):
    assert parse_slurm_counts(text) == counts


@pytest.mark.parametrize("text", ["", "x", "2(3)", "2(x)", "2x3", "-1"])
def test_slurm_counts_bad(text):
    with pytest.raises(ValueError, match="expected like '2\\(x3\\),1'"):
        parse_slurm_counts(text)


def test_slurm_tasks_per_node():
    env = {"SLURM_JOB_NODELIST": "n[01-03,07],gpu5", "SLURM_TASKS_PER_NODE": "2(x3),1,4",
           "SLURM_JOB_CPUS_PER_NODE": "32(x5)"}
    name, hosts = hosts_from_environment(env)
    assert name == "SLURM"
    assert format_hosts(hosts) == "n01:2 n02:2 n03:2 n07:1 gpu5:4"


def test_slurm_two_nodes_four_tasks_each():
    env = {"SLURM_JOB_NODELIST": "cn[1-2]", "SLURM_TASKS_PER_NODE": "4(x2)"}
    assert hosts_from_environment(env) == ("SLURM", [Host("cn1", 4), Host("cn2", 4)])


def test_slurm_cpus_per_node_when_no_tasks():
    env = {"SLURM_NODELIST": "cn[1-3]", "SLURM_JOB_CPUS_PER_NODE": "8(x2),4"}
    assert hosts_from_environment(env) == (
        "SLURM", [Host("cn1", 8), Host("cn2", 8), Host("cn3", 4)])


def test_slurm_without_counts_means_cpu_count():
    env = {"SLURM_JOB_NODELIST": "cn[1-2]"}
    assert hosts_from_environment(env) == ("SLURM", [Host("cn1", None), Host("cn2", None)])


def test_slurm_job_nodelist_wins_over_nodelist():
    env = {"SLURM_JOB_NODELIST": "a1", "SLURM_NODELIST": "b1", "SLURM_TASKS_PER_NODE": "2"}
    assert hosts_from_environment(env) == ("SLURM", [Host("a1", 2)])


def test_slurm_counts_that_do_not_align():
    env = {"SLURM_JOB_NODELIST": "cn[1-3]", "SLURM_TASKS_PER_NODE": "4(x2)"}
    with pytest.raises(ValueError, match=r"SLURM allocation \(\$SLURM_JOB_NODELIST\): "
                                         r"\$SLURM_TASKS_PER_NODE='4\(x2\)' gives 2 counts "
                                         r"for 3 nodes"):
        hosts_from_environment(env)


def test_slurm_bad_nodelist_names_the_variable():
    with pytest.raises(ValueError, match=r"^SLURM allocation \(\$SLURM_JOB_NODELIST\): "):
        hosts_from_environment({"SLURM_JOB_NODELIST": "n[1-"})


def test_pbs_nodefile(tmp_path):
    path = hostfile(tmp_path, "node01\nnode01\nnode02\n\nnode01\nnode03\nnode02\n", "nodes")
    assert hosts_from_environment({"PBS_NODEFILE": path}) == (
        "PBS", [Host("node01", 3), Host("node02", 2), Host("node03", 1)])


def test_pbs_nodefile_missing(tmp_path):
    path = str(tmp_path / "gone")
    with pytest.raises(HostfileError, match=rf"^{path} \(from \$PBS_NODEFILE\): cannot read"):
        hosts_from_environment({"PBS_NODEFILE": path})


def test_sge_pe_hostfile(tmp_path):
    path = hostfile(tmp_path, "node01.cluster 4 all.q@node01.cluster UNDEFINED\n"
                              "node02.cluster 2 all.q@node02.cluster UNDEFINED\n\n"
                              "node01.cluster 1 short.q@node01.cluster UNDEFINED\n", "pe")
    assert hosts_from_environment({"PE_HOSTFILE": path}) == (
        "SGE", [Host("node01.cluster", 5), Host("node02.cluster", 2)])


@pytest.mark.parametrize("line", ["node01", "node01 four all.q@node01 UNDEFINED",
                                  "node01 0 all.q@node01 UNDEFINED"])
def test_sge_pe_hostfile_bad_line(tmp_path, line):
    path = hostfile(tmp_path, f"node00 1 all.q@node00 UNDEFINED\n{line}\n", "pe")
    with pytest.raises(HostfileError, match=rf"^{path}:2: expected 'host slots queue"):
        hosts_from_environment({"PE_HOSTFILE": path})


def test_lsf_mcpu_hosts():
    env = {"LSB_MCPU_HOSTS": "hostA 4 hostB 2 ", "LSB_HOSTS": "ignored"}
    assert hosts_from_environment(env) == ("LSF", [Host("hostA", 4), Host("hostB", 2)])


@pytest.mark.parametrize("value", ["hostA 4 hostB", "hostA four", "hostA 0"])
def test_lsf_mcpu_hosts_bad(value):
    with pytest.raises(ValueError, match=r"^LSF allocation \(\$LSB_MCPU_HOSTS\): "):
        hosts_from_environment({"LSB_MCPU_HOSTS": value})


def test_lsf_hosts():
    env = {"LSB_HOSTS": "hostA hostA hostB hostA"}
    assert hosts_from_environment(env) == ("LSF", [Host("hostA", 3), Host("hostB", 1)])


def test_no_scheduler():
    assert hosts_from_environment({}) is None
    assert hosts_from_environment({"PATH": "/usr/bin", "SLURM_TASKS_PER_NODE": "2"}) is None
    assert hosts_from_environment({"SLURM_JOB_NODELIST": "", "PBS_NODEFILE": "  "}) is None


def test_default_environment_is_os_environ(monkeypatch):
    for row in SCHEDULERS:
        monkeypatch.delenv(row.variable, raising=False)
    assert hosts_from_environment() is None
    monkeypatch.setenv("LSB_HOSTS", "x y x")
    assert hosts_from_environment() == ("LSF", [Host("x", 2), Host("y", 1)])


def test_scheduler_table_is_data():
    assert [(row.name, row.variable) for row in SCHEDULERS] == [
        ("SLURM", "SLURM_JOB_NODELIST"), ("SLURM", "SLURM_NODELIST"),
        ("PBS", "PBS_NODEFILE"), ("SGE", "PE_HOSTFILE"),
        ("LSF", "LSB_MCPU_HOSTS"), ("LSF", "LSB_HOSTS")]
    for row in SCHEDULERS:
        assert row.parse.__doc__, f"{row.name} parser needs a docstring with an example"


def test_first_scheduler_in_table_order_wins(tmp_path):
    path = hostfile(tmp_path, "p1\n", "nodes")
    env = {"PBS_NODEFILE": path, "LSB_HOSTS": "l1", "SLURM_JOB_NODELIST": "s1"}
    assert hosts_from_environment(env)[0] == "SLURM"
    del env["SLURM_JOB_NODELIST"]
    assert hosts_from_environment(env) == ("PBS", [Host("p1", 1)])



HOSTILE_NAMES = ["-oProxyCommand=touch${IFS}/tmp/x", "a;touch /tmp/x", "$(touch /tmp/x)",
                 "`id`", "a|b", "a&b", "'quoted'", "a\\b", "x>y"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_from_every_scheduler_are_refused(tmp_path, name):
    """Scheduler variables are not the user's own input: a name that is not a host name
    never reaches ssh, whichever scheduler it comes from."""
    files = {"PBS_NODEFILE": f"{name}\n", "PE_HOSTFILE": f"{name} 2 all.q UNDEFINED\n"}
    cases = {"SLURM_JOB_NODELIST": name, "LSB_MCPU_HOSTS": f"{name} 2", "LSB_HOSTS": name}
    for variable, text in files.items():
        cases[variable] = hostfile(tmp_path, text, variable)
    for variable, value in cases.items():
        if " " in name and variable in ("LSB_MCPU_HOSTS", "LSB_HOSTS", "PE_HOSTFILE"):
            continue  # split into other words by the format itself; each checked alone
        with pytest.raises(ValueError, match=r"not a host name|cannot start with '-'|"
                                             r"cannot contain|unbalanced|bad range"):
            hosts_from_environment({variable: value})


@pytest.mark.parametrize("name", ["node01", "n01.cluster.org", "user@node-3", "10.0.0.1",
                                  "::1", "[fe80::1%eth0]", "a_b"])
def test_host_names_that_ssh_takes_are_accepted(name):
    assert hosts_from_list([name]) == [Host(name, 1)]


@pytest.mark.parametrize("name", HOSTILE_NAMES[1:])
def test_hostile_names_in_a_hostfile_name_the_line(tmp_path, name):
    path = hostfile(tmp_path, f"node01 2\n{name} 2\n")
    with pytest.raises(HostfileError, match=rf"^{path}:2: "):
        parse_hostfile(path)
