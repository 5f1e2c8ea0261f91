"""
A data object's bytes between memory and storage, checksummed on the way.

A write hands its chunks to ``Hashing`` and writes them meanwhile, so that the
checksum overlaps the write and its fsync. A read goes front to back into the
buffers the caller placed (the live tensors, where it can), and hands what
arrived to ``Hashing`` every few MiB, so that the checksum overlaps the reads;
padding and unplaced buffers get memory of their own. Knows neither torch nor
fsspec.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from resumable._hashing import Hashing
from resumable._snapshot import DATA_OBJECT, ObjectInfo, buffer_views
from resumable._storage import Storage
from resumable.errors import SnapshotCorruptError

# Bytes read in one system call, at most, and handed to the hashing at once: the
# fastest here of those tried (benchmarks/bench_snapshot.py).
_PIECE = 1 << 20
_GROUP = 8 << 20
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
        for view in views:
            for start in range(0, view.nbytes, _GROUP):
                hashing.give([view[start : start + _GROUP]])
        size = storage.write_object(snapshot, name, chunks)
        found = hashing.hexdigest()

    return ObjectInfo(size=size, checksum=found)


def read_checksummed(
    storage: Storage,
    snapshot: str,
    info: ObjectInfo,
    algorithm: str,
    table: Sequence[Sequence[int]],
    places: Places,
) -> list[memoryview]:
    """
    Read the data object into its buffers, checking its size and checksum.

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
        _read(storage, snapshot, info, algorithm, [data])
        return buffer_views(data, table)
    buffers = _destinations(table, places)
    _read(storage, snapshot, info, algorithm, _front_to_back(table, buffers, info))

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
    own = [
        length for (_, length), place in zip(table, chosen, strict=True) if not place
    ]
    spare = memoryview(bytearray(sum(own)))
    buffers = []
    for (_, length), place in zip(table, chosen, strict=True):
        if place is None:
            place, spare = spare[:length], spare[length:]
        buffers.append(place)

    return buffers


def _front_to_back(
    table: Sequence[Sequence[int]], buffers: list[memoryview], info: ObjectInfo
) -> Iterator[memoryview | int]:
    """Yield the object's parts in order: each buffer, or a count of padding bytes."""
    position = 0
    for (offset, length), buffer in zip(table, buffers, strict=True):
        if offset > position:
            yield offset - position
        yield buffer
        position = offset + length
    if info.size > position:
        yield info.size - position


def _read(
    storage: Storage,
    snapshot: str,
    info: ObjectInfo,
    algorithm: str,
    parts: Iterable[memoryview | int],
) -> None:
    done = grouped = 0
    group: list[memoryview] = []
    beside = info.size >= _HASH_BESIDE_FROM
    with Hashing(algorithm, beside=beside) as hashing:
        with storage.reading(snapshot, DATA_OBJECT) as fill:
            for batch, size in _batches(parts):
                count = fill(batch)
                done += count
                if count < size:
                    _refuse_short(done, info)
                group += batch
                grouped += count
                if grouped >= _GROUP:
                    hashing.give(group)
                    hashing.help()
                    group, grouped = [], 0
        hashing.give(group)
        found = hashing.hexdigest()
    if found != info.checksum:
        msg = (
            f"object {DATA_OBJECT} has checksum {found}, the manifest says "
            f"{info.checksum} (damaged bytes)"
        )
        raise SnapshotCorruptError(msg)


def _refuse_short(done: int, info: ObjectInfo) -> None:
    msg = (
        f"object {DATA_OBJECT} ended after {done} bytes, the manifest says "
        f"{info.size} bytes (torn or incomplete write)"
    )
    raise SnapshotCorruptError(msg)


def _batches(
    parts: Iterable[memoryview | int],
) -> Iterator[tuple[list[memoryview], int]]:
    """
    Group parts into vectored reads of one piece at most, each with its size:
    buffers are split, padding gets memory of its own (it waits to be hashed).
    """
    batch: list[memoryview] = []
    size = 0
    for part in parts:
        length = part if isinstance(part, int) else part.nbytes
        for start in range(0, length, _PIECE):
            step = min(_PIECE, length - start)
            if batch and (size + step > _PIECE or len(batch) == _BATCH):
                yield batch, size
                batch, size = [], 0
            if isinstance(part, int):
                batch.append(memoryview(bytearray(step)))
            else:
                batch.append(part[start : start + step])
            size += step
    if batch:
        yield batch, size


def _bytes(chunk: Any) -> memoryview:
    return memoryview(chunk).cast("B")
