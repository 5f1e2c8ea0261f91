"""``python -m resumable``: run the command line and exit with its code."""

from __future__ import annotations

import sys

from resumable._cli import main

if __name__ == "__main__":
    sys.exit(main())
