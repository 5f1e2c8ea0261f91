"""
A data object's bytes between memory and storage, checksummed on the way.

A write hands its chunks to ``Hashing`` and writes them meanwhile, so that the
checksum overlaps the write and its fsync. A read goes front to back into the
buffers the caller placed (the live tensors, where it can), and hands what
arrived to ``Hashing`` every few MiB, so that the checksum overlaps the reads
(or, with no idle core, hashes each small piece right after it arrives, still in
the cache); padding and unplaced buffers get memory of their own. Knows neither
torch nor fsspec.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from resumable._hashing import Hashing, has_idle_core
from resumable._snapshot import DATA_OBJECT, Hasher, ObjectInfo, buffer_views
from resumable._storage import Fill, Storage
from resumable.errors import SnapshotCorruptError

# Bytes read in one system call, at most, and handed to the hashing at once. With
# a helper thread, few handovers; inline, pieces small enough to be still in the
# cache when hashed. The fastest here of those tried (bench_snapshot.py).
_PIECE, _GROUP = 1 << 20, 8 << 20
_INLINE_PIECE = 256 << 10
# Objects smaller than this are hashed inline: a thread would cost more.
_HASH_BESIDE_FROM = 4 << 20
# Buffers in one vectored read, at most.
_BATCH = 1024

# Where each buffer of a snapshot goes: a writable view of its size, or None.
Places = Sequence[memoryview | None]


def write_checksummed(
    storage: Storage,
    snapshot: str,
    name: str,
    chunks: Iterable[Any],
    algorithm: str,
) -> ObjectInfo:
    """Write one object from bytes-like chunks; return its size and checksum."""
    # A list, so that the storage may send it again after a transient failure.
    chunks = list(chunks)
    views = [_bytes(chunk) for chunk in chunks]
    beside = sum(view.nbytes for view in views) >= _HASH_BESIDE_FROM
    with Hashing(algorithm, beside=beside) as hashing:
        for group in _groups(views):
            hashing.give(group)
        size = storage.write_object(snapshot, name, chunks)
        found = hashing.hexdigest()

    return ObjectInfo(size=size, checksum=found)


def _groups(views: list[memoryview]) -> Iterator[list[memoryview]]:
    """Split views into groups of about ``_GROUP`` bytes, in order."""
    group: list[memoryview] = []
    size = 0
    for view in views:
        for start in range(0, view.nbytes, _GROUP):
            group.append(view[start : start + _GROUP])
            size += group[-1].nbytes
            if size >= _GROUP:
                yield group
                group, size = [], 0
    yield group


def read_checksummed(
    storage: Storage,
    snapshot: str,
    info: ObjectInfo,
    algorithm: str,
    table: Sequence[Sequence[int]],
    places: Places,
    object_name: str = DATA_OBJECT,
) -> list[memoryview]:
    """
    Read a data object (``data.bin``, or a rank's part) into its buffers,
    checking its size and checksum.

    ``places`` holds, for each buffer of ``table``, the writable view its bytes
    go to, or None for memory of its own. Their bytes count only once this
    returns: a damaged object leaves them filled with whatever arrived.

    Returns:
        A view of each buffer, where its bytes now are.

    Raises:
        SnapshotCorruptError: The object is short, fails its checksum, or the
            table points outside it.
    """
    if not _in_order(table, info.size):
        # Not the layout this library writes: one piece, then checked views.
        data = memoryview(bytearray(info.size))
        _read(storage, snapshot, info, algorithm, [data], object_name)
        return buffer_views(data, table)
    buffers = _destinations(table, places)
    regions = _front_to_back(table, buffers, info)
    _read(storage, snapshot, info, algorithm, regions, object_name)

    return buffers


def _in_order(table: Sequence[Sequence[int]], size: int) -> bool:
    """Say whether buffers follow each other without overlap, all inside the data."""
    end = 0
    for offset, length in table:
        if offset < end or length < 0:
            return False
        end = offset + length
    return end <= size


def _destinations(table: Sequence[Sequence[int]], places: Places) -> list[memoryview]:
    """Return the view each buffer is read into: its place, or memory of its own."""
    chosen = [
        place if place is not None and place.nbytes == length else None
        for (_, length), place in zip(table, places, strict=True)
    ]
    own = sum(
        length
        for (_, length), place in zip(table, chosen, strict=True)
        if place is None
    )
    spare = memoryview(bytearray(own))
    buffers = []
    for (_, length), place in zip(table, chosen, strict=True):
        if place is None:
            place, spare = spare[:length], spare[length:]
        buffers.append(place)

    return buffers


def _front_to_back(
    table: Sequence[Sequence[int]], buffers: list[memoryview], info: ObjectInfo
) -> list[memoryview]:
    """Return the object's regions in order: each buffer, and padding of its own."""
    regions, position = [], 0
    for (offset, length), buffer in zip(table, buffers, strict=True):
        if offset > position:
            regions.append(memoryview(bytearray(offset - position)))
        regions.append(buffer)
        position = offset + length
    if info.size > position:
        regions.append(memoryview(bytearray(info.size - position)))

    return regions


def _read(
    storage: Storage,
    snapshot: str,
    info: ObjectInfo,
    algorithm: str,
    regions: list[memoryview],
    object_name: str,
) -> None:
    found = storage.read_through(
        snapshot, object_name, functools.partial(_hash_read, regions, algorithm, info)
    )
    if found != info.checksum:
        msg = (
            f"object {object_name} has checksum {found}, the manifest says "
            f"{info.checksum} (damaged bytes)"
        )
        raise SnapshotCorruptError(msg)


def _hash_read(
    regions: list[memoryview], algorithm: str, info: ObjectInfo, fill: Fill
) -> str:
    """Read all regions from their start, hashing them; return the checksum."""
    if info.size >= _HASH_BESIDE_FROM and has_idle_core():
        with Hashing(algorithm, beside=True) as hashing:
            _read_handing_over(fill, regions, hashing, info)
            return hashing.hexdigest()
    hasher = Hasher(algorithm)
    _read_hashing(fill, regions, hasher, info)

    return hasher.hexdigest()


def _read_hashing(
    fill: Fill, regions: list[memoryview], hasher: Hasher, info: ObjectInfo
) -> None:
    """Read in small pieces, each hashed right after it arrives, still in the cache."""
    done = 0
    for batch, size in _batches(regions, _INLINE_PIECE):
        count = fill(batch)
        done += count
        if count < size:
            _refuse_short(done, info)
        for view in batch:
            hasher.update(view)


def _read_handing_over(
    fill: Fill, regions: list[memoryview], hashing: Hashing, info: ObjectInfo
) -> None:
    """Read in pieces, handing what arrived to the hashing thread every group."""
    arrived = _Arrived(regions)
    for batch, size in _batches(regions, _PIECE):
        count = fill(batch)
        if count < size:
            _refuse_short(arrived.end + count, info)
        arrived.end += count
        if arrived.end - arrived.given >= _GROUP:
            hashing.give(arrived.take())
            hashing.help()
    hashing.give(arrived.take())


class _Arrived:
    """The bytes read so far, handed to the hashing as few long views."""

    def __init__(self, regions: list[memoryview]) -> None:
        self._regions = regions
        self._index = self._offset = 0
        # Bytes read, and bytes handed over, from the object's start.
        self.end = self.given = 0

    def take(self) -> list[memoryview]:
        """Return views of the bytes that arrived since the last call."""
        views = []
        while self.given < self.end:
            region = self._regions[self._index]
            step = min(region.nbytes - self._offset, self.end - self.given)
            views.append(region[self._offset : self._offset + step])
            self._offset += step
            self.given += step
            if self._offset == region.nbytes:
                self._index, self._offset = self._index + 1, 0

        return views


def _refuse_short(done: int, info: ObjectInfo) -> None:
    msg = (
        f"object {DATA_OBJECT} ended after {done} bytes, the manifest says "
        f"{info.size} bytes (torn or incomplete write)"
    )
    raise SnapshotCorruptError(msg)


def _batches(
    regions: list[memoryview], most: int
) -> Iterator[tuple[list[memoryview], int]]:
    """Group regions into vectored reads of ``most`` bytes at most, with their size."""
    batch: list[memoryview] = []
    size = 0
    for region in regions:
        for start in range(0, region.nbytes, most):
            piece = region[start : start + most]
            if batch and (size + piece.nbytes > most or len(batch) == _BATCH):
                yield batch, size
                batch, size = [], 0
            batch.append(piece)
            size += piece.nbytes
    if batch:
        yield batch, size


def _bytes(chunk: Any) -> memoryview:
    return memoryview(chunk).cast("B")
