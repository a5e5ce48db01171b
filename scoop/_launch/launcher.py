"""The launcher's core: the :class:`Launcher` starts a job's broker and workers, watches
them, and ends them all.

Reimplements SCOOP's ``scoop.launcher``. Deliberate differences: the exit status is the
program's, the job key reaches workers on a pipe of their own (the root's stdin is the
launcher's, as mpirun gives rank 0), workers live in their own process group
(Ctrl-C gives one short message, not a traceback per worker), and every process started
is gone when the launcher returns, however the job ended.

Data flow of a job started by the launcher::

    python -m scoop -n 3 prog.py args
      |-- Broker, a thread of this process, bound to 127.0.0.1:<port> (random)
      |-- worker 0 (root)  python -m scoop._start_worker 5  <- fd 5: {address, key, ...}
      |       runs prog.py as __main__, sends SHUTDOWN(status) when it ends
      |-- worker 1, 2      same command; import prog.py as __scoop_main__ and serve tasks
      '-- waits for the root -> STOP to every worker -> waits -> kills stragglers
          -> exits with the root's status

*Launcher.* Owns the processes: starts them where :meth:`Job.placements` says (remote
ones first, through :mod:`.remote`; the root once they have all joined), watches them,
reports a worker that dies, starts the sandbox workers the broker asks for, and on any
ending (program done, Ctrl-C, SIGTERM, error) stops them all.

*Broker.* Routes work between the workers (see :mod:`scoop._broker`); where it listens
is a row of :data:`.address.ROUTES`.

*Workers.* See :mod:`scoop._bootstrap` (start-up) and :mod:`scoop._runtime` (runtime).

A :class:`Launcher` can also make the calling interpreter the root worker
(``root_in_process=True``): a library call then gets a pool with no separate program.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import TextIO

from .. import _agent, _bootstrap, _broker, _reaper, _shm, _worker
from .._errors import LaunchError
from .._files import write_atomically
from .._transport import Credentials
from . import address, remote
from .job import ENDED, Job, Placement, wants_encryption
from .template import Template

log = logging.getLogger("scoop")

# How long workers get to leave by themselves after STOP before they are killed.
STOP_GRACE_S = 3.0
# How often the launcher checks its processes while the program runs.
WATCH_PERIOD_S = 0.05
# Sandbox workers the launcher may start, per --max-attempts: a task that may have killed
# a worker runs in one when no other worker is left, never in the root (a poison task
# kills at most --max-attempts of them, then fails).
SANDBOXES_PER_ATTEMPT = 4
# How long remote workers may take to join before the job is abandoned (ssh, a cold
# Python start on a loaded node, a network file system).
JOIN_TIMEOUT_S = 60.0
# Ended marks of elastic jobs in ~/.scoop/jobs are removed when a later job writes its file
# this long after: a late worker of the job array still reads why it need not start.
ENDED_MARK_KEEP_S = 7 * 24 * 3600
# Local workers from which on a job forks them from a template process instead of
# starting an interpreter each: the template costs one interpreter start of its own, so
# below this it saves nothing (an in-process pool of 2 starts a single worker).
FORK_FROM = 2


class Launcher:
    """Starts a broker and ``n`` workers on this host; watches and stops them.

    Args:
        n: the number of workers, the root included (with no ``hosts``).
        program: path of the program the root runs (None with ``root_in_process``).
        args: the program's arguments.
        hosts: (name, workers) pairs; the first host runs the root.
        module: instead of ``program``, the module the root runs as ``python -m`` does.
        python: the interpreter for the workers.
        cwd: the workers' working directory.
        pythonpath: prepended to the workers' PYTHONPATH.
        nice: niceness increment for the workers.
        debug: sets ``scoop.DEBUG`` on the workers.
        log_level: the workers' logging level.
        log_file: where the workers write their log records (None: stderr).
        encrypt: encrypt the job's traffic with ZeroMQ CURVE (see ``_transport``); None:
            whenever a worker may connect from another machine (:func:`wants_encryption`).
        ssh, broker_hostname, prolog, tunnel, external, elastic, job_file, launcher,
        max_attempts, progress: as the command line's options of the same names (see
            :mod:`.cli`).
    """

    def __init__(self, n: int | None = None, program: str | None = None,
                 args: list[str] | None = None, *, hosts: list[tuple[str, int]] | None = None,
                 python: str = sys.executable, cwd: str | None = None,
                 pythonpath: str | None = None, nice: int = 0, debug: bool = False,
                 log_level: int = logging.WARNING, log_file: str | None = None,
                 ssh: str = "ssh", broker_hostname: str | None = None,
                 prolog: str | None = None, tunnel: bool = False, external: int = 0,
                 job_file: str | None = None, launcher: str = "ssh",
                 max_attempts: int = _broker.MAX_ATTEMPTS, encrypt: bool | None = None,
                 module: str | None = None, progress: bool = False,
                 elastic: bool = False) -> None:
        self.job = Job(
            hosts=tuple(hosts if hosts is not None else [("127.0.0.1", n or 1)]),
            program=program, module=module, args=tuple(args or ()), python=python,
            cwd=cwd or os.getcwd(), pythonpath=pythonpath, nice=nice, debug=debug,
            log_level=log_level, log_file=log_file, external=external, elastic=elastic,
            launcher=launcher, ssh=ssh, broker_hostname=broker_hostname, prolog=prolog,
            tunnel=tunnel, max_attempts=max_attempts, progress=progress)
        self.job_file = job_file
        self._wrote_job_file = False
        self.creds = Credentials.new(wants_encryption(
            encrypt, list(self.job.hosts), external or elastic, tunnel, launcher))
        self.broker: _broker.Broker | None = None
        self.worker_address = ""  # what workers connect to (see address.ROUTES)
        self.procs: dict[int, subprocess.Popen] = {}  # local workers by id
        self.template: Template | None = None  # forks the local workers (.template)
        self.forks_workers = True  # may start local workers from a template
        self.agents: dict[str, remote.RemoteHost] = {}  # remote hosts by name
        self.root_worker: _worker.Worker | None = None
        self._reported: set[int] = set()
        # scoop.Executor's output relays: Popen arguments, remote stdout (None: fd 1)
        self.worker_popen: dict = {}
        self.remote_stdout: TextIO | None = None
        self.clients = 0  # processes of the job that run no task (scoop.Executor's caller)

    @property
    def n(self) -> int:
        """The number of workers of the job."""
        return self.job.size

    @property
    def key(self) -> bytes:
        """The job's key (``creds.key``): it signs every message of the job."""
        return self.creds.key

    # -- starting --------------------------------------------------------------------------
    def start(self, root_in_process: bool = False) -> Launcher:
        """Start the broker and the workers; with ``root_in_process``, join as the root."""
        job = self.job = dataclasses.replace(self.job, broker_apart=not root_in_process)
        route = address.route(job)
        self.broker = _start_broker(job, self.creds, route.bind, self.clients)
        try:
            self.worker_address = address.worker_address(route, job, self.broker.address)
            if job.accepts_joiners:
                self.write_job_file()
            if self.forks_workers and self.template is None:
                self.template = _template(job, root_in_process)
            # The root starts last, once every remote worker has joined: a host that
            # cannot take part stops the job before the program runs, not halfway.
            for row in job.placements(root_in_process):
                if 0 in row.wids:
                    self._await_remote_workers()
                self._start_placement(row)
            if root_in_process:
                self._await_remote_workers()
                self._join_as_root()
            elif 0 in self.procs:  # this process watches the job: it can start sandboxes
                self.broker.sandbox_budget = SANDBOXES_PER_ATTEMPT * job.max_attempts
        except BaseException:
            self.stop()
            raise
        return self

    def _start_placement(self, row: Placement) -> None:
        """Start the workers of one row of :meth:`Job.placements`."""
        job, out = self.job, self.remote_stdout
        if row.how == "local":
            self.procs.update(_start_local(self, row.wids))
        elif row.how == "srun":
            self.agents[row.host] = remote.srun_step(row.wids, job, self.job_file, out)
        else:
            configs = [job.worker_config(w, self.worker_address, self.creds) for w in row.wids]
            port = self.broker.address.rsplit(":", 1)[1]
            self.agents[row.host] = remote.ssh_agent(row.host, row.wids, job, configs, port, out)

    def write_job_file(self) -> str:
        """Write the job file joining workers read (mode 0600: it holds the key)."""
        if self.job_file is None:
            folder = os.path.join(os.path.expanduser("~"), ".scoop", "jobs")
            os.makedirs(folder, mode=0o700, exist_ok=True)
            _prune_ended_marks(folder)
            self.job_file = os.path.join(folder, f"job-{os.getpid()}-{self.job.id[:8]}.json")
        config = self.job.worker_config(None, self.worker_address, self.creds)
        try:
            write_atomically(self.job_file, json.dumps(config))
        except OSError as exc:
            raise LaunchError(f"cannot write the job file {self.job_file}: "
                              f"{exc.strerror or exc}") from None
        self._wrote_job_file = True
        log.info("job file for joining workers: %s", self.job_file)
        return self.job_file

    def _await_remote_workers(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Wait until every remote worker started so far has joined the broker.

        Raises:
            LaunchError: a host failed, or its workers did not join in time.
        """
        expected = {w for agent in self.agents.values() for w in agent.wids}
        deadline = time.monotonic() + timeout
        while missing := expected - set(self.broker.by_wid):
            for agent in self.agents.values():
                agent.check_failed(ended_early=bool(set(agent.wids) & missing))
            if time.monotonic() > deadline:
                hosts = sorted({a.name for a in self.agents.values() if set(a.wids) & missing})
                raise LaunchError(
                    f"workers on {', '.join(hosts)} did not join the broker within "
                    f"{timeout:.0f} s. If they cannot reach {self.worker_address}, pass "
                    "--broker-hostname with an address of this machine they can reach")
            time.sleep(0.02)
        for agent in self.agents.values():
            agent.go_live()

    def _spawn(self, wid: int) -> subprocess.Popen:
        """Start local worker ``wid`` (the root gets this process's stdin)."""
        config = self.job.worker_config(wid, _local_address(self.broker), self.creds)
        try:
            # worker_popen (the Executor's output relay in a notebook) needs a process of
            # its own: then no fork of the template
            if self.template is not None and not self.worker_popen:
                proc = self.template.fork(config, stdin_fd=0 if wid == 0 else None)
            else:
                proc = _agent.spawn_worker(config, self.job.python, self.job.cwd,
                                           self.job.pythonpath,
                                           stdin=None if wid == 0 else subprocess.DEVNULL,
                                           **self.worker_popen)
        except _agent.SpawnError as exc:
            raise LaunchError(str(exc)) from None
        log.debug("started worker %d (pid %d)", wid, proc.pid)
        return proc

    def _join_as_root(self) -> None:
        worker, job = _worker.Worker(0), self.job  # the job's size comes with the WELCOME
        worker.shm = _shm.usable(job.shm)
        _bootstrap.enter_job(worker, self.broker.inproc_address, self.creds,  # (issue 12)
                             debug=job.debug, hosts=job.hosts, spin_us=job.spin_us)
        self.broker.baton.attach(worker)  # its idle waits run the broker's loop
        self.root_worker = worker

    # -- watching --------------------------------------------------------------------------
    def wait(self) -> int:
        """Wait for the root worker's process; return its status as a shell would.

        Raises:
            LaunchError: a remote host failed (ssh refused, scoop missing there, ...).
        """
        root = self.procs.get(0) or self.agents[self.job.hosts[0][0]].proc
        while True:
            code = root.poll()
            if code is not None:
                if 0 not in self.procs and 0 not in self.broker.seen:
                    self.agents[self.job.hosts[0][0]].check_failed()  # it never ran
                elif code < 0:  # a bare 137 tells a user nothing
                    print(f"scoop: {_agent.death_message(0, root.pid, code)}",
                          file=sys.stderr, flush=True)
                return _agent.shell_status(code)
            self.check_workers()
            _pause(root)

    def check_workers(self) -> None:
        """Report each non-root worker that ended before the job did (once), to the log
        and to the broker, which gives its work to the others."""
        if self.broker is not None and self.broker.stopping:
            return
        for wid, proc in self.procs.items():
            code = proc.poll()
            if wid and code is not None and wid not in self._reported:
                self._reported.add(wid)  # status 0: it left (SIGTERM), its work handed back
                log.log(logging.INFO if code == 0 else logging.WARNING, "%s",
                        _agent.death_message(wid, proc.pid, code))
                self.broker.worker_lost(wid, _agent.describe_status(code))
        for agent in self.agents.values():
            if any(w in self.broker.seen for w in agent.wids):
                agent.go_live()
            agent.check_ended()
        self._start_sandboxes()

    def _start_sandboxes(self) -> None:
        """Start the workers the broker asked for (sandboxes, replacements: see Recovery)."""
        requests = self.broker.sandbox_requests
        while not requests.empty():
            wid = requests.get_nowait()
            sandbox = wid in self.broker.schedule.roster.sandbox_wids  # else a replacement
            log.info("starting %s worker %d", "sandbox" if sandbox else "a new", wid)
            self.procs[wid] = self._spawn(wid)

    # -- stopping --------------------------------------------------------------------------
    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop the job: STOP every worker, wait ``grace`` seconds, then kill the rest."""
        if self.root_worker is not None:
            self.root_worker.shutdown(0)
            self.root_worker = None
            _bootstrap.leave_job()
        if self.broker is not None:
            self.broker.stop_workers()
        for agent in self.agents.values():
            agent.close()  # EOF on its stdin: it stops its workers if STOP did not
        _agent.reap([*self.procs.values(), *(a.proc for a in self.agents.values())], grace)
        if self.template is not None:
            self.template.close()  # after its workers: their ends were reported
            self.template = None
        for agent in self.agents.values():
            agent.finish()
        # What tasks started and their workers did not end (a worker killed outright).
        _reaper.end_marked(_reaper.JOB, self.job.id)
        _shm.sweep(self.job.id)  # what killed workers (or jobs) left in /dev/shm
        if self.broker is not None:
            self.broker.stop()
        if self._wrote_job_file:
            self._wrote_job_file = False
            _end_job_file(self.job_file, self.job)

    def __enter__(self) -> Launcher:
        return self.start(root_in_process=True) if self.root_worker is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pause(root) -> None:
    """Wait :data:`WATCH_PERIOD_S`, or less if the root ends meanwhile: the launcher's
    exit follows the program's without a pause."""
    try:
        root.wait(WATCH_PERIOD_S)
    except subprocess.TimeoutExpired:
        pass


def _start_broker(job: Job, creds: Credentials, host: str, clients: int) -> _broker.Broker:
    """The job's broker, its loop running; in an elastic job it tells the workers how
    many there are now as it forwards their results (``scoop._schedule``). ``clients``:
    the job's processes that run no task (``scoop.Executor``'s caller)."""
    broker = _broker.Broker(creds, size=job.size, host=host, max_attempts=job.max_attempts,
                            first_free_wid=job.size - job.joiners if job.joiners else None,
                            clients=clients, local=address.local_wire(creds.encrypted))
    broker.schedule.report_size = job.elastic
    return broker.start()


def _end_job_file(path: str, job: Job) -> None:
    """The job is over: remove its job file, or, in an elastic job (workers may still be
    started with it: a job array, a later sbatch), replace it with a mark that the job
    ended, without the key, so that they exit at once, saying so."""
    try:
        if job.elastic:
            write_atomically(path, json.dumps({ENDED: True, "job": job.id}))
        else:
            os.unlink(path)
    except OSError:
        pass


def _prune_ended_marks(folder: str) -> None:
    """Remove the ended marks (see :func:`_end_job_file`) older than
    :data:`ENDED_MARK_KEEP_S` from ``folder``; job files of live jobs stay."""
    too_old = time.time() - ENDED_MARK_KEEP_S
    with os.scandir(folder) as entries:
        for entry in entries:
            if not (entry.name.startswith("job-") and entry.name.endswith(".json")):
                continue
            try:
                if entry.stat().st_mtime < too_old and entry.stat().st_size < 4096:
                    with open(entry.path) as f:
                        if json.load(f).get(ENDED):
                            os.unlink(entry.path)
            except (OSError, ValueError, AttributeError):
                continue  # not ours, or gone meanwhile


def _local_address(broker: _broker.Broker) -> str:
    """What the workers started on this host connect to: the broker's Unix socket, else
    its TCP address (see ``address.local_wire``)."""
    return broker.local_address or broker.address


def _start_local(launcher: Launcher, wids: list[int]) -> dict:
    """Start local workers ``wids``; return them by id. From the template, their fork
    requests go out in a row, the root's last (it gets this process's stdin)."""
    # worker_popen (the Executor's output relay in a notebook) needs a process of its
    # own: then no fork of the template
    if launcher.template is None or launcher.worker_popen:
        return {wid: launcher._spawn(wid) for wid in wids}
    job, address = launcher.job, _local_address(launcher.broker)
    # The root last: its program's first tasks would otherwise keep the few workers
    # forked so far (and the CPU) busy while the template forks the others.
    wids = sorted(wids, key=lambda wid: wid == 0)
    requests = [(job.worker_config(wid, address, launcher.creds), 0 if wid == 0 else None)
                for wid in wids]
    try:
        procs = launcher.template.fork_many(requests)
    except _agent.SpawnError as exc:
        raise LaunchError(str(exc)) from None
    for wid, proc in zip(wids, procs):
        log.debug("started worker %d (pid %d)", wid, proc.pid)
    return dict(zip(wids, procs))


def template_here(job: Job) -> Template | None:
    """The template of ``job``'s local workers forked from this process, for
    :attr:`Launcher.template` before :meth:`Launcher.start`: the command line's, which
    has no thread and no ZeroMQ context yet (a library's process may have both, and
    memory its workers would not need); None if forking does not pay."""
    return _template(job, False, here=threading.active_count() == 1)  # or spawned


def _template(job: Job, root_in_process: bool, here: bool = False) -> Template | None:
    """The template that forks the job's local workers, if forking pays (FORK_FROM);
    ``here``: forked from this process (:func:`template_here`)."""
    local = sum(len(row.wids) for row in job.placements(root_in_process)
                if row.how == "local")
    # Another interpreter (--python-executable, often a wrapper script) may do something
    # per process: each worker still starts it.
    if local < FORK_FROM or job.python != sys.executable:
        return None
    try:
        return Template(job.python, job.cwd, job.pythonpath, job.id, here=here)
    except _agent.SpawnError as exc:
        raise LaunchError(str(exc)) from None
