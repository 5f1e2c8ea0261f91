"""
Whole snapshots on a storage: write one, find and verify the newest, prune.

This is where the snapshot format meets the storage; the loop itself lives in
``_runtime``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from resumable._lease import Lease
from resumable._snapshot import (
    ATTEMPT_OBJECT,
    CHECKSUM_ALGORITHM,
    DATA_OBJECT,
    INDEX_OBJECT,
    START_PREFIX,
    Manifest,
    ObjectInfo,
    Payload,
    check_compatible,
    check_world_size,
    checksum,
    current_versions,
    new_snapshot_name,
    parse_snapshot_name,
)
from resumable._space import abandon_attempt, delete_attempt
from resumable._storage import Storage
from resumable._transfer import Places, read_checksummed, write_checksummed
from resumable.errors import (
    IncompatibleSnapshotError,
    NoProgressError,
    SnapshotCorruptError,
    SnapshotError,
    StorageError,
    SupersededError,
)

logger = logging.getLogger(__name__)

# Given a snapshot's tree and buffer table, says where each buffer's bytes go.
Placer = Callable[[dict[str, Any], list[list[int]]], Places]


@attrs.frozen
class Loaded:
    """A verified snapshot read into memory."""

    manifest: Manifest
    tree: dict[str, Any]
    buffers: list[memoryview]


@attrs.frozen
class Listed:
    """A committed snapshot as listed: its manifest, or why it has none."""

    name: str
    manifest: Manifest | None
    error: SnapshotError | None = None

    @property
    def problem(self) -> str | None:
        return None if self.error is None else str(self.error)

    @property
    def step(self) -> int:
        return (
            self.manifest.step if self.manifest else parse_snapshot_name(self.name) or 0
        )

    @property
    def order(self) -> tuple[int, int, int]:
        """The commit sequence: generation, then incarnation, then step."""
        if self.manifest is None:
            return -1, -1, self.step
        return self.manifest.generation, self.manifest.incarnation, self.step


class Archive:
    """The snapshots of one program on one storage."""

    def __init__(
        self, storage: Storage, program: str, lease: Lease | None = None
    ) -> None:
        self.storage = storage
        self.program = program
        # Checked before each commit and deletion, where this process writes.
        self.lease = lease
        # Snapshots that failed verification in this process; retention skips them.
        self.damaged: set[str] = set()
        # The processes of this run (torchrun's world size).
        self.world_size = 1

    def listing(self) -> list[Listed]:
        """Return every committed snapshot, newest first by commit generation."""
        entries = []
        for name in self.storage.committed():
            try:
                manifest = Manifest.from_bytes(self.storage.read_manifest(name), name)
            except SnapshotError as err:
                entries.append(Listed(name, None, err))
            except StorageError as err:
                if not isinstance(err.__cause__, FileNotFoundError):
                    raise
                # Deleted by retention between listing and reading.
            else:
                entries.append(Listed(name, manifest))

        return sorted(entries, key=lambda entry: entry.order, reverse=True)

    def check_foreign(self, listing: Iterable[Listed]) -> None:
        """Refuse storage that holds another program's, or another run's, snapshots."""
        mine = []
        for entry in listing:
            if entry.manifest and entry.manifest.program != self.program:
                check_compatible(entry.manifest, self.program, entry.manifest.schema)
            if entry.manifest:
                mine.append(entry.manifest)
        if not mine:
            return
        newest = mine[0]
        for manifest in mine[1:]:
            if (
                manifest.lineage != newest.lineage
                and manifest.generation >= newest.lineage_start
            ):
                msg = (
                    f"The storage {self.storage.url} holds snapshots of two runs of "
                    f"{self.program}: {newest.name} and {manifest.name} belong to "
                    "different runs that overlap (one was copied in, or written by "
                    "another job). Nothing was loaded or deleted; move one run's "
                    "snapshots away, or give this run its own --storage."
                )
                raise IncompatibleSnapshotError(msg)

    def newest_verified(
        self,
        listing: Iterable[Listed],
        schema: dict[str, Any],
        place: Placer | None = None,
    ) -> Loaded | None:
        """
        Return the newest snapshot of this program that verifies, or None.

        Torn or damaged snapshots are skipped with a warning that says why.
        ``place`` puts each candidate's bytes where they go (see ``read``).

        Raises:
            IncompatibleSnapshotError: The newest one holds another schema, or
                snapshots exist and none verifies.
        """
        skipped = []
        for entry in listing:
            if isinstance(entry.error, IncompatibleSnapshotError):
                raise entry.error
            if entry.manifest is None:
                logger.warning(
                    "snapshot skipped: name=%s, reason=%s", entry.name, entry.problem
                )
                skipped.append(entry.name)
        for entry in listing:
            if entry.manifest is None:
                continue
            try:
                check_compatible(entry.manifest, self.program, schema)
                if check_world_size(entry.manifest, self.world_size):
                    logger.info(
                        "re-laid out: snapshot=%s, world_size=%d, now=%d, "
                        "state=replicated",
                        entry.name,
                        entry.manifest.world_size,
                        self.world_size,
                    )
                return self.read(entry.manifest, place)
            except SnapshotCorruptError as err:
                logger.warning("snapshot skipped: name=%s, reason=%s", entry.name, err)
                skipped.append(entry.name)
                self.damaged.add(entry.name)
        if skipped:
            msg = (
                f"None of the {len(skipped)} snapshots at {self.storage.url} "
                f"verifies ({', '.join(skipped)}). Nothing was deleted; run with "
                "--fresh to start over, or restore a good copy."
            )
            raise IncompatibleSnapshotError(msg)
        return None

    def read(self, manifest: Manifest, place: Placer | None = None) -> Loaded:
        """
        Read a snapshot and check each object's size and checksum.

        ``place`` names, from the index, a writable view for each buffer to be
        read into (the live tensors a restore fills), or None for memory of its
        own. Where the snapshot fails its checksum, those views hold whatever
        bytes arrived.

        Raises:
            SnapshotCorruptError: Something is missing, short or damaged.
        """
        name = manifest.name
        self._check_sizes(manifest)
        index = self.storage.read(name, INDEX_OBJECT)
        _check_sum(manifest, INDEX_OBJECT, index)
        try:
            parsed = json.loads(index)
            tree, table = parsed["tree"], parsed["buffers"]
            table = [[int(offset), int(size)] for offset, size in table]
        except (ValueError, KeyError, TypeError) as err:
            msg = f"index of {name} is unreadable: {err}"
            raise SnapshotCorruptError(msg) from None
        places = place(tree, table) if place else [None] * len(table)
        buffers = read_checksummed(
            self.storage,
            name,
            manifest.objects[DATA_OBJECT],
            manifest.checksum_algorithm,
            table,
            places,
        )

        return Loaded(manifest, tree, buffers)

    def _check_sizes(self, manifest: Manifest) -> None:
        sizes = self.storage.sizes(manifest.name)
        for object_name, info in manifest.objects.items():
            found = sizes.get(object_name)
            if found != info.size:
                what = "missing" if found is None else f"{found} bytes"
                msg = (
                    f"object {object_name} is {what}, the manifest says "
                    f"{info.size} bytes (torn or incomplete write)"
                )
                raise SnapshotCorruptError(msg)

    def write(
        self,
        step: int,
        lineage: tuple[str, int, int],
        schema: dict[str, Any],
        content: tuple[dict[str, Any], list[Any]] | Payload,
        inside_step: dict[str, int] | None = None,
        arguments: list[str] | None = None,
    ) -> Manifest:
        """
        Write and commit a snapshot of ``content``: the tree and its buffers, or
        their bytes already laid out (a staged copy).

        ``lineage`` is the run's lineage id, the generation of this commit and
        that of the lineage's first commit.
        """
        started = time.perf_counter()
        payload = content if isinstance(content, Payload) else Payload.of(*content)
        name = new_snapshot_name(step)
        attempt = {
            "program": self.program,
            "lineage": lineage[0],
            "generation": lineage[1],
        }
        try:
            objects = self._write_objects(name, attempt, payload)
        except Exception as err:
            if isinstance(err, StorageError):
                # A newer incarnation may have cleaned this attempt away: then
                # the failure is that this one was superseded.
                self._check_lease("write", name)
            # Nothing committed it: what was written goes, not to hold space
            # that the next attempt needs.
            needed = payload.size
            explained = abandon_attempt(self.storage, name, err, needed)
            if explained is None:
                raise
            raise explained from err.__cause__
        manifest = self.new_manifest(
            name,
            step,
            lineage,
            objects,
            started,
            schema=schema,
            inside_step=inside_step,
            arguments=arguments,
        )
        self.commit(manifest)

        return manifest

    def new_manifest(
        self,
        name: str,
        step: int,
        lineage: tuple[str, int, int],
        objects: dict[str, ObjectInfo],
        started: float,
        **details: Any,
    ) -> Manifest:
        """Return the manifest of an attempt whose objects are written."""
        return Manifest(
            name=name,
            step=step,
            generation=lineage[1],
            lineage=lineage[0],
            lineage_start=lineage[2],
            program=self.program,
            objects=objects,
            versions=current_versions(),
            write_seconds=time.perf_counter() - started,
            incarnation=self.lease.number if self.lease else 0,
            checksum_algorithm=CHECKSUM_ALGORITHM,
            **details,
        )

    def commit(self, manifest: Manifest) -> None:
        """Commit an attempt, this process's or every rank's (see ``_parts``)."""
        self._check_lease("commit", manifest.name)
        # Invariant: the manifest is written last, after every object is durable.
        self.storage.commit(manifest.name, manifest.to_bytes())

    def _write_objects(
        self,
        name: str,
        attempt: dict[str, Any],
        payload: Payload,
    ) -> dict[str, ObjectInfo]:
        # Invariant: the attempt record comes first, so cleanup can prove ownership.
        self.storage.write_object(name, ATTEMPT_OBJECT, [json.dumps(attempt).encode()])
        return {
            DATA_OBJECT: self._write(name, DATA_OBJECT, payload.data),
            INDEX_OBJECT: self._write(name, INDEX_OBJECT, [payload.index]),
        }

    def remove_abandoned(self, lineage: str, generation: int) -> None:
        """Delete this run's uncommitted attempts from generations up to this one."""
        self._check_lease("clean up")
        for name in self.storage.uncommitted():
            attempt = self._attempt(name)
            empty = not any(self.storage.sizes(name).values())
            if empty or (
                attempt is not None
                and attempt.get("program") == self.program
                and attempt.get("lineage") == lineage
                and attempt.get("generation", generation + 1) <= generation
            ):
                delete_attempt(self.storage, name)

    def attempts(self, lineage: str) -> tuple[list[str], list[str]]:
        """Return uncommitted folders this run made, and those it cannot prove."""
        mine: list[str] = []
        foreign: list[str] = []
        for name in self.storage.uncommitted():
            attempt = self._attempt(name) or {}
            owner = (attempt.get("program"), attempt.get("lineage"))
            # An empty folder holds nothing to protect: a write killed at once.
            ours = owner == (self.program, lineage) or not any(
                self.storage.sizes(name).values()
            )
            (mine if ours else foreign).append(name)
        return mine, foreign

    def record_start(self, manifest: Manifest, limit: int) -> str:
        """
        Note one more start from ``manifest``'s snapshot, beside its objects.

        Returns:
            The name of the marker written.

        Raises:
            NoProgressError: It was started from ``limit`` times already.
        """
        starts = [
            name
            for name in self.storage.sizes(manifest.name)
            if name.startswith(START_PREFIX)
        ]
        if len(starts) >= limit:
            msg = (
                f"The run was started {len(starts)} times from snapshot "
                f"{manifest.name} without committing a newer one: it makes no "
                "progress (a crash or kill before the next snapshot, a grace "
                "period too short to write one, or a storage too full to hold "
                "one). Fix the cause, then delete the "
                f"{START_PREFIX}* files in that snapshot's folder to try again."
            )
            raise NoProgressError(msg)
        marker = f"{START_PREFIX}{uuid.uuid4().hex[:12]}.json"
        record = json.dumps({"started": time.time()}).encode()
        self.storage.write_object(manifest.name, marker, [record])
        return marker

    def first_lineage(self) -> str:
        """
        Return the lineage of a run that starts with no snapshot to resume.

        It is the same for every start of this program on this storage, so that a
        restart owns the attempts of a predecessor killed before its first
        commit, and differs from that of a copy made elsewhere.
        """
        where = self.storage.fs.unstrip_protocol(self.storage.root)
        digest = hashlib.sha256(f"{self.program}\0{where}".encode())
        return digest.hexdigest()[:32]

    def prune(self, keep: int) -> None:
        """
        Delete this program's snapshots older than the ``keep`` newest good ones.

        Snapshots that failed verification do not count as kept; they are deleted,
        with a warning, once older than every kept one.
        """
        mine = [
            entry
            for entry in self.listing()
            if entry.manifest and entry.manifest.program == self.program
        ]
        kept = [entry for entry in mine if entry.name not in self.damaged][:keep]
        if len(kept) < keep:
            return
        self._check_lease("prune")
        for entry in mine:
            if entry.order >= kept[-1].order:
                continue
            if entry.name in self.damaged:
                logger.warning(
                    "damaged snapshot deleted: name=%s, keep=%d", entry.name, keep
                )
            else:
                logger.debug("snapshot deleted: name=%s, keep=%d", entry.name, keep)
            self.storage.delete(entry.name)

    def _check_lease(self, action: str, attempt: str | None = None) -> None:
        """Refuse ``action`` once superseded; an own attempt is deleted first."""
        if self.lease is None:
            return
        try:
            self.lease.check(action)
        except SupersededError:
            logger.warning(
                "superseded: incarnation=%d, refused=%s", self.lease.number, action
            )
            if attempt is not None:
                # A failure to delete is logged: being superseded is the news.
                delete_attempt(self.storage, attempt)
            raise

    def _attempt(self, name: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self.storage.read(name, ATTEMPT_OBJECT))
        except (StorageError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _write(self, name: str, object_name: str, chunks: Iterable[Any]) -> ObjectInfo:
        return write_checksummed(
            self.storage, name, object_name, chunks, CHECKSUM_ALGORITHM
        )


def _check_sum(manifest: Manifest, object_name: str, data: Any) -> None:
    expected = manifest.objects[object_name].checksum
    found = checksum(data, manifest.checksum_algorithm)
    if found != expected:
        msg = (
            f"object {object_name} has checksum {found}, the manifest says {expected} "
            "(damaged bytes)"
        )
        raise SnapshotCorruptError(msg)
