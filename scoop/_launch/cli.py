"""The command line: ``python -m scoop [options] (program.py | -m module) [args]``.

::

    argv --split_host_args--> argparse (build_parser) --> Namespace
      |-- the program checked here: missing, a directory or a syntax error stops the
      |   job before any process starts (as Python words it)
      |-- job_hosts(): --hostfile, --hosts, or the batch scheduler's allocation, bare host
      |   names counted over ssh (remote.host_cpu_counts), then the -n rules (_hosts)
      |-- Launcher(...).start() --> wait() --> stop(), under _run's signal handlers
      '-- exit status: the program's (128 + N when ended by signal N, 1 on a launch error,
          2 on a usage error)

*User.* Types the options before the program; everything from the program on is the
program's own, ``--hosts`` included (:func:`split_host_args`).

*Parser.* The one list of the launcher's options: the options that take a value, which
:func:`split_host_args` must skip, are read from it (:data:`OPTIONS_WITH_VALUE`).

*_run.* Turns Ctrl-C and SIGTERM into one line and an orderly stop; a second Ctrl-C
during the stop is ignored, so that no worker is left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import traceback

import scoop

from .. import _bootstrap, _broker, _hosts
from .._errors import LaunchError
from .._files import create_private, read_regular
from .launcher import Launcher, template_here
from .remote import cpu_count, host_cpu_counts
from .walltime import WallClock, parse_duration

log = logging.getLogger("scoop")


def _prog_name() -> str:
    """How the user started the launcher: ``python -m scoop`` or ``scoop``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m scoop" if name in ("", "__main__.py", "-c") else name


def _worker_count(text: str) -> int:
    """The value of ``-n``: a positive number of workers."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options about the program's run: its time, and its progress."""
    p.add_argument("--walltime", type=parse_duration, metavar="HH:MM:SS", default=None,
                   help="the job's time: --grace before it, no task starts any more; at it, "
                        "the program stops (exit status 75: run it again to resume a "
                        "checkpointed map). SIGUSR1 to the launcher does the same at once "
                        "(sbatch --signal=B:USR1@120)")
    p.add_argument("--grace", type=float, metavar="SECONDS", default=60.0,
                   help="seconds from the drain (SIGUSR1, or --walltime minus this) to the "
                        "program's stop: running tasks finish and are recorded meanwhile "
                        "(default 60)")
    p.add_argument("--progress", action="store_true",
                   default=os.environ.get("SCOOP_PROGRESS", "") not in ("", "0"),
                   help="show the program's progress on stderr: items done/total, rate, "
                        "workers, time left (also SCOOP_PROGRESS=1)")


def _add_join_options(p: argparse.ArgumentParser) -> None:
    """The options about workers another launcher starts (``python -m scoop.join``)."""
    p.add_argument("--external", type=int, metavar="N", default=0,
                   help="N more workers will be started by another launcher (srun, mpirun, "
                        "a container) with `python -m scoop.join JOBFILE`; more may join "
                        "later")
    p.add_argument("--elastic", action="store_true",
                   help="workers join (`python -m scoop.join JOBFILE`) and leave (SIGTERM) "
                        "at any time, none awaited: the program starts on the root alone; "
                        "implied by --job-file without --external")
    p.add_argument("--job-file", metavar="FILE", default=None,
                   help="where to write the job file joining workers read (default: "
                        "~/.scoop/jobs/; it holds the job key and is made readable only "
                        "by you)")


def build_parser(prog: str = "python -m scoop") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [options] (program.py | -m module) [args ...]",
        description="Run a Python program with its scoop.futures calls spread over "
                    "several worker processes.",
        epilog=f"Example: {prog} -n 4 program.py --its-own-option 1")
    p.add_argument("--version", action="version", version=f"scoop {scoop.__version__}")
    p.add_argument("-n", type=_worker_count, metavar="N", default=None,
                   help="number of workers, the root included (default: the hosts' counts, "
                        f"or the CPUs of this machine, {cpu_count()} here). Fewer than the "
                        "hosts' total fills hosts in order; more adds workers round-robin "
                        "from the first host")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hosts", "--host", nargs="+", metavar="HOST", default=None,
                       help="hosts, each repeated once per worker; the first runs the "
                            "program. The list ends where the program begins")
    where.add_argument("--hostfile", metavar="FILE", default=None,
                       help="a file of 'host count' lines ('host slots=N' too; # comments)")
    p.add_argument("--ssh-executable", dest="ssh", metavar="SSH", default="ssh",
                   help="the ssh command that reaches remote hosts (default: ssh; it "
                        "honours your ~/.ssh/config)")
    p.add_argument("--broker-hostname", "--external-hostname", dest="broker_hostname",
                   metavar="ADDRESS", default=None,
                   help="the address remote workers use to reach this machine (default: "
                        "the local address that routes to the first remote host)")
    p.add_argument("--launcher", choices=("ssh", "srun"), default=None,
                   help="how workers start on other hosts: ssh, or srun (default inside a "
                        "SLURM allocation when srun is on PATH, where ssh between nodes is "
                        "often forbidden)")
    _add_join_options(p)
    p.add_argument("--max-attempts", type=int, metavar="N", default=_broker.MAX_ATTEMPTS,
                   help="workers that may die running a task before it fails with "
                        f"WorkerLostError (default: {_broker.MAX_ATTEMPTS})")
    p.add_argument("--encrypt", action="store_const", const=True, default=None,
                   help="encrypt all job traffic (ZeroMQ CURVE, keys made for this job), "
                        "local workers' too; the default when workers connect from other "
                        "hosts (without -e)")
    p.add_argument("--no-encrypt", dest="encrypt", action="store_const", const=False,
                   help="never encrypt, also across hosts: faster for large data on a "
                        "network you trust, but whoever can read it can flood the job")
    p.add_argument("-e", "--tunnel", action="store_true",
                   help="remote workers reach the broker through ssh reverse tunnels (when "
                        "they cannot reach this machine directly; slower)")
    p.add_argument("--prolog", metavar="FILE", default=None,
                   help="a shell file sourced on remote hosts before the workers start "
                        "(e.g. to activate a virtualenv or `module load`)")
    p.add_argument("--path", "-p", metavar="DIR", default=None,
                   help="working directory of the workers, on every host (default: the "
                        "current one)")
    p.add_argument("--nice", type=int, metavar="N", default=0,
                   help="niceness increment of the workers (-20 to 19)")
    p.add_argument("--python-executable", "--python-interpreter", dest="python",
                   metavar="PYTHON", default=sys.executable,
                   help="the Python interpreter of the workers (default: this one)")
    p.add_argument("--pythonpath", metavar="PATH", default=None,
                   help="directories prepended to the workers' PYTHONPATH")
    p.add_argument("--verbose", "-v", action="count", default=0,
                   help="more launcher messages (-vv for debugging)")
    p.add_argument("--quiet", "-q", action="store_true", help="only errors")
    p.add_argument("--log", metavar="FILE", default=None,
                   help="write scoop's log messages (launcher and workers) to FILE; the "
                        "program's own output still goes to the terminal")
    _add_run_options(p)
    p.add_argument("--debug", action="store_true",
                   help="debug mode: scoop.DEBUG is True and logging is verbose")
    p.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="module",
                   help="run a module, as `python -m module args` does (found from the "
                        "workers' directory and --pythonpath); the rest are its arguments")
    p.add_argument("executable", metavar="program.py", nargs="?", help="the program to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the program's arguments")
    return p


def options_with_value(parser: argparse.ArgumentParser) -> frozenset[str]:
    """The options of ``parser`` whose value is the next token (``-n 4``)."""
    return frozenset(option for action in parser._actions
                     if action.option_strings and action.nargs is None
                     for option in action.option_strings)


# Launcher options whose value is the next token: "-n 4" must not make "4" the program.
OPTIONS_WITH_VALUE = options_with_value(build_parser())
HOST_OPTIONS = frozenset({"--host", "--hosts"})


def _is_program(token: str) -> bool:
    return token.endswith(".py") or os.path.isfile(token)


def split_host_args(argv: list[str],
                    options_with_value: frozenset[str] = OPTIONS_WITH_VALUE) -> list[str]:
    """Rewrite the launcher's argv so that ``--host``/``--hosts`` cannot eat the program.

    The original's ``--hosts`` took every following name, so in
    ``python -m scoop --host a a b b prog.py`` argparse swallowed ``prog.py`` as a host.
    Here each ``--host``/``--hosts`` and the names after it become one token
    ``--hosts=a,a,b,b`` (read back by :func:`scoop._hosts.hosts_from_list`). The names end at the
    first token that:

    * starts with ``-`` (the next launcher option, or ``--``), or
    * ends with ``.py`` or names an existing file: that is the program.

    So a host name never ends in ``.py`` (write ``--hosts=x.com.py`` for a Paraguayan
    host) and never is the name of a file in the current directory; a program that exists
    needs no ``.py``. If no token ends the list, every name is a host and argparse then
    reports the missing program.

    Scanning stops at the program: the first token that is not an option nor the value of
    one of ``options_with_value`` (e.g. the ``4`` of ``-n 4``). Everything from the
    program on is the program's own and is kept as is, ``--hosts`` included. Also kept:
    ``--hosts=...`` tokens, everything after a ``--``, and unknown options (taken for
    flags). Option abbreviations (``--ho``) and value-taking short options inside
    clusters (``-vn 4``) are not recognised.

    Args:
        argv: the launcher's arguments, without the interpreter (``sys.argv[1:]``).
        options_with_value: launcher options that take the next token as their value.

    Returns:
        A new list; ``argv`` itself is not changed.

    Example:
        ``["-n", "4", "--host", "a", "a", "b", "prog.py", "--hosts", "x"]`` ->
        ``["-n", "4", "--hosts=a,a,b", "prog.py", "--hosts", "x"]``.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in HOST_OPTIONS:
            i += 1
            names = []
            while i < len(argv) and not argv[i].startswith("-") and not _is_program(argv[i]):
                names.append(argv[i])
                i += 1
            out.append("--hosts=" + ",".join(names))
        elif token in options_with_value:
            out += argv[i:i + 2]
            i += 2
        elif token == "--" or not token.startswith("-") or token == "-":
            out += argv[i:]
            break
        else:
            out.append(token)
            i += 1
    return out


def _log_level(ns: argparse.Namespace) -> int:
    if ns.debug or ns.verbose >= 2:
        return logging.DEBUG
    if ns.quiet:
        return logging.ERROR
    return logging.INFO if ns.verbose == 1 else logging.WARNING


def _check_program(path: str) -> tuple[str, int] | None:
    """Why the program cannot run and the exit status that says so, or None.

    A syntax error reads as Python prints it (``File "...", line N``, the line, the
    caret, ``SyntaxError: ...``), so that editors and CI log parsers recognise it.
    """
    if not os.path.exists(path):
        return f"scoop: {path}: no such file", 2
    if os.path.isdir(path):
        return f"scoop: {path}: is a directory, not a Python program", 2
    try:
        compile(read_regular(path), path, "exec")
    except SyntaxError as exc:  # IndentationError and TabError too
        return "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n"), 1
    except (OSError, ValueError) as exc:
        return f"scoop: {path}: cannot read: {exc}", 1
    return None


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise _Interrupted(signum)


def _default_launcher(ns: argparse.Namespace) -> str:
    """srun inside a SLURM allocation (when on PATH) unless hosts were named; else ssh."""
    inside_slurm = "SLURM_JOB_NODELIST" in os.environ or "SLURM_NODELIST" in os.environ
    if inside_slurm and not (ns.hosts or ns.hostfile) and shutil.which("srun"):
        return "srun"
    return "ssh"


def job_hosts(ns: argparse.Namespace) -> list[tuple[str, int]]:
    """The job's hosts and worker counts, from the options or the batch scheduler.

    Raises:
        LaunchError: a bad hostfile or host list.
    """
    try:
        if ns.hostfile:
            hosts = _hosts.parse_hostfile(ns.hostfile)
        elif ns.hosts:
            hosts = _hosts.hosts_from_list(ns.hosts)
        else:
            found = _hosts.hosts_from_environment()
            if found is None:
                return [("127.0.0.1", ns.n or cpu_count())]
            scheduler, hosts = found
            log.info("hosts from the %s allocation: %s", scheduler, _hosts.format_hosts(hosts))
        counts = host_cpu_counts([h.name for h in hosts if h.workers is None], ns.ssh)
        hosts = _hosts.distribute(hosts, ns.n, counts.__getitem__)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    return [(h.name, h.workers) for h in hosts]


def _parse(argv: list[str]) -> argparse.Namespace:
    """The launcher's options; ``ns.module`` (``-m``) or ``ns.executable`` names what to
    run and ``ns.args`` its arguments. Exits with status 2 on a usage error."""
    parser = build_parser(_prog_name())
    ns = parser.parse_args(split_host_args(argv))
    if ns.module is not None:
        if not ns.module:
            parser.error("-m needs a module name")
        ns.module, ns.args = ns.module[0], ns.module[1:]
    elif ns.executable is None:
        parser.error("the program to run is missing: program.py or -m module")
    return ns


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m scoop [options] program.py [args]``; return the exit status. With
    ``argv`` None (the command line's), end the process instead, skipping the teardown
    of every module (its processes are all gone by then)."""
    status = _main(sys.argv[1:] if argv is None else list(argv))
    if argv is None:
        _bootstrap.exit_now(status)
    return status


def _main(argv: list[str]) -> int:
    ns = _parse(argv)
    level = _log_level(ns)
    if ns.log:
        try:
            create_private(ns.log)  # the log names hosts, paths and addresses
        except OSError as exc:
            print(f"scoop: --log {ns.log}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=level, filename=ns.log,
                        format="[%(asctime)s] %(levelname)-7s scoop %(message)s")
    program = None if ns.module else os.path.abspath(ns.executable)
    problem = program and _check_program(program)
    if problem:
        print(problem[0], file=sys.stderr)
        return problem[1]
    try:
        hosts = job_hosts(ns)
    except LaunchError as exc:
        print(f"scoop: {exc}", file=sys.stderr)
        return 2
    launcher = Launcher(program=program, args=ns.args, hosts=hosts, python=ns.python,
                        cwd=os.path.abspath(ns.path) if ns.path else None,
                        pythonpath=ns.pythonpath, nice=ns.nice, debug=ns.debug,
                        log_level=level, log_file=ns.log and os.path.abspath(ns.log),
                        ssh=ns.ssh, broker_hostname=ns.broker_hostname, prolog=ns.prolog,
                        tunnel=ns.tunnel, external=ns.external, job_file=ns.job_file,
                        elastic=_elastic(ns),
                        launcher=ns.launcher or _default_launcher(ns),
                        max_attempts=ns.max_attempts, encrypt=ns.encrypt, module=ns.module,
                        progress=ns.progress)
    return _run(launcher, hosts, WallClock(launcher, ns.grace, ns.walltime))


def _elastic(ns: argparse.Namespace) -> bool:
    """--elastic, or a --job-file given with nobody to read it otherwise."""
    return ns.elastic or (ns.job_file is not None and not ns.external
                          and (ns.launcher or _default_launcher(ns)) != "srun")


def _run(launcher: Launcher, hosts: list[tuple[str, int]], clock: WallClock) -> int:
    """Start the job, wait for its end, stop it whatever happens; return its status."""
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.template = template_here(launcher.job)  # no thread nor ZeroMQ yet
        launcher.start()
        clock.start()
        if launcher.job.elastic:
            print(f"scoop: workers join this job with: python -m scoop.join "
                  f"{launcher.job_file}", file=sys.stderr, flush=True)
        log.info("started %d workers on %s; broker at %s", launcher.n,
                 " ".join(f"{h}:{c}" for h, c in hosts), launcher.broker.address)
        status = launcher.wait()
    except _Interrupted as exc:
        name = "Ctrl-C" if exc.signum == signal.SIGINT else signal.Signals(exc.signum).name
        print(f"scoop: {name}, stopping the job", file=sys.stderr)
        status = 128 + exc.signum
    except LaunchError as exc:
        print(f"scoop: {exc}", file=sys.stderr)
        status = 1
    finally:
        clock.stop()
        for s in old:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
        try:
            launcher.stop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return status
