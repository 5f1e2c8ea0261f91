"""
Writing the snapshots of one run: at once, in the training loop's time, or copied
into the staging arena and written in the background while training goes on.

Snapshots of the cadence go to the background (unless ``background`` is off); the
last one, and those at a stop, flush the background write in flight and are written
at once. Either way a write is ``Archive.write``, then the cleanup of abandoned
attempts and retention. The loop, its cadence and its stops stay in ``_runtime``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from resumable._archive import Archive
from resumable._distributed import Group
from resumable._parts import write_parts
from resumable._preemption import Preemption
from resumable._settings import Settings
from resumable._snapshot import Payload
from resumable._staging import Staged, Stager, staged_size
from resumable._state import Metrics, encode_snapshot, schema
from resumable._writer import BackgroundWriter

logger = logging.getLogger(__name__)

# The run's lineage id, the generation of a commit, that of the lineage's first.
Lineage = tuple[str, int, int]


class Saver:
    """The snapshot writes of one run, and the one in flight in the background."""

    def __init__(
        self,
        archive: Archive,
        settings: Settings,
        preemption: Preemption,
        group: Group | None = None,
    ) -> None:
        self.archive = archive
        # The job's ranks, where there are several: they write parts, in the
        # loop's time, and rank 0 commits.
        self.group = group
        self.settings = settings
        self.preemption = preemption
        self.stager = Stager()
        self.writer = BackgroundWriter(preemption.signals)
        # Steps done at the newest snapshot committed or loaded by this process.
        self.saved_at: int | None = None
        # Set at a stop: an arena still being prepared is not needed any more.
        self._stopping = threading.Event()
        # Set where the staging copy cannot be allocated: every write is blocking.
        self.in_loop = False

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """
        A run's block: at its end, wait for the write in flight and raise its
        failure; where the run raised, that error goes on, and a failure of the
        write is logged beside it.
        """
        try:
            yield
        except BaseException:
            try:
                self.writer.close()
            except Exception as err:  # the run's own error goes on
                logger.error("background write failed too: error=%s", err)
            raise
        else:
            self.writer.close()
        finally:
            self.stager.release()

    def prepare(self, state_bytes: int) -> None:
        """
        Allocate the staging arena in the background, before a snapshot needs it:
        touching fresh memory costs seconds a GiB on some machines.
        """
        if not (self.settings.background and state_bytes):
            return
        # A process that has set CUDA up holds tensors there: pinned memory.
        pinned = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        reserve = functools.partial(self._reserve, state_bytes, pinned)
        self.writer.submit(reserve, "staging arena")

    def _reserve(self, size: int, pinned: bool) -> None:
        try:
            self.stager.reserve(size, pinned=pinned, cancel=self._stopping)
        except (MemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            self._without_staging(size, err)

    def _without_staging(self, size: int, err: BaseException) -> None:
        """Write in the loop's time from now on: the staging copy does not fit."""
        self.stager.release()
        self.in_loop = True
        logger.warning(
            "staging memory not available, snapshots written in the loop's time: "
            "bytes=%d, error=%s (set RESUMABLE_BACKGROUND=0 to skip the attempt)",
            size,
            str(err).splitlines()[0],
        )

    def flush(self, *, stopping: bool = False) -> None:
        """
        Wait for the background write in flight; ``stopping``, the run stops, and
        an arena still being prepared is dropped rather than waited for.

        Raises:
            BaseException: A background write failed: its own exception, once.
        """
        if stopping:
            self._stopping.set()
        self.writer.flush()

    def save(
        self,
        state: Any,
        done: int,
        history: Sequence[Metrics | None],
        lineage: Lineage,
        resume: dict[str, Any] | None = None,
    ) -> None:
        """Write a snapshot now, once the background write in flight is done."""
        self.writer.flush()
        started = time.perf_counter()
        inside = None if resume is None else {k: resume[k] for k in ("loop", "item")}
        content = encode_snapshot(state, history, resume=resume)
        self._write(done, lineage, schema(state), inside, started, content)

    def save_in_background(
        self, state: Any, done: int, history: Sequence[Metrics | None], lineage: Lineage
    ) -> None:
        """
        Copy a snapshot into the staging arena and write it in the background.

        The loop waits for the write before, if it is still in flight: the arena
        holds one snapshot at a time.
        """
        self.writer.flush()
        if self.in_loop:
            self.save(state, done, history, lineage)
            return
        started = time.perf_counter()
        content = encode_snapshot(state, history, staged=True)
        try:
            staged = self.stager.stage(*content)
        except (MemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            self._without_staging(staged_size(content[1]), err)
            self.save(state, done, history, lineage)
            return
        logger.debug(
            "snapshot staged: step=%d, seconds=%.3f",
            done,
            time.perf_counter() - started,
        )
        write = functools.partial(
            self._write_staged, done, lineage, schema(state), started, staged
        )
        self.writer.submit(write, f"snapshot of step {done}")

    def _write_staged(
        self,
        done: int,
        lineage: Lineage,
        state_schema: dict[str, Any],
        started: float,
        staged: Staged,
    ) -> None:
        self._write(done, lineage, state_schema, None, started, staged.wait())

    def _write(
        self,
        done: int,
        lineage: Lineage,
        state_schema: dict[str, Any],
        inside: dict[str, int] | None,
        started: float,
        content: tuple[dict[str, Any], list[Any]] | Payload,
    ) -> None:
        arguments = self.settings.arguments
        listed = None if arguments is None else list(arguments)
        with self.preemption.deferred():
            if self.group is not None:
                assert not isinstance(content, Payload)  # never staged
                details = {
                    "schema": state_schema,
                    "inside_step": inside,
                    "arguments": listed,
                }
                manifest = write_parts(
                    self.archive, self.group, done, lineage, content, details
                )
            else:
                manifest = self.archive.write(
                    done, lineage, state_schema, content, inside, listed
                )
        seconds = time.perf_counter() - started
        self.preemption.record_write(seconds)
        self.saved_at = done if inside is None else None
        logger.info(
            "snapshot committed: step=%d%s, size=%d, seconds=%.3f, name=%s",
            done,
            describe_inside(inside),
            manifest.size,
            seconds,
            manifest.name,
        )
        if self.group is None or self.group.leads:
            self.archive.remove_abandoned(lineage[0], lineage[1])
            self.archive.prune(self.settings.keep)


def _out_of_memory(err: BaseException) -> bool:
    """Whether an allocation failed: Python's MemoryError, or torch's allocator."""
    return isinstance(err, MemoryError) or "allocate" in str(err)


def describe_inside(position: dict[str, int] | None) -> str:
    """Say where inside a step a snapshot was taken, for the log; empty at its end."""
    if position is None:
        return ""
    return f" (inside: loop={position['loop']}, item={position['item']})"
