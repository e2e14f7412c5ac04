"""``python -m keyguard``: the ``keyguard`` command line (SPEC §6), where the console script
is not on the PATH (a virtualenv not activated, ``pipx``-less hosts)."""

from __future__ import annotations

import sys

from keyguard.cli import main

if __name__ == "__main__":
    sys.exit(main())
