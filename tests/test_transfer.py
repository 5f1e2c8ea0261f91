"""
Tests of ``resumable._transfer``: an object written with its checksum hashed beside
the write reads back into any mix of placed and own buffers, padding and pieces
included, and a short or damaged object is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from resumable import _transfer
from resumable._snapshot import (
    DATA_OBJECT,
    ObjectInfo,
    buffer_table,
    checksum,
    data_chunks,
)
from resumable._storage import Storage
from resumable.errors import SnapshotCorruptError

NAME = "step-000000001-aaaaaaaaaaaa"


def buffers(sizes: list[int]) -> list[np.ndarray]:
    """Return buffers of random bytes of the given sizes."""
    generator = np.random.default_rng(len(sizes))
    return [generator.integers(0, 256, size, np.uint8) for size in sizes]


def write(url: str, parts: list[np.ndarray], algorithm: str = "xxh3_64") -> Any:
    """Write the parts as a data object; return the storage, its info and table."""
    storage = Storage.open(url)
    info = _transfer.write_checksummed(
        storage, NAME, DATA_OBJECT, data_chunks(parts), algorithm
    )
    return storage, info, buffer_table(parts)


def read(storage: Storage, info: ObjectInfo, table: Any, places: Any) -> list[bytes]:
    """Read the data object back; return each buffer's bytes."""
    views = _transfer.read_checksummed(storage, NAME, info, "xxh3_64", table, places)
    return [bytes(view) for view in views]


# Larger than a piece and than the size hashed in the caller; many small ones,
# more than a batch of vectored reads; odd sizes, so that padding is everywhere.
SIZES = {
    "large": [5 * 2**20 + 3, 17, 2**20],
    "many small": [i % 97 for i in range(2500)],
    "many medium": [20_000 + i for i in range(300)],
    "empty": [],
}


@pytest.mark.parametrize("idle", [True, False])
@pytest.mark.parametrize("layout", list(SIZES))
def test_read_back_into_placed_and_own_buffers(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, layout: str, idle: bool
) -> None:
    """Every other buffer is read into its place, the rest into own memory."""
    monkeypatch.setattr(_transfer, "has_idle_core", lambda: idle)
    parts = buffers(SIZES[layout])
    storage, info, table = write(f"file://{tmp_path}", parts)
    targets = [bytearray(part.nbytes) for part in parts]
    places = [
        memoryview(target) if index % 2 else None
        for index, target in enumerate(targets)
    ]

    found = read(storage, info, table, places)

    expected = (
        [part.tobytes() for part in parts],
        [part.tobytes() for part in parts[1::2]],
        checksum(b"".join(bytes(chunk) for chunk in data_chunks(parts))),
    )
    assert expected == (found, [bytes(t) for t in targets[1::2]], info.checksum)


def test_read_back_from_memory_storage() -> None:
    """Objects on fsspec backends read into places through their file objects."""
    parts = buffers(SIZES["large"])
    storage, info, table = write("memory://transfer-tests/large", parts)
    target = bytearray(parts[0].nbytes)

    found = read(storage, info, table, [memoryview(target), None, None])

    expected = ([part.tobytes() for part in parts], parts[0].tobytes())
    assert expected == (found, bytes(target))


def test_place_of_another_size_is_not_used(tmp_path: Any) -> None:
    """A place whose size differs from its buffer's is ignored: own memory instead."""
    parts = buffers([100, 200])
    storage, info, table = write(f"file://{tmp_path}", parts)
    wrong = bytearray(99)

    found = read(storage, info, table, [memoryview(wrong), None])

    expected = ([part.tobytes() for part in parts], bytes(99))
    assert expected == (found, bytes(wrong))


def test_table_out_of_order_reads_whole_object(tmp_path: Any) -> None:
    """A table this library never writes (overlapping buffers) still reads right."""
    parts = buffers([128])
    storage, info, _ = write(f"file://{tmp_path}", parts)
    table = [[64, 64], [0, 128]]

    found = read(storage, info, table, [bytearray(64), None])

    expected = [parts[0][64:].tobytes(), parts[0].tobytes()]
    assert expected == found


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("longer", "torn or incomplete write"),
        ("checksum", "damaged bytes"),
        ("outside", "lies outside"),
    ],
)
def test_short_damaged_or_outside_is_corrupt(
    tmp_path: Any, change: str, reason: str
) -> None:
    """An object shorter than its info, or of another checksum, is refused."""
    parts = buffers([3 * 2**20, 40])
    storage, info, table = write(f"file://{tmp_path}", parts)
    if change == "longer":
        info = ObjectInfo(size=info.size + 64, checksum=info.checksum)
        table = [*table, [info.size - 64, 64]]
    elif change == "checksum":
        info = ObjectInfo(size=info.size, checksum="0" * 16)
    else:
        table = [[info.size, 1], [0, 1]]

    with pytest.raises(SnapshotCorruptError) as caught:
        read(storage, info, table, [None] * len(table))

    assert reason in str(caught.value)


def test_failed_write_stops_the_hashing_and_raises(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails raises its own error; the hashing thread does not hang."""
    storage = Storage.open(f"file://{tmp_path}")

    def failing(snapshot: str, name: str, chunks: Any) -> int:
        raise OSError("injected")

    monkeypatch.setattr(storage, "write_object", failing)

    with pytest.raises(OSError, match="injected"):
        _transfer.write_checksummed(
            storage, NAME, DATA_OBJECT, buffers([64 * 2**20]), "xxh3_64"
        )
