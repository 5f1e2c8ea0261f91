"""
Objects on S3 through s3fs's own client and event loop; imports neither s3fs nor torch.

An object of at most one part goes up in one PUT. A larger one goes as a multipart
upload: this thread cuts the parts from the chunks and hands each to s3fs's event
loop, with a bounded number in flight, and the upload is completed only after every
part has arrived. On any error or interruption it is aborted instead, so a partial
object never becomes visible. Incomplete uploads left by a killed process are found
and aborted with the folder they belong to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
from fsspec.asyn import sync

from resumable import _knobs
from resumable.errors import StorageError

logger = logging.getLogger(__name__)

MIB = 2**20
# Parts of 16 MiB, 8 in flight: within AWS's advice for parallel uploads (parts of
# 8 to 16 MiB), for 128 MiB in flight at most. The moto server of
# benchmarks/bench_s3.py cannot tell such settings apart; a real endpoint can.
DEFAULT_PART_MIB = 16
DEFAULT_CONCURRENCY = 8
# S3's smallest part (all but the last) and largest, in MiB; its most parts.
_MIN_PART_MIB = 5
_MAX_PART_MIB = 5 * 1024
_MAX_PARTS = 10_000
# A bound on the memory in flight: each part in flight holds its bytes.
_MAX_CONCURRENCY = 64
# Seconds between looks at the parts in flight, so that signal handlers run.
_POLL_SECONDS = 0.25

# Buckets whose incomplete uploads this process may not list, warned about once.
_unlisted: set[str] = set()


def is_s3(fs: Any) -> bool:
    """Return whether ``fs`` is s3fs's file system, without importing s3fs."""
    s3fs = sys.modules.get("s3fs")
    return s3fs is not None and isinstance(fs, s3fs.S3FileSystem)


@attrs.frozen
class UploadSettings:
    """Part size in bytes and parts in flight for multipart uploads."""

    part_size: int = DEFAULT_PART_MIB * MIB
    concurrency: int = DEFAULT_CONCURRENCY

    @classmethod
    def from_environment(cls) -> UploadSettings:
        """
        Return the defaults, overridden by RESUMABLE_UPLOAD_* variables.

        Raises:
            ConfigurationError: A variable is no integer in S3's limits.
        """
        part_mib = _knobs.env_int(
            _knobs.UPLOAD_PART_MIB, _MIN_PART_MIB, maximum=_MAX_PART_MIB
        )
        concurrency = _knobs.env_int(
            _knobs.UPLOAD_CONCURRENCY, 1, maximum=_MAX_CONCURRENCY
        )
        return cls(
            part_size=(part_mib or DEFAULT_PART_MIB) * MIB,
            concurrency=concurrency or DEFAULT_CONCURRENCY,
        )

    def part_size_for(self, size: int | None) -> int:
        """Return the part size for an object of ``size`` bytes (None: unknown)."""
        if size is None:
            return self.part_size
        # S3 takes at most 10,000 parts: a larger object gets larger parts.
        needed = -(-size // _MAX_PARTS)
        return max(self.part_size, -(-needed // MIB) * MIB)


def upload(fs: Any, path: str, chunks: Iterable[Any], settings: UploadSettings) -> int:
    """
    Upload one object from bytes-like chunks; return its size.

    Nothing is visible at ``path`` unless every byte arrived: a failure or an
    interruption (any BaseException) aborts the multipart upload, then propagates.
    Memory held beyond the chunks is about ``concurrency`` parts.
    """
    bucket, key, _ = fs.split_path(path)
    parts = _cut(chunks, settings.part_size_for(_known_size(chunks)))
    first = next(parts, b"")
    second = next(parts, None)
    if second is None:
        # One PUT publishes the whole object or nothing.
        _call(fs, "put_object", Bucket=bucket, Key=key, Body=_as_bytes(first))
        fs.invalidate_cache(path)
        return len(first)
    multipart = _Multipart(fs, bucket, key, settings.concurrency)
    multipart.start()
    try:
        size = multipart.send([first, second], parts)
        multipart.complete()
    except BaseException:
        multipart.abort()
        raise
    fs.invalidate_cache(path)

    return size


def upload_folders(fs: Any, root: str) -> set[str]:
    """Return the name, below ``root``, of each folder with an incomplete upload."""
    bucket, prefix = _prefix(fs, root)
    return {
        upload["Key"][len(prefix) :].split("/", 1)[0]
        for upload in _uploads(fs, bucket, prefix)
    }


def abort_uploads(fs: Any, folder: str) -> int:
    """Abort every incomplete upload under ``folder``; return how many."""
    bucket, prefix = _prefix(fs, folder)
    uploads = _uploads(fs, bucket, prefix)
    aborted = 0
    for upload in uploads:
        key = upload["Key"]
        try:
            _call(
                fs,
                "abort_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload["UploadId"],
            )
        except FileNotFoundError:
            continue  # another process aborted or completed it meanwhile
        except PermissionError as err:
            logger.warning(
                "incomplete upload not aborted: key=%s, error=%s; it stays until a "
                "lifecycle rule (AbortIncompleteMultipartUpload) or someone aborts it",
                key,
                err,
            )
            continue
        logger.debug("abandoned upload aborted: key=%s", key)
        aborted += 1

    return aborted


class _Multipart:
    """One multipart upload: parts cut here, uploaded on s3fs's event loop."""

    def __init__(self, fs: Any, bucket: str, key: str, concurrency: int) -> None:
        self.fs = fs
        self.target = {"Bucket": bucket, "Key": key}
        self.concurrency = concurrency
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}
        self.in_flight = 0
        # Results of parts, put by the loop's thread, taken by this one.
        self.results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Parts being uploaded; touched on the loop's thread only.
        self.tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        # An interruption while this waits may still leave an upload with no
        # parts: the cleanup of abandoned attempts aborts it (abort_uploads).
        reply = _call(self.fs, "create_multipart_upload", **self.target)
        self.upload_id = reply["UploadId"]
        logger.debug(
            "multipart upload started: key=%s, upload=%s",
            self.target["Key"],
            self.upload_id,
        )

    def send(self, head: list[Any], rest: Iterator[Any]) -> int:
        """Upload every part, ``concurrency`` at most at once; return the size."""
        size = 0
        for number, part in enumerate(itertools.chain(head, rest), start=1):
            if number > _MAX_PARTS:
                msg = (
                    f"Object {self.target['Key']} needs more than {_MAX_PARTS} "
                    "parts, the most S3 takes. Set "
                    f"{_knobs.UPLOAD_PART_MIB} higher."
                )
                raise StorageError(msg)
            while self.in_flight >= self.concurrency:
                self._collect()
            body = _as_bytes(part)
            self.fs.loop.call_soon_threadsafe(self._start_part, number, body)
            self.in_flight += 1
            size += len(body)
        while self.in_flight:
            self._collect()

        return size

    def complete(self) -> None:
        parts = [
            {"PartNumber": number, "ETag": etag}
            for number, etag in sorted(self.etags.items())
        ]
        _call(
            self.fs,
            "complete_multipart_upload",
            **self.target,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": parts},
        )
        logger.debug(
            "multipart upload completed: key=%s, parts=%d",
            self.target["Key"],
            len(parts),
        )

    def abort(self) -> None:
        """Stop the parts in flight, then abort; never hide the error that led here."""
        try:
            sync(self.fs.loop, self._abort)
        except Exception as err:
            logger.warning(
                "multipart upload not aborted: key=%s, error=%s; the cleanup of "
                "abandoned attempts aborts it later",
                self.target["Key"],
                err,
            )
        else:
            logger.debug("multipart upload aborted: key=%s", self.target["Key"])

    def _collect(self) -> None:
        result = _wait_for(self.results)
        self.in_flight -= 1
        if isinstance(result, BaseException):
            raise result
        number, etag = result
        self.etags[number] = etag

    def _start_part(self, number: int, body: bytes) -> None:
        task = asyncio.ensure_future(self._upload_part(number, body))
        self.tasks.add(task)
        task.add_done_callback(self._part_done)

    async def _upload_part(self, number: int, body: bytes) -> tuple[int, str]:
        reply = await self.fs._call_s3(
            "upload_part",
            **self.target,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=body,
        )
        return number, reply["ETag"]

    def _part_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            self.results.put(task.exception() or task.result())

    async def _abort(self) -> None:
        # Invariant: parts in flight stop before the abort, or one arriving after
        # it could outlive it. Every part handed over was started before this
        # runs: the loop runs callbacks in the order they were scheduled.
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.fs._call_s3(
            "abort_multipart_upload", **self.target, UploadId=self.upload_id
        )


def _call(fs: Any, method: str, **kwargs: Any) -> Any:
    """Call an S3 operation through s3fs, with its retries, from this thread."""
    return sync(fs.loop, fs._call_s3, method, **kwargs)


def _cut(chunks: Iterable[Any], part_size: int) -> Iterator[Any]:
    """
    Yield parts of ``part_size`` bytes, the last one shorter: a view of the
    chunk where a part lies inside one, the bytes joined where it spans several.
    """
    pending: list[memoryview] = []
    filled = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view.nbytes:
            take = min(view.nbytes, part_size - filled)
            if not pending and take == part_size:
                yield view[:take]
            else:
                pending.append(view[:take])
                filled += take
                if filled == part_size:
                    yield b"".join(pending)
                    pending, filled = [], 0
            view = view[take:]
    if pending:
        yield b"".join(pending)


def _as_bytes(part: Any) -> bytes:
    """
    Return a part as bytes, copying a view of other memory once.

    botocore takes no memoryview, and s3fs sends the same body again after a
    transient error: a file-like view would then be sent drained, as an empty
    part that completes a short object. Bytes are sent whole every time.
    """
    if isinstance(part, bytes):
        return part
    if isinstance(part.obj, bytes) and part.nbytes == len(part.obj):
        return part.obj
    return bytes(part)


def _known_size(chunks: Iterable[Any]) -> int | None:
    if not isinstance(chunks, Sequence):
        return None
    return sum(memoryview(chunk).nbytes for chunk in chunks)


def _wait_for(results: queue.SimpleQueue[Any]) -> Any:
    # A wait with a timeout lets the signal handlers of this thread run.
    while True:
        with contextlib.suppress(queue.Empty):
            return results.get(timeout=_POLL_SECONDS)


def _prefix(fs: Any, folder: str) -> tuple[str, str]:
    bucket, key, _ = fs.split_path(folder)
    return bucket, (key.rstrip("/") + "/") if key else ""


def _uploads(fs: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    markers: dict[str, str] = {}
    while True:
        try:
            reply = _call(
                fs, "list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers
            )
        except PermissionError as err:
            # Cleanup is a courtesy: a role that may write but not list uploads
            # still trains, and a lifecycle rule can do the cleaning.
            if bucket not in _unlisted:
                _unlisted.add(bucket)
                logger.warning(
                    "incomplete uploads not listed: bucket=%s, error=%s; those of "
                    "killed writes stay until a lifecycle rule "
                    "(AbortIncompleteMultipartUpload) or someone aborts them",
                    bucket,
                    err,
                )
            return found
        found.extend(reply.get("Uploads") or [])
        if not reply.get("IsTruncated"):
            return found
        markers = {
            "KeyMarker": reply["NextKeyMarker"],
            "UploadIdMarker": reply["NextUploadIdMarker"],
        }
