"""
The runtime: owns the loop, resume, snapshot cadence and retention.

It alone brings together the step declaration, state capture, the snapshot format
and the storage.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import attrs

from resumable._archive import Archive
from resumable._ddp import pin_buckets
from resumable._distributed import Group, joined
from resumable._iterate import (
    Position,
    Preempted,
    Replay,
    StepContext,
    run_in_context,
    shut_down_workers,
)
from resumable._lease import Lease
from resumable._parts import check_shared_storage
from resumable._preemption import Preemption
from resumable._resume import Resuming
from resumable._rng import find_generators
from resumable._saving import Saver
from resumable._settings import Settings
from resumable._signals import StopRequest
from resumable._snapshot import new_lineage
from resumable._state import (
    Metrics,
    check_capturable,
    check_metrics,
    check_state,
)
from resumable._step import Step
from resumable._storage import Storage
from resumable.errors import (
    ConfigurationError,
)

logger = logging.getLogger(__name__)

StateT = TypeVar("StateT")
# Called after each step with (steps done, steps in all, that step's metrics).
Progress = Callable[[int, int, "Metrics | None"], None]


@attrs.define
class Result(Generic[StateT]):
    """What a run ends with."""

    state: StateT
    step: int
    history: list[Metrics | None]
    storage: str
    steps: int
    preempted: bool = False

    @property
    def finished(self) -> bool:
        return self.step >= self.steps and not self.preempted


def run(
    step: Step[StateT],
    *,
    storage: str | None = None,
    steps: int | None = None,
    every: int | None = None,
    keep: int | None = None,
    fresh: bool = False,
    grace: float | None = None,
    signals: Sequence[str] | None = None,
    preempted_exit_code: int | None = None,
    max_attempts: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    background: bool | None = None,
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
        grace: Seconds from a stop signal to the kill that follows it.
        signals: Names of further signals that stop the run, besides SIGTERM,
            SIGINT and SIGUSR1.
        preempted_exit_code: The exit code the CLI gives a preempted run.
        max_attempts: Starts from one snapshot before the run counts as stuck.
        storage_options: Passed to fsspec with the URL, over the decorator's and
            RESUMABLE_STORAGE_OPTIONS, key by key.
        progress: Called after each step with (done, total, metrics).
        background: Write the snapshots of the cadence in the background (the
            default; RESUMABLE_BACKGROUND=0 turns it off), the loop paying for a
            copy of the state; the last one and those at a stop are written at once.

    Returns:
        The final state, the number of steps done, the metric history, and
        whether a stop request ended the run early.

    Raises:
        ResumableError: The configuration, state or storage is unusable.
    """
    if not isinstance(step, Step):
        msg = f"run() takes a @resumable.step function, not {step!r}."
        raise ConfigurationError(msg)
    settings = Settings.resolve(
        step,
        storage=storage,
        steps=steps,
        every=every,
        keep=keep,
        fresh=fresh,
        grace=grace,
        signals=signals,
        preempted_exit_code=preempted_exit_code,
        max_attempts=max_attempts,
        storage_options=storage_options,
        background=background,
    )
    return run_with(step, settings, progress=progress)


def run_with(
    step: Step[StateT],
    settings: Settings,
    *,
    progress: Progress | None = None,
    stop: StopRequest | None = None,
) -> Result[StateT]:
    """Run with resolved settings; ``stop`` carries a request made before the run."""
    with joined() as group:
        if group is not None and settings.background:
            # Every rank's part must be durable before rank 0 commits: the
            # parts are written in the loop's time (see the README's Limitations).
            settings = attrs.evolve(settings, background=False)
        backend = Storage.open(settings.storage, settings.storage_options)
        backend.check_writable()
        runtime = Runtime(step, settings, backend, progress, stop, group)
        return runtime.run()


class Runtime(Resuming[StateT]):
    """One run of a step on one storage."""

    def __init__(
        self,
        step: Step[StateT],
        settings: Settings,
        storage: Storage,
        progress: Progress | None = None,
        stop: StopRequest | None = None,
        group: Group | None = None,
    ) -> None:
        self.step = step
        # The job's ranks where it runs as many processes (torchrun), else None.
        self.group = group
        self.settings = settings
        # This process's incarnation of the run: its claim fences older ones.
        self.lease = Lease(storage)
        self.archive = Archive(storage, step.program, self.lease)
        self.archive.world_size = group.world_size if group else 1
        self.progress = progress
        self.preemption = Preemption(settings, stop)
        # The start marker this run wrote into the snapshot it resumed from.
        self.start_marker: tuple[str, str] | None = None
        # The chain of snapshots this run continues, its newest commit number and
        # that of its first commit.
        self.lineage = new_lineage()
        self.generation = 0
        self.lineage_start = 1
        # Writes the snapshots, in the background or at once.
        self.saver = Saver(self.archive, settings, self.preemption, group)
        # The snapshot this run resumed from, where it resumed.
        self.loaded_name: str | None = None
        # Whether the step's body has run resumable.iterate loops (None before
        # the first step): then the RNG states at each step's start are kept.
        self.loops_seen: bool | None = None
        # Stop after this many steps as if killed there; used by resumable.testing.
        self.stop_after: int | None = None

    def run(self) -> Result[StateT]:
        """
        Run the loop:

            catch stop signals (a handler only sets a flag)
            state = init()
            if a snapshot verifies: restore state, RNGs and history from it
            claim the next incarnation of the run (it fences older ones)
            prove that the state can be captured
            for step in done .. steps - 1:
                if a stop was requested: wait for the background write,
                    snapshot if the grace allows, exit
                metrics = body(state, step), replayed up to where a snapshot
                    inside it was taken; at each resumable.iterate item, a stop
                    request waits for the background write, snapshots inside
                    the step and exits
                history.append(metrics)
                if a snapshot is due, or a background write failed: wait for
                    the background write (back-pressure), raise its failure
                if a stop was requested: snapshot if the grace allows, exit
                if step + 1 == steps: write the snapshot now
                elif (step + 1) % every == 0: copy the state into the staging
                    arena, write it in the background
                each write: unless a newer incarnation claimed the run since,
                    commit its manifest, then prune to keep
            wait for the background write; raise its failure
            return state, steps done, history, whether preempted
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
        self.step.expose_script()
        if self.group is not None:
            check_shared_storage(self.archive, self.group)
            logger.info(
                "ranks joined: world_size=%d, storage shared", self.group.world_size
            )
        with self.preemption, _workers_shut_down(), self.saver.running():
            state = self.step.init()
            check_state(state, f"init() of {self.step.program}")
            done, history, replay = self._resume_ranks(state)
            if self.group is not None:
                pin_buckets(state)
            self.preemption.state_bytes = check_capturable(state)
            if done >= settings.steps and replay is None:
                logger.info(
                    "run already finished: step=%d, steps=%d", done, settings.steps
                )
            else:
                if (done // settings.every + 1) * settings.every < settings.steps:
                    # A snapshot of the cadence comes before the last one.
                    self.saver.prepare(self.preemption.state_bytes)
                done = self._run_steps(state, done, history, replay)
        result = Result(state, done, history, settings.storage, settings.steps)
        result.preempted = self.preemption.preempted
        if result.preempted and self.start_marker is not None:
            # A stop asked for is no failure: only starts that end otherwise
            # count towards max_attempts.
            self.archive.storage.delete_object(*self.start_marker)

        return result

    def _run_steps(
        self,
        state: StateT,
        done: int,
        history: list[Metrics | None],
        replay: Replay | None,
    ) -> int:
        settings = self.settings
        generators = find_generators(state)
        first = True
        while done < settings.steps:
            # With many ranks, the agreement after each step covers this one.
            if (first or self.group is None) and self._stop_agreed():
                self._stop_between_steps(state, done, history)
                return done
            try:
                metrics = self._run_one_step(state, done, history, generators, replay)
            except Preempted:
                return done
            replay, first = None, False
            history.append(metrics)
            done += 1
            self.lease.check_now_and_then("train on")
            due = done % settings.every == 0 or done == settings.steps
            if due or self.saver.writer.failed:
                # Back-pressure, and a background write's failure raised as soon
                # as it is known; a stop asked for meanwhile is seen below. Before
                # progress: what it reports is committed, as without the writer.
                self.saver.flush()
            if self.progress is not None:
                self.progress(done, settings.steps, history[-1])
            if self._stop_agreed():
                self._stop_between_steps(state, done, history)
                return done
            if due:
                self._snapshot(state, done, history)
            if self.stop_after is not None and done >= self.stop_after:
                # A kill as resumable.testing simulates it: after the snapshot of
                # this step is committed (run() waits for a background write).
                return done
        logger.info("run finished: step=%d, storage=%s", done, settings.storage)

        return done

    def _run_one_step(
        self,
        state: StateT,
        index: int,
        history: list[Metrics | None],
        generators: list[Any],
        replay: Replay | None,
    ) -> Metrics | None:
        started = time.perf_counter()

        def safe_point(context: StepContext, position: Position) -> None:
            self.preemption.check_simulated(index, position.loop, position.item)
            if self._stop_agreed():
                self._stop_inside_step(state, context, position, history)

        context = StepContext(
            index,
            generators,
            safe_point,
            replay,
            expect_loops=self.loops_seen is not False,
        )
        returned = run_in_context(context, lambda: self.step(state, index))
        # Once a step has used loops, every later step keeps its start's RNGs.
        self.loops_seen = bool(self.loops_seen) or context.used_loops
        metrics = check_metrics(returned, index)
        self.preemption.check_simulated(index, None, None)
        logger.debug(
            "step done: step=%d, seconds=%.3f, metrics=%s",
            index,
            time.perf_counter() - started,
            metrics,
        )
        return metrics

    def _stop_agreed(self) -> bool:
        """
        Say whether to stop here; with many ranks, every rank says the same, at
        the cost of one small all-reduce.
        """
        requested = self.preemption.requested
        if self.group is None:
            return requested
        asking = self.group.agree_stop(requested)
        if asking is not None and not requested:
            self.preemption.stop_for_rank(asking)

        return asking is not None

    def _stop_between_steps(
        self, state: StateT, done: int, history: list[Metrics | None]
    ) -> None:
        self.preemption.preempted = True
        # The write in flight counts against the grace period: the watchdog
        # bounds the wait, and the final snapshot's budget is what is left.
        self.saver.flush(stopping=True)
        if self.saver.saved_at == done:
            outcome = "snapshot already committed"
        elif done == 0:
            outcome = "nothing to save before the first step"
        else:
            outcome = self._final_snapshot(state, done, history, None)
        if self.saver.saved_at == done == self.settings.steps:
            # The stop came during the last step, and its snapshot is committed.
            self.preemption.preempted = False
            logger.info(
                "run finished: step=%d, storage=%s", done, self.settings.storage
            )
            return
        logger.info(
            "preempted: cause=%s, step=%d, %s, seconds=%.2f",
            self.preemption.cause(),
            done,
            outcome,
            self.preemption.stop.elapsed(),
        )

    def _stop_inside_step(
        self,
        state: StateT,
        context: StepContext,
        position: Position,
        history: list[Metrics | None],
    ) -> None:
        self.preemption.preempted = True
        self.saver.flush(stopping=True)
        resume = {
            "loop": position.loop,
            "item": position.item,
            "rngs": list(context.rngs),
        }
        outcome = self._final_snapshot(state, context.index, history, resume)
        logger.info(
            "preempted: cause=%s, step=%d, loop=%d, item=%d, %s, seconds=%.2f",
            self.preemption.cause(),
            context.index,
            position.loop,
            position.item,
            outcome,
            self.preemption.stop.elapsed(),
        )
        raise Preempted

    def _final_snapshot(
        self,
        state: StateT,
        done: int,
        history: list[Metrics | None],
        resume: dict[str, Any] | None,
    ) -> str:
        fits, reason = self.preemption.write_fits()
        if self.group is not None and not self.group.all_agree(fits, "the budget"):
            fits, reason = False, f"{reason}, on this rank or another"
        if not fits:
            logger.warning(
                "final snapshot skipped: %s; the newest committed one stays", reason
            )
            return f"snapshot skipped ({reason})"
        self._snapshot(state, done, history, resume, now=True)
        return f"snapshot committed ({reason})"

    def _snapshot(
        self,
        state: StateT,
        done: int,
        history: list[Metrics | None],
        resume: dict[str, Any] | None = None,
        *,
        now: bool = False,
    ) -> None:
        self.generation += 1
        lineage = (self.lineage, self.generation, self.lineage_start)
        # The last snapshot, and one at a stop, must be durable before the run
        # ends: they are written now.
        now = now or done == self.settings.steps
        if self.settings.background and not now:
            self.saver.save_in_background(state, done, history, lineage)
        else:
            self.saver.save(state, done, history, lineage, resume)


@contextlib.contextmanager
def _workers_shut_down() -> Iterator[None]:
    try:
        yield
    finally:
        shut_down_workers()
