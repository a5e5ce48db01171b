"""Entry point of a host agent: ``python -m scoop._start_host`` (spec on stdin)."""

from scoop._agent import main

main()
