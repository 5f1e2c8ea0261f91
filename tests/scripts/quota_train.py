"""
``crash_train.py`` on storage with a quota: ``python -m resumable quota_train.py
--storage quota:///path``.

Importing ``quotafs`` registers the ``quota://`` protocol with fsspec, as a user's
script imports the fsspec plugin of its storage; the CLI loads the script before
it opens the storage. The step, its settings and its digest are crash_train's.
"""

from __future__ import annotations

import quotafs  # noqa: F401  registers quota://
from crash_train import train  # noqa: F401  the step that the CLI runs
