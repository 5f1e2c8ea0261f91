"""
Snapshot storage on any fsspec URL. Knows nothing of torch or of the payload's meaning.

Commit protocol:
1. Every payload object of an attempt is written under the attempt's own folder
   ``<root>/<name>/``, a name no other attempt uses, and made durable (fsync on local
   and mounted file systems; a completed upload on object stores).
2. Only then is ``<root>/<name>.manifest.json`` written, in one step: a temporary file,
   fsync, rename and fsync of the folder on file systems; a single PUT elsewhere.
3. A snapshot exists for readers exactly when its manifest does. Deletion removes the
   manifest first, so a half-deleted snapshot is an uncommitted folder, never a torn
   snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from resumable._retry import RetryPolicy, client_options, retried
from resumable._snapshot import ATTEMPT_OBJECT, MANIFEST_SUFFIX, parse_snapshot_name
from resumable.errors import ConfigurationError, StorageError

logger = logging.getLogger(__name__)


class Storage:
    """A folder of snapshots at an fsspec URL."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        self._local = isinstance(fs, LocalFileSystem)
        # Remote calls run again after transient failures; local ones never do.
        self.retry = None if self._local else RetryPolicy.from_environment()

    @classmethod
    def open(
        cls,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        create: bool = True,
    ) -> Storage:
        """
        Open the storage at ``url``; ``create`` makes its folder where it is missing.

        Raises:
            StorageError: The URL names no usable storage.
        """
        storage_options = client_options(url, storage_options or {})
        try:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as err:
            msg = (
                f"Cannot open storage {url!r}: {err}. Check the URL, its scheme, "
                "and that the package for that scheme is installed."
            )
            raise ConfigurationError(msg) from None
        storage = cls(fs, root, url)
        if create:
            try:
                storage._create()
            except (FileExistsError, NotADirectoryError):
                msg = (
                    f"Storage {url!r} names a file, not a folder. Give the path of "
                    "a folder (it is created if missing)."
                )
                raise ConfigurationError(msg) from None
            except OSError:
                with storage._translate("create the snapshot folder at"):
                    raise

        return storage

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    @retried("write")
    def write_object(self, snapshot: str, name: str, chunks: Iterable[Any]) -> int:
        """
        Write one payload object durably from bytes-like chunks; return its size.

        ``chunks`` may be a list, which a backend may iterate more than once (to
        send it again after a transient failure), or an iterator, iterated once.
        """
        path = self.path(snapshot, name)
        with self._translate("write", path):
            if self._local:
                return _write_local(path, chunks)
            self.fs.makedirs(self.path(snapshot), exist_ok=True)
            file = self.fs.open(path, "wb")
            try:
                size = _write_chunks(file, chunks)
            except BaseException:
                # Closing would publish the partial object; throw it away instead.
                _discard(file)
                raise
            file.close()
            return size

    @retried("commit")
    def commit(self, snapshot: str, manifest: bytes) -> None:
        """Make ``snapshot`` visible to readers by writing its manifest in one step."""
        path = self.path(snapshot + MANIFEST_SUFFIX)
        with self._translate("commit", path):
            if self._local:
                # The temporary file lives in the attempt's folder, so that a crash
                # leaves it where cleanup of uncommitted attempts finds it.
                _replace_local(self.path(snapshot, "manifest.tmp"), path, manifest)
            else:
                # A single PUT: object stores publish it whole or not at all.
                self.fs.pipe_file(path, manifest)
        logger.debug("manifest written: path=%s", path)

    def committed(self) -> list[str]:
        """Return the names of committed snapshots, in no particular order."""
        return [
            name[: -len(MANIFEST_SUFFIX)]
            for name in self._names()
            if name.endswith(MANIFEST_SUFFIX)
            and parse_snapshot_name(name[: -len(MANIFEST_SUFFIX)]) is not None
        ]

    def uncommitted(self) -> list[str]:
        """Return the names of attempt folders that no manifest commits."""
        names = set(self._names())
        return sorted(
            name
            for name in names
            if parse_snapshot_name(name) is not None
            and name + MANIFEST_SUFFIX not in names
        )

    def unrecognised(self) -> list[str]:
        """Return entries of the root that are neither snapshots nor attempts."""
        return sorted(
            name
            for name in self._names()
            if parse_snapshot_name(name.removesuffix(MANIFEST_SUFFIX)) is None
        )

    def read_manifest(self, snapshot: str) -> bytes:
        return self.read(snapshot + MANIFEST_SUFFIX)

    @retried("read")
    def read(self, *parts: str) -> bytes:
        path = self.path(*parts)
        with self._translate("read", path):
            data: bytes = self.fs.cat_file(path)
        return data

    @retried("read")
    def read_into(self, snapshot: str, name: str, buffer: Any) -> int:
        """Read an object into a writable buffer; return how many bytes came."""
        path = self.path(snapshot, name)
        view = memoryview(buffer).cast("B")
        with self._translate("read", path), self.fs.open(path, "rb") as file:
            done = 0
            while done < len(view):
                count = file.readinto(view[done:])
                if not count:
                    break
                done += count
            return done

    @retried("list")
    def sizes(self, snapshot: str) -> dict[str, int]:
        """Return the size of each object in a snapshot's folder."""
        with self._translate("list", self.path(snapshot)):
            try:
                entries = self.fs.ls(self.path(snapshot), detail=True)
            except FileNotFoundError:
                return {}
        return {_basename(entry["name"]): int(entry["size"]) for entry in entries}

    @retried("write to")
    def check_writable(self) -> None:
        """
        Write and delete a small probe file, so that a read-only storage fails
        before any training rather than at the first snapshot.

        Raises:
            StorageError: The storage cannot be written.
        """
        probe = self.path(f".resumable-probe-{uuid.uuid4().hex[:12]}")
        with self._translate("write to", self.root):
            try:
                self.fs.pipe_file(probe, b"")
            except OSError as err:
                msg = (
                    f"Storage {self.url!r} cannot be written ({err}). Check its "
                    "permissions or mount, or give another --storage."
                )
                raise StorageError(msg) from err
            self.fs.rm_file(probe)

    @retried("delete")
    def delete_object(self, snapshot: str, name: str) -> None:
        path = self.path(snapshot, name)
        with self._translate("delete", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    @retried("delete")
    def delete(self, snapshot: str) -> None:
        """Delete a snapshot: its manifest first, then its folder."""
        # Invariant: the manifest goes first, so nothing torn is ever committed.
        manifest = self.path(snapshot + MANIFEST_SUFFIX)
        with self._translate("delete", manifest):
            if self.fs.exists(manifest):
                self.fs.rm_file(manifest)
            if self._local:
                _fsync_folder(self.root)
        self.delete_folder(snapshot)

    @retried("delete")
    def delete_folder(self, snapshot: str) -> None:
        """Delete an attempt's folder, its attempt record last."""
        folder = self.path(snapshot)
        with self._translate("delete", folder):
            names = sorted(
                self.sizes(snapshot), key=lambda name: name == ATTEMPT_OBJECT
            )
            # Invariant: the attempt record goes last, so that a folder left by a
            # kill in the middle still proves who made it, and is cleaned later.
            for name in names:
                self.fs.rm_file(self.path(snapshot, name))
            # Object stores have no folders; an empty one elsewhere goes too.
            with contextlib.suppress(FileNotFoundError, NotImplementedError):
                self.fs.rmdir(folder)

    @retried("create")
    def _create(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    @retried("list")
    def _names(self) -> list[str]:
        with self._translate("list", self.root):
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return []
        return [_basename(entry) for entry in entries]

    @contextlib.contextmanager
    def _translate(self, action: str, path: str | None = None) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            if isinstance(err, StorageError):
                raise
            where = path or self.root
            msg = f"Cannot {action} {where} on storage {self.url!r}: {err}."
            if _is_disk_full(err):
                msg += (
                    f" The storage is full ({_free_space(self, where)}); free space "
                    "or lower --keep, then run the same command again."
                )
            raise StorageError(msg) from err


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _write_chunks(file: IO[bytes], chunks: Iterable[Any]) -> int:
    size = 0
    for chunk in chunks:
        size += file.write(chunk)
    return size


def _discard(file: IO[bytes]) -> None:
    discard = getattr(file, "discard", None)
    with contextlib.suppress(Exception):
        if callable(discard):
            discard()


def _write_local(path: str, chunks: Iterable[Any]) -> int:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as file:
        size = _write_chunks(file, chunks)
        file.flush()
        os.fsync(file.fileno())
    _fsync_folder(folder)

    return size


def _replace_local(temporary: str, path: str, data: bytes) -> None:
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        # Invariant: the rename is the commit; it comes after the data is durable.
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(os.path.dirname(path))


def _fsync_folder(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _is_disk_full(err: OSError) -> bool:
    import errno

    causes = [err, err.__cause__, err.__context__]
    return any(
        isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        for cause in causes
    )


def _free_space(storage: Storage, path: str) -> str:
    if not storage._local:
        return "free space unknown"
    try:
        stat = os.statvfs(os.path.dirname(path) or storage.root)
    except OSError:
        return "free space unknown"
    return f"{stat.f_bavail * stat.f_frsize / 2**20:.1f} MiB free"
