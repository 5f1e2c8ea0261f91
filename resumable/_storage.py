"""
Snapshot storage on any fsspec URL. Knows nothing of torch or of the payload's meaning.

Commit protocol:
1. Every payload object of an attempt is written under the attempt's own folder
   ``<root>/<name>/``, a name no other attempt uses, and made durable (fsync on local
   and mounted file systems; a completed upload on object stores). A write that
   fails publishes nothing: a multipart upload is aborted, a partial file deleted.
2. Only then is ``<root>/<name>.manifest.json`` written, in one step: a temporary file,
   fsync, rename and fsync of the folder on file systems; a single PUT elsewhere.
3. A snapshot exists for readers exactly when its manifest does. Deletion removes the
   manifest first, so a half-deleted snapshot is an uncommitted folder, never a torn
   snapshot.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from resumable import _s3
from resumable._retry import RetryPolicy, client_options, retried
from resumable._snapshot import (
    ATTEMPT_OBJECT,
    MANIFEST_SUFFIX,
    parse_incarnation_name,
    parse_snapshot_name,
)
from resumable.errors import ConfigurationError, StorageError

logger = logging.getLogger(__name__)

# Fills buffers in turn from an object read front to back; returns the bytes read,
# short only at the object's end.
Fill = Callable[[Sequence[memoryview]], int]
T = TypeVar("T")

# The name of the empty file a start writes and deletes to prove it may write.
_PROBE_PREFIX = ".resumable-probe-"
# Buffers in one vectored read, at most: the kernel's limit (IOV_MAX).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
# The package each remote scheme needs, and the extra of resumable that installs it.
_EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
}


class Storage:
    """A folder of snapshots at an fsspec URL."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        self._local = isinstance(fs, LocalFileSystem)
        # How large objects go to S3; None on other backends.
        self._upload_settings = (
            _s3.UploadSettings.from_environment() if _s3.is_s3(fs) else None
        )
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
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/[^/]", url):
            msg = (
                f"Storage {url!r} has one slash after its scheme, so it would be a "
                "local folder of that name. Write the scheme with two slashes "
                "(s3://bucket/run)."
            )
            raise ConfigurationError(msg)
        storage_options = client_options(url, storage_options or {})
        try:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as err:
            raise ConfigurationError(_missing_backend(url, err)) from None
        except (TypeError, ValueError) as err:
            msg = (
                f"Cannot open storage {url!r}: {_said(err)}. Check the URL, its "
                "scheme, and that the package for that scheme is installed."
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
            except Exception as err:
                # Backends such as s3fs connect at the first call: options that
                # they reject, and missing credentials, show only now.
                if isinstance(err, TypeError | ValueError) or _credentials(err):
                    raise ConfigurationError(_rejected(url, err)) from None
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
            if self._upload_settings is not None:
                return _s3.upload(self.fs, path, chunks, self._upload_settings)
            self.fs.makedirs(self.path(snapshot), exist_ok=True)
            return _write_stream(self.fs, path, chunks)

    @retried("commit")
    def commit(self, snapshot: str, manifest: bytes) -> None:
        """Make ``snapshot`` visible to readers by writing its manifest in one step."""
        path = self.path(snapshot + MANIFEST_SUFFIX)
        with self._translate("commit", path):
            if self._local:
                # The temporary file lives in the attempt's folder, so that a crash
                # leaves it where cleanup of uncommitted attempts finds it.
                _replace_local(self.path(snapshot, "manifest.tmp"), path, manifest)
            elif self._upload_settings is not None:
                # A single PUT: S3 publishes it whole or not at all.
                self.fs.pipe_file(path, manifest)
            else:
                # Elsewhere (sftp, smb, memory, gcs...) a file may be written in
                # place: publish a whole temporary one by a move.
                temporary = self.path(snapshot, "manifest.tmp")
                self.fs.pipe_file(temporary, manifest)
                self.fs.mv(temporary, path)
        logger.debug("manifest written: path=%s", path)

    @retried("create")
    def create(self, name: str, data: bytes) -> bool:
        """
        Create the small object ``name`` at the root unless it exists already.

        Returns:
            Whether this call created it. Exclusive on local file systems (O_EXCL)
            and on S3 (a conditional PUT); elsewhere as fsspec's ``mode="create"``
            allows.
        """
        path = self.path(name)
        with self._translate("create", path):
            try:
                if self._local:
                    _create_local(path, data)
                else:
                    self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                # A resend after a lost answer finds the object it made itself.
                return self._holds(path, data)
        return True

    def _holds(self, path: str, data: bytes) -> bool:
        try:
            return bool(self.fs.cat_file(path) == data)
        except FileNotFoundError:
            return False

    def claims(self) -> dict[int, str]:
        """Return the incarnation claims at the root, by number."""
        claims = {}
        for name in self._names():
            number = parse_incarnation_name(name)
            if number is not None:
                claims[number] = name
        return claims

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
        names = set(self._names()) | self._upload_folders()
        return sorted(
            name
            for name in names
            if parse_snapshot_name(name) is not None
            and name + MANIFEST_SUFFIX not in names
        )

    @retried("list uploads under")
    def _upload_folders(self) -> set[str]:
        """Folders whose only trace may be an incomplete upload (S3 only)."""
        if self._upload_settings is None:
            return set()
        with self._translate("list uploads under", self.root):
            folders: set[str] = _s3.upload_folders(self.fs, self.root)
        return folders

    def unrecognised(self) -> list[str]:
        """Return entries of the root that are neither snapshots nor attempts."""
        return sorted(
            name
            for name in self._names()
            if parse_snapshot_name(name.removesuffix(MANIFEST_SUFFIX)) is None
            and parse_incarnation_name(name) is None
            # A start killed between writing its probe and deleting it.
            and not name.startswith(_PROBE_PREFIX)
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
    def read_through(self, snapshot: str, name: str, receive: Callable[[Fill], T]) -> T:
        """
        Read an object front to back: ``receive`` is given what fills buffers
        from it, and its result returned. After a transient failure it is
        called again from the object's start, so it must start over too.
        """
        path = self.path(snapshot, name)
        with self._translate("read", path):
            if not self._local:
                with self.fs.open(path, "rb") as file:
                    return receive(lambda views: _readinto_each(file, views))
            descriptor = os.open(path, os.O_RDONLY)
            try:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                return receive(lambda views: _readv_fully(descriptor, views))
            finally:
                os.close(descriptor)

    @retried("list")
    def sizes(self, snapshot: str) -> dict[str, int]:
        """Return the size of each object in a snapshot's folder."""
        with self._translate("list", self.path(snapshot)):
            # Another process may have written since: never answer from a cache.
            self.fs.invalidate_cache(self.path(snapshot))
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
        probe = self.path(f"{_PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        with self._translate("write to", self.root):
            try:
                self.fs.pipe_file(probe, b"")
            except OSError as err:
                if is_disk_full(err):
                    raise  # Said as such below: permissions are not the cause.
                msg = (
                    f"Storage {self.url!r} cannot be written ({err}). Check its "
                    "permissions or mount, or give another --storage."
                )
                raise StorageError(msg) from err
            self.fs.rm_file(probe)

    @retried("delete")
    def delete_object(self, *parts: str) -> None:
        path = self.path(*parts)
        with self._translate("delete", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    @retried("delete")
    def delete(self, snapshot: str) -> None:
        """Delete a snapshot: its manifest first, then its folder."""
        # Invariant: the manifest goes first, so nothing torn is ever committed.
        manifest = self.path(snapshot + MANIFEST_SUFFIX)
        with self._translate("delete", manifest):
            # Not exists() first: it may answer from a cache that another
            # process's deletion made stale.
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(manifest)
            if self._local:
                _fsync_folder(self.root)
        self.delete_folder(snapshot)

    @retried("delete")
    def delete_folder(self, snapshot: str) -> None:
        """Delete an attempt's folder, its attempt record last."""
        folder = self.path(snapshot)
        with self._translate("delete", folder):
            if self._upload_settings is not None:
                # Uploads go first: the attempt record must outlive them, so
                # that a folder left by a kill still proves who made it.
                _s3.abort_uploads(self.fs, folder)
            names = sorted(
                self.sizes(snapshot), key=lambda name: name == ATTEMPT_OBJECT
            )
            # Invariant: the attempt record goes last, so that a folder left by a
            # kill in the middle still proves who made it, and is cleaned later.
            for name in names:
                # Gone already where another process cleans the same attempt
                # up (a newer incarnation, while this one was superseded).
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.path(snapshot, name))
            # Object stores have no folders; an empty one elsewhere goes too.
            with contextlib.suppress(FileNotFoundError, NotImplementedError):
                self.fs.rmdir(folder)

    def free_bytes(self) -> int | None:
        """
        Return the bytes free to this user, or None where the storage cannot
        tell: only local and mounted file systems report it.
        """
        if not self._local:
            return None
        try:
            stat = os.statvfs(self.root)
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize

    @retried("create")
    def _create(self) -> None:
        if self._upload_settings is None:
            self.fs.makedirs(self.root, exist_ok=True)
            return
        # S3 has no folders to make; never create a bucket (a typo would).
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.ls(bucket, detail=False)
        except FileNotFoundError:
            msg = (
                f"The bucket {bucket!r} of storage {self.url!r} does not exist. "
                "Check its name and the endpoint, or create it first."
            )
            raise StorageError(msg) from None

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
            msg = f"Cannot {action} {where} on storage {self.url!r}: {_said(err)}."
            if is_disk_full(err):
                msg += (
                    f" The storage is full ({_free_space(self)}); free space "
                    "or lower --keep, then run the same command again."
                )
            raise StorageError(msg) from err


def _rejected(url: str, err: Exception) -> str:
    """Say that the backend rejected the options or found no credentials."""
    hint = "Check the storage options (-o KEY=VALUE) for this backend."
    if _credentials(err):
        hint = (
            "Give credentials: -o key=... -o secret=..., a profile, or the "
            "backend's environment variables."
        )
    return f"Cannot open storage {url!r}: {type(err).__name__}: {_said(err)}. {hint}"


def _said(err: BaseException) -> str:
    """An error's text without its closing full stop: a message adds its own."""
    return str(err).rstrip(". ")


def _credentials(err: Exception) -> bool:
    """Whether the backend found no usable credentials (botocore's errors)."""
    return "Credentials" in type(err).__name__


def _missing_backend(url: str, err: ImportError) -> str:
    """Say which package, and which extra of resumable, a URL's scheme needs."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    extra = _EXTRAS.get(scheme)
    if extra is None:
        return (
            f"Cannot open storage {url!r}: {_said(err)}. Install the fsspec "
            f"backend for {scheme}:// URLs."
        )
    package, name = extra
    return (
        f"Storage {url!r} needs the package {package}, which is not installed. "
        f"Install it with: pip install 'resumable[{name}]'."
    )


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _write_chunks(file: IO[bytes], chunks: Iterable[Any]) -> int:
    size = 0
    for chunk in chunks:
        size += file.write(chunk)
    return size


def _write_stream(
    fs: fsspec.AbstractFileSystem, path: str, chunks: Iterable[Any]
) -> int:
    file = fs.open(path, "wb")
    try:
        size = _write_chunks(file, chunks)
        file.close()
    except BaseException:
        _abandon(fs, path, file)
        raise

    return size


def _abandon(fs: fsspec.AbstractFileSystem, path: str, file: IO[bytes]) -> None:
    """Throw a failed write away, so that nothing, not even a close, publishes it."""
    discard = getattr(file, "discard", None)
    with contextlib.suppress(Exception):
        if callable(discard):
            discard()
    try:
        # A buffered file closed later, by the garbage collector, would finish
        # the upload it just discarded (or fail in __del__): mark it closed.
        file.closed = True  # type: ignore[misc]  # a property fsspec's files set
    except AttributeError:
        # An io object refuses: close it now, so that what a close publishes
        # is there to delete.
        with contextlib.suppress(Exception):
            file.close()
    # Backends that publish as they write (memory://) hold the part written.
    try:
        fs.rm_file(path)
    except Exception as err:  # the write's own error is the one to raise
        logger.debug("partial object not deleted: path=%s, error=%r", path, err)


def _write_local(path: str, chunks: Iterable[Any]) -> int:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    try:
        # Buffered: small chunks (padding, small tensors) go out together,
        # large ones straight from the caller's memory, in one call each.
        with open(path, "wb") as file:
            size = _write_chunks(file, chunks)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    _fsync_folder(folder)

    return size


def _readv_fully(descriptor: int, views: Sequence[memoryview]) -> int:
    """Fill ``views`` in turn from the file; return the bytes read, short at its end."""
    done, pending = 0, views
    while pending:
        count = os.readv(descriptor, pending[:_IOV_MAX])
        done += count
        pending = _advance(pending, count)
        if not count and any(view.nbytes for view in pending):
            break  # The end of the file.

    return done


def _readinto_each(file: Any, views: Sequence[memoryview]) -> int:
    done = 0
    for view in views:
        filled = 0
        while filled < view.nbytes:
            count = file.readinto(view[filled:])
            if not count:
                return done + filled
            filled += count
        done += filled

    return done


def _advance(views: Sequence[memoryview], count: int) -> Sequence[memoryview]:
    """Return what remains of ``views`` after their first ``count`` bytes."""
    for index, view in enumerate(views):
        if count < view.nbytes:
            return [view[count:], *views[index + 1 :]]
        count -= view.nbytes
    return []


def _create_local(path: str, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except OSError as err:
        # The name is what counts: on a full disk it is created with no content,
        # so that a lower --keep can still make room.
        if not is_disk_full(err):
            raise
    _fsync_folder(os.path.dirname(path))


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


def is_disk_full(err: BaseException) -> bool:
    """Say whether ``err``, or the error it came from, is a full disk or quota."""
    causes = [err, err.__cause__, err.__context__]
    return any(
        isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        for cause in causes
    )


def _free_space(storage: Storage) -> str:
    free = storage.free_bytes()
    return "free space unknown" if free is None else f"{mebibytes(free)} free"


def mebibytes(size: int) -> str:
    """Say a size in MiB, for messages."""
    return f"{size / 2**20:.1f} MiB"
