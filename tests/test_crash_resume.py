"""
Exact replay under SIGKILL: a real training process is killed at random moments
(inside a step, right after a commit, in the middle of a snapshot write, during
start-up) and the same command is run again until it finishes. The end state must be
bit-identical to an uninterrupted run, and the storage must never list a snapshot
that does not verify.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from resumable._snapshot import parse_snapshot_name
from resumable._storage import Storage
from tests.conftest import import_script

harness = import_script("crash_harness")

pytestmark = pytest.mark.slow

STEPS = 24
KEEP = 2
STEP_SLEEP = 0.03
# What makes the run: equal in the reference and in the killed runs.
RUN = {
    "CRASH_STEPS": STEPS,
    "CRASH_KEEP": KEEP,
    "CRASH_BALLAST_MB": 4,
    "CRASH_BALLAST_PARTS": 4,
}
# Pacing only: slow steps and slow writes give the kills room to land.
PACING = {
    "CRASH_STEP_SLEEP": STEP_SLEEP,
    "CRASH_CHUNK_BYTES": 256 * 1024,
    "CRASH_CHUNK_SLEEP": 0.006,
}
# Where each incarnation is killed; shuffled by each scenario's seed.
KILLS = ["step", "step", "write", "write", "commit", "random", "launch"]


@attrs.define
class Reference:
    digest: dict[str, str]
    checksums: dict[str, str]
    data_size: int


@attrs.define
class Observed:
    """What a killed-and-rerun scenario saw, for the tests to judge."""

    every: int
    kills: list[str] = attrs.Factory(list)
    exited_before_kill: list[tuple[str, int | None]] = attrs.Factory(list)
    mid_write: list[str] = attrs.Factory(list)
    unverified: list[list[str]] = attrs.Factory(list)
    unrecognised: list[list[str]] = attrs.Factory(list)
    # (newest committed step when an incarnation started, step it resumed from)
    resumes: list[tuple[int | None, int | None]] = attrs.Factory(list)
    final_rc: int | None = None
    digest: dict[str, str] = attrs.Factory(dict)
    checksums: dict[str, str] = attrs.Factory(dict)
    committed: list[int] = attrs.Factory(list)
    uncommitted: list[str] = attrs.Factory(list)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    run = harness.Run(tmp_path_factory.mktemp("reference"), RUN)
    finished = run.run_to_end()
    assert finished.returncode == 0, finished.log()
    return Reference(
        run.digest(), harness.final_checksums(run), harness.full_data_size(run)
    )


def _kill_event(
    kind: str, incarnation: Any, rng: random.Random, full: int, found: dict[str, Any]
) -> Callable[[], bool]:
    """
    Return the condition on which to kill ``incarnation``, for a kind of kill.

    A "write" kill puts the name of the folder it hits into ``found["attempt"]``.
    """
    started = time.monotonic()
    marks: dict[str, float] = {}

    def after_step_starts(count: int, delay: float) -> Callable[[], bool]:
        def event() -> bool:
            if "at" not in marks and incarnation.steps_started() >= count:
                marks["at"] = time.monotonic()
            return "at" in marks and time.monotonic() >= marks["at"] + delay

        return event

    if kind == "step":
        # Inside the count-th step of this incarnation, at a random moment of it.
        return after_step_starts(rng.randint(1, 3), rng.uniform(0, STEP_SLEEP))
    if kind == "random":
        return after_step_starts(1, rng.uniform(0, 0.4))
    if kind == "launch":
        delay = rng.uniform(0.2, 1.5)
        return lambda: time.monotonic() >= started + delay
    if kind == "commit":
        # Right after a new snapshot is committed: between two steps.
        return lambda: bool(incarnation.new_commits())
    assert kind == "write"
    target, fraction = rng.randint(1, 2), rng.uniform(0.1, 0.8)
    folders: list[str] = []

    def mid_write() -> bool:
        # Judged by data.bin's size alone, committed or not: a snapshot committed
        # before its payload is complete must be caught, not skipped.
        for folder in incarnation.new_folders():
            if folder not in folders:
                folders.append(folder)
        for folder in folders[target - 1 :]:
            if fraction * full <= harness.data_size(incarnation.run, folder) < full:
                found["attempt"] = folder
                return True
        return False

    return mid_write


def _after(run: Any, incarnation: Any, newest: int | None, seen: Observed) -> None:
    """Record the storage's invariants once an incarnation is dead."""
    seen.unverified.append(harness.unverified(run))
    seen.unrecognised.append(Storage.open(run.storage).unrecognised())
    resumed = incarnation.resumed_from()
    if resumed is not None or incarnation.steps_started() > 0:
        seen.resumes.append((newest, resumed))


@pytest.fixture(
    scope="module",
    params=[(1, 101), (3, 202)],
    ids=["every-1", "every-3"],
)
def killed(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    reference: Reference,
) -> Observed:
    """Kill a run once for each entry of KILLS, then run it to the end."""
    every, seed = request.param
    rng = random.Random(seed)
    kills = list(KILLS)
    rng.shuffle(kills)
    run = harness.Run(
        tmp_path_factory.mktemp(f"killed-every-{every}"),
        {**RUN, **PACING, "CRASH_EVERY": every},
    )
    seen = Observed(every)
    for kind in kills:
        newest = harness.newest_step(run)
        found: dict[str, Any] = {}
        with run.start() as incarnation:
            event = _kill_event(kind, incarnation, rng, reference.data_size, found)
            if incarnation.kill_when(event):
                seen.kills.append(kind)
            else:
                seen.exited_before_kill.append((kind, incarnation.returncode))
        if kind == "write":
            attempt = found.get("attempt")
            size = harness.data_size(run, attempt) if attempt else -1
            if 0 <= size < reference.data_size:
                seen.mid_write.append(str(attempt))
        _after(run, incarnation, newest, seen)
    newest = harness.newest_step(run)
    final = run.run_to_end()
    _after(run, final, newest, seen)
    seen.final_rc = final.returncode
    if final.returncode == 0:
        seen.digest = run.digest()
        seen.checksums = harness.final_checksums(run)
    seen.committed = harness.committed_steps(run)
    seen.uncommitted = Storage.open(run.storage).uncommitted()
    return seen


def test_every_planned_kill_landed(killed: Observed) -> None:
    """Each planned SIGKILL hits a live run, and each mid-write kill hits a write."""
    expected: tuple[list[str], list[object], int]
    expected = (sorted(KILLS), [], KILLS.count("write"))

    actual = (sorted(killed.kills), killed.exited_before_kill, len(killed.mid_write))

    assert expected == actual


def test_rerun_after_kills_finishes(killed: Observed) -> None:
    """The same command, run again after any number of SIGKILLs, exits 0."""
    expected = 0

    actual = killed.final_rc

    assert expected == actual


def test_final_state_is_bit_identical(killed: Observed, reference: Reference) -> None:
    """A run killed many times ends with the uninterrupted run's exact state."""
    expected = reference.digest

    actual = killed.digest

    assert expected == actual


def test_final_snapshot_is_bit_identical(
    killed: Observed, reference: Reference
) -> None:
    """The last snapshot (state, RNGs, history) equals the uninterrupted run's."""
    expected = reference.checksums

    actual = killed.checksums

    assert expected == actual


def test_no_partial_snapshot_is_ever_listed(killed: Observed) -> None:
    """After every kill, each listed snapshot reads back and verifies."""
    expected: list[list[str]] = [[]] * (len(KILLS) + 1)

    actual = killed.unverified

    assert expected == actual


def test_no_stray_files_after_kills(killed: Observed) -> None:
    """A kill never leaves a file outside the snapshot and attempt folders."""
    expected: list[list[str]] = [[]] * (len(KILLS) + 1)

    actual = killed.unrecognised

    assert expected == actual


def test_each_restart_resumes_from_newest_committed(killed: Observed) -> None:
    """Every restart resumes from the newest committed snapshot at its start."""
    expected = [(newest, newest) for newest, _ in killed.resumes]

    actual = killed.resumes

    assert expected == actual
    assert any(newest is not None for newest, _ in killed.resumes)


def test_retention_holds_newest_snapshots(killed: Observed) -> None:
    """At the end, exactly the newest ``keep`` snapshots of the cadence remain."""
    cadence = [
        step
        for step in range(1, STEPS + 1)
        if step % killed.every == 0 or step == STEPS
    ]
    expected = cadence[-KEEP:]

    actual = killed.committed

    assert expected == actual


def test_no_abandoned_attempts_remain(killed: Observed) -> None:
    """Attempt folders of killed writes are gone once the run has finished."""
    expected: list[str] = []

    actual = killed.uncommitted

    assert expected == actual


def _kill_in_write_of(run: Any, step: int, full: int) -> str:
    """Start an incarnation, SIGKILL it with half of snapshot ``step`` written."""
    found: list[str] = []

    def half_written() -> bool:
        for attempt in run.names():
            size = harness.data_size(run, attempt)
            if parse_snapshot_name(attempt) == step and full // 2 <= size < full:
                found.append(attempt)
                return True
        return False

    with run.start() as incarnation:
        assert incarnation.kill_when(half_written), incarnation.log()
    return found[0]


# A short run whose every write takes about 0.2 s.
SHORT = {**RUN, **PACING, "CRASH_STEPS": 3, "CRASH_CHUNK_SLEEP": 0.012}


def test_write_killed_before_first_commit_is_cleaned_up(
    tmp_path: Path, reference: Reference
) -> None:
    """A write killed before any snapshot exists is cleaned up by the rerun."""
    run = harness.Run(tmp_path, SHORT)
    attempt = _kill_in_write_of(run, 1, reference.data_size)
    finished = run.run_to_end()
    expected: tuple[int, list[str]] = (0, [])

    actual = (finished.returncode, Storage.open(run.storage).uncommitted())

    assert expected == actual, f"killed write: {attempt}\n{finished.log()}"


def test_write_killed_before_final_commit_is_cleaned_up(
    tmp_path: Path, reference: Reference
) -> None:
    """A killed write of the last snapshot is cleaned up even if the run ends."""
    # The retry of the last snapshot dies between its commit and the cleanup;
    # the next incarnation finds the run finished.
    run = harness.Run(tmp_path, {**SHORT, "CRASH_EXIT_AFTER_COMMIT": 3})
    attempt = _kill_in_write_of(run, 3, reference.data_size)
    retried = run.run_to_end()
    finished = run.run_to_end()
    expected: tuple[int, int, list[str]] = (137, 0, [])

    actual = (
        retried.returncode,
        finished.returncode,
        Storage.open(run.storage).uncommitted(),
    )

    assert expected == actual, f"killed write: {attempt}\n{finished.log()}"


# Background writes: a periodic snapshot is written while the next step runs.
# Every write takes about 0.2 s, steps 0.03 s; the rerun runs unpaced.
BACKGROUND = {**RUN, **PACING, "CRASH_CHUNK_SLEEP": 0.012}


def _in_background(
    run: Any, incarnation: Any, full: int, found: list[int]
) -> Callable[[], bool]:
    """
    A condition: a snapshot's data.bin is partly written while a later step
    runs; its step goes into ``found``.
    """

    def event() -> bool:
        for attempt in incarnation.new_folders():
            step = parse_snapshot_name(attempt)
            size = harness.data_size(run, attempt)
            started = incarnation.steps_started()
            if step is not None and 0 < size < full and started > step:
                found.append(step)
                return True
        return False

    return event


def _rerun_unpaced(run: Any) -> Any:
    """Run the same command to its end, without the pacing (no part of the state)."""
    for key in PACING:
        run.env.pop(key, None)
    return run.run_to_end()


def test_kill_during_a_background_write_leaves_nothing_torn(
    tmp_path: Path, reference: Reference
) -> None:
    """A SIGKILL while a snapshot is written in the background: the rerun is exact."""
    run = harness.Run(tmp_path, BACKGROUND)
    with run.start() as incarnation:
        landed = incarnation.kill_when(
            _in_background(run, incarnation, reference.data_size, [])
        )
    listed = harness.unverified(run)
    finished = _rerun_unpaced(run)
    expected: tuple[object, ...] = (True, [], 0, [], [])

    actual = (
        landed,
        listed,
        finished.returncode,
        harness.unverified(run),
        Storage.open(run.storage).uncommitted(),
    )

    assert expected == actual, finished.log()
    assert reference.digest == run.digest()


def test_sigterm_during_a_background_write_commits_it_then_stops(
    tmp_path: Path, reference: Reference
) -> None:
    """
    A SIGTERM while a snapshot is written in the background: it commits, the
    step that runs meanwhile ends with a snapshot of its own, the process exits 1,
    and the rerun resumes there and ends exact.
    """
    run = harness.Run(tmp_path, BACKGROUND)
    found: list[int] = []
    with run.start() as incarnation:
        event = _in_background(run, incarnation, reference.data_size, found)
        deadline = time.monotonic() + harness.PATIENCE
        while not event() and time.monotonic() < deadline:
            time.sleep(harness.POLL)
        incarnation.process.send_signal(signal.SIGTERM)
        code = incarnation.wait()
    [in_flight] = found
    stopped = harness.newest_step(run)
    finished = _rerun_unpaced(run)
    expected: tuple[object, ...] = (1, True, True, stopped, 0, [])

    actual = (
        code,
        in_flight in incarnation.committed_steps(),
        stopped is not None and stopped > in_flight,
        finished.resumed_from(),
        finished.returncode,
        harness.unverified(run),
    )

    assert expected == actual, incarnation.log()
    assert reference.digest == run.digest()
