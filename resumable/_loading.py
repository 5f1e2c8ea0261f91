"""
Reading snapshots without running: the newest verified state of a step, and a
listing of what a storage holds with what fails to verify.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from resumable._archive import Archive, Listed
from resumable._rng import capture_global_rngs, restore_global_rngs
from resumable._settings import Settings
from resumable._snapshot import Manifest, part_objects
from resumable._state import check_state, decode_snapshot, place_snapshot, schema
from resumable._step import Step
from resumable._storage import Storage
from resumable._transfer import read_checksummed
from resumable.errors import (
    NoSnapshotError,
    SnapshotCorruptError,
    SnapshotError,
    StorageError,
)

StateT = TypeVar("StateT")


def load(
    step: Step[StateT],
    *,
    storage: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StateT:
    """
    Return the state of the newest verified snapshot of ``step``.

    Raises:
        NoSnapshotError: The storage holds no snapshot of this step.
        IncompatibleSnapshotError: Its snapshots do not fit this state.
    """
    settings = Settings.resolve(step, storage=storage, storage_options=storage_options)
    backend = Storage.open(settings.storage, settings.storage_options, create=False)
    archive = Archive(backend, step.program)
    step.expose_script()
    # Loading for evaluation must not move the caller's random streams, which
    # init() and the restore both touch.
    rngs = capture_global_rngs()
    try:
        return _load(step, archive, settings.storage)
    finally:
        restore_global_rngs(rngs)


def _load(step: Step[StateT], archive: Archive, storage: str) -> StateT:
    state = step.init()
    check_state(state, "init()")
    listing = archive.listing()
    archive.check_foreign(listing)
    place = functools.partial(place_snapshot, state)
    loaded = archive.newest_verified(listing, schema(state), place)
    if loaded is None:
        msg = f"No snapshot of {step.program} at {storage}."
        raise NoSnapshotError(msg)
    decode_snapshot(state, loaded.tree, loaded.buffers)

    return state


def list_snapshots(
    url: str, storage_options: dict[str, Any] | None = None
) -> list[tuple[Listed, str | None]]:
    """Return each committed snapshot at ``url``, newest first, and why it fails."""
    archive = Archive(Storage.open(url, storage_options, create=False), program="")
    rows = []
    for entry in archive.listing():
        problem = entry.problem
        if entry.manifest is not None:
            try:
                _verify(archive, entry.manifest)
            except (SnapshotError, StorageError) as err:
                problem = str(err)
        rows.append((entry, problem))

    return rows


def _verify(archive: Archive, manifest: Manifest) -> None:
    """Read every object of a snapshot, each rank's part too, checking checksums."""
    archive.read(manifest)
    for rank in range(1, manifest.world_size):
        for name in part_objects(rank):
            info = manifest.objects.get(name)
            if info is None:
                msg = f"snapshot {manifest.name} has no {name} (part of rank {rank})"
                raise SnapshotCorruptError(msg)
            read_checksummed(
                archive.storage,
                manifest.name,
                info,
                manifest.checksum_algorithm,
                [[0, info.size]],
                [None],
                name,
            )
