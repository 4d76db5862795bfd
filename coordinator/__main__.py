"""``python -m coordinator``: see :mod:`coordinator.lab.cli`."""

from __future__ import annotations

import sys

from .lab.cli import main

# The guard matters: race pods are spawned interpreters that re-import this module.
if __name__ == "__main__":
    sys.exit(main())
