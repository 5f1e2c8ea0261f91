"""
Room on the storage: refuse to train where the next snapshot cannot fit, and
free what a failed snapshot left behind.

Local and mounted file systems report their free space; object stores and other
fsspec back ends do not, so there a full disk or quota shows at the first
snapshot that does not fit, as a StorageError that says so. Either way nothing
committed is touched: retention deletes only after a commit.
"""

from __future__ import annotations

import logging

from resumable._snapshot import Manifest, parse_snapshot_name
from resumable._storage import Storage, is_disk_full, mebibytes
from resumable.errors import StorageError

logger = logging.getLogger(__name__)


def check_room(storage: Storage, newest: Manifest) -> None:
    """
    Refuse to start where the next snapshot, about as large as ``newest``,
    cannot fit: a run that trains first would lose that work at its snapshot.

    Raises:
        StorageError: The storage reports less free space than ``newest`` takes.
    """
    free = storage.free_bytes()
    if free is None or free >= newest.size:
        return
    msg = (
        f"Storage {storage.url!r} is too full for the next snapshot: "
        f"{mebibytes(free)} free, and the newest snapshot, {newest.name}, takes "
        f"{mebibytes(newest.size)}. Nothing was trained. Free space there, or lower "
        "--keep so that retention deletes older snapshots, then run the same "
        "command again."
    )
    raise StorageError(msg)


def abandon_attempt(
    storage: Storage, name: str, error: Exception, needed: int
) -> StorageError | None:
    """
    Delete what an attempt wrote before ``error`` stopped it, ahead of its
    commit. Where the storage was full, return ``error`` told what the
    snapshot needs, to raise in its place.

    Nothing committed the attempt, so its folder is this process's alone.
    """
    deleted = delete_attempt(storage, name)
    if not (isinstance(error, StorageError) and is_disk_full(error)):
        return None
    if not deleted:
        outcome = "its partial objects are deleted after a later commit"
    else:
        free = storage.free_bytes()
        left = "" if free is None else f", leaving {mebibytes(free)} free"
        outcome = f"its partial objects were deleted{left}"
    msg = (
        f"{error} The snapshot of step {parse_snapshot_name(name)} needs about "
        f"{mebibytes(needed)}; {outcome}. The snapshots committed before it "
        "are intact."
    )
    return StorageError(msg)


def delete_attempt(storage: Storage, name: str) -> bool:
    """
    Delete an uncommitted attempt's folder; return whether it is gone.

    A failure is no reason to stop a run (deleting fails on a full copy-on-write
    file system): it is logged, and a later cleanup tries again.
    """
    try:
        storage.delete_folder(name)
    except StorageError as err:
        logger.warning(
            "incomplete snapshot left for a later cleanup: name=%s, reason=%s",
            name,
            err,
        )
        return False
    logger.debug("incomplete snapshot deleted: name=%s", name)

    return True
