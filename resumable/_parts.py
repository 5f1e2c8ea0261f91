"""
Snapshots of many processes: each rank writes its part, one manifest commits all.

Rank 0's part is the usual ``index.json`` and ``data.bin``: its whole state. The
part of rank N > 0 is ``index-rankN.json``, its whole tree, and ``data-rankN.bin``
with only the buffers whose bytes differ from rank 0's buffer of the same index
(RNG streams, data positions, shards); the others (DDP parameters, optimizer
moments) are read from ``data.bin``. Which buffers are replicated is found by
comparing each buffer's checksum across ranks (one all-gather of digests), not
declared: no marker can be forgotten, and a buffer that drifted apart is kept.
The commit, in this order: rank 0 writes the attempt record; every rank writes
its part; rank 0 gathers every part's size and checksum and, only where all
succeeded, commits the manifest. The loop and its safe points stay in
``_runtime``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from resumable._archive import Archive, Loaded, Placer
from resumable._distributed import Group
from resumable._snapshot import (
    ATTEMPT_OBJECT,
    CHECKSUM_ALGORITHM,
    INDEX_OBJECT,
    RANKS_FORMAT_VERSION,
    Manifest,
    ObjectInfo,
    Payload,
    buffer_table,
    checksum,
    data_chunks,
    new_snapshot_name,
    part_objects,
)
from resumable._space import delete_attempt
from resumable._transfer import read_checksummed, write_checksummed
from resumable.errors import (
    ConfigurationError,
    SnapshotCorruptError,
    StorageError,
)

logger = logging.getLogger(__name__)

# What a rank hands over at the start of a snapshot: the name (rank 0's counts),
# each buffer's checksum, the tree's, and why it cannot take part, or None.
_Start = tuple[str, list[str], str, str | None]


def write_parts(
    archive: Archive,
    group: Group,
    step: int,
    lineage: tuple[str, int, int],
    content: tuple[dict[str, Any], list[Any]],
    details: dict[str, Any],
) -> Manifest:
    """
    Write this rank's part of a snapshot; on rank 0, commit it once every part
    is durable. Every rank calls it at the same safe point.

    ``details`` holds the manifest's ``schema``, ``inside_step`` and
    ``arguments``.

    Raises:
        StorageError: A rank's part failed; nothing was committed.
    """
    started = time.perf_counter()
    tree, buffers = content
    starts: list[_Start] = group.gather(
        _start(archive, group, step, lineage, content), "the start of a snapshot"
    )
    name = starts[0][0]
    _raise_failed([start[3] for start in starts], archive, group, name)
    base = starts[0][1]
    try:
        objects = _write_part(archive, group.rank, name, tree, buffers, base)
        result: dict[str, ObjectInfo] | str = objects
    except Exception as err:  # every rank learns of it below
        result = f"{type(err).__name__}: {err}"
    results = group.gather(result, "the writes of a snapshot's parts")
    _raise_failed(
        [r if isinstance(r, str) else None for r in results], archive, group, name
    )
    replicated = all(s[1] == base and s[2] == starts[0][2] for s in starts)

    def commit() -> Manifest:
        every = {key: info for part in results for key, info in part.items()}
        manifest = archive.new_manifest(
            name,
            step,
            lineage,
            every,
            started,
            format_version=RANKS_FORMAT_VERSION,
            world_size=group.world_size,
            replicated=replicated,
            **details,
        )
        archive.commit(manifest)
        return manifest

    return group.lead(commit, "the commit of a snapshot")


def _start(
    archive: Archive,
    group: Group,
    step: int,
    lineage: tuple[str, int, int],
    content: tuple[dict[str, Any], list[Any]],
) -> _Start:
    tree, buffers = content
    digests = [checksum(memoryview(buffer).cast("B")) for buffer in buffers]
    shape = checksum(json.dumps(tree, sort_keys=True).encode())
    if not group.leads:
        return "", digests, shape, None
    name = new_snapshot_name(step)
    attempt = {
        "program": archive.program,
        "lineage": lineage[0],
        "generation": lineage[1],
    }
    try:
        # Invariant: the attempt record comes first, before any rank's part, so
        # that cleanup can prove who made the folder.
        archive.storage.write_object(
            name, ATTEMPT_OBJECT, [json.dumps(attempt).encode()]
        )
    except StorageError as err:
        return name, digests, shape, f"{type(err).__name__}: {err}"
    return name, digests, shape, None


def _raise_failed(
    failures: Sequence[str | None], archive: Archive, group: Group, name: str
) -> None:
    """Raise on every rank where one failed; rank 0 deletes the attempt."""
    failed = [(rank, text) for rank, text in enumerate(failures) if text]
    if not failed:
        return
    if group.leads:
        delete_attempt(archive.storage, name)
    told = "; ".join(f"rank {rank}: {text}" for rank, text in failed)
    msg = (
        f"Snapshot {name} was not committed: a part failed ({told}). The newest "
        "committed snapshot stays; fix the storage and run the job again."
    )
    raise StorageError(msg)


def _write_part(
    archive: Archive,
    rank: int,
    name: str,
    tree: dict[str, Any],
    buffers: list[Any],
    base: list[str],
) -> dict[str, ObjectInfo]:
    index_name, data_name = part_objects(rank)
    if rank == 0:
        payload = Payload.of(tree, buffers)
        chunks, index = payload.data, payload.index
    else:
        shared = [
            number
            for number, buffer in enumerate(buffers)
            if number < len(base)
            and checksum(memoryview(buffer).cast("B")) == base[number]
        ]
        own = [b for number, b in enumerate(buffers) if number not in set(shared)]
        chunks = list(data_chunks(own))
        record = {"tree": tree, "buffers": buffer_table(own), "shared": shared}
        index = json.dumps(record).encode()
    storage = archive.storage
    return {
        data_name: write_checksummed(
            storage, name, data_name, chunks, CHECKSUM_ALGORITHM
        ),
        index_name: write_checksummed(
            storage, name, index_name, [index], CHECKSUM_ALGORITHM
        ),
    }


def read_part(
    archive: Archive, manifest: Manifest, rank: int, place: Placer | None
) -> Loaded:
    """
    Read and verify rank ``rank``'s part of a snapshot (rank 0's where the
    snapshot is loaded at another world size), with the replicated buffers.

    Raises:
        SnapshotCorruptError: Something of the part is missing, short or damaged.
    """
    if rank == 0 or manifest.world_size != archive.world_size:
        return archive.read(manifest, place)
    index_name, data_name = part_objects(rank)
    if data_name not in manifest.objects:
        msg = f"snapshot {manifest.name} has no part of rank {rank}"
        raise SnapshotCorruptError(msg)
    tree, table, shared = _read_index(archive, manifest, index_name)
    sizes = _sizes(archive, manifest, table, shared)
    places = place(tree, sizes) if place else [None] * len(sizes)
    own = [n for n in range(len(sizes)) if n not in set(shared)]
    buffers: list[Any] = [None] * len(sizes)
    algorithm = manifest.checksum_algorithm
    mine = read_checksummed(
        archive.storage,
        manifest.name,
        manifest.objects[data_name],
        algorithm,
        table,
        [places[n] for n in own],
        data_name,
    )
    for number, view in zip(own, mine, strict=True):
        buffers[number] = view
    if shared:
        base = archive.read(manifest, None).buffers
        for number in shared:
            buffers[number] = base[number]

    return Loaded(manifest, tree, buffers)


def _read_index(
    archive: Archive, manifest: Manifest, index_name: str
) -> tuple[dict[str, Any], list[list[int]], list[int]]:
    data = archive.storage.read(manifest.name, index_name)
    if (
        checksum(data, manifest.checksum_algorithm)
        != manifest.objects[index_name].checksum
    ):
        msg = f"object {index_name} fails its checksum (damaged bytes)"
        raise SnapshotCorruptError(msg)
    try:
        record = json.loads(data)
        table = [[int(offset), int(size)] for offset, size in record["buffers"]]
        return record["tree"], table, [int(number) for number in record["shared"]]
    except (ValueError, KeyError, TypeError) as err:
        msg = f"{index_name} of {manifest.name} is unreadable: {err}"
        raise SnapshotCorruptError(msg) from None


def _sizes(
    archive: Archive, manifest: Manifest, table: list[list[int]], shared: list[int]
) -> list[list[int]]:
    """Return ``[0, size]`` of every buffer of the part, own and replicated."""
    base = json.loads(archive.storage.read(manifest.name, INDEX_OBJECT))["buffers"]
    sizes: list[list[int]] = []
    own = iter(table)
    for number in range(len(table) + len(shared)):
        size = base[number][1] if number in set(shared) else next(own)[1]
        sizes.append([0, int(size)])
    return sizes


def check_shared_storage(archive: Archive, group: Group) -> None:
    """
    Make sure every rank sees the same storage: rank 0 writes a token, the
    others must read it.

    Raises:
        ConfigurationError: A rank does not see rank 0's token.
    """
    storage = archive.storage
    token = f"shared-{uuid.uuid4().hex[:12]}"
    if group.leads:
        storage.write_object(token, "token.json", [token.encode()])
    token = group.lead(lambda: token, "the storage check")
    try:
        seen = storage.read(token, "token.json").decode() == token
    except StorageError:
        seen = False
    seen_by = group.gather(seen, "the storage check")
    if group.leads:
        storage.delete_folder(token)
    missing = [rank for rank, seen in enumerate(seen_by) if not seen]
    if missing:
        msg = (
            f"Ranks {missing} do not see the storage {storage.url} that rank 0 "
            "writes to: each node would keep snapshots of its own. Give every "
            "rank one shared --storage (a network file system or an object "
            "store), the same URL on every node."
        )
        raise ConfigurationError(msg)
