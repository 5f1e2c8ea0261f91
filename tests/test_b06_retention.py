"""
Case B06: retention keeps exactly the newest generations of this run, deletes only after
a commit, never the snapshot just committed, and never what is not provably its own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

import resumable
from resumable._snapshot import Manifest, parse_snapshot_name
from resumable._storage import Storage
from resumable.errors import IncompatibleSnapshotError

MANIFEST_SUFFIX = ".manifest.json"


@attrs.define
class Counter:
    """A state that costs nothing to snapshot."""

    value: int = 0


@resumable.step(init=Counter, steps=12, every=1, keep=3)
def count(state: Counter, step: int) -> None:
    state.value += 1


@resumable.step(init=Counter, steps=1000, every=1000, keep=1)
def foreign_count(state: Counter, step: int) -> None:
    state.value += 1


def _kept(url: str) -> tuple[int, ...]:
    """Return the steps of the committed snapshots at ``url``, in step order."""
    return tuple(
        sorted(parse_snapshot_name(n) or 0 for n in Storage.open(url).committed())
    )


def _generations(url: str) -> dict[int, int]:
    """Return the generation of each committed snapshot at ``url`` by its step."""
    storage = Storage.open(url)
    manifests = [
        Manifest.from_bytes(storage.read_manifest(name), name)
        for name in storage.committed()
    ]
    return {manifest.step: manifest.generation for manifest in manifests}


def _files(url: str, part: str = "") -> dict[str, bytes]:
    """Return every file under the storage root whose path contains ``part``."""
    storage = Storage.open(url)
    storage.fs.invalidate_cache()
    paths = [path for path in storage.fs.find(storage.root) if part in path]
    return {path: storage.fs.cat_file(path) for path in paths}


def _copy(source: str, step: int, target: str, *, manifest: bool) -> str:
    """Copy the snapshot of ``step`` by plain file copy; return its name."""
    origin, destination = Storage.open(source), Storage.open(target)
    [name] = [n for n in origin.committed() if parse_snapshot_name(n) == step]
    for object_name in origin.sizes(name):
        data = origin.read(name, object_name)
        destination.write_object(name, object_name, [data])
    if manifest:
        destination.commit(name, origin.read_manifest(name))

    return name


def _run_observing(url: str, steps: int = 12, touch: Path | None = None) -> list[Any]:
    """Run ``count``; return the kept steps seen after each commit and at the end."""
    seen: list[tuple[int, ...]] = []

    def progress(done: int, total: int, metrics: object) -> None:
        # Called after each step, before its snapshot: the last commit is done-1.
        seen.append(_kept(url))
        if touch is not None:
            _touch_older(touch)

    resumable.run(count, storage=url, steps=steps, progress=progress)
    seen.append(_kept(url))

    return seen[1:]


def _touch_older(root: Path) -> None:
    """Move the mtime of every snapshot but the newest into the far future."""
    manifests = sorted(root.glob("*" + MANIFEST_SUFFIX))
    future = time.time() + 10**6
    for manifest in manifests[:-1]:
        folder = root / manifest.name.removesuffix(MANIFEST_SUFFIX)
        for path in [manifest, folder, *folder.iterdir()]:
            os.utime(path, (future, future))


def _expected_kept(steps: int) -> list[tuple[int, ...]]:
    """The three newest steps after each of ``steps`` commits, one commit a step."""
    return [tuple(range(max(1, done - 2), done + 1)) for done in range(1, steps + 1)]


def test_b06_kept_set_is_three_newest_after_every_commit(storage_url: str) -> None:
    """With keep=3 and a snapshot a step, each commit leaves exactly the 3 newest."""
    kept = _run_observing(storage_url)

    expected = (_expected_kept(12), {10: 10, 11: 11, 12: 12})
    assert expected == (kept, _generations(storage_url))


def test_b06_deletes_only_after_commit_never_the_new_one(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletion comes after the new snapshot commits, and never deletes that one."""
    events: list[tuple[str, int | None]] = []
    commit, delete = Storage.commit, Storage.delete

    def recording_commit(self: Storage, snapshot: str, manifest: bytes) -> None:
        commit(self, snapshot, manifest)
        events.append(("commit", parse_snapshot_name(snapshot)))

    def recording_delete(self: Storage, snapshot: str) -> None:
        events.append(("delete", parse_snapshot_name(snapshot)))
        delete(self, snapshot)

    monkeypatch.setattr(Storage, "commit", recording_commit)
    monkeypatch.setattr(Storage, "delete", recording_delete)
    resumable.run(count, storage=storage_url, steps=6)

    expected = [("commit", 1), ("commit", 2), ("commit", 3)]
    for step in (4, 5, 6):
        expected += [("commit", step), ("delete", step - 3)]
    assert expected == events


def test_b06_kept_set_follows_generations_not_steps(storage_url: str) -> None:
    """A fresh restart's low steps are newer than an old run's high steps, and kept."""
    resumable.run(count, storage=storage_url, steps=12)

    kept = [_kept(storage_url)]
    for steps in (1, 2, 3):
        resumable.run(count, storage=storage_url, steps=steps, fresh=steps == 1)
        kept.append(_kept(storage_url))

    expected = ([(10, 11, 12), (1, 11, 12), (1, 2, 12), (1, 2, 3)], 3)
    assert expected == (kept, resumable.load(count, storage=storage_url).value)


def test_b06_a_touching_older_snapshots_changes_nothing(tmp_path: Path) -> None:
    """Newer mtimes on older snapshots change neither the kept set nor the resume."""
    root = tmp_path / "store"

    kept = _run_observing(f"file://{root}", touch=root)

    expected = (_expected_kept(12), 12)
    assert expected == (kept, resumable.load(count, storage=str(root)).value)


def test_b06_b_digit_boundary_9_10_11(storage_url: str) -> None:
    """Runs to 9, 10 and 11 steps each keep the newest three, the newest included."""
    kept = []
    for steps in (9, 10, 11):
        resumable.run(count, storage=storage_url, steps=steps)
        kept.append(_kept(storage_url))

    expected = ([(7, 8, 9), (8, 9, 10), (9, 10, 11)], 11)
    assert expected == (kept, resumable.load(count, storage=storage_url).value)


def test_b06_b_digit_boundary_99_100_101(storage_url: str) -> None:
    """Runs to 99, 100 and 101 steps each keep the newest three, the newest included."""
    kept = []
    for steps, every in ((99, 33), (100, 1), (101, 1)):
        resumable.run(count, storage=storage_url, steps=steps, every=every)
        kept.append(_kept(storage_url))

    expected = ([(33, 66, 99), (66, 99, 100), (99, 100, 101)], 101)
    assert expected == (kept, resumable.load(count, storage=storage_url).value)


def test_b06_c_foreign_snapshot_at_1000_refuses_and_stays(
    storage_url: str, tmp_path: Path
) -> None:
    """A foreign program's step-1000 snapshot makes the run refuse, touching nothing."""
    source = f"file://{tmp_path}/foreign"
    resumable.run(foreign_count, storage=source)
    resumable.run(count, storage=storage_url, steps=3)
    _copy(source, 1000, storage_url, manifest=True)
    before = _files(storage_url)

    with pytest.raises(IncompatibleSnapshotError) as caught:
        resumable.run(count, storage=storage_url)

    assert count.program in str(caught.value)
    assert foreign_count.program in str(caught.value)
    expected = ((1, 2, 3, 1000), before)
    assert expected == (_kept(storage_url), _files(storage_url))


def test_b06_d_imported_folder_without_manifest_is_never_counted_or_deleted(
    storage_url: str, tmp_path: Path
) -> None:
    """A snapshot folder copied in without its manifest is neither kept nor deleted."""
    source = f"file://{tmp_path}/source"
    resumable.run(count, storage=source, steps=2)
    name = _copy(source, 2, storage_url, manifest=False)
    imported = _files(storage_url, name)

    kept = _run_observing(storage_url)

    expected = (_expected_kept(12), imported)
    assert expected == (kept, _files(storage_url, name))
