"""
Case B05: two incarnations of one run overlap on one storage (an old pod still
saving inside its grace period while its replacement starts). Each start claims a
fencing token; an older incarnation can neither commit nor prune once a newer one
has claimed, and says so; of two commits of one generation the newer incarnation's
is the newest.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest

import resumable
from resumable import _lease, testing
from resumable._archive import Archive
from resumable._lease import Lease
from resumable._snapshot import Manifest
from resumable._storage import Storage
from resumable.errors import SupersededError
from tests.conftest import import_script, tiny_train

harness = import_script("crash_harness")

PROGRAM = "crash_train.py:train"
RUN = {"CRASH_STEPS": 8, "CRASH_KEEP": 3}
# Incarnation A only: its snapshot after step 4 waits between data and commit
# until the test releases it, once B has claimed the run.
HOLD = {"CRASH_HOLD_STEPS": "4"}


def _write_one(archive: Archive, step: int, generation: int) -> Manifest:
    return archive.write(step, ("lineage", generation, 1), {}, ({}, [b"data"]))


def test_a_newer_claim_supersedes_an_older_one(storage_url: str) -> None:
    """The first of two claims fails its check, naming the newer incarnation."""
    storage = Storage.open(storage_url)
    older, newer = Lease(storage), Lease(storage)

    numbers = (older.claim(), newer.claim())
    newer.check("commit")
    with pytest.raises(SupersededError) as caught:
        older.check("commit")

    assert (1, 2) == numbers
    assert "incarnation 2" in str(caught.value)
    assert storage_url in str(caught.value)


def test_racing_claims_all_get_distinct_numbers(storage_url: str) -> None:
    """Starts that claim at the same moment each get a number of their own."""
    storage = Storage.open(storage_url)
    leases = [Lease(storage) for _ in range(6)]
    threads = [threading.Thread(target=lease.claim) for lease in leases]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [1, 2, 3, 4, 5, 6] == sorted(lease.number for lease in leases)


def test_a_superseded_writer_commits_nothing_and_removes_its_attempt(
    storage_url: str,
) -> None:
    """A commit after a newer claim is refused; the attempt's folder is gone."""
    storage = Storage.open(storage_url)
    stale = Archive(storage, "p.py:train", Lease(storage))
    stale.lease.claim()  # type: ignore[union-attr]  # built with one
    _write_one(stale, 1, 1)
    Lease(storage).claim()

    with pytest.raises(SupersededError):
        _write_one(stale, 2, 2)

    assert [1] == [entry.step for entry in stale.listing()]
    assert [] == storage.uncommitted()


def test_a_superseded_writer_prunes_nothing(storage_url: str) -> None:
    """Retention by an older incarnation is refused, and nothing is deleted."""
    storage = Storage.open(storage_url)
    stale = Archive(storage, "p.py:train", Lease(storage))
    stale.lease.claim()  # type: ignore[union-attr]  # built with one
    for step in (1, 2, 3):
        _write_one(stale, step, step)
    Lease(storage).claim()

    with pytest.raises(SupersededError):
        stale.prune(1)

    assert [3, 2, 1] == [entry.step for entry in stale.listing()]


def test_of_two_commits_of_one_generation_the_newer_incarnation_is_newest(
    storage_url: str,
) -> None:
    """Equal generations are ordered by incarnation, then step: never by time."""
    storage = Storage.open(storage_url)
    old, new = Lease(storage), Lease(storage)
    old.claim()
    new.claim()
    _write_one(Archive(storage, "p.py:train", new), 4, 5)
    # The old incarnation's commit lands later, as one that raced its check would.
    _write_one(Archive(storage, "p.py:train", None), 6, 5)

    listing = Archive(storage, "p.py:train").listing()

    assert [(5, 2, 4), (5, 0, 6)] == [entry.order for entry in listing]


def test_claims_are_left_alone_by_the_unrecognised_check(storage_url: str) -> None:
    """A run's claims are neither warned about nor counted as snapshots."""
    testing.run_steps(tiny_train, 2, storage=storage_url)
    testing.run_steps(tiny_train, 4, storage=storage_url)
    storage = Storage.open(storage_url)

    assert [] == storage.unrecognised()
    assert [1, 2] == sorted(storage.claims())


def test_a_probe_left_by_a_killed_start_is_not_warned_about(storage_url: str) -> None:
    """The empty probe of a start killed before deleting it is ours, not foreign."""
    testing.run_steps(tiny_train, 1, storage=storage_url)
    storage = Storage.open(storage_url)
    storage.fs.pipe_file(storage.path(".resumable-probe-0123456789ab"), b"")

    assert [] == storage.unrecognised()


def test_each_start_claims_and_manifests_record_the_incarnation(
    storage_url: str,
) -> None:
    """Each run claims the next number; its manifests carry it."""
    testing.run_killed(tiny_train, 2, storage=storage_url)
    resumable.run(tiny_train, storage=storage_url)
    archive = Archive(Storage.open(storage_url), tiny_train.program)

    orders = [entry.order for entry in archive.listing()]

    assert [(4, 2, 4), (3, 2, 3), (2, 1, 2)] == orders


class S3Run(harness.Run):  # type: ignore[misc]  # loaded by path
    """A crash-harness run whose snapshots live in a bucket of the S3 server."""

    def __init__(self, folder: Path, settings: dict[str, Any], url: str) -> None:
        super().__init__(folder, settings)
        self.url = url

    @property
    def storage(self) -> str:
        return self.url

    def names(self) -> set[str]:
        fs, root = fsspec.core.url_to_fs(self.url)
        fs.invalidate_cache()
        if not fs.exists(root):
            return set()
        return {path.rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The digest of the final state of an uninterrupted run."""
    run = harness.Run(tmp_path_factory.mktemp("reference"), RUN)
    finished = run.run_to_end()
    assert 0 == finished.returncode, finished.log()

    return dict(run.digest())


@pytest.fixture(params=["file", "s3"])
def overlapping(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A run on file:// or s3:// whose first incarnation holds its step-4 save."""
    release = tmp_path / "release"
    settings = {**RUN, **HOLD, "CRASH_HOLD_UNTIL": release}
    if request.param == "file":
        return harness.Run(tmp_path, settings)
    url = request.getfixturevalue("s3_url")
    return S3Run(tmp_path, settings, url)


@pytest.mark.slow
def test_b05_overlapping_incarnations(
    overlapping: Any, reference: dict[str, str]
) -> None:
    """
    A replacement started while the old incarnation saves fences it: the old one
    commits nothing after the claim and exits with the preempted code, and the
    run ends with the replacement's snapshots, bit-identical to one never stopped.
    """
    run = overlapping
    release = Path(run.env["CRASH_HOLD_UNTIL"])
    with run.start() as old:
        _wait_for(Path(f"{release}.held").exists, old)
        old.process.send_signal(signal.SIGTERM)
        del run.env["CRASH_HOLD_STEPS"]
        run.env["CRASH_DIGEST"] = str(run.folder / "digest-new.json")
        with run.start() as new:
            _wait_for(lambda: "incarnation-000000002.json" in run.names(), new)
            release.touch()
            new_code = new.wait()
        old_code = old.wait()
    storage = Storage.open(run.storage)
    listing = Archive(storage, PROGRAM).listing()
    final = json.loads((run.folder / "digest-new.json").read_text())

    assert (1, 0) == (old_code, new_code), old.log() + new.log()
    assert "incarnation 2" in old.log()
    assert "incarnation claimed: number=2, fences=1" in new.log()
    assert 4 not in old.committed_steps()
    assert [(8, 2), (7, 2), (6, 2)] == [
        (entry.step, entry.manifest.incarnation) for entry in listing if entry.manifest
    ]
    assert [] == storage.uncommitted()
    assert reference == final


def _wait_for(condition: Any, incarnation: Any) -> None:
    deadline = time.monotonic() + harness.PATIENCE
    while not condition():
        if incarnation.process.poll() is not None or time.monotonic() > deadline:
            msg = f"the awaited moment never came: {incarnation.log()}"
            raise AssertionError(msg)
        time.sleep(0.01)


def test_a_snapshot_committed_before_the_claim_is_the_one_resumed(
    storage_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What an older incarnation commits while a new one loads is resumed from."""
    reference = testing.run_steps(tiny_train, storage=testing.memory_storage())
    testing.run_killed(tiny_train, 2, storage=storage_url)
    claim = Lease.claim

    def claim_late(lease: Lease) -> int:
        # The older incarnation commits step 3 while this one still loads 2.
        monkeypatch.setattr(Lease, "claim", claim)
        testing.run_killed(tiny_train, 3, storage=storage_url)
        return claim(lease)

    monkeypatch.setattr(Lease, "claim", claim_late)
    caplog.set_level(logging.INFO, logger="resumable")

    result = testing.run_steps(tiny_train, storage=storage_url)

    assert "newer snapshot committed before the claim" in caplog.text
    assert "resumed: step=3" in caplog.text
    testing.assert_states_equal(reference.state, result.state)


def test_a_superseded_incarnation_stops_training_before_its_next_snapshot(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer claim stops an older run at a step end, though no snapshot is due."""
    monkeypatch.setattr(_lease, "CHECK_INTERVAL", 0.0)
    steps_done: list[int] = []

    def progress(done: int, total: int, metrics: object) -> None:
        steps_done.append(done)
        if done == 1:
            Lease(Storage.open(storage_url)).claim()

    with pytest.raises(SupersededError):
        resumable.run(tiny_train, storage=storage_url, every=100, progress=progress)

    assert [1] == steps_done
    assert [] == Archive(Storage.open(storage_url), tiny_train.program).listing()
