"""Training that survives preemption: declare a step, and the runtime owns the loop."""

from __future__ import annotations

from resumable import errors, testing
from resumable._iterate import iterate
from resumable._loading import load
from resumable._runtime import Result, run
from resumable._state import transient
from resumable._step import Step, step
from resumable.errors import (
    ConfigurationError,
    IncompatibleSnapshotError,
    NoProgressError,
    NoSnapshotError,
    RankLostError,
    ResumableError,
    SnapshotCorruptError,
    SnapshotError,
    StateDefinitionError,
    StorageError,
    SupersededError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "IncompatibleSnapshotError",
    "NoProgressError",
    "NoSnapshotError",
    "RankLostError",
    "Result",
    "ResumableError",
    "SnapshotCorruptError",
    "SnapshotError",
    "StateDefinitionError",
    "Step",
    "StorageError",
    "SupersededError",
    "__version__",
    "errors",
    "iterate",
    "load",
    "run",
    "step",
    "testing",
    "transient",
]
