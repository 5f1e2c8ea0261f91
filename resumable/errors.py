"""
Public exception tree of resumable.

    ResumableError (Exception)
    ├── ConfigurationError (ValueError)       bad argument, option or variable
    ├── StateDefinitionError (TypeError)      a state or field that cannot be captured
    ├── SnapshotError
    │   ├── SnapshotCorruptError (ValueError) a snapshot that fails verification
    │   ├── IncompatibleSnapshotError (ValueError)
    │   │                                     another program's, schema's or format's
    │   ├── NoSnapshotError (LookupError)     nothing committed to load
    │   └── NoProgressError (RuntimeError)    restarted too often from one snapshot
    ├── StorageError (OSError)                storage unreachable, failing or full
    ├── SupersededError (RuntimeError)        a newer incarnation took over the run
    └── RankLostError (RuntimeError)          another rank of the job died or hangs
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "IncompatibleSnapshotError",
    "NoProgressError",
    "NoSnapshotError",
    "RankLostError",
    "ResumableError",
    "SnapshotCorruptError",
    "SnapshotError",
    "StateDefinitionError",
    "StorageError",
    "SupersededError",
]


class ResumableError(Exception):
    """Root of every error that resumable raises on purpose."""


class ConfigurationError(ResumableError, ValueError):
    """An argument, command-line option or environment variable is invalid."""


class StateDefinitionError(ResumableError, TypeError):
    """The state class, or a value held in it, cannot be snapshotted."""


class SnapshotError(ResumableError):
    """A snapshot cannot be used."""


class SnapshotCorruptError(SnapshotError, ValueError):
    """A committed snapshot fails verification (size, checksum or structure)."""


class IncompatibleSnapshotError(SnapshotError, ValueError):
    """The storage holds snapshots that this program must not load or overwrite."""


class NoSnapshotError(SnapshotError, LookupError):
    """The storage holds no committed snapshot of this program."""


class NoProgressError(SnapshotError, RuntimeError):
    """The run was started too often from one snapshot without committing another."""


class StorageError(ResumableError, OSError):
    """The storage could not be reached, read or written."""


class SupersededError(ResumableError, RuntimeError):
    """
    A newer incarnation of the run started on the same storage; this one stops.

    Raised instead of a commit or a deletion, so that a process still inside its
    grace period never writes over its replacement's snapshots.
    """


class RankLostError(ResumableError, RuntimeError):
    """
    Another process of a torchrun job died, hung or failed; nothing was committed.

    Raised within a bounded time instead of waiting in a collective for ever.
    """
