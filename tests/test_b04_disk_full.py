"""
Case B04: the storage fills up in the middle of a snapshot.

keep=5 and a snapshot after every step, on storage with room for about 3.5
snapshots: the 4th hits a full disk inside its data object. The same command runs
again without freeing space, then once more after freeing some. The first run must
exit 5 with a message that names the storage and says what to do, leaving
snapshots 1 to 3 intact; the second must fail before training where the storage
reports its free space, or at its first snapshot where it cannot, losing nothing;
the third must resume from snapshot 3 and end bit-identical to an uninterrupted
run. The failed attempt is never selected, and goes as soon as the storage allows.

The storages, each behind the real command line in a subprocess: ``quota://``
(``tests/scripts/quotafs.py``, the generic fsspec path); the same with EDQUOT and
copy-on-write deletes that fail while full; and a real tmpfs of that size, mounted
in a user namespace, where those are allowed (no root needed). In-process tests
give a local folder a small disk at the OS level.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import torch

import resumable
from resumable import _storage, testing
from resumable._archive import Archive
from resumable._snapshot import START_PREFIX, parse_snapshot_name
from resumable._storage import Storage, mebibytes
from resumable.errors import StorageError
from tests.conftest import import_script

SCRIPTS = Path(__file__).parent / "scripts"


harness = import_script("crash_harness")
quotafs = import_script("quotafs")

RUN = {
    "CRASH_STEPS": 8,
    "CRASH_EVERY": 1,
    "CRASH_KEEP": 5,
    "CRASH_BALLAST_MB": 1,
    "CRASH_BALLAST_PARTS": 2,
}
# Room for this many snapshots: the 4th fills it in the middle of its data.
ROOM = 3.5
# tmpfs counts whole pages.
PAGE = 4096
_RESUMED = re.compile(r"resumed: step=(\d+)")


# --- the three runs of the same command, on three storages --------------------


@attrs.frozen
class Outcome:
    """One run of the command and what the storage held after it."""

    returncode: int
    log: str
    started: int
    committed: list[int]
    uncommitted: list[int | None]
    unverified: list[str]

    @property
    def error(self) -> str:
        lines = [line for line in self.log.splitlines() if "resumable: error:" in line]
        return "\n".join(lines)

    @property
    def resumed_from(self) -> int | None:
        found = _RESUMED.findall(self.log)
        return int(found[0]) if found else None


@attrs.frozen
class Scenario:
    """The three runs: out of room, again without freeing space, after freeing."""

    kind: str
    url: str
    outcomes: list[Outcome]
    digest: dict[str, str]
    reference: dict[str, str]


_Run: Any = harness.Run


class QuotaRun(_Run):  # type: ignore[misc]  # the harness is loaded by path: Any
    """A run of ``quota_train.py`` on ``quota://`` storage, in a volume of its own."""

    def __init__(self, folder: Path, settings: Mapping[str, object]) -> None:
        super().__init__(folder, settings)
        self.volume = folder / "volume"
        self.root = self.volume / "snapshots"

    @property
    def storage(self) -> str:
        return f"quota://{self.root}"

    def command(self) -> list[str]:
        script = SCRIPTS / "quota_train.py"
        return [
            sys.executable,
            "-m",
            "resumable",
            str(script),
            "--storage",
            self.storage,
        ]


def _look(url: str, log: str, returncode: int, started: int) -> Outcome:
    archive = Archive(Storage.open(url), harness.PROGRAM)
    unverified = []
    for entry in archive.listing():
        try:
            assert entry.manifest is not None, entry.problem
            archive.read(entry.manifest)
        except Exception as err:
            unverified.append(f"{entry.name}: {err}")
    committed = sorted(
        parse_snapshot_name(name) or 0 for name in archive.storage.committed()
    )
    uncommitted = [parse_snapshot_name(name) for name in archive.storage.uncommitted()]
    return Outcome(returncode, log, started, committed, uncommitted, unverified)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], int]:
    """The digest of an uninterrupted run, and the bytes one snapshot takes."""
    run = harness.Run(tmp_path_factory.mktemp("reference"), RUN)
    finished = run.run_to_end()
    assert finished.returncode == 0, finished.log()
    snapshots = len(harness.committed_steps(run))

    return run.digest(), quotafs.usage(run.root) // snapshots


def _quota_scenario(
    folder: Path, reference: tuple[dict[str, str], int], *, cow: bool
) -> Scenario:
    error = errno.EDQUOT if cow else errno.ENOSPC
    run = QuotaRun(folder, RUN)
    quotafs.set_quota(run.volume, int(ROOM * reference[1]), error, cow=cow)
    outcomes = []
    for number in range(3):
        if number == 2:
            quotafs.set_quota(run.volume, 100 * reference[1], error, cow=cow)
        before = run.steps_started()
        incarnation = run.run_to_end()
        outcomes.append(
            _look(
                run.storage,
                incarnation.log(),
                incarnation.returncode,
                run.steps_started() - before,
            )
        )
    kind = "cow" if cow else "quota"
    return Scenario(kind, run.storage, outcomes, run.digest(), reference[0])


# Runs the three incarnations in a user and mount namespace that holds the tmpfs:
# it lives as long as this shell. After each, the storage is copied out.
_TMPFS_SCRIPT = """
set -u
mount -t tmpfs -o "size=$B04_SIZE" b04 "$B04_VOLUME" || exit 97
head -c "$B04_FILLER" /dev/zero > "$B04_VOLUME/filler" || exit 98
for number in 0 1 2; do
    if [ "$number" = 2 ]; then rm "$B04_VOLUME/filler"; fi
    "$@" > "$B04_FOLDER/incarnation-$number.log" 2>&1
    echo $? > "$B04_FOLDER/returncode-$number"
    cat "$B04_FOLDER/progress.txt" 2>/dev/null | wc -l > "$B04_FOLDER/started-$number"
    cp -a "$B04_VOLUME/snapshots" "$B04_FOLDER/after-$number"
done
"""
_NAMESPACE = ["unshare", "--user", "--map-root-user", "--mount"]


def _namespaces_allowed(folder: Path) -> bool:
    """Whether this user may mount a tmpfs in a user namespace of its own."""
    try:
        probe = subprocess.run(
            [*_NAMESPACE, "mount", "-t", "tmpfs", "probe", str(folder)],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _tmpfs_scenario(folder: Path, reference: tuple[dict[str, str], int]) -> Scenario:
    if shutil.which("unshare") is None or not _namespaces_allowed(folder):
        pytest.skip("no unshare, or user namespaces may not mount a tmpfs here")
    run = harness.Run(folder, RUN)
    volume = folder / "volume"
    volume.mkdir()
    run.root = volume / "snapshots"
    # Whole pages per snapshot; the filler stands for what is freed later.
    pages = _pages_per_snapshot(reference[1])
    filler = 5 * pages
    env = {
        **run.env,
        "B04_SIZE": str(filler + int(ROOM * pages)),
        "B04_FILLER": str(filler),
        "B04_VOLUME": str(volume),
        "B04_FOLDER": str(folder),
    }
    shell = subprocess.run(
        [*_NAMESPACE, "bash", "-c", _TMPFS_SCRIPT, "bash", *run.command()],
        env=env,
        cwd=folder,
        capture_output=True,
        timeout=harness.PATIENCE,
        check=False,
    )
    assert shell.returncode == 0, shell.stderr
    outcomes, before = [], 0
    for number in range(3):
        started = int((folder / f"started-{number}").read_text())
        outcomes.append(
            _look(
                str(folder / f"after-{number}"),
                (folder / f"incarnation-{number}.log").read_text(),
                int((folder / f"returncode-{number}").read_text()),
                started - before,
            )
        )
        before = started
    return Scenario("tmpfs", run.storage, outcomes, run.digest(), reference[0])


def _pages_per_snapshot(size: int) -> int:
    # Each snapshot is 4 files (attempt, data, index, manifest): up to a page more
    # each, on top of its bytes.
    return (size // PAGE + 4) * PAGE


@pytest.fixture(scope="module", params=["quota", "cow", "tmpfs"])
def scenario(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    reference: tuple[dict[str, str], int],
) -> Scenario:
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "tmpfs":
        return _tmpfs_scenario(folder, reference)
    return _quota_scenario(folder, reference, cow=request.param == "cow")


# How each storage says it is full.
FULL = {
    "quota": "No space left on device",
    "cow": "Disk quota exceeded",
    "tmpfs": "No space left on device",
}


@pytest.mark.slow
def test_out_of_room_exits_5_naming_the_storage_and_what_to_do(
    scenario: Scenario,
) -> None:
    """The run that fills the storage exits 5, saying where, why and what to do."""
    first = scenario.outcomes[0]
    expected = (5, True, True, True, True)

    actual = (
        first.returncode,
        repr(scenario.url) in first.error,
        FULL[scenario.kind] in first.error,
        "The storage is full" in first.error,
        "free space or lower --keep, then run the same command again" in first.error,
    )

    assert expected == actual, first.log


@pytest.mark.slow
def test_snapshots_before_the_full_one_stay_intact(scenario: Scenario) -> None:
    """Snapshots 1 to 3 stay committed and verify after every run that fails."""
    expected: list[tuple[list[int], list[str]]]
    expected = [([1, 2, 3], []), ([1, 2, 3], [])]

    actual = [
        (outcome.committed, outcome.unverified) for outcome in scenario.outcomes[:2]
    ]

    assert expected == actual


@pytest.mark.slow
def test_restart_without_room_loses_nothing(scenario: Scenario) -> None:
    """
    Without freeing space, a restart fails with exit 5: before training where the
    storage reports its free space, else at its first snapshot; never in a load.
    """
    second = scenario.outcomes[1]
    expected = {
        # quota:// cannot say its free space: one step runs, its snapshot fails
        # in the background while a second step runs, and at its end the run stops.
        "quota": (5, 2, "The storage is full"),
        # Full to the last byte, copy-on-write: not even a probe file fits.
        "cow": (5, 0, "The storage is full"),
        "tmpfs": (5, 0, "too full for the next snapshot"),
    }[scenario.kind]

    actual = (
        second.returncode,
        second.started,
        expected[2] if expected[2] in second.error else second.error,
    )

    assert expected == actual, second.log
    assert not any("Traceback" in outcome.log for outcome in scenario.outcomes)


@pytest.mark.slow
def test_failed_attempt_goes_as_soon_as_the_storage_allows(scenario: Scenario) -> None:
    """
    The partial snapshot is deleted when its write fails, or where deleting
    fails too (copy-on-write and full), after the next commit.
    """
    expected = {
        "quota": [[], [], []],
        "cow": [[4], [4], []],
        "tmpfs": [[], [], []],
    }[scenario.kind]

    actual = [outcome.uncommitted for outcome in scenario.outcomes]

    assert expected == actual
    if scenario.kind == "cow":
        assert (
            "incomplete snapshot left for a later cleanup" in scenario.outcomes[0].log
        )


@pytest.mark.slow
def test_restart_after_freeing_resumes_from_newest_valid(scenario: Scenario) -> None:
    """After space is freed, the same command resumes from 3 and finishes."""
    third = scenario.outcomes[2]
    expected: tuple[int, int, list[int], list[str]]
    expected = (0, 3, [4, 5, 6, 7, 8], [])

    actual = (third.returncode, third.resumed_from, third.committed, third.unverified)

    assert expected == actual, third.log


@pytest.mark.slow
def test_finished_run_equals_uninterrupted(scenario: Scenario) -> None:
    """The run that ran out of room ends bit-identical to an uninterrupted run."""
    expected = scenario.reference

    actual = scenario.digest

    assert expected == actual


@pytest.mark.slow
def test_final_snapshot_at_sigterm_on_full_quota_exits_5(
    tmp_path: Path, reference: tuple[dict[str, str], int]
) -> None:
    """
    A SIGTERM whose final snapshot does not fit exits 5; the snapshot before it
    stays the newest, and the restart after freeing space resumes from it.
    """
    run = QuotaRun(tmp_path, {**RUN, "CRASH_EVERY": 3, "CRASH_STEP_SLEEP": 0.1})
    quotafs.set_quota(run.volume, int(1.5 * reference[1]))
    with run.start() as incarnation:
        while run.steps_started() < 5 and incarnation.process.poll() is None:
            time.sleep(harness.POLL)
        incarnation.process.send_signal(signal.SIGTERM)
        incarnation.wait()
    first = _look(run.storage, incarnation.log(), incarnation.returncode, 0)
    quotafs.set_quota(run.volume, 100 * reference[1])
    second = run.run_to_end()
    expected: tuple[int, bool, list[int], list[int | None], int, int]
    expected = (5, True, [3], [], 0, 3)

    actual = (
        first.returncode,
        "The storage is full" in first.error,
        first.committed,
        first.uncommitted,
        second.returncode,
        second.resumed_from(),
    )

    assert expected == actual, incarnation.log()


# --- in-process: a local folder with a small disk at the OS level -------------


@attrs.define
class DiskState:
    """A small model with 256 KiB of ballast, so that sizes show in MiB."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ballast: torch.Tensor
    losses: list[float] = attrs.Factory(list)


# Step indices that the body ran, in this process.
STEPS_RUN: list[int] = []


def disk_init() -> DiskState:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return DiskState(model, optimizer, torch.zeros(2**16))


@resumable.step(init=disk_init, steps=6, every=1, keep=5)
def disk_train(state: DiskState, step: int) -> dict[str, float]:
    STEPS_RUN.append(step)
    loss = state.model(torch.randn(8, 4)).square().mean()
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.ballast[step] = loss.item()
    state.losses.append(loss.item())

    return {"loss": loss.item()}


class SmallDisk:
    """A local folder whose writes and statvfs behave as on a disk of some size."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder = folder
        self.url = f"file://{folder}/snapshots"
        real_open, real_statvfs = open, os.statvfs

        def open_(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode and str(path).startswith(str(folder)):
                return quotafs.QuotaFile(str(path))
            return real_open(path, mode, *args, **kwargs)

        def statvfs(path: Any) -> Any:
            if not str(path).startswith(str(folder)):
                return real_statvfs(path)
            return SimpleNamespace(f_bavail=self.free(), f_frsize=1)

        # The storage's own writes and its free space: the OS seen by resumable.
        monkeypatch.setattr(_storage, "open", open_, raising=False)
        monkeypatch.setattr(os, "statvfs", statvfs)

    def resize(self, size: int) -> None:
        quotafs.set_quota(self.folder, size)

    def free(self) -> int:
        free: int = quotafs.Volume(str(self.folder / "snapshots")).free()
        return free

    def archive(self) -> Archive:
        return Archive(Storage.open(self.url), disk_train.program)

    def committed(self) -> list[int]:
        names = self.archive().storage.committed()
        return sorted(parse_snapshot_name(name) or 0 for name in names)

    def uncommitted(self) -> list[str]:
        return self.archive().storage.uncommitted()


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SmallDisk:
    _snapshot_size()
    STEPS_RUN.clear()
    return SmallDisk(tmp_path, monkeypatch)


@functools.cache
def _snapshot_size() -> int:
    """Bytes that one snapshot of disk_train takes in a local folder, all files."""
    with tempfile.TemporaryDirectory() as folder:
        testing.run_steps(disk_train, 1, storage=folder)
        size: int = quotafs.usage(folder)
    return size


def _fill(disk: SmallDisk, room: float = ROOM, **options: Any) -> StorageError:
    """Run disk_train on a disk with room for ``room`` snapshots, to its failure."""
    disk.resize(int(room * _snapshot_size()))
    with pytest.raises(StorageError) as caught:
        resumable.run(disk_train, storage=disk.url, **options)
    return caught.value


def test_local_full_disk_says_where_how_full_and_what_is_needed(
    disk: SmallDisk,
) -> None:
    """
    ENOSPC on a local folder names the object and the storage, the free space
    then and after the partial snapshot went, and the size a snapshot needs.
    """
    error = _fill(disk)
    newest = disk.archive().listing()[0].manifest
    assert newest is not None
    expected: tuple[bool, bool, bool, bool, bool, list[int], list[str]]
    expected = (True, True, True, True, True, [1, 2, 3], [])

    actual = (
        "/data.bin on storage " + repr(disk.url) in str(error),
        "No space left on device" in str(error),
        "MiB free); free space or lower --keep" in str(error),
        f"leaving {mebibytes(disk.free())} free" in str(error),
        f"needs about {mebibytes(newest.size)}" in str(error),
        disk.committed(),
        disk.uncommitted(),
    )

    assert expected == actual, str(error)


def test_local_restart_without_room_fails_before_training(disk: SmallDisk) -> None:
    """With less free space than its newest snapshot takes, a run trains nothing."""
    _fill(disk)
    STEPS_RUN.clear()
    newest = disk.archive().listing()[0].manifest
    assert newest is not None

    with pytest.raises(StorageError) as caught:
        resumable.run(disk_train, storage=disk.url)

    expected: tuple[list[int], list[int], list[str], bool]
    expected = ([], [1, 2, 3], [], True)
    actual = (
        STEPS_RUN,
        disk.committed(),
        [
            name
            for name in disk.archive().storage.sizes(newest.name)
            if name.startswith(START_PREFIX)
        ],
        f"{mebibytes(disk.free())} free, and the newest snapshot" in str(caught.value),
    )
    assert expected == actual, str(caught.value)


def test_lower_keep_makes_room_before_training(disk: SmallDisk) -> None:
    """A restart with a lower keep prunes first, then fits and finishes."""
    _fill(disk)
    uninterrupted = testing.run_steps(disk_train, 6)

    result = resumable.run(disk_train, storage=disk.url, keep=2)

    expected = (True, [5, 6])
    actual = (result.finished, disk.committed())
    assert expected == actual
    testing.assert_states_equal(uninterrupted.state, result.state)


def test_local_restart_after_freeing_resumes_identically(disk: SmallDisk) -> None:
    """After space is freed, the run resumes from 3 and equals an uninterrupted one."""
    _fill(disk)
    uninterrupted = testing.run_steps(disk_train, 6)
    disk.resize(100 * _snapshot_size())
    STEPS_RUN.clear()

    result = resumable.run(disk_train, storage=disk.url)

    expected: tuple[list[int], list[int], list[str]]
    expected = ([3, 4, 5], [2, 3, 4, 5, 6], [])
    actual = (STEPS_RUN, disk.committed(), disk.uncommitted())
    assert expected == actual
    testing.assert_states_equal(uninterrupted.state, result.state)


def test_quota_reported_at_fsync_is_a_full_storage(
    disk: SmallDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EDQUOT at fsync, as NFS reports a quota, fails the snapshot as a full disk."""
    disk.resize(100 * _snapshot_size())
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        path = os.readlink(f"/proc/self/fd/{descriptor}")
        # By the snapshot's name: a background write may end after the next
        # step has begun.
        if path.endswith("/data.bin") and "/step-000000003-" in path:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), path)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)

    with pytest.raises(StorageError) as caught:
        resumable.run(disk_train, storage=disk.url)

    expected: tuple[bool, list[int], list[str]]
    expected = (True, [1, 2], [])
    actual = (
        "The storage is full" in str(caught.value),
        disk.committed(),
        disk.uncommitted(),
    )
    assert expected == actual, str(caught.value)


def test_final_snapshot_at_the_end_that_does_not_fit(disk: SmallDisk) -> None:
    """The last snapshot failing for room leaves the one before it the newest."""
    error = _fill(disk, 1.5, every=4)

    expected: tuple[bool, list[int], list[str]]
    expected = (True, [4], [])
    actual = ("The storage is full" in str(error), disk.committed(), disk.uncommitted())
    assert expected == actual


def test_final_snapshot_at_preemption_that_does_not_fit(disk: SmallDisk) -> None:
    """A stop whose snapshot does not fit raises; the one before stays the newest."""
    disk.resize(int(1.5 * _snapshot_size()))

    with pytest.raises(StorageError) as caught:
        testing.run_preempted(disk_train, 4, storage=disk.url, every=4)

    expected: tuple[bool, list[int], list[str], list[int]]
    expected = (True, [4], [], [0, 1, 2, 3, 4])
    actual = (
        "The storage is full" in str(caught.value),
        disk.committed(),
        disk.uncommitted(),
        STEPS_RUN,
    )
    assert expected == actual


def test_cleanup_that_fails_never_fails_the_run(
    disk: SmallDisk, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """
    A partial snapshot that cannot be deleted leaves the full-storage error as it
    is, and is warned about, not raised, after a later commit.
    """
    real_delete = Storage.delete_folder

    def delete_folder(self: Storage, snapshot: str) -> None:
        if parse_snapshot_name(snapshot) == 4 and snapshot not in self.committed():
            raise StorageError("deleting failed")
        real_delete(self, snapshot)

    monkeypatch.setattr(Storage, "delete_folder", delete_folder)
    error = _fill(disk)
    left = disk.uncommitted()
    disk.resize(100 * _snapshot_size())

    with caplog.at_level("WARNING", logger="resumable"):
        result = resumable.run(disk_train, storage=disk.url)

    expected = (True, True, [4], True, [2, 3, 4, 5, 6], left)
    actual = (
        "No space left on device" in str(error),
        "deleted after a later commit" in str(error),
        [parse_snapshot_name(name) for name in left],
        result.finished,
        disk.committed(),
        disk.uncommitted(),
    )
    assert expected == actual, str(error)
    assert f"left for a later cleanup: name={left[0]}" in caplog.text


def test_a_manifest_that_finds_no_room_is_never_published(tmp_path: Path) -> None:
    """On a file-like back end, a commit cut short by a full disk leaves no manifest."""
    volume = tmp_path / "volume"
    quotafs.set_quota(volume, 10_000)
    storage = Storage.open(f"quota://{volume}/store")
    name = "step-000000001-aaaaaaaaaaaa"
    storage.write_object(name, "data.bin", [b"x" * 9_000])

    with pytest.raises(StorageError) as caught:
        storage.commit(name, b"m" * 4_000)

    assert "The storage is full" in str(caught.value)
    assert ([], [name]) == (storage.committed(), storage.uncommitted())
