"""The launcher: ``python -m scoop`` (and the ``scoop`` command) starts a job's broker and
workers, on this machine, over ssh or in a batch allocation, and ends them all.

::

    cli        argv -> options -> hosts -> Launcher -> exit status
     '-> launcher   Launcher: broker + workers, watched, stopped
          |-> job       Job: the one description every worker config comes from
          |-> address   where the broker listens, what workers connect to (a table)
          '-> remote    ssh host agents, the srun step, CPU counts over ssh

*cli.* The command line only: parsing, the program's and the hosts' checks, signals.

*launcher.* The processes of one job, from start to the last one's end.

*job, address, remote.* What the launcher starts, how workers reach the broker, and
the connections to other hosts.

``Launcher`` (a library's in-process pool: ``Launcher(n).start(root_in_process=True)``)
and ``main`` are the entry points; both are importable from here.
"""

from .._errors import LaunchError
from .cli import main
from .launcher import Launcher

__all__ = ["Launcher", "LaunchError", "main"]
