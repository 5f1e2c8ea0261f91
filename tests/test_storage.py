"""
Conformance suite of ``Storage``: each test taking ``storage_url`` runs unchanged on
the local file system, in memory and on a real S3 server; the rest pin what only
local storage does.
"""

from __future__ import annotations

import errno
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resumable._storage import Storage, _rejected
from resumable.errors import ConfigurationError, StorageError

NAME = "step-000000001-aaaaaaaaaaaa"
OTHER = "step-000000002-bbbbbbbbbbbb"
MANIFEST = b'{"a manifest": "whole"}'


def _attempt(storage: Storage, name: str = NAME) -> None:
    """Write a small attempt: an attempt record and five bytes of data."""
    storage.write_object(name, "attempt.json", [b"{}"])
    storage.write_object(name, "data.bin", [b"abcde"])


def _lists(storage: Storage) -> tuple[list[str], list[str]]:
    """Return the committed and the uncommitted snapshots, sorted."""
    return sorted(storage.committed()), storage.uncommitted()


def test_write_object_returns_size_and_bytes_read_back(storage_url: str) -> None:
    """write_object returns the number of bytes written, and read returns them."""
    storage = Storage.open(storage_url)
    chunks = [b"ab", bytearray(b"cd"), memoryview(b"efg"), b""]

    size = storage.write_object(NAME, "data.bin", chunks)

    expected = (7, b"abcdefg")
    assert expected == (size, storage.read(NAME, "data.bin"))


def test_snapshot_is_committed_only_by_its_manifest(storage_url: str) -> None:
    """An attempt folder is uncommitted until commit writes its manifest."""
    storage = Storage.open(storage_url)
    _attempt(storage)
    before = _lists(storage)

    storage.commit(NAME, MANIFEST)

    expected: object = (([], [NAME]), ([NAME], []), MANIFEST)
    assert expected == (before, _lists(storage), storage.read_manifest(NAME))


def test_delete_removes_snapshot(storage_url: str) -> None:
    """After delete a snapshot is neither committed nor uncommitted; others stay."""
    storage = Storage.open(storage_url)
    for name in (NAME, OTHER):
        _attempt(storage, name)
        storage.commit(name, MANIFEST)

    storage.delete(NAME)

    expected: object = (([OTHER], []), {})
    assert expected == (_lists(storage), storage.sizes(NAME))


def test_delete_removes_manifest_before_folder(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete failing on the folder leaves an uncommitted folder, never a snapshot."""
    storage = Storage.open(storage_url)
    _attempt(storage)
    storage.commit(NAME, MANIFEST)

    def fail(snapshot: str) -> None:
        raise StorageError("folder deletion failed")

    monkeypatch.setattr(storage, "delete_folder", fail)
    with pytest.raises(StorageError):
        storage.delete(NAME)

    expected: object = ([], [NAME])
    assert expected == _lists(storage)


def test_sizes_lists_each_object(storage_url: str) -> None:
    """sizes maps each object of a snapshot folder to its size; none for no folder."""
    storage = Storage.open(storage_url)
    _attempt(storage)

    expected: object = ({"attempt.json": 2, "data.bin": 5}, {})
    assert expected == (storage.sizes(NAME), storage.sizes(OTHER))


def test_unrecognised_lists_foreign_entries(storage_url: str) -> None:
    """Entries that are neither snapshots nor attempts are listed only as foreign."""
    storage = Storage.open(storage_url)
    _attempt(storage)
    storage.commit(NAME, MANIFEST)
    foreign = ["notes.txt", "step-12", "step-000000003-NOTHEX000000.manifest.json"]
    for name in foreign:
        storage.fs.pipe_file(storage.path(name), b"not ours")
    storage.fs.makedirs(storage.path("checkpoints"), exist_ok=True)
    storage.fs.pipe_file(storage.path("checkpoints", "model.pt"), b"not ours")

    expected: object = (sorted([*foreign, "checkpoints"]), ([NAME], []))
    assert expected == (storage.unrecognised(), _lists(storage))


def test_open_unknown_protocol_raises_configuration_error() -> None:
    """A URL of an unknown protocol is a ConfigurationError that names the URL."""
    url = "nosuchprotocol://bucket/runs"

    with pytest.raises(ConfigurationError) as caught:
        Storage.open(url)

    assert url in str(caught.value)


def test_open_below_regular_file_raises_configuration_error(tmp_path: Path) -> None:
    """A folder whose parent is a regular file is a ConfigurationError with the URL."""
    (tmp_path / "file").write_bytes(b"")
    url = f"file://{tmp_path}/file/store"

    with pytest.raises(ConfigurationError) as caught:
        Storage.open(url)

    assert url in str(caught.value)


def test_disk_full_during_write_says_storage_is_full(storage_url: str) -> None:
    """ENOSPC while writing an object is a StorageError saying the storage is full."""
    storage = Storage.open(storage_url)

    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError) as caught:
        storage.write_object(NAME, "data.bin", chunks())

    assert "The storage is full" in str(caught.value)
    assert storage_url in str(caught.value)


def test_failed_write_publishes_nothing(storage_url: str) -> None:
    """A write that fails after some bytes leaves no object, even after gc."""
    storage = Storage.open(storage_url)
    storage.write_object(NAME, "attempt.json", [b"{}"])

    def chunks() -> Iterator[bytes]:
        yield bytes(2**20)
        raise RuntimeError("injected after 1 MiB")

    with pytest.raises(RuntimeError):
        storage.write_object(NAME, "data.bin", chunks())
    gc.collect()

    expected = {"attempt.json": 2}
    assert expected == storage.sizes(NAME)


def test_local_commit_renames_a_durable_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local commit fsyncs a whole temporary file, renames it, and leaves no temp."""
    storage = Storage.open(f"file://{tmp_path}/store")
    _attempt(storage)
    events: list[object] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(source: str, target: str) -> None:
        events.append(("replace", Path(source).read_bytes(), target))
        real_replace(source, target)

    def fsync(descriptor: int) -> None:
        events.append("fsync")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    storage.commit(NAME, MANIFEST)
    monkeypatch.undo()

    manifest = storage.path(NAME + ".manifest.json")
    expected = [
        ["fsync", ("replace", MANIFEST, manifest), "fsync"],
        sorted([NAME, NAME + ".manifest.json"]),
        ["attempt.json", "data.bin"],
    ]
    assert expected == [
        events,
        sorted(os.listdir(storage.root)),
        sorted(os.listdir(storage.path(NAME))),
    ]


def test_local_commit_failing_rename_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local commit whose rename fails leaves no manifest and no temporary file."""
    storage = Storage.open(f"file://{tmp_path}/store")
    _attempt(storage)

    def replace(source: str, target: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StorageError):
        storage.commit(NAME, MANIFEST)
    monkeypatch.undo()

    expected: object = (([], [NAME]), ["attempt.json", "data.bin"])
    assert expected == (_lists(storage), sorted(os.listdir(storage.path(NAME))))


def test_a_second_client_sees_what_another_wrote_since_it_looked(
    storage_url: str,
) -> None:
    """Listings and sizes come from the storage, never from a stale client cache."""
    writer = Storage.open(storage_url)
    reader = Storage.open(storage_url, {"skip_instance_cache": True})
    writer.write_object(NAME, "attempt.json", [b"{}"])
    before = (reader.sizes(NAME), _lists(reader))

    writer.write_object(NAME, "data.bin", [b"abcde"])
    writer.commit(NAME, MANIFEST)

    assert ({"attempt.json": 2}, ([], [NAME])) == before
    assert {"attempt.json": 2, "data.bin": 5} == reader.sizes(NAME)
    assert ([NAME], []) == _lists(reader)


def test_a_claim_on_a_full_disk_is_created_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create() holds the name when only its content finds no room (a full disk)."""
    storage = Storage.open(f"file://{tmp_path}/store")
    real_fsync = os.fsync

    def full(descriptor: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", full)

    created = storage.create("incarnation-000000001.json", b'{"pid": 1}')
    again = storage.create("incarnation-000000001.json", b'{"pid": 2}')

    assert (True, False) == (created, again)
    assert (tmp_path / "store" / "incarnation-000000001.json").exists()


def test_read_through_fills_buffers_in_turn(storage_url: str) -> None:
    """read_through fills buffers front to back; the count is short past the end."""
    storage = Storage.open(storage_url)
    storage.write_object(NAME, "data.bin", [b"abcdefghij"])
    first, second, third = bytearray(3), bytearray(4), bytearray(5)

    counts = storage.read_through(
        NAME,
        "data.bin",
        lambda fill: (
            fill([memoryview(first), memoryview(second)]),
            fill([memoryview(third)]),
        ),
    )

    expected = ((7, 3), b"abc", b"defg", b"hij\0\0")
    assert expected == (counts, first, second, third)


def test_local_read_survives_partial_system_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vectored reads that move 3 bytes a call still fill every buffer in turn."""
    storage = Storage.open(f"file://{tmp_path}")
    size = storage.write_object(NAME, "data.bin", [b"abcdefghijklmn" * 700])
    readv = os.readv

    def short_readv(descriptor: int, views: list[memoryview]) -> int:
        return readv(descriptor, [memoryview(views[0]).cast("B")[:3]])

    monkeypatch.setattr(os, "readv", short_readv)
    backs = [bytearray(size // 2), bytearray(5), bytearray(size - size // 2 - 5)]
    count = storage.read_through(
        NAME, "data.bin", lambda fill: fill([memoryview(back) for back in backs])
    )

    expected = (size, b"abcdefghijklmn" * 700)
    assert expected == (count, b"".join(backs))


class NoCredentialsError(Exception):
    """Named as botocore's is: the storage recognises it by its name."""


def test_an_error_that_ends_a_sentence_is_not_given_a_second_full_stop() -> None:
    """A backend's message that ends in a full stop gets no second one."""
    err = NoCredentialsError("Unable to locate credentials.")

    message = _rejected("s3://bucket/run", err)

    assert "credentials. Give credentials" in message
    assert "credentials.." not in message


def test_an_attempt_deleted_meanwhile_by_another_process_is_deleted(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files that vanish while a folder is deleted (another cleanup) are no error."""
    storage = Storage.open(storage_url)
    _attempt(storage)
    remove = type(storage.fs).rm_file

    def raced(fs: Any, path: str, *args: Any, **kwargs: Any) -> None:
        remove(fs, path, *args, **kwargs)  # the other process got there first
        remove(fs, path, *args, **kwargs)

    monkeypatch.setattr(type(storage.fs), "rm_file", raced)
    storage.delete_folder(NAME)

    assert {} == storage.sizes(NAME)
