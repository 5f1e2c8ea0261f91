"""
Safe points inside a step: ``resumable.iterate`` and the replay of a step that a
snapshot interrupted.

A snapshot taken inside a step records which ``iterate`` loop of the step was
running, how many of its items were done, and the RNG states at the start of the
step and of each loop. On resume the step body runs again from its start with those
RNG states; loops finished before the snapshot yield nothing, the interrupted one
rebuilds its iterator in the same order and skips the items done, and then the
state and RNGs are put back as the snapshot had them.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import signal
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import attrs
import torch

from resumable._rng import capture_rngs, restore_rngs
from resumable.errors import ConfigurationError, IncompatibleSnapshotError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CURRENT: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "resumable_step", default=None
)


class Preempted(BaseException):
    """Unwinds a step after a snapshot at a safe point inside it."""


@attrs.frozen
class Position:
    """Where inside a step a snapshot was taken: the loop's ordinal and items done."""

    loop: int
    item: int


@attrs.define
class Replay:
    """What a resume needs to replay an interrupted step up to where it was."""

    position: Position
    rngs: list[dict[str, Any]]
    restore: Callable[[], None]
    done: bool = False


class StepContext:
    """The runtime's view of one running step, for ``iterate`` to talk to."""

    def __init__(
        self,
        index: int,
        generators: list[Any],
        safe_point: Callable[[StepContext, Position], None],
        replay: Replay | None = None,
        *,
        expect_loops: bool = True,
    ) -> None:
        self.index = index
        self.generators = generators
        self._safe_point = safe_point
        self.replay = replay
        # Whether an iterate loop of this step is running.
        self.active = False
        # RNG states at the start of the step, then at the start of each loop.
        # Capturing them costs tens of microseconds, so a step whose body has
        # not used iterate before takes the first loop's start for the step's.
        self.rngs: list[dict[str, Any]] = []
        if replay is not None:
            restore_rngs(replay.rngs[0], generators)
            self.rngs.append(replay.rngs[0])
        elif expect_loops:
            self.rngs.append(capture_rngs(generators))

    @property
    def used_loops(self) -> bool:
        return len(self.rngs) > 1

    def enter_loop(self) -> tuple[int, int | None]:
        """Start a loop; return its ordinal and how many items to skip (None: all)."""
        if not self.rngs:
            self.rngs.append(capture_rngs(self.generators))
        ordinal = len(self.rngs) - 1
        replay = self.replay
        if replay is None or replay.done:
            self.rngs.append(capture_rngs(self.generators))
            return ordinal, 0
        restore_rngs(replay.rngs[ordinal + 1], self.generators)
        self.rngs.append(replay.rngs[ordinal + 1])
        if ordinal < replay.position.loop:
            return ordinal, None
        return ordinal, replay.position.item

    def resume_here(self) -> None:
        """Put the snapshot's state and RNGs back, now that the loop has skipped."""
        if self.replay is not None and not self.replay.done:
            self.replay.restore()
            self.replay.done = True
            logger.debug("step replayed: step=%d", self.index)

    def after_item(self, ordinal: int, item: int) -> None:
        self._safe_point(self, Position(ordinal, item))

    def check_finished(self) -> None:
        """Refuse a step that ended without reaching where the snapshot was taken."""
        if self.replay is not None and not self.replay.done:
            msg = (
                f"The snapshot was taken inside loop {self.replay.position.loop} of "
                f"step {self.index}, after item {self.replay.position.item}, but the "
                "step ended without reaching that loop again. The step's code has "
                "changed; start over with --fresh."
            )
            raise IncompatibleSnapshotError(msg)


def iterate(iterable: Iterable[T]) -> Iterator[T]:
    """
    Iterate with a safe point after each item, where a stop request snapshots.

    Outside a run (a step called as a plain function) it is plain iteration.
    A resumed step skips the items done before the snapshot, without loading
    them where the iterable allows (sequences, DataLoaders over map-style data),
    so values that must survive a snapshot inside a step belong on the state.

    Args:
        iterable: A DataLoader, sampler, sequence or any other iterable; it must
            give the same items in the same order when made again from the same
            state and RNGs.

    Yields:
        The items of ``iterable``.
    """
    context = _CURRENT.get()
    if context is None:
        yield from iterable
        return
    if context.active:
        msg = (
            "resumable.iterate loops cannot be nested: a snapshot records one "
            "position in one loop. Use it for one of the loops only."
        )
        raise ConfigurationError(msg)
    ordinal, skip = context.enter_loop()
    if skip is None:
        return
    context.active = True
    try:
        iterator = _start(iterable, skip, context)
        if context.replay is not None and not context.replay.done:
            context.resume_here()
        done = skip
        for item in iterator:
            yield item
            done += 1
            context.after_item(ordinal, done)
    finally:
        context.active = False


def _start(iterable: Iterable[T], skip: int, context: StepContext) -> Iterator[T]:
    if isinstance(iterable, torch.utils.data.DataLoader):
        return _start_loader(iterable, skip, context)
    iterator = iter(iterable)
    if skip:
        # Sequences skip without work; other iterables make the items again.
        next(itertools.islice(iterator, skip - 1, None), None)
    return iterator


def _start_loader(
    loader: torch.utils.data.DataLoader[Any], skip: int, context: StepContext
) -> Iterator[Any]:
    _prepare_loader(loader, context)
    iterator = iter(loader)
    sampler = getattr(iterator, "_sampler_iter", None)
    if not skip:
        return iterator
    # Only the main process's RNGs are put back after the skip: batches made by
    # workers must be made again, or the workers' random streams would differ.
    by_index = (
        loader.num_workers == 0
        and not isinstance(loader.dataset, torch.utils.data.IterableDataset)
        and sampler is not None
        and hasattr(iterator, "_num_yielded")
    )
    if not by_index:
        logger.debug("loader skipped by loading: items=%d", skip)
        next(itertools.islice(iterator, skip - 1, None), None)
        return iterator
    skipped = 0
    for _ in itertools.islice(sampler, skip):  # type: ignore[arg-type]  # checked above
        skipped += 1
    iterator._num_yielded += skipped
    return iterator


def _prepare_loader(
    loader: torch.utils.data.DataLoader[Any], context: StepContext
) -> None:
    if loader.num_workers > 0:
        _LOADERS_WITH_WORKERS.add(loader)
        if not isinstance(loader.worker_init_fn, _IgnoreStopSignals):
            loader.worker_init_fn = _IgnoreStopSignals(loader.worker_init_fn)
        if loader.persistent_workers and getattr(loader, "_iterator", None):
            # Persistent workers carry random streams from earlier epochs that a
            # resumed process cannot have: new workers make every epoch replayable.
            loader._iterator = None
    generator = loader.generator
    if generator is not None and not any(generator is g for g in context.generators):
        logger.warning(
            "loader order not replayable: the DataLoader's generator is not on the "
            "state; put it in a state field so resume restores it"
        )


# Loaders whose workers ignore stop signals: shut down at a run's end, since at
# interpreter exit multiprocessing would SIGTERM them and wait for ever.
_LOADERS_WITH_WORKERS: weakref.WeakSet[torch.utils.data.DataLoader[Any]] = (
    weakref.WeakSet()
)


def shut_down_workers() -> None:
    """Stop the workers that loaders used by ``iterate`` keep between epochs."""
    for loader in list(_LOADERS_WITH_WORKERS):
        iterator = getattr(loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        loader._iterator = None
    _LOADERS_WITH_WORKERS.clear()


class _IgnoreStopSignals:
    """A worker_init_fn: workers leave stop signals to the main process."""

    def __init__(self, wrapped: Callable[[int], None] | None) -> None:
        self.wrapped = wrapped

    def __call__(self, worker_id: int) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)
        if self.wrapped is not None:
            self.wrapped(worker_id)


def run_in_context(context: StepContext, body: Callable[[], T]) -> T:
    """Run ``body`` with ``context`` as the running step of ``iterate``."""
    token = _CURRENT.set(context)
    try:
        result = body()
    finally:
        _CURRENT.reset(token)
    context.check_finished()
    return result
