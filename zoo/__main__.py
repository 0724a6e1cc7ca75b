"""``python -m zoo``: the command line of :mod:`zoo.cli`; models live in importable modules, never here
(a class defined in ``__main__`` could not be found again when a checkpoint is loaded)."""

import sys

from zoo.cli import main

sys.exit(main())
