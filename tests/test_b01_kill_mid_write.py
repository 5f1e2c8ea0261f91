"""
Case B01: a SIGKILL in the middle of a snapshot write.

A run with a ~20 MB state (an MLP with a wide hidden layer, Adam) snapshots after
every step; the write of snapshot 5 is throttled to about 2 s and the process is
killed when about half of its ``data.bin`` is on disk. The same command then runs to
step 10. The partial write must never be taken for a snapshot, the restart resumes
from snapshot 4 and ends bit-identical to an uninterrupted 10-step run, and the
killed write's folder is cleaned up.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from resumable._snapshot import MANIFEST_SUFFIX, parse_snapshot_name
from resumable._storage import Storage
from tests.conftest import import_script

harness = import_script("crash_harness")

pytestmark = pytest.mark.slow

KILLED_STEP = 5
# An MLP 8 -> 160000 -> 2 with Adam: about 21 MB of data.bin.
RUN = {"CRASH_STEPS": 10, "CRASH_EVERY": 1, "CRASH_KEEP": 3, "CRASH_HIDDEN": 160000}
# Snapshot 5 only is written in 1 MiB chunks, about 2 s in all.
THROTTLE = {
    "CRASH_CHUNK_BYTES": 2**20,
    "CRASH_CHUNK_SLEEP": 0.05,
    "CRASH_THROTTLE_STEPS": KILLED_STEP,
}


@attrs.define
class Scenario:
    """What the uninterrupted run and the killed-then-rerun run left."""

    reference_digest: dict[str, str]
    reference_checksums: dict[str, str]
    full_size: int
    killed: bool
    attempt: str
    size_at_kill: int
    committed_after_kill: list[int]
    unverified_after_kill: list[str]
    names_after_kill: set[str]
    rerun: Any
    rerun_rc: int | None
    digest: dict[str, str]
    checksums: dict[str, str]
    names_at_end: set[str]
    uncommitted_at_end: list[str]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    reference = harness.Run(tmp_path_factory.mktemp("reference"), RUN)
    finished = reference.run_to_end()
    assert finished.returncode == 0, finished.log()
    full = harness.full_data_size(reference)

    run = harness.Run(tmp_path_factory.mktemp("killed"), {**RUN, **THROTTLE})
    found: dict[str, int | str] = {}

    def half_of_snapshot_5_written() -> bool:
        for attempt in run.names():
            if parse_snapshot_name(attempt) == KILLED_STEP:
                size = harness.data_size(run, attempt)
                if full // 2 <= size < full:
                    found.update(attempt=attempt, size=size)
                    return True
        return False

    with run.start() as incarnation:
        killed = incarnation.kill_when(half_of_snapshot_5_written)
    committed_after_kill = harness.committed_steps(run)
    unverified_after_kill = harness.unverified(run)
    names_after_kill = run.names()
    rerun = run.run_to_end()
    return Scenario(
        reference_digest=reference.digest(),
        reference_checksums=harness.final_checksums(reference),
        full_size=full,
        killed=killed,
        attempt=str(found.get("attempt", "")),
        size_at_kill=int(found.get("size", -1)),
        committed_after_kill=committed_after_kill,
        unverified_after_kill=unverified_after_kill,
        names_after_kill=names_after_kill,
        rerun=rerun,
        rerun_rc=rerun.returncode,
        digest=run.digest() if rerun.returncode == 0 else {},
        checksums=harness.final_checksums(run),
        names_at_end=run.names(),
        uncommitted_at_end=Storage.open(run.storage).uncommitted(),
    )


def test_kill_lands_in_the_middle_of_snapshot_5(scenario: Scenario) -> None:
    """The SIGKILL hits snapshot 5's write with about half of data.bin on disk."""
    attempt = scenario.attempt
    expected = (True, True, False, True)

    actual = (
        scenario.killed,
        attempt in scenario.names_after_kill,
        attempt + MANIFEST_SUFFIX in scenario.names_after_kill,
        scenario.full_size // 2 <= scenario.size_at_kill < scenario.full_size,
    )

    assert expected == actual


def test_partial_write_is_not_listed(scenario: Scenario) -> None:
    """After the kill, only snapshots 2 to 4 are listed, and each one verifies."""
    expected: tuple[list[int], list[str]] = ([2, 3, 4], [])

    actual = (scenario.committed_after_kill, scenario.unverified_after_kill)

    assert expected == actual


def test_restart_resumes_from_snapshot_4(scenario: Scenario) -> None:
    """The restart resumes from snapshot 4, the newest complete one."""
    expected = 4

    actual = scenario.rerun.resumed_from()

    assert expected == actual


def test_restart_finishes_without_error(scenario: Scenario) -> None:
    """The restart exits 0 and no exception or error reaches the user."""
    log = scenario.rerun.log()
    expected = (0, False, False)

    actual = (scenario.rerun_rc, "Traceback" in log, "error" in log.lower())

    assert expected == actual


def test_final_state_equals_uninterrupted_run(scenario: Scenario) -> None:
    """The restarted run ends bit-identical to an uninterrupted 10-step run."""
    expected = (scenario.reference_digest, scenario.reference_checksums)

    actual = (scenario.digest, scenario.checksums)

    assert expected == actual


def test_killed_write_is_cleaned_up(scenario: Scenario) -> None:
    """The killed write's folder is gone, and no uncommitted folder remains."""
    expected: tuple[bool, list[str]] = (False, [])

    actual = (scenario.attempt in scenario.names_at_end, scenario.uncommitted_at_end)

    assert expected == actual


def test_restart_logs_the_incomplete_snapshot(scenario: Scenario) -> None:
    """The restart's log names the incomplete snapshot 5 that it ignored."""
    expected = True

    actual = scenario.attempt in scenario.rerun.log()

    assert expected == actual
