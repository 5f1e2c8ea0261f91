"""
Tests of whole snapshots on a storage, through real runs: which snapshot a resume picks,
what it skips and why, what it refuses, and what it leaves alone.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest

import resumable
from resumable._snapshot import parse_snapshot_name
from resumable._storage import Storage
from resumable.errors import IncompatibleSnapshotError, NoSnapshotError

MANIFEST_SUFFIX = ".manifest.json"


def other_program(state: Any, step: int) -> None:
    """The body of another program, whose snapshots must never be loaded as ours."""
    state.seen.append(step)


def _snapshots(url: str) -> dict[int, str]:
    """Return the committed snapshots at ``url`` by step."""
    names = Storage.open(url).committed()
    return {parse_snapshot_name(name) or 0: name for name in names}


def _files(url: str, part: str = "") -> dict[str, bytes]:
    """Return every file under the storage root whose path contains ``part``."""
    storage = Storage.open(url)
    storage.fs.invalidate_cache()
    paths = [path for path in storage.fs.find(storage.root) if part in path]
    return {path: storage.fs.cat_file(path) for path in paths}


def _warnings(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    """Return the warnings logged that name ``name``."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and name in record.getMessage()
    ]


def _damage(url: str, name: str, how: str) -> None:
    """Truncate or flip a byte of a snapshot's data, or make its manifest garbage."""
    storage = Storage.open(url)
    data = storage.read(name, "data.bin")
    if how == "truncated":
        storage.fs.pipe_file(storage.path(name, "data.bin"), data[:-1])
    elif how == "flipped":
        middle = len(data) // 2
        flipped = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]
        storage.fs.pipe_file(storage.path(name, "data.bin"), flipped)
    else:
        storage.fs.pipe_file(storage.path(name + MANIFEST_SUFFIX), b"{garbage")


def _run(step: resumable.Step[Any], url: str, steps: int, **options: Any) -> Any:
    """Run ``step`` to ``steps`` steps; return the result and the steps done seen."""
    done: list[int] = []
    result = resumable.run(
        step,
        storage=url,
        steps=steps,
        progress=lambda count, total, metrics: done.append(count),
        **options,
    )
    return result, done


def test_resume_picks_newest_committed_snapshot(
    storage_url: str, tiny_step: resumable.Step[Any]
) -> None:
    """A run resumes from the newest snapshot and runs only the steps after it."""
    resumable.run(tiny_step, storage=storage_url, steps=3)

    result, done = _run(tiny_step, storage_url, 5)

    expected = ([4, 5], [0, 1, 2, 3, 4], 5)
    assert expected == (done, result.state.seen, len(result.history))


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("truncated", "torn or incomplete write"),
        ("flipped", "damaged bytes"),
        ("garbage", "not readable JSON"),
    ],
)
def test_damaged_snapshot_is_skipped_with_warning_and_kept(
    storage_url: str,
    tiny_step: resumable.Step[Any],
    caplog: pytest.LogCaptureFixture,
    how: str,
    reason: str,
) -> None:
    """A damaged newest snapshot is skipped with a warning, kept; the previous loads."""
    resumable.run(tiny_step, storage=storage_url, steps=3, keep=10)
    damaged = _snapshots(storage_url)[3]
    _damage(storage_url, damaged, how)
    before = _files(storage_url, damaged)

    result, done = _run(tiny_step, storage_url, 5, keep=10)

    expected = ([3, 4, 5], [0, 1, 2, 3, 4], [True], before)
    assert expected == (
        done,
        result.state.seen,
        [reason in message for message in _warnings(caplog, damaged)],
        _files(storage_url, damaged),
    )


def test_all_snapshots_damaged_refuses_and_deletes_nothing(
    storage_url: str, tiny_step: resumable.Step[Any]
) -> None:
    """When no snapshot verifies the run refuses before training and deletes nothing."""
    resumable.run(tiny_step, storage=storage_url, steps=3)
    for step, how in zip((1, 2, 3), ("truncated", "flipped", "garbage"), strict=True):
        _damage(storage_url, _snapshots(storage_url)[step], how)
    before = _files(storage_url)
    done: list[int] = []

    with pytest.raises(IncompatibleSnapshotError) as caught:
        resumable.run(
            tiny_step,
            storage=storage_url,
            steps=5,
            progress=lambda count, total, metrics: done.append(count),
        )

    assert "Nothing was deleted" in str(caught.value)
    expected: object = ([], before)
    assert expected == (done, _files(storage_url))


def test_uncommitted_attempt_is_never_picked_and_removed_after_next_commit(
    storage_url: str, tiny_step: resumable.Step[Any]
) -> None:
    """An attempt of this program is never loaded, and deleted after the next commit."""
    resumable.run(tiny_step, storage=storage_url, steps=3)
    storage = Storage.open(storage_url)
    attempt = _snapshots(storage_url)[3]
    storage.fs.rm_file(storage.path(attempt + MANIFEST_SUFFIX))
    present: list[bool] = []

    def progress(count: int, total: int, metrics: object) -> None:
        present.append(attempt in storage.uncommitted())

    result = resumable.run(tiny_step, storage=storage_url, steps=5, progress=progress)

    expected: object = ([0, 1, 2, 3, 4], [True, False, False], [], {})
    assert expected == (
        result.state.seen,
        present,
        storage.uncommitted(),
        storage.sizes(attempt),
    )


def test_attempt_without_record_is_left_alone_and_warned_about(
    storage_url: str,
    tiny_step: resumable.Step[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A snapshot folder copied without attempt record is left alone, with a warning."""
    resumable.run(tiny_step, storage=storage_url, steps=2)
    storage = Storage.open(storage_url)
    source, copy = _snapshots(storage_url)[2], "step-000000009-cccccccccccc"
    for name in ("index.json", "data.bin"):
        storage.write_object(copy, name, [storage.read(source, name)])
    before = _files(storage_url, copy)

    result, done = _run(tiny_step, storage_url, 4)

    expected = ([3, 4], [0, 1, 2, 3], before)
    assert expected == (done, result.state.seen, _files(storage_url, copy))
    assert _warnings(caplog, copy), f"no warning names {copy}"


def test_another_programs_snapshot_refuses_before_training(
    storage_url: str, tiny_step: resumable.Step[Any]
) -> None:
    """Another program's snapshot makes the run refuse untrained, naming both."""
    other = resumable.step(init=tiny_step.init, steps=2)(other_program)
    resumable.run(other, storage=storage_url)
    before = _files(storage_url)
    done: list[int] = []

    with pytest.raises(IncompatibleSnapshotError) as caught:
        resumable.run(
            tiny_step,
            storage=storage_url,
            progress=lambda count, total, metrics: done.append(count),
        )

    assert other.program in str(caught.value)
    assert tiny_step.program in str(caught.value)
    expected: object = ([], before)
    assert expected == (done, _files(storage_url))


def test_schema_change_refuses_naming_field_and_fresh_starts_over(
    storage_url: str, tiny_step: resumable.Step[Any]
) -> None:
    """An added state field refuses resume, naming it; fresh=True starts over."""
    resumable.run(tiny_step, storage=storage_url, steps=2)
    base = type(tiny_step.init())
    extended = attrs.make_class(
        base.__name__, {"extra": attrs.field(default=0)}, bases=(base,)
    )

    def init() -> Any:
        state = tiny_step.init()
        return extended(
            **{field.name: getattr(state, field.name) for field in attrs.fields(base)}
        )

    changed = resumable.step(init=init, steps=3)(tiny_step.function)
    before = _files(storage_url)

    with pytest.raises(IncompatibleSnapshotError) as caught:
        resumable.run(changed, storage=storage_url)

    assert "extra" in str(caught.value)
    assert before == _files(storage_url)

    result, done = _run(changed, storage_url, 3, fresh=True)

    loaded = resumable.load(changed, storage=storage_url)
    expected = ([1, 2, 3], [0, 1, 2], [0, 1, 2])
    assert expected == (done, result.state.seen, loaded.seen)


def test_load_returns_newest_verified_state(
    storage_url: str, tiny_step: resumable.Step[Any]
) -> None:
    """load returns the newest snapshot's state, or the one before if it is damaged."""
    result = resumable.run(tiny_step, storage=storage_url, steps=3)

    newest = resumable.load(tiny_step, storage=storage_url)
    _damage(storage_url, _snapshots(storage_url)[3], "flipped")
    previous = resumable.load(tiny_step, storage=storage_url)

    expected: object = ([], [0, 1])
    assert expected == (
        resumable.testing.diff_states(result.state, newest),
        previous.seen,
    )


def test_load_from_empty_storage_raises_no_snapshot(
    storage_url: str, tiny_step: resumable.Step[Any]
) -> None:
    """load from a storage without snapshots raises NoSnapshotError."""
    with pytest.raises(NoSnapshotError):
        resumable.load(tiny_step, storage=storage_url)
