"""``python -m scoop``: the launcher (see :mod:`scoop._launch`)."""

import sys

from scoop._launch import main

sys.exit(main())
