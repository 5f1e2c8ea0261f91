"""Tests of the snapshot format: names, the manifest and its checks, the data layout."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from resumable._snapshot import (
    ALIGNMENT,
    FORMAT_VERSION,
    Manifest,
    ObjectInfo,
    _record_checksum,
    buffer_table,
    buffer_views,
    check_compatible,
    checksum,
    data_chunks,
    new_snapshot_name,
    parse_snapshot_name,
)
from resumable.errors import IncompatibleSnapshotError, SnapshotCorruptError

NAME = "step-000000012-0123456789ab"
PROGRAM = "train.py:train"
SCHEMA = {"class": "State", "fields": ["model", "optimizer", "seen"]}


def _manifest(**changes: Any) -> Manifest:
    """Return a valid manifest of NAME, with ``changes`` applied."""
    fields: dict[str, Any] = {
        "name": NAME,
        "step": 12,
        "generation": 3,
        "lineage": "0" * 32,
        "lineage_start": 1,
        "program": PROGRAM,
        "schema": SCHEMA,
        "objects": {
            "index.json": ObjectInfo(size=10, checksum=checksum(b"0123456789")),
            "data.bin": ObjectInfo(size=0, checksum=checksum(b"")),
            "attempt.json": ObjectInfo(size=2, checksum=checksum(b"{}")),
        },
        "created": 1700000000.5,
        "versions": {"python": "3.11.0", "torch": "2.13.0"},
    }
    return Manifest(**{**fields, **changes})


def _record(**changes: Any) -> bytes:
    """Return the bytes of a valid manifest of NAME, updated by ``changes``."""
    record = json.loads(_manifest().to_bytes())
    record.update(changes)
    record["manifest_checksum"] = _record_checksum(record)
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    ("before", "after"),
    [(9, 10), (99, 100), (999, 1000), (99999999, 100000000), (0, 1)],
)
def test_names_sort_lexically_in_step_order(before: int, after: int) -> None:
    """Zero padding makes the lexical order of names their step order across digits."""
    names = [new_snapshot_name(after), new_snapshot_name(before)]

    assert [before, after] == [parse_snapshot_name(name) for name in sorted(names)]


@pytest.mark.parametrize("step", [0, 1, 999999999, 1000000000, 12345678901])
def test_names_parse_back_to_their_step(step: int) -> None:
    """Every new name, even past nine digits, parses back to its step."""
    name = new_snapshot_name(step)

    assert step == parse_snapshot_name(name)


def test_new_names_are_unique_per_attempt() -> None:
    """Two attempts at the same step get different names."""
    names = {new_snapshot_name(5) for _ in range(100)}

    expected = 100
    assert expected == len(names)


@pytest.mark.parametrize(
    "name",
    [
        "step-12",
        "step-000000012",
        "step-00000012-0123456789ab",
        "step-000000012-0123456789AB",
        "step-000000012-0123456789a",
        "step-000000012-0123456789abc",
        "step-000000012-0123456789ab.manifest.json",
        "step-000000012-0123456789ab.tmp",
        "Step-000000012-0123456789ab",
        "xstep-000000012-0123456789ab",
        "step--00000012-0123456789ab",
        "checkpoint-000000012",
        "notes.txt",
        "",
    ],
)
def test_parse_rejects_foreign_names(name: str) -> None:
    """Names that new_snapshot_name cannot make are not snapshot names."""
    assert None is parse_snapshot_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "step-000000012-0123456789ab\n",
        "step-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661\u0662-0123456789ab",
    ],
    ids=["trailing-newline", "arabic-indic-digits"],
)
def test_parse_rejects_lookalike_names(name: str) -> None:
    """A name with a trailing newline or non-ASCII digits is not a snapshot name."""
    assert None is parse_snapshot_name(name)


def test_manifest_round_trip() -> None:
    """A manifest read back from its bytes equals the one written."""
    manifest = _manifest()

    assert manifest == Manifest.from_bytes(manifest.to_bytes(), NAME)


def test_manifest_size_is_sum_of_objects() -> None:
    """A manifest's size is the total size of its objects."""
    expected = 12
    assert expected == _manifest().size


def test_manifest_of_another_name_is_rejected() -> None:
    """A manifest read for a snapshot it does not name is corrupt."""
    other = "step-000000012-ba9876543210"

    with pytest.raises(SnapshotCorruptError) as caught:
        Manifest.from_bytes(_manifest().to_bytes(), other)

    assert other in str(caught.value)


def test_manifest_step_must_match_name() -> None:
    """A manifest whose step differs from its name's is corrupt."""
    with pytest.raises(SnapshotCorruptError):
        Manifest.from_bytes(_manifest(step=13).to_bytes(), NAME)


@pytest.mark.parametrize(
    "object_name",
    [
        "../data.bin",
        "..",
        "a/b",
        "sub/../../data.bin",
        "/etc/passwd",
        "C:\\data.bin",
        "data\\..\\x",
        ".",
        ".hidden",
        "",
        "data.bin\n",
        "~/x",
        "x" * 200,
    ],
)
def test_manifest_cannot_name_anything_outside_its_snapshot(object_name: str) -> None:
    """An object name that is not a plain file name makes the manifest corrupt."""
    objects = json.loads(_manifest().to_bytes())["objects"]
    objects[object_name] = {"size": 1, "checksum": "0"}

    with pytest.raises(SnapshotCorruptError) as caught:
        Manifest.from_bytes(_record(objects=objects), NAME)

    assert "not a plain file name" in str(caught.value)


@pytest.mark.parametrize("missing", ["index.json", "data.bin"])
def test_manifest_missing_an_object_is_rejected(missing: str) -> None:
    """A manifest without the index or the data object is corrupt."""
    objects = json.loads(_manifest().to_bytes())["objects"]
    del objects[missing]

    with pytest.raises(SnapshotCorruptError) as caught:
        Manifest.from_bytes(_record(objects=objects), NAME)

    assert missing in str(caught.value)


def test_manifest_negative_size_is_rejected() -> None:
    """A manifest listing an object of negative size is corrupt."""
    objects = json.loads(_manifest().to_bytes())["objects"]
    objects["data.bin"]["size"] = -1

    with pytest.raises(SnapshotCorruptError):
        Manifest.from_bytes(_record(objects=objects), NAME)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe garbage",
        b"null",
        b"[]",
        b"{}",
        b'{"format_version": 1}',
        _record(objects={"data.bin": 5, "index.json": 5}),
        _record(objects=[]),
        _record(versions=[]),
        _record(schema="State"),
        _record(step="twelve"),
        _record(checksum_algorithm="md5"),
        _manifest().to_bytes()[:-10],
    ],
    ids=[
        "empty",
        "text",
        "binary",
        "null",
        "list",
        "empty-object",
        "version-only",
        "objects-not-records",
        "objects-list",
        "versions-list",
        "schema-string",
        "step-string",
        "checksum-md5",
        "truncated",
    ],
)
def test_garbage_manifest_is_corrupt(data: bytes) -> None:
    """Bytes that are no valid manifest raise SnapshotCorruptError, nothing else."""
    with pytest.raises(SnapshotCorruptError) as caught:
        Manifest.from_bytes(data, NAME)

    assert NAME in str(caught.value)


def test_newer_format_version_asks_for_upgrade() -> None:
    """A manifest of a newer format is incompatible, and the message says upgrade."""
    data = _record(format_version=FORMAT_VERSION + 1)

    with pytest.raises(IncompatibleSnapshotError) as caught:
        Manifest.from_bytes(data, NAME)

    assert "upgrade" in str(caught.value).lower()


def test_check_compatible_accepts_same_program_and_schema() -> None:
    """A snapshot of the same program and schema is compatible."""
    check_compatible(_manifest(), PROGRAM, dict(SCHEMA))


def test_check_compatible_refuses_another_program() -> None:
    """A snapshot of another program is refused, naming both programs."""
    with pytest.raises(IncompatibleSnapshotError) as caught:
        check_compatible(_manifest(), "other.py:fit", SCHEMA)

    assert PROGRAM in str(caught.value)
    assert "other.py:fit" in str(caught.value)


def test_check_compatible_names_fields_added_and_removed() -> None:
    """A snapshot of another schema is refused, naming the fields added and removed."""
    schema = {"class": "State", "fields": ["model", "optimizer", "scheduler"]}

    with pytest.raises(IncompatibleSnapshotError) as caught:
        check_compatible(_manifest(), PROGRAM, schema)

    assert "fields added: scheduler" in str(caught.value)
    assert "fields removed: seen" in str(caught.value)


def test_check_compatible_names_another_class() -> None:
    """A snapshot of another state class is refused, naming both classes."""
    schema = {"class": "OtherState", "fields": SCHEMA["fields"]}

    with pytest.raises(IncompatibleSnapshotError) as caught:
        check_compatible(_manifest(), PROGRAM, schema)

    assert "'State'" in str(caught.value)
    assert "'OtherState'" in str(caught.value)


def test_buffer_table_aligns_every_buffer() -> None:
    """Each buffer starts at a multiple of ALIGNMENT right after the previous one."""
    buffers = [b"x", bytes(ALIGNMENT), b"", bytes(ALIGNMENT + 1), b"abc"]

    expected = [
        [0, 1],
        [ALIGNMENT, ALIGNMENT],
        [2 * ALIGNMENT, 0],
        [2 * ALIGNMENT, ALIGNMENT + 1],
        [4 * ALIGNMENT, 3],
    ]
    assert expected == buffer_table(buffers)


def test_data_chunks_and_buffer_views_round_trip() -> None:
    """The views of the written data object equal the buffers, byte for byte."""
    buffers: list[Any] = [
        b"x",
        np.arange(12, dtype=np.float32).reshape(3, 4),
        b"",
        bytearray(range(65)),
        np.arange(5, dtype=np.int64).data,
    ]
    table = buffer_table(buffers)
    data = b"".join(bytes(chunk) for chunk in data_chunks(buffers))

    views = buffer_views(memoryview(data), table)

    assert [memoryview(b).cast("B").tobytes() for b in buffers] == [
        view.tobytes() for view in views
    ]
    assert table[-1][0] + 40 + (-40 % ALIGNMENT) == len(data)


@pytest.mark.parametrize(
    "table",
    [[[0, 129]], [[64, 65]], [[-1, 2]], [[0, -1]], [[0, 1], [200, 1]]],
)
def test_buffer_views_reject_out_of_range_tables(table: list[list[int]]) -> None:
    """A table pointing outside the data object makes the snapshot corrupt."""
    data = memoryview(bytes(128))

    with pytest.raises(SnapshotCorruptError):
        buffer_views(data, table)
