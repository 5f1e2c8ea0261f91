"""
A data object's bytes between memory and storage, checksummed on the way.

A write hashes in a second thread while the storage writes: both release the GIL,
so the checksum costs the caller little. A read goes front to back into the
buffers the caller placed (the live tensors, where it can), hashing each piece
right after it arrives, while it is still in the cache; padding goes to a small
scratch buffer and unplaced buffers to memory of their own. Knows neither torch
nor fsspec.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from resumable._snapshot import DATA_OBJECT, Hasher, ObjectInfo, buffer_views
from resumable._storage import Storage
from resumable.errors import SnapshotCorruptError

# Bytes read, or hashed, in one piece: small enough to stay in the cache between
# its read and its hash, large enough that system calls cost little.
_PIECE = 1 << 20
# Objects smaller than this are hashed in the caller: a thread would cost more.
_HASH_BESIDE_FROM = 4 << 20
# Buffers in one vectored read, at most.
_BATCH = 1024
# Padding bytes that one batch can take (buffers are 64-byte aligned).
_SCRATCH = _BATCH * 64

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
    hasher = Hasher(algorithm)
    if sum(_bytes(chunk).nbytes for chunk in chunks) < _HASH_BESIDE_FROM:
        _hash_all(hasher, chunks)
        size = storage.write_object(snapshot, name, chunks)
    else:
        size = _write_hashing_beside(storage, snapshot, name, chunks, hasher)

    return ObjectInfo(size=size, checksum=hasher.hexdigest())


def _write_hashing_beside(
    storage: Storage, snapshot: str, name: str, chunks: list[Any], hasher: Hasher
) -> int:
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="resumable-checksum") as pool:
        hashed = pool.submit(_hash_all, hasher, chunks, stop)
        try:
            size = storage.write_object(snapshot, name, chunks)
        except BaseException:
            stop.set()
            raise
        hashed.result()

    return size


def _hash_all(
    hasher: Hasher, chunks: list[Any], stop: threading.Event | None = None
) -> None:
    for chunk in chunks:
        view = _bytes(chunk)
        for start in range(0, view.nbytes, 16 * _PIECE):
            if stop is not None and stop.is_set():
                return
            hasher.update(view[start : start + 16 * _PIECE])


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
    hasher = Hasher(algorithm)
    done = 0
    with storage.reading(snapshot, DATA_OBJECT) as fill:
        for batch in _batches(parts, memoryview(bytearray(_SCRATCH))):
            expected = sum(view.nbytes for view in batch)
            count = fill(batch)
            done += count
            if count < expected:
                msg = (
                    f"object {DATA_OBJECT} ended after {done} bytes, the manifest "
                    f"says {info.size} bytes (torn or incomplete write)"
                )
                raise SnapshotCorruptError(msg)
            # Invariant: hashed before the next batch reuses the scratch.
            for view in batch:
                hasher.update(view)
    found = hasher.hexdigest()
    if found != info.checksum:
        msg = (
            f"object {DATA_OBJECT} has checksum {found}, the manifest says "
            f"{info.checksum} (damaged bytes)"
        )
        raise SnapshotCorruptError(msg)


def _batches(
    parts: Iterable[memoryview | int], scratch: memoryview
) -> Iterator[list[memoryview]]:
    """
    Group parts into vectored reads of about one piece each; large buffers are
    split, padding is read into ``scratch``, reused by each batch.
    """
    batch: list[memoryview] = []
    size = used = 0
    for part in _pieces(parts, scratch.nbytes):
        length = part if isinstance(part, int) else part.nbytes
        if batch and (
            size + length > _PIECE
            or len(batch) == _BATCH
            or (isinstance(part, int) and used + part > scratch.nbytes)
        ):
            yield batch
            batch, size, used = [], 0, 0
        if isinstance(part, int):
            batch.append(scratch[used : used + part])
            used += part
        else:
            batch.append(part)
        size += length
    if batch:
        yield batch


def _pieces(parts: Iterable[memoryview | int], most: int) -> Iterator[memoryview | int]:
    """Split buffers into pieces, and padding into parts the scratch can take."""
    for part in parts:
        if isinstance(part, int):
            for start in range(0, part, most):
                yield min(most, part - start)
        else:
            for start in range(0, part.nbytes, _PIECE):
                yield part[start : start + _PIECE]


def _bytes(chunk: Any) -> memoryview:
    return memoryview(chunk).cast("B")
