"""
The runtime: owns the loop, resume, snapshot cadence and retention.

It alone brings together the step declaration, state capture, the snapshot format
and the storage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import attrs

from resumable import _knobs
from resumable._archive import Archive, Listed
from resumable._snapshot import new_lineage, parse_snapshot_name
from resumable._state import (
    Metrics,
    check_capturable,
    check_state,
    decode_snapshot,
    encode_snapshot,
    schema,
)
from resumable._step import Step, check_count
from resumable._storage import Storage
from resumable.errors import (
    ConfigurationError,
    NoSnapshotError,
    SnapshotError,
    StorageError,
)

logger = logging.getLogger(__name__)

StateT = TypeVar("StateT")
# Called after each step with (steps done, steps in all, that step's metrics).
Progress = Callable[[int, int, "Metrics | None"], None]


@attrs.frozen
class Settings:
    """The options of one run, resolved from arguments, environment and decorator."""

    storage: str
    steps: int
    every: int
    keep: int
    fresh: bool = False
    storage_is_default: bool = False

    @classmethod
    def resolve(cls, step: Step[Any], **given: Any) -> Settings:
        """Resolve each option: argument, then RESUMABLE_* variable, then decorator."""
        storage = given.get("storage") or _knobs.env_str(_knobs.STORAGE)
        storage = storage or step.storage
        settings = cls(
            storage=str(storage or step.default_storage()),
            steps=_first(given.get("steps"), _knobs.STEPS, 0, step.steps),
            every=_first(given.get("every"), _knobs.EVERY, 1, step.every),
            keep=_first(given.get("keep"), _knobs.KEEP, 1, step.keep),
            fresh=bool(given.get("fresh", False)),
            storage_is_default=storage is None,
        )
        check_count("steps", settings.steps, 0)
        check_count("every", settings.every, 1)
        check_count("keep", settings.keep, 1)

        return settings


@attrs.define
class Result(Generic[StateT]):
    """What a run ends with."""

    state: StateT
    step: int
    history: list[Metrics | None]
    storage: str
    steps: int

    @property
    def finished(self) -> bool:
        return self.step >= self.steps


def run(
    step: Step[StateT],
    *,
    storage: str | None = None,
    steps: int | None = None,
    every: int | None = None,
    keep: int | None = None,
    fresh: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Result[StateT]:
    """
    Run ``step`` to the end, resuming from the newest verified snapshot.

    Args:
        step: The ``@resumable.step`` function.
        storage: fsspec URL or path of the snapshots.
        steps: How many steps in all; more than the decorator's extends a run.
        every: Snapshot after every this many steps.
        keep: How many snapshots to keep.
        fresh: Start over, ignoring existing snapshots (retention removes them).
        storage_options: Passed to fsspec with the URL.
        progress: Called after each step with (done, total, metrics).

    Returns:
        The final state, the number of steps done and the metric history.

    Raises:
        ResumableError: The configuration, state or storage is unusable.
    """
    if not isinstance(step, Step):
        msg = f"run() takes a @resumable.step function, not {step!r}."
        raise ConfigurationError(msg)
    settings = Settings.resolve(
        step, storage=storage, steps=steps, every=every, keep=keep, fresh=fresh
    )
    backend = Storage.open(settings.storage, storage_options)
    runtime = Runtime(step, settings, backend, progress)

    return runtime.run()


def load(
    step: Step[StateT],
    *,
    storage: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StateT:
    """
    Return the state of the newest verified snapshot of ``step``.

    Raises:
        NoSnapshotError: The storage holds no snapshot of this step.
        IncompatibleSnapshotError: Its snapshots do not fit this state.
    """
    settings = Settings.resolve(step, storage=storage)
    backend = Storage.open(settings.storage, storage_options, create=False)
    archive = Archive(backend, step.program)
    state = step.init()
    check_state(state, "init()")
    listing = archive.listing()
    archive.check_foreign(listing)
    loaded = archive.newest_verified(listing, schema(state))
    if loaded is None:
        msg = f"No snapshot of {step.program} at {settings.storage}."
        raise NoSnapshotError(msg)
    decode_snapshot(state, loaded.tree, loaded.buffers)

    return state


def list_snapshots(
    url: str, storage_options: dict[str, Any] | None = None
) -> list[tuple[Listed, str | None]]:
    """Return each committed snapshot at ``url``, newest first, and why it fails."""
    archive = Archive(Storage.open(url, storage_options, create=False), program="")
    rows = []
    for entry in archive.listing():
        problem = entry.problem
        if entry.manifest is not None:
            try:
                archive.read(entry.manifest)
            except (SnapshotError, StorageError) as err:
                problem = str(err)
        rows.append((entry, problem))

    return rows


class Runtime(Generic[StateT]):
    """One run of a step on one storage."""

    def __init__(
        self,
        step: Step[StateT],
        settings: Settings,
        storage: Storage,
        progress: Progress | None = None,
    ) -> None:
        self.step = step
        self.settings = settings
        self.archive = Archive(storage, step.program)
        self.progress = progress
        # The chain of snapshots this run continues, and its newest commit number.
        self.lineage = new_lineage()
        self.generation = 0
        # Stop after this many steps as if killed there; used by resumable.testing.
        self.stop_after: int | None = None

    def run(self) -> Result[StateT]:
        """
        Run the loop:

            state = init()
            if a snapshot verifies: restore state, RNGs and history from it
            prove that the state can be captured
            for step in done .. steps - 1:
                metrics = body(state, step); history.append(metrics)
                if (step + 1) % every == 0 or step + 1 == steps:
                    write the snapshot, commit its manifest, prune to keep
            return state, steps done, history
        """
        settings = self.settings
        logger.info(
            "run started: program=%s, storage=%s%s, steps=%d, every=%d, keep=%d",
            self.step.program,
            settings.storage,
            " (default, next to the script)" if settings.storage_is_default else "",
            settings.steps,
            settings.every,
            settings.keep,
        )
        state = self.step.init()
        check_state(state, f"init() of {self.step.program}")
        done, history = self._resume(state)
        check_capturable(state)
        if done >= settings.steps:
            logger.info("run already finished: step=%d, steps=%d", done, settings.steps)
        else:
            done = self._run_steps(state, done, history)

        return Result(state, done, history, settings.storage, settings.steps)

    def _resume(self, state: StateT) -> tuple[int, list[Metrics | None]]:
        listing = self.archive.listing()
        self.archive.check_foreign(listing)
        self.generation = max((entry.order[0] for entry in listing), default=0)
        for name in self.archive.storage.unrecognised():
            logger.warning("unrecognised entry left alone: name=%s", name)
        if self.settings.fresh and listing:
            logger.warning(
                "fresh start: ignoring %d snapshots, retention deletes them",
                len(listing),
            )
        loaded = None
        if not self.settings.fresh:
            loaded = self.archive.newest_verified(listing, schema(state))
        if loaded is not None:
            self.lineage = loaded.manifest.lineage
        elif not self.settings.fresh:
            self.lineage = self.archive.first_lineage()
        self._report_attempts()
        if loaded is None:
            return 0, []
        history = decode_snapshot(state, loaded.tree, loaded.buffers)
        logger.info(
            "resumed: step=%d, snapshot=%s, storage=%s",
            loaded.manifest.step,
            loaded.manifest.name,
            self.settings.storage,
        )
        # A run that ends without another commit still leaves the storage tidy.
        self.archive.remove_abandoned(self.lineage, self.generation)
        self.archive.prune(self.settings.keep)

        return loaded.manifest.step, history

    def _report_attempts(self) -> None:
        mine, foreign = self.archive.attempts(self.lineage)
        for name in mine:
            logger.info(
                "incomplete snapshot ignored: name=%s, step=%s",
                name,
                parse_snapshot_name(name),
            )
        for name in foreign:
            logger.warning(
                "uncommitted folder not of this run left alone: name=%s", name
            )

    def _run_steps(
        self, state: StateT, done: int, history: list[Metrics | None]
    ) -> int:
        settings = self.settings
        while done < settings.steps:
            history.append(self._run_one_step(state, done))
            done += 1
            if self.progress is not None:
                self.progress(done, settings.steps, history[-1])
            if done % settings.every == 0 or done == settings.steps:
                self._snapshot(state, done, history)
            if self.stop_after is not None and done >= self.stop_after:
                return done
        logger.info("run finished: step=%d, storage=%s", done, settings.storage)

        return done

    def _run_one_step(self, state: StateT, index: int) -> Metrics | None:
        started = time.perf_counter()
        metrics = _check_metrics(self.step(state, index), index)
        logger.debug(
            "step done: step=%d, seconds=%.3f, metrics=%s",
            index,
            time.perf_counter() - started,
            metrics,
        )
        return metrics

    def _snapshot(
        self, state: StateT, done: int, history: list[Metrics | None]
    ) -> None:
        started = time.perf_counter()
        self.generation += 1
        manifest = self.archive.write(
            done,
            (self.lineage, self.generation),
            schema(state),
            encode_snapshot(state, history),
        )
        logger.info(
            "snapshot committed: step=%d, size=%d, seconds=%.3f, name=%s",
            done,
            manifest.size,
            time.perf_counter() - started,
            manifest.name,
        )
        self.archive.remove_abandoned(self.lineage, self.generation)
        self.archive.prune(self.settings.keep)


def _first(given: int | None, variable: str, minimum: int, declared: int) -> int:
    """Return the argument, else the environment variable, else the declaration."""
    if given is not None:
        return given
    from_environment = _knobs.env_int(variable, minimum)
    return declared if from_environment is None else from_environment


def _check_metrics(metrics: object, index: int) -> Metrics | None:
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        msg = (
            f"Step {index} returned a {type(metrics).__name__}; a step returns None "
            "or a dict of metric names to numbers."
        )
        raise ConfigurationError(msg)
    checked = {}
    for key, value in metrics.items():
        # A loss tensor still attached to its graph warns when turned into a float.
        detach = getattr(value, "detach", None)
        try:
            if isinstance(value, str | bytes):
                raise TypeError
            number = float(detach() if callable(detach) else value)
        except (TypeError, ValueError, RuntimeError):
            msg = (
                f"Step {index} returned metric {key!r} = {value!r}; metric values "
                "must be numbers (a float, an int or a one-element tensor)."
            )
            raise ConfigurationError(msg) from None
        checked[str(key)] = number

    return checked
