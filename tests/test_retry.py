"""
Tests of ``resumable._retry``: which errors are retried, the waits, the attempts,
the knobs, and how ``Storage`` applies the policy; no test sleeps for real.
"""

from __future__ import annotations

import errno
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import fsspec
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from fsspec.implementations.local import LocalFileSystem
from s3fs.errors import translate_boto_error

from resumable._retry import RetryPolicy, client_options, is_transient
from resumable._storage import Storage
from resumable.errors import ConfigurationError, StorageError

URL = "http://127.0.0.1:9"


def _client_error(status: int, code: str) -> ClientError:
    """An error answer of an S3 server, as botocore raises it."""
    response: Any = {
        "Error": {"Code": code, "Message": "from the test"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")


def _translated(status: int, code: str) -> BaseException:
    """An error answer as s3fs raises it: translated, the answer as its cause."""
    return translate_boto_error(_client_error(status, code))


def _wrapped(cause: BaseException) -> StorageError:
    """A StorageError made from ``cause``, as ``Storage`` translates errors."""
    try:
        raise StorageError("Cannot read x on storage 's3://b'.") from cause
    except StorageError as err:
        return err


def _during(handling: BaseException, error: BaseException) -> BaseException:
    """``error`` as if raised while ``handling`` was being handled."""
    error.__context__ = handling
    return error


TRANSIENT = [
    ConnectionResetError(errno.ECONNRESET, "reset"),
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    ConnectionAbortedError(errno.ECONNABORTED, "aborted"),
    BrokenPipeError(errno.EPIPE, "broken pipe"),
    TimeoutError("timed out"),
    EndpointConnectionError(endpoint_url=URL),
    ConnectionClosedError(endpoint_url=URL),
    ReadTimeoutError(endpoint_url=URL),
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientPayloadError("payload cut short"),
    _translated(500, "InternalError"),
    _translated(502, "BadGateway"),
    _translated(503, "SlowDown"),
    _translated(503, "503"),
    _translated(504, "GatewayTimeout"),
    _translated(429, "TooManyRequests"),
    _translated(400, "RequestTimeout"),
    _client_error(503, "SlowDown"),
    OSError(errno.EREMOTEIO, "remote I/O error"),
    _wrapped(ConnectionResetError(errno.ECONNRESET, "reset")),
    _wrapped(_translated(500, "InternalError")),
    _wrapped(_during(TimeoutError(), OSError("no errno"))),
]
PERMANENT = [
    PermissionError(errno.EACCES, "denied"),
    FileNotFoundError(errno.ENOENT, "no such file"),
    FileExistsError(errno.EEXIST, "exists"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    OSError(errno.EROFS, "Read-only file system"),
    _translated(403, "AccessDenied"),
    _translated(404, "NoSuchBucket"),
    _translated(404, "NoSuchKey"),
    _translated(412, "PreconditionFailed"),
    _translated(400, "InvalidArgument"),
    _translated(501, "NotImplemented"),
    SSLError(endpoint_url=URL, error="certificate verify failed"),
    NoCredentialsError(),
    ValueError("not an I/O error"),
    _wrapped(OSError(errno.ENOSPC, "No space left on device")),
    _wrapped(_translated(403, "AccessDenied")),
    _during(ConnectionResetError(), PermissionError("denied, no errno")),
    _during(TimeoutError(), ValueError("a bad argument")),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=repr)
def test_errors_that_may_pass_are_transient(error: BaseException) -> None:
    """Resets, refusals, timeouts, 5xx and throttling answers are retried."""
    assert is_transient(error)


@pytest.mark.parametrize("error", PERMANENT, ids=repr)
def test_errors_that_will_not_change_are_not_transient(error: BaseException) -> None:
    """Denied, missing, full, precondition failed and the like are never retried."""
    assert not is_transient(error)


class Recorder:
    """A fake clock and sleep: sleeping moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def _policy(
    recorder: Recorder, retries: int = 3, jitter: float = 0.5, **kwargs: float
) -> RetryPolicy:
    return RetryPolicy(
        retries,
        **kwargs,
        sleep=recorder.sleep,
        clock=recorder.clock,
        jitter=lambda: jitter,
    )


def _failing(errors: list[BaseException], result: str = "done") -> Callable[[], str]:
    """A call that raises each of ``errors`` in turn, then returns ``result``."""
    pending = list(errors)

    def call() -> str:
        if pending:
            raise pending.pop(0)
        return result

    return call


@pytest.mark.parametrize(
    ("jitter", "expected"),
    [
        (0.0, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]),
        (0.999999, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]),
    ],
)
def test_waits_double_from_the_base_up_to_the_cap_with_jitter_between_half_and_all(
    jitter: float, expected: list[float]
) -> None:
    """Wait i lies between half and all of min(cap, base * 2**(i-1))."""
    policy = RetryPolicy(9, 1.0, 10.0, jitter=lambda: jitter)

    waits = [round(policy.wait(attempt), 4) for attempt in range(1, 7)]

    assert expected == waits


def test_transient_failures_are_retried_then_the_result_returned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two resets then success: three calls, two waits, one WARNING line per retry."""
    recorder = Recorder()
    policy = _policy(recorder, retries=3, delay=1.0, max_delay=30.0)
    errors: list[BaseException] = [ConnectionResetError(), _translated(503, "SlowDown")]

    with caplog.at_level(logging.WARNING, logger="resumable._retry"):
        result = policy.call("read", "bucket/x", _failing(errors))

    lines = [record.getMessage() for record in caplog.records]
    expected = (
        "done",
        [0.75, 1.5],
        [
            "storage retry: action=read, path=bucket/x, attempt=1/4, "
            "error=ConnectionResetError: , wait=0.75s",
            "storage retry: action=read, path=bucket/x, attempt=2/4, "
            "error=OSError: [Errno 16] from the test (HTTP 503 SlowDown), wait=1.50s",
        ],
    )
    assert expected == (result, recorder.sleeps, lines)


def test_exhausted_retries_raise_a_storage_error_that_says_what_to_do() -> None:
    """When every attempt fails, the error names the call, attempts, time, cause."""
    recorder = Recorder()
    policy = _policy(recorder, retries=2, delay=1.0, max_delay=30.0)
    last = _translated(500, "InternalError")
    errors: list[BaseException] = [ConnectionResetError(), TimeoutError(), last]

    with pytest.raises(StorageError) as caught:
        policy.call("commit", "bucket/m", _failing(errors), storage="s3://bucket")

    expected = (
        "Cannot commit bucket/m on storage 's3://bucket': gave up after 3 attempts "
        "over 2.2 s; the last error was OSError: [Errno 121] from the test (HTTP 500 "
        "InternalError). Check "
        "that the endpoint answers and that the network reaches it (set "
        "RESUMABLE_RETRIES to retry longer), then run the same command again: it "
        "resumes from the newest committed snapshot.",
        last,
        [0.75, 1.5],
    )
    assert expected == (str(caught.value), caught.value.__cause__, recorder.sleeps)


def test_errors_that_will_not_change_are_raised_at_once_unchanged() -> None:
    """A permission error is raised as it is, with no retry and no wait."""
    recorder = Recorder()
    denied = PermissionError(errno.EACCES, "denied")

    with pytest.raises(PermissionError) as caught:
        _policy(recorder).call("write", "bucket/x", _failing([denied]))

    assert (denied, []) == (caught.value, recorder.sleeps)


def test_a_call_that_cannot_resend_gets_one_attempt() -> None:
    """With resend=False a transient failure gives the clear error after 1 attempt."""
    recorder = Recorder()
    call = _failing([ConnectionResetError()])

    with pytest.raises(StorageError, match="gave up after 1 attempt over"):
        _policy(recorder).call("write", "bucket/x", call, resend=False)

    assert [] == recorder.sleeps


def test_nested_calls_retry_only_at_the_outermost_level() -> None:
    """A retried call inside another is not retried itself: attempts never multiply."""
    recorder = Recorder()
    policy = _policy(recorder, retries=2)
    calls = []

    def inner() -> str:
        calls.append("inner")
        raise ConnectionResetError

    with pytest.raises(StorageError):
        policy.call("delete", "x", lambda: policy.call("list", "x", inner))

    assert (["inner"] * 3, 2) == (calls, len(recorder.sleeps))


def test_retry_knobs_set_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """RESUMABLE_RETRIES, _RETRY_DELAY and _RETRY_MAX_DELAY set attempts and waits."""
    monkeypatch.setenv("RESUMABLE_RETRIES", "0")
    monkeypatch.setenv("RESUMABLE_RETRY_DELAY", "0.25")
    monkeypatch.setenv("RESUMABLE_RETRY_MAX_DELAY", "2")

    policy = RetryPolicy.from_environment()

    assert (1, 0.25, 2.0) == (policy.attempts, policy.delay, policy.max_delay)


def test_retry_defaults_without_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the variables: 6 attempts, waits from 1 s, capped at 30 s."""
    for name in (
        "RESUMABLE_RETRIES",
        "RESUMABLE_RETRY_DELAY",
        "RESUMABLE_RETRY_MAX_DELAY",
    ):
        monkeypatch.delenv(name, raising=False)

    policy = RetryPolicy.from_environment()

    assert (6, 1.0, 30.0) == (policy.attempts, policy.delay, policy.max_delay)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RESUMABLE_RETRIES", "-1", "RESUMABLE_RETRIES=-1 is below 0"),
        ("RESUMABLE_RETRIES", "many", "RESUMABLE_RETRIES='many' is not an integer"),
        ("RESUMABLE_RETRY_DELAY", "-0.5", "RESUMABLE_RETRY_DELAY=-0.5 is below 0"),
        ("RESUMABLE_RETRY_MAX_DELAY", "soon", "RESUMABLE_RETRY_MAX_DELAY='soon'"),
        ("RESUMABLE_RETRY_MAX_DELAY", "nan", "RESUMABLE_RETRY_MAX_DELAY=nan is below"),
    ],
)
def test_invalid_retry_knobs_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    """A retry variable that is no valid number stops the run before it starts."""
    monkeypatch.setenv(name, value)

    with pytest.raises(ConfigurationError, match=message):
        Storage.open(f"memory://resumable-tests/{uuid.uuid4().hex}")


class Flaky:
    """A file system that fails the first calls of chosen methods, then delegates."""

    def __init__(self, fs: Any, failures: dict[str, list[BaseException]]) -> None:
        self._fs = fs
        self.failures = failures
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._fs, name)
        if name not in self.failures:
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if self.failures[name]:
                raise self.failures[name].pop(0)
            return method(*args, **kwargs)

        return call


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh folder of the memory file system, removed afterwards."""
    root = f"/resumable-tests/{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _storage(fs: Any, root: str, recorder: Recorder) -> Storage:
    storage = Storage(fs, root, f"memory://{root}")
    storage.retry = _policy(recorder, retries=3)
    return storage


def test_storage_retries_remote_reads_and_commits(memory_root: str) -> None:
    """Reads, commits and listings of remote storage pass through transient faults."""
    recorder = Recorder()
    flaky = Flaky(
        fsspec.filesystem("memory"),
        {
            "cat_file": [ConnectionResetError(), _translated(500, "InternalError")],
            "pipe_file": [EndpointConnectionError(endpoint_url=URL)],
            "ls": [ReadTimeoutError(endpoint_url=URL)],
        },
    )
    storage = _storage(flaky, memory_root, recorder)

    storage.write_object("step-000000001-aaaaaaaaaaaa", "data.bin", [b"abc"])
    storage.commit("step-000000001-aaaaaaaaaaaa", b"{}")
    found = (
        storage.committed(),
        storage.read("step-000000001-aaaaaaaaaaaa.manifest.json"),
    )

    expected = ((["step-000000001-aaaaaaaaaaaa"], b"{}"), 4)
    assert expected == (found, len(recorder.sleeps))


def test_storage_resends_a_list_but_not_an_iterator(memory_root: str) -> None:
    """A write given a list is sent again after a reset; one given an iterator not."""
    recorder = Recorder()
    reset = ConnectionResetError(errno.ECONNRESET, "reset")
    flaky = Flaky(fsspec.filesystem("memory"), {"open": [reset]})
    storage = _storage(flaky, memory_root, recorder)

    size = storage.write_object("step-000000001-aaaaaaaaaaaa", "a.bin", [b"abc"])
    flaky.failures["open"].append(reset)
    with pytest.raises(StorageError, match="gave up after 1 attempt"):
        storage.write_object("step-000000001-aaaaaaaaaaaa", "b.bin", iter([b"abc"]))

    assert (3, ["open"] * 3) == (size, flaky.calls)


class FlakyLocal(LocalFileSystem):
    """The local file system, whose listings fail with a reset connection."""

    calls = 0

    def ls(self, path: str, detail: bool = False, **kwargs: Any) -> Any:
        FlakyLocal.calls += 1
        raise ConnectionResetError(errno.ECONNRESET, "reset")


def test_local_storage_is_not_retried(tmp_path: Any) -> None:
    """A local file system error is translated at once, with no retry."""
    storage = Storage(FlakyLocal(skip_instance_cache=True), str(tmp_path), "file://x")

    with pytest.raises(StorageError, match="Cannot list"):
        storage.committed()

    assert (None, 1) == (storage.retry, FlakyLocal.calls)


def test_local_storage_opens_without_a_policy(tmp_path: Any) -> None:
    """Storage.open on the local file system leaves retries off."""
    assert Storage.open(f"file://{tmp_path}/store").retry is None


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        ("s3://b/x", {}, {"config_kwargs": {"retries": {"total_max_attempts": 1}}}),
        (
            "s3://b/x",
            {"config_kwargs": {"read_timeout": 5}},
            {
                "config_kwargs": {
                    "read_timeout": 5,
                    "retries": {"total_max_attempts": 1},
                }
            },
        ),
        (
            "s3://b/x",
            {"config_kwargs": {"retries": {"max_attempts": 9}}},
            {"config_kwargs": {"retries": {"max_attempts": 9}}},
        ),
        ("memory://x", {}, {}),
        ("file:///tmp/x", {"auto_mkdir": True}, {"auto_mkdir": True}),
    ],
)
def test_botocore_retries_are_turned_off_unless_the_user_chose(
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    options: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    """For s3 resumable owns the retries, unless the options choose botocore's."""
    monkeypatch.delitem(fsspec.config.conf, "s3", raising=False)
    for name in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)

    assert expected == client_options(url, options)


def test_botocore_retries_chosen_elsewhere_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retries set in fsspec's configuration or AWS_MAX_ATTEMPTS stay the user's."""
    monkeypatch.setitem(
        fsspec.config.conf, "s3", {"config_kwargs": {"retries": {"mode": "adaptive"}}}
    )
    from_config = client_options("s3://b/x", {"key": "k"})
    monkeypatch.delitem(fsspec.config.conf, "s3")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    from_environment = client_options("s3://b/x", {})

    assert ({"key": "k"}, {}) == (from_config, from_environment)
