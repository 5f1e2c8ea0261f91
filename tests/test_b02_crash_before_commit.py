"""
Case B02: a crash after a snapshot's payload is fully written, before its commit.

The training script replaces the commit of snapshot 7, and later of snapshot 9, with
``os._exit(137)``, once each, so the payload of that snapshot lies complete on disk
with no manifest. The same command is run again after each crash and finally runs
to step 12. Each restart must resume from the last committed snapshot (6, then 8),
save 7 and 9 anew without complaint, never pick the uncommitted payload, and end
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from resumable._snapshot import DATA_OBJECT, INDEX_OBJECT, parse_snapshot_name
from resumable._storage import Storage
from tests.conftest import import_script

harness = import_script("crash_harness")

pytestmark = pytest.mark.slow

RUN = {
    "CRASH_STEPS": 12,
    "CRASH_EVERY": 1,
    "CRASH_KEEP": 3,
    "CRASH_BALLAST_MB": 1,
    "CRASH_BALLAST_PARTS": 2,
}
CRASHES = {"CRASH_EXIT_BEFORE_COMMIT": "7,9"}


@attrs.define
class Scenario:
    """What the uninterrupted run and the crashed-then-rerun run left."""

    reference_digest: dict[str, str]
    reference_checksums: dict[str, str]
    full_size: int
    incarnations: list[Any]
    # After each incarnation: committed steps, problems, uncommitted folders.
    committed: list[list[int]]
    unverified: list[list[str]]
    uncommitted: list[list[str]]
    # Object sizes of the folder left by the first crash.
    left_by_first_crash: dict[str, int]
    digest: dict[str, str]
    checksums: dict[str, str]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    reference = harness.Run(tmp_path_factory.mktemp("reference"), RUN)
    finished = reference.run_to_end()
    assert finished.returncode == 0, finished.log()

    run = harness.Run(tmp_path_factory.mktemp("crashed"), {**RUN, **CRASHES})
    incarnations: list[Any] = []
    committed, unverified, uncommitted = [], [], []
    left: dict[str, int] = {}
    for _ in range(3):
        incarnations.append(run.run_to_end())
        storage = Storage.open(run.storage)
        committed.append(harness.committed_steps(run))
        unverified.append(harness.unverified(run))
        uncommitted.append(storage.uncommitted())
        if len(incarnations) == 1 and len(uncommitted[0]) == 1:
            left = storage.sizes(uncommitted[0][0])
    final = incarnations[-1]
    return Scenario(
        reference_digest=reference.digest(),
        reference_checksums=harness.final_checksums(reference),
        full_size=harness.full_data_size(reference),
        incarnations=incarnations,
        committed=committed,
        unverified=unverified,
        uncommitted=uncommitted,
        left_by_first_crash=left,
        digest=run.digest() if final.returncode == 0 else {},
        checksums=harness.final_checksums(run),
    )


def test_crash_comes_between_payload_and_commit(scenario: Scenario) -> None:
    """The first crash leaves snapshot 7's payload complete and uncommitted."""
    left = scenario.left_by_first_crash
    expected = ([7], scenario.full_size, True)

    actual = (
        [parse_snapshot_name(name) for name in scenario.uncommitted[0]],
        left.get(DATA_OBJECT),
        left.get(INDEX_OBJECT, 0) > 0,
    )

    assert expected == actual


def test_exit_codes(scenario: Scenario) -> None:
    """The two injected crashes exit 137; the last restart finishes with 0."""
    expected = [137, 137, 0]

    actual = [incarnation.returncode for incarnation in scenario.incarnations]

    assert expected == actual


def test_restarts_resume_from_last_committed(scenario: Scenario) -> None:
    """The restarts resume from 6 and then 8, never from an uncommitted payload."""
    expected = [None, 6, 8]

    actual = [incarnation.resumed_from() for incarnation in scenario.incarnations]

    assert expected == actual


def test_uncommitted_payload_is_never_listed(scenario: Scenario) -> None:
    """Only committed snapshots are listed, and each of them verifies."""
    expected: tuple[list[list[int]], list[list[str]]]
    expected = ([[4, 5, 6], [6, 7, 8], [10, 11, 12]], [[], [], []])

    actual = (scenario.committed, scenario.unverified)

    assert expected == actual


def test_later_saves_of_the_same_steps_succeed(scenario: Scenario) -> None:
    """Snapshots 7 and 9 are saved anew by the restarts, without any error."""
    expected = ([1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12])

    actual = tuple(
        incarnation.committed_steps() for incarnation in scenario.incarnations
    )

    assert expected == actual
    assert not any("error" in run.log().lower() for run in scenario.incarnations)


def test_abandoned_payload_is_removed_after_next_commit(scenario: Scenario) -> None:
    """An uncommitted payload is gone once a later snapshot has committed."""
    expected = [[7], [9], []]

    actual = [
        [parse_snapshot_name(name) for name in names] for names in scenario.uncommitted
    ]

    assert expected == actual


def test_final_state_equals_uninterrupted_run(scenario: Scenario) -> None:
    """The crashed and restarted run ends bit-identical to an uninterrupted one."""
    expected = (scenario.reference_digest, scenario.reference_checksums)

    actual = (scenario.digest, scenario.checksums)

    assert expected == actual
