"""Entry point of a worker process: ``python -m scoop._start_worker FD`` (config on FD)."""

from scoop._bootstrap import main

main()
