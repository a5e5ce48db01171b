"""``python -m scoop.join JOBFILE``: a worker, started by any launcher, joins a running job.

Use it when something other than scoop starts the workers: ``srun``, ``mpirun``, ``qrsh``,
``blaunch``, a container entry point, a job array. Start the job with ``python -m scoop
--external N --job-file JOBFILE program.py`` (N workers expected at start) or ``--elastic
--job-file JOBFILE`` (none expected: workers come and go): it writes JOBFILE (the broker's
address and the job's secret key; readable only by you, so the key never appears on a
command line) and runs the program. Then start workers, on any hosts that see JOBFILE (a
shared file system), with your launcher, e.g.::

    srun --ntasks=63 python -m scoop.join ~/.scoop/jobs/myjob.json
    mpirun -n 63 python -m scoop.join ~/.scoop/jobs/myjob.json

Each worker asks the broker for its id, imports the program, and runs tasks until the job
ends (or exits by itself within seconds if the job is gone). Workers may join late; the
program runs from the start, on whatever workers have joined. SIGTERM makes a worker
leave cleanly (it hands its queued work back, finishes its running task, exits 0). A
worker started after the job ended (an elastic job marks its job file so) exits 0 at once.
"""

from __future__ import annotations

import json
import os
import stat
import sys

from . import _bootstrap

ENDED = "ended"  # the key of an ended job's mark (as scoop._launch.job.ENDED)


def read_job_file(path: str) -> dict:
    """The job description a launcher wrote for joining workers."""
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"scoop.join: warning: {path} is readable by others; it holds the job key",
              file=sys.stderr)
    with open(path) as f:
        job = json.load(f)
    return dict(job, wid=None)


def main(argv: list[str] | None = None) -> int:
    """Run a joining worker; return its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m scoop.join JOBFILE   (see python -m scoop --external)",
              file=sys.stderr)
        return 2
    try:
        cfg = read_job_file(argv[0])
    except (OSError, ValueError) as exc:
        print(f"scoop.join: cannot read the job file {argv[0]}: {exc}", file=sys.stderr)
        return 2
    if cfg.get(ENDED) or not _bootstrap.start(dict(cfg, job_file=argv[0])):
        print(f"scoop.join: the job of {argv[0]} has ended; nothing to do", file=sys.stderr)
    return 0


def job_has_ended(path: str) -> bool:
    """Whether the job file at ``path`` carries the mark of an ended elastic job."""
    try:
        with open(path) as f:
            return bool(json.load(f).get(ENDED))
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
