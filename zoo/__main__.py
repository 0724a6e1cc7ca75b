"""``python -m zoo``: builds ZooCLI only; models live in importable modules (pitfall 23)."""

import sys

from zoo.cli import main

sys.exit(main())
