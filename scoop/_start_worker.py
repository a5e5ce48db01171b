"""Entry point of a worker process: ``python -m scoop._start_worker`` (config on stdin)."""

from scoop._bootstrap import main

main()
