"""
The S3 write path against a real S3 server (moto on 127.0.0.1), through s3fs:
multipart uploads, what a failure or an interruption leaves (nothing), and the
cleanup of incomplete uploads that a killed process leaves behind.
"""

from __future__ import annotations

import _thread
import asyncio
import gc
import itertools
import random
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import HTTPClientError

from resumable import _s3
from resumable._archive import Archive
from resumable._s3 import UploadSettings
from resumable._storage import Storage
from resumable.errors import ConfigurationError, StorageError

MIB = 2**20
NAME = "step-000000001-aaaaaaaaaaaa"
PROGRAM = "train.py:train"


class Spy:
    """Records the S3 operations s3fs is asked for; may delay or fail them."""

    def __init__(self, fs: Any) -> None:
        self.calls: list[tuple[str, int | None]] = []
        self.fault: Callable[[str, dict[str, Any]], BaseException | None] = (
            lambda method, arguments: None
        )
        self.part_seconds = 0.0
        self.part_started = threading.Event()
        self._call = fs._call_s3

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((method, kwargs.get("PartNumber")))
        if method == "upload_part":
            self.part_started.set()
            await asyncio.sleep(self.part_seconds)
        error = self.fault(method, kwargs)
        if error is not None:
            raise error
        return await self._call(method, *args, **kwargs)

    def methods(self) -> list[str]:
        return [method for method, _ in self.calls]


@pytest.fixture
def storage(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> Storage:
    """A storage on S3 whose multipart uploads use parts of 5 MiB, S3's least."""
    monkeypatch.setenv("RESUMABLE_UPLOAD_PART_MIB", "5")
    return Storage.open(s3_url)


@pytest.fixture
def spy(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> Spy:
    """A spy between the storage and s3fs's client."""
    spy = Spy(storage.fs)
    monkeypatch.setattr(storage.fs, "_call_s3", spy)
    return spy


def _data(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def _uploads(storage: Storage) -> list[str]:
    """Keys of the incomplete multipart uploads in the storage's bucket."""
    bucket = storage.fs.split_path(storage.root)[0]
    return [upload["Key"] for upload in storage.fs.list_multipart_uploads(bucket)]


def _failing_chunks(data: bytes, after: int, error: BaseException) -> Iterator[Any]:
    """Yield ``data`` in pieces of 1 MiB, then raise ``error`` after ``after`` bytes."""
    view = memoryview(data)
    for start in range(0, after, MIB):
        yield view[start : start + MIB]
    raise error


@pytest.mark.parametrize(
    ("size", "methods"),
    [
        (MIB, ["put_object"]),
        (
            13 * MIB + 7,
            [
                "create_multipart_upload",
                *["upload_part"] * 3,
                "complete_multipart_upload",
            ],
        ),
    ],
    ids=["one-put", "multipart"],
)
def test_object_round_trips_byte_exact(
    storage: Storage, spy: Spy, size: int, methods: list[str]
) -> None:
    """An object reads back byte-exact, in one PUT up to a part, else in parts."""
    data = _data(size)
    view = memoryview(bytearray(data))
    # Parts span chunks, and lie inside one: both ways of cutting are used.
    cuts = [0, 3 * MIB, 3 * MIB + 100, 11 * MIB + 3, size]
    pairs = itertools.pairwise(cuts)
    chunks = [view[start:end] for start, end in pairs if start < size]

    written = storage.write_object(NAME, "data.bin", chunks)
    calls = spy.methods()

    expected = (size, methods, data, [])
    assert expected == (
        written,
        calls,
        storage.read(NAME, "data.bin"),
        _uploads(storage),
    )


@pytest.mark.parametrize(
    "error", [RuntimeError("injected"), KeyboardInterrupt()], ids=type
)
def test_error_mid_upload_aborts_it(
    storage: Storage, spy: Spy, error: BaseException
) -> None:
    """An error or interruption after parts went up aborts the upload and goes on."""
    data = _data(14 * MIB)

    with pytest.raises(type(error)) as caught:
        storage.write_object(NAME, "data.bin", _failing_chunks(data, 12 * MIB, error))
    calls = list(spy.calls)

    expected: object = (error, ("abort_multipart_upload", None), [], {})
    assert expected == (caught.value, calls[-1], _uploads(storage), storage.sizes(NAME))
    assert {("upload_part", 1), ("upload_part", 2)} <= set(calls)


def test_failed_part_aborts_upload(storage: Storage, spy: Spy) -> None:
    """A part that fails to upload aborts the upload with a StorageError."""
    injected = PermissionError(13, "injected: access denied")
    spy.fault = lambda method, arguments: (
        injected if arguments.get("PartNumber") == 2 else None
    )

    with pytest.raises(StorageError) as caught:
        storage.write_object(NAME, "data.bin", [_data(12 * MIB)])
    last = spy.methods()[-1]

    expected: object = (injected, "abort_multipart_upload", [], {})
    assert expected == (
        caught.value.__cause__,
        last,
        _uploads(storage),
        storage.sizes(NAME),
    )


def test_interrupt_while_parts_in_flight_aborts_upload(
    storage: Storage, spy: Spy
) -> None:
    """A KeyboardInterrupt that lands while parts are in flight aborts the upload."""
    spy.part_seconds = 2.0
    # Python's own handler, whatever an earlier test left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt() -> None:
        spy.part_started.wait(30)
        _thread.interrupt_main()

    thread = threading.Thread(target=interrupt)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            storage.write_object(NAME, "data.bin", [_data(12 * MIB)])
    finally:
        thread.join()
        signal.signal(signal.SIGINT, previous)
    last = spy.methods()[-1]

    expected: object = ("abort_multipart_upload", [], {})
    assert expected == (last, _uploads(storage), storage.sizes(NAME))


def test_part_resent_after_transient_error_is_whole(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part that s3fs sends again after a transient error arrives whole."""
    client = storage.fs.s3
    real = client.upload_part
    attempts: list[int] = []

    async def upload_part(**arguments: Any) -> Any:
        attempts.append(arguments["PartNumber"])
        if len(attempts) == 1:
            # Like a connection reset once the body was sent.
            body = arguments["Body"]
            if hasattr(body, "read"):
                body.read()
            raise HTTPClientError(error="injected: connection reset")
        return await real(**arguments)

    monkeypatch.setattr(client, "upload_part", upload_part)
    data = _data(11 * MIB)

    storage.write_object(NAME, "data.bin", [data])

    expected = (data, [1, 1, 2, 3])
    assert expected == (storage.read(NAME, "data.bin"), sorted(attempts))


def test_failed_write_on_generic_path_leaves_nothing(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through s3fs's file objects, a failed write leaves nothing, even after gc."""
    monkeypatch.setattr(storage, "_upload_settings", None)
    storage.write_object(NAME, "attempt.json", [b"{}"])

    with pytest.raises(RuntimeError):
        storage.write_object(
            NAME, "data.bin", _failing_chunks(_data(2 * MIB), MIB, RuntimeError("x"))
        )
    gc.collect()

    expected: object = ({"attempt.json": 2}, [])
    assert expected == (storage.sizes(NAME), _uploads(storage))


def _start_upload(storage: Storage, folder: str) -> None:
    """Leave an incomplete upload of data.bin in ``folder``, as a killed writer does."""
    bucket, key, _ = storage.fs.split_path(storage.path(folder, "data.bin"))
    upload = storage.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    storage.fs.call_s3(
        "upload_part",
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=_data(5 * MIB),
    )


def test_delete_folder_aborts_incomplete_uploads(storage: Storage) -> None:
    """Deleting an attempt's folder aborts the uploads left in it, and only those."""
    other = "step-000000002-bbbbbbbbbbbb"
    storage.write_object(NAME, "attempt.json", [b"{}"])
    _start_upload(storage, NAME)
    _start_upload(storage, other)

    storage.delete_folder(NAME)

    expected: object = ([storage.fs.split_path(storage.path(other, "data.bin"))[1]], {})
    assert expected == (_uploads(storage), storage.sizes(NAME))


def test_folder_with_only_an_upload_is_abandoned(storage: Storage) -> None:
    """A folder whose only trace is an incomplete upload is listed and cleaned up."""
    _start_upload(storage, NAME)
    archive = Archive(storage, PROGRAM)
    before = (storage.uncommitted(), archive.attempts("lineage"))

    archive.remove_abandoned("lineage", 1)

    expected: object = (([NAME], ([NAME], [])), [], [])
    assert expected == (before, storage.uncommitted(), _uploads(storage))


def test_upload_in_another_runs_folder_is_left_alone(storage: Storage) -> None:
    """The upload in a folder that another run's attempt record claims stays."""
    record = b'{"program": "train.py:train", "lineage": "other", "generation": 1}'
    storage.write_object(NAME, "attempt.json", [record])
    _start_upload(storage, NAME)

    Archive(storage, PROGRAM).remove_abandoned("lineage", 5)

    expected: object = ([NAME], 1)
    assert expected == (storage.uncommitted(), len(_uploads(storage)))


@pytest.mark.parametrize(
    ("denied", "warning"),
    [
        ("list_multipart_uploads", "incomplete uploads not listed"),
        ("abort_multipart_upload", "incomplete upload not aborted"),
    ],
)
def test_upload_that_may_not_be_cleaned_is_left_with_a_warning(
    storage: Storage,
    spy: Spy,
    caplog: pytest.LogCaptureFixture,
    denied: str,
    warning: str,
) -> None:
    """Without permission to list or abort uploads, cleanup warns and goes on."""
    storage.write_object(NAME, "attempt.json", [b"{}"])
    _start_upload(storage, NAME)
    spy.fault = lambda method, arguments: (
        PermissionError(13, "injected: access denied") if method == denied else None
    )

    listed = storage.uncommitted()
    storage.delete_folder(NAME)
    spy.fault = lambda method, arguments: None

    expected: object = ([NAME], {}, 1)
    assert expected == (listed, storage.sizes(NAME), len(_uploads(storage)))
    assert warning in caplog.text


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RESUMABLE_UPLOAD_PART_MIB", "4", "is below 5"),
        ("RESUMABLE_UPLOAD_PART_MIB", "6000", "is above 5120"),
        ("RESUMABLE_UPLOAD_PART_MIB", "big", "is not an integer"),
        ("RESUMABLE_UPLOAD_CONCURRENCY", "0", "is below 1"),
    ],
)
def test_invalid_upload_variable_is_configuration_error(
    s3_url: str,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    message: str,
) -> None:
    """An upload variable outside S3's limits fails when the storage opens."""
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as caught:
        Storage.open(s3_url)

    assert variable in str(caught.value)
    assert message in str(caught.value)


def test_part_size_grows_so_that_parts_fit_s3s_limit() -> None:
    """An object too large for 10,000 parts of the set size gets larger parts."""
    settings = UploadSettings(part_size=16 * MIB)

    sizes = [settings.part_size_for(size) for size in (None, 10 * 2**30, 2**40)]

    expected = [16 * MIB, 16 * MIB, 105 * MIB]
    assert expected == sizes


def test_listing_incomplete_uploads_is_retried(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient failure listing the incomplete uploads is retried, not fatal."""
    monkeypatch.setenv("RESUMABLE_RETRY_DELAY", "0.01")
    storage = Storage.open(s3_url)
    storage.write_object("step-000000001-aaaaaaaaaaaa", "attempt.json", [b"{}"])
    real = _s3.upload_folders
    failures = [ConnectionResetError(104, "Connection reset by peer")]

    def flaky(fs: Any, root: str) -> set[str]:
        if failures:
            raise failures.pop()
        return real(fs, root)

    monkeypatch.setattr(_s3, "upload_folders", flaky)

    assert ["step-000000001-aaaaaaaaaaaa"] == storage.uncommitted()
    assert [] == failures
