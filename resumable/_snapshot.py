"""
The snapshot format: names, manifest, checksums. Knows neither torch nor fsspec.

A snapshot named ``step-000000012-<attempt>`` is a folder of payload objects
(``index.json`` and ``data.bin``) plus, beside the folder, the manifest
``step-000000012-<attempt>.manifest.json`` that commits it. The manifest lists each
object's size and checksum; it cannot name anything outside its own folder.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import xxhash

from resumable.errors import IncompatibleSnapshotError, SnapshotCorruptError

# Bumped on any change a reader of an older version would misread: the newest
# this library reads. Snapshots of one process are still written as version 1.
FORMAT_VERSION = 2
# The version of snapshots of many processes, that older readers must refuse.
RANKS_FORMAT_VERSION = 2
# Suffix of the file whose presence commits a snapshot.
MANIFEST_SUFFIX = ".manifest.json"
# The tree of the state, with JSON values inline and references into the data object.
INDEX_OBJECT = "index.json"
# Raw tensor and array bytes, then pickles, each aligned to _ALIGNMENT.
DATA_OBJECT = "data.bin"
# Written first into an attempt's folder, so that cleanup can prove who made it.
ATTEMPT_OBJECT = "attempt.json"
# Prefix of the small files, beside a snapshot's objects, that count its starts.
START_PREFIX = "start-"
# Claims of the run's incarnations, one per start, created exclusively: the fencing
# tokens (``incarnation-000000007.json``).
INCARNATION_PREFIX = "incarnation-"
# Name of the checksum written for every object: xxhash's xxh3_64, chosen by
# benchmarks/bench_checksum.py (as fast as any candidate, and it releases the GIL).
CHECKSUM_ALGORITHM = "xxh3_64"
# Every checksum a reader verifies, by the name a manifest records: an old snapshot
# still verifies after the written one changes.
CHECKSUMS: dict[str, Callable[[], Any]] = {
    "xxh3_64": xxhash.xxh3_64,
    "xxh3_128": xxhash.xxh3_128,
}
# Byte alignment of each buffer in the data object, so that views of it are aligned.
ALIGNMENT = 64
# Largest piece of a staged data object handed to the storage at once: hashing one
# holds the GIL (xxhash does not release it) for about a millisecond at most.
PIECE_BYTES = 8 * 2**20

# Objects of the part of rank N > 0 of a snapshot of many processes; rank 0's part
# is INDEX_OBJECT and DATA_OBJECT, holding every buffer replicated on all ranks.
RANK_INDEX_OBJECT = "index-rank{rank:05d}.json"
RANK_DATA_OBJECT = "data-rank{rank:05d}.bin"

_NAME = re.compile(r"step-([0-9]{9,})-([0-9a-f]{12})")
_INCARNATION = re.compile(r"incarnation-([0-9]{9,})\.json")
_OBJECT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def new_snapshot_name(step: int) -> str:
    """Return a name for a new attempt at a snapshot after ``step`` steps."""
    return f"step-{step:09d}-{uuid.uuid4().hex[:12]}"


def new_lineage() -> str:
    """Return the id of a new chain of snapshots, one run from its fresh start."""
    return uuid.uuid4().hex


def incarnation_name(number: int) -> str:
    """Return the name of the claim of incarnation ``number``."""
    return f"{INCARNATION_PREFIX}{number:09d}.json"


def parse_incarnation_name(name: str) -> int | None:
    """Return the number in an incarnation's claim name, or None for other names."""
    match = _INCARNATION.fullmatch(name)
    return int(match.group(1)) if match else None


def parse_snapshot_name(name: str) -> int | None:
    """Return the step in a snapshot name, or None for names that are not ours."""
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else None


class Hasher:
    """Incremental checksum of the bytes of one object, by the algorithm's name."""

    def __init__(self, algorithm: str = CHECKSUM_ALGORITHM) -> None:
        self._hash = CHECKSUMS[algorithm]()

    def update(self, data: Any) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return str(self._hash.hexdigest())


def checksum(data: Any, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """Return the checksum of a bytes-like object."""
    hasher = Hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


@attrs.frozen
class ObjectInfo:
    """Size and checksum of one payload object."""

    size: int
    checksum: str


@attrs.frozen
class Manifest:
    """The record that commits a snapshot."""

    name: str
    step: int
    generation: int
    lineage: str
    # The generation of the lineage's first commit: older ones of other lineages
    # were superseded (--fresh); newer ones come from another run.
    lineage_start: int
    program: str
    schema: dict[str, Any]
    objects: dict[str, ObjectInfo]
    created: float = attrs.Factory(time.time)
    # Where inside a step it was taken ({"loop", "item"}); None at a step's end.
    inside_step: dict[str, int] | None = None
    # Seconds its objects took to write: a resumed run's first time estimate.
    write_seconds: float | None = None
    # The script's own arguments, where the CLI ran it.
    arguments: list[str] | None = None
    # The number of the incarnation that committed it: orders equal generations.
    incarnation: int = 0
    versions: dict[str, str] = attrs.Factory(dict)
    format_version: int = 1
    # The processes that wrote it, one part each (see RANK_INDEX_OBJECT).
    world_size: int = 1
    # Whether every rank's part equals rank 0's: any world size can load it.
    replicated: bool = False
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    @property
    def size(self) -> int:
        return sum(info.size for info in self.objects.values())

    def to_bytes(self) -> bytes:
        record = attrs.asdict(self, recurse=True)
        record["manifest_checksum"] = _record_checksum(record)
        return json.dumps(record, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> Manifest:
        """
        Parse and check a manifest read from the file for snapshot ``name``.

        Raises:
            SnapshotCorruptError: The bytes are no manifest of ours, or name objects
                outside the snapshot.
            IncompatibleSnapshotError: A newer format version wrote it.
        """
        try:
            record = json.loads(data)
            version = record["format_version"]
        except (ValueError, KeyError, TypeError) as err:
            msg = f"Manifest of {name} is not readable JSON of resumable: {err}."
            raise SnapshotCorruptError(msg) from None
        if type(version) is not int:
            msg = f"Manifest of {name} has format version {version!r}, not an integer."
            raise SnapshotCorruptError(msg)
        if version > FORMAT_VERSION:
            msg = (
                f"Snapshot {name} has format version {version!r}, newer than the "
                f"{FORMAT_VERSION} this resumable reads. Upgrade resumable to load it."
            )
            raise IncompatibleSnapshotError(msg)
        if record.get("manifest_checksum") != _record_checksum(record):
            msg = f"Manifest of {name} fails its own checksum (damaged bytes)."
            raise SnapshotCorruptError(msg)
        try:
            manifest = _manifest_from_record(record)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            msg = f"Manifest of {name} is malformed: {err!r}."
            raise SnapshotCorruptError(msg) from None
        _check_manifest(manifest, name)

        return manifest


def _manifest_from_record(record: Mapping[str, Any]) -> Manifest:
    objects = {
        str(key): ObjectInfo(size=int(value["size"]), checksum=str(value["checksum"]))
        for key, value in record["objects"].items()
    }
    return Manifest(
        name=str(record["name"]),
        step=int(record["step"]),
        generation=int(record["generation"]),
        lineage=str(record["lineage"]),
        lineage_start=int(record["lineage_start"]),
        program=str(record["program"]),
        schema=dict(record["schema"]),
        objects=objects,
        created=float(record["created"]),
        inside_step=_inside_step(record.get("inside_step")),
        write_seconds=_optional_float(record.get("write_seconds")),
        arguments=_optional_strings(record.get("arguments")),
        incarnation=int(record.get("incarnation", 0)),
        versions={str(k): str(v) for k, v in record["versions"].items()},
        format_version=int(record["format_version"]),
        world_size=int(record.get("world_size", 1)),
        replicated=bool(record.get("replicated", False)),
        checksum_algorithm=str(record["checksum_algorithm"]),
    )


def _record_checksum(record: Mapping[str, Any]) -> str:
    """Checksum of a manifest's record, without the checksum itself."""
    rest = {key: value for key, value in record.items() if key != "manifest_checksum"}
    # Always xxh3_64, whatever the objects use: part of the format, read first.
    return xxhash.xxh3_64_hexdigest(json.dumps(rest, sort_keys=True).encode())


def _optional_strings(value: Any) -> list[str] | None:
    return None if value is None else [str(item) for item in value]


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _inside_step(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    return {"loop": int(value["loop"]), "item": int(value["item"])}


def _check_manifest(manifest: Manifest, name: str) -> None:
    problems = []
    if manifest.name != name:
        problems.append(f"it names snapshot {manifest.name!r}")
    if parse_snapshot_name(name) != manifest.step:
        problems.append(f"its step {manifest.step} does not match the name")
    if manifest.checksum_algorithm not in CHECKSUMS:
        problems.append(f"unknown checksum {manifest.checksum_algorithm!r}")
    for object_name, info in manifest.objects.items():
        # Invariant: objects are plain names inside the snapshot's own folder.
        if not _OBJECT_NAME.fullmatch(object_name) or ".." in object_name:
            problems.append(f"object name {object_name!r} is not a plain file name")
        if info.size < 0:
            problems.append(f"object {object_name!r} has negative size")
    if manifest.world_size < 1:
        problems.append(f"world size {manifest.world_size} is below 1")
    for required in (INDEX_OBJECT, DATA_OBJECT):
        if required not in manifest.objects:
            problems.append(f"object {required!r} is missing")
    if problems:
        msg = f"Manifest of {name} is invalid: {'; '.join(problems)}."
        raise SnapshotCorruptError(msg)


def check_compatible(
    manifest: Manifest, program: str, schema: Mapping[str, Any]
) -> None:
    """
    Refuse a snapshot of another program or another state schema.

    Raises:
        IncompatibleSnapshotError: The snapshot belongs to something else.
    """
    if manifest.program != program:
        msg = (
            f"The storage holds snapshot {manifest.name} of program "
            f"{manifest.program!r}, not of {program!r}. Give this run its own "
            "storage (--storage), or remove that program's snapshots."
        )
        raise IncompatibleSnapshotError(msg)
    if dict(manifest.schema) != dict(schema):
        msg = (
            f"Snapshot {manifest.name} holds a state of another schema: "
            f"{describe_schema_change(manifest.schema, schema)}. Start over with "
            "--fresh, or use another --storage."
        )
        raise IncompatibleSnapshotError(msg)


def part_objects(rank: int) -> tuple[str, str]:
    """Return the index and data objects of ``rank``'s part of a snapshot."""
    if rank == 0:
        return INDEX_OBJECT, DATA_OBJECT
    return RANK_INDEX_OBJECT.format(rank=rank), RANK_DATA_OBJECT.format(rank=rank)


def check_world_size(manifest: Manifest, world_size: int) -> bool:
    """
    Say whether a snapshot of another world size is loaded re-laid out (all its
    state is replicated: every rank reads rank 0's part); False where the sizes
    are equal.

    Raises:
        IncompatibleSnapshotError: The world sizes differ and the snapshot holds
            per-rank state.
    """
    if manifest.world_size == world_size:
        return False
    if manifest.replicated:
        return True
    msg = (
        f"Snapshot {manifest.name} was written by {manifest.world_size} processes "
        f"and this run has {world_size}; it holds per-rank state (RNG streams, "
        "data positions or shards) that cannot be re-laid out. Resume with "
        f"--nproc-per-node (or nodes) giving {manifest.world_size} processes, or "
        "start over with --fresh or another --storage."
    )
    raise IncompatibleSnapshotError(msg)


def describe_schema_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Say in words how two state schemas differ."""
    if old.get("class") != new.get("class"):
        return f"class {old.get('class')!r} in the snapshot, {new.get('class')!r} now"
    old_fields, new_fields = set(old.get("fields", ())), set(new.get("fields", ()))
    parts = []
    if new_fields - old_fields:
        parts.append(f"fields added: {', '.join(sorted(new_fields - old_fields))}")
    if old_fields - new_fields:
        parts.append(f"fields removed: {', '.join(sorted(old_fields - new_fields))}")

    return "; ".join(parts) or "field order or kinds changed"


def current_versions() -> dict[str, str]:
    """Versions of what reads and writes snapshots, recorded in each manifest."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in ("resumable", "torch", "cloudpickle", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"

    return versions


def buffer_table(buffers: Sequence[Any]) -> list[list[int]]:
    """Return ``[offset, size]`` of each buffer in the data object, aligned."""
    return layout([memoryview(buffer).nbytes for buffer in buffers])


def layout(sizes: Sequence[int]) -> list[list[int]]:
    """Return ``[offset, size]`` of buffers of ``sizes`` bytes, each aligned."""
    table, offset = [], 0
    for size in sizes:
        table.append([offset, size])
        offset += size + (-size % ALIGNMENT)

    return table


def data_size(table: Sequence[Sequence[int]]) -> int:
    """Return the size of the data object that ``table`` lays out."""
    if not table:
        return 0
    offset, size = table[-1]
    return offset + size + (-size % ALIGNMENT)


def encode_index(tree: dict[str, Any], table: Sequence[Sequence[int]]) -> bytes:
    """Return the index object: the state's tree and where each buffer lies."""
    return json.dumps({"tree": tree, "buffers": table}).encode()


@attrs.frozen
class Payload:
    """A snapshot's objects as bytes: the index, and the data object in pieces."""

    index: bytes
    data: list[Any]

    @classmethod
    def of(cls, tree: dict[str, Any], buffers: Sequence[Any]) -> Payload:
        """Lay out ``buffers``, views of their memory with padding, no copy."""
        index = encode_index(tree, buffer_table(buffers))
        return cls(index, list(data_chunks(buffers)))

    @property
    def size(self) -> int:
        return len(self.index) + sum(memoryview(part).nbytes for part in self.data)


def pieces(data: Any) -> list[memoryview]:
    """Cut a contiguous data object into views of at most PIECE_BYTES each."""
    view = memoryview(data).cast("B")
    starts = range(0, view.nbytes, PIECE_BYTES)
    return [view[start : start + PIECE_BYTES] for start in starts]


def data_chunks(buffers: Sequence[Any]) -> Iterator[Any]:
    """Yield the data object's bytes: each buffer, then padding to the alignment."""
    padding = bytes(ALIGNMENT)
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        yield view
        if -view.nbytes % ALIGNMENT:
            yield padding[: -view.nbytes % ALIGNMENT]


def buffer_views(data: memoryview, table: Sequence[Sequence[int]]) -> list[memoryview]:
    """
    Return views of each buffer in the data object.

    Raises:
        SnapshotCorruptError: The table points outside the data.
    """
    views = []
    for offset, size in table:
        if offset < 0 or size < 0 or offset + size > data.nbytes:
            msg = f"Buffer at {offset}+{size} lies outside the {data.nbytes}-byte data."
            raise SnapshotCorruptError(msg)
        views.append(data[offset : offset + size])

    return views
