"""
A file system with a byte quota, for the full-storage tests: ``quota:///path``.

It is a local folder seen through fsspec, not a ``LocalFileSystem``, so the
library takes its generic path (``open(..., "wb")``, ``pipe_file``) as for any
other back end. The quota belongs to the nearest folder above a path that holds
a ``QUOTA_FILE``: that folder is the volume, and the bytes of every file in it
count. A write that would pass the quota writes what still fits and raises
``OSError`` with the volume's errno (ENOSPC, or EDQUOT), as a full disk does. A
test frees space between runs by raising the limit in the file. On a volume
marked copy-on-write, creating and deleting files fail too while it is full, as
they can on ZFS or btrfs.

Importing this module registers the ``quota`` protocol with fsspec: the training
script imports it, as a user's script imports the fsspec plugin of its storage.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# The file that sets a volume's quota: "<bytes> [ENOSPC|EDQUOT] [cow]".
QUOTA_FILE = ".quota"
PROTOCOL = "quota"


def set_quota(
    volume: Path, limit: int, error: int = errno.ENOSPC, *, cow: bool = False
) -> None:
    """Make ``volume`` a volume of ``limit`` bytes that fails with ``error``."""
    volume.mkdir(parents=True, exist_ok=True)
    words = [str(limit), errno.errorcode[error], *(["cow"] if cow else [])]
    (volume / QUOTA_FILE).write_text(" ".join(words))


def usage(volume: Path | str) -> int:
    """Bytes of the files in ``volume``, its quota file aside."""
    total = 0
    for folder, _, names in os.walk(volume):
        for name in names:
            if name != QUOTA_FILE:
                total += os.stat(os.path.join(folder, name)).st_size
    return total


class Volume:
    """The quota that governs a path: its folder, limit, errno, deletion rule."""

    def __init__(self, path: str) -> None:
        folder = Path(path)
        while not (folder / QUOTA_FILE).is_file() and folder != folder.parent:
            folder = folder.parent
        self.folder = folder
        words = []
        if (folder / QUOTA_FILE).is_file():
            words = (folder / QUOTA_FILE).read_text().split()
        self.limit = int(words[0]) if words else None
        self.error = getattr(errno, words[1]) if len(words) > 1 else errno.ENOSPC
        self.cow = "cow" in words[2:]

    def free(self) -> int | None:
        if self.limit is None:
            return None
        return max(self.limit - usage(self.folder), 0)

    def full(self, path: str) -> OSError:
        return OSError(self.error, os.strerror(self.error), path)


class QuotaFile(io.RawIOBase):
    """A file opened for writing on a volume; a write past the quota fails."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.volume = Volume(path)
        if self.volume.cow and self.volume.free() == 0:
            # Copy-on-write: even a new empty file needs space for its metadata.
            raise self.volume.full(path)
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115  closed in close()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._file.fileno()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        free = self.volume.free()
        if free is not None and view.nbytes > free:
            # As a full disk does: what fits is written, then the call fails.
            self._file.write(view[:free])
            raise self.volume.full(self.path)
        written: int = self._file.write(view)
        return written

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class QuotaFileSystem(fsspec.AbstractFileSystem):  # type: ignore[misc]  # untyped
    """Local folders under quotas, through fsspec's generic interface."""

    protocol = PROTOCOL
    root_marker = "/"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.local = LocalFileSystem()

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        entries: list[Any] = self.local.ls(self._strip_protocol(path), detail=detail)
        return entries

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        info: dict[str, Any] = self.local.info(self._strip_protocol(path))
        return info

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents)

    def rmdir(self, path: str) -> None:
        self.local.rmdir(self._strip_protocol(path))

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        volume = Volume(path)
        if volume.cow and volume.free() == 0:
            raise volume.full(path)
        self.local.rm_file(path)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        self.local.mv(self._strip_protocol(path1), self._strip_protocol(path2))

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        source = open(self._strip_protocol(path1), "rb")  # noqa: SIM115  closed below
        with source, QuotaFile(self._strip_protocol(path2)) as target:
            shutil.copyfileobj(source, target)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "r" in mode:
            return open(path, mode)
        return QuotaFile(path)


fsspec.register_implementation(PROTOCOL, QuotaFileSystem, clobber=True)
