"""
Network faults between s3fs and a real S3 server (moto on 127.0.0.1), injected by
the tests' own proxy: resets, 5xx answers and stalls are retried, a server that
keeps failing gives a clear error in bounded time, and nothing torn is ever listed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

import resumable
from resumable._archive import Archive
from resumable._rng import seed_global_rngs
from resumable._storage import Storage
from resumable.errors import ResumableError, StorageError
from resumable.testing import diff_states
from tests.conftest import TinyState
from tests.faultproxy import FaultProxy, Request
from tests.s3server import S3Server

# Short timeouts and waits, so that each fault costs a fraction of a second.
READ_TIMEOUT = 0.5
SCRIPT = Path(__file__).resolve().parent / "scripts" / "stall_train.py"
# The grace period of the stall test, and what exiting may take beyond it.
GRACE = 2.0
EXIT_MARGIN = 2.0


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A faulty proxy in front of the test S3 server, passing everything at first."""
    with FaultProxy(s3_server.endpoint) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def package_logs_reach_caplog() -> Iterator[None]:
    """Undo the handler and level that an in-process CLI test may have left."""
    package = logging.getLogger("resumable")
    handlers, level, propagate = package.handlers[:], package.level, package.propagate
    package.handlers[:] = []
    package.setLevel(logging.NOTSET)
    package.propagate = True
    yield
    package.handlers[:] = handlers
    package.setLevel(level)
    package.propagate = propagate


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry up to 5 times after waits of 10 to 50 ms."""
    monkeypatch.setenv("RESUMABLE_RETRIES", "5")
    monkeypatch.setenv("RESUMABLE_RETRY_DELAY", "0.01")
    monkeypatch.setenv("RESUMABLE_RETRY_MAX_DELAY", "0.05")


def _through(server: S3Server, proxy: FaultProxy) -> dict[str, Any]:
    """Storage options that reach the server through the proxy."""
    timeouts = {"connect_timeout": READ_TIMEOUT, "read_timeout": READ_TIMEOUT}
    return {**server.options, "endpoint_url": proxy.endpoint, "config_kwargs": timeouts}


def _bucket_url() -> str:
    bucket = f"resumable-{uuid.uuid4().hex[:16]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/store"


def _run(step: resumable.Step[TinyState], url: str, **kwargs: Any) -> Any:
    """Run ``step`` on ``url`` from seeded RNGs, as every incarnation starts."""
    seed_global_rngs(0)
    return resumable.run(step, storage=url, **kwargs)


class TornWatcher:
    """
    Lists the storage over a direct connection, again and again, in a thread, and
    verifies every manifest listed; records each one that does not verify.
    """

    def __init__(self, server: S3Server, url: str) -> None:
        self.archive = Archive(Storage.open(url, server.options, create=False), "")
        self.torn: list[str] = []
        self.verified: set[str] = set()
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> TornWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def verify_all(self) -> None:
        """List the storage once and verify every snapshot listed."""
        for entry in self.archive.listing():
            self._verify(entry.name, entry.manifest)
        self.rounds += 1

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.verify_all()

    def _verify(self, name: str, manifest: Any) -> None:
        try:
            if manifest is None:
                raise ValueError("unreadable manifest")
            self.archive.read(manifest)
        except (ResumableError, ValueError) as err:
            # Deletion removes the manifest first: a snapshot whose manifest is
            # gone by now was deleted, not torn.
            if name in self.archive.storage.committed():
                self.torn.append(f"{name}: {err}")
        else:
            self.verified.add(name)


def _listing(request: Request) -> bool:
    return request.method == "GET" and "list-type=2" in request.target


def _manifest_put(request: Request) -> bool:
    return request.method == "PUT" and request.target.endswith(".manifest.json")


def _object_put(request: Request) -> bool:
    return request.method == "PUT" and "/step-" in request.target


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("storage retry:")
    ]


def test_run_through_resets_and_5xx_ends_identical_and_never_torn(
    s3_server: S3Server,
    proxy: FaultProxy,
    tiny_step: resumable.Step[TinyState],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Resets, lost answers and 500/503 answers are retried; the run ends as clean."""
    clean = _run(tiny_step, _bucket_url(), steps=5)
    url = _bucket_url()
    # Before each step's snapshot (and the first listing), another fault: two
    # resets in a row get past aiohttp's own single resend.
    faults = {
        1: lambda: proxy.reset(None, every=2),
        2: lambda: proxy.reset(2, match=_manifest_put, after=True),
        3: lambda: proxy.answer(500, None, every=3),
        4: lambda: proxy.answer(503, None, every=3),
        5: lambda: proxy.reset(4, match=_object_put),
    }
    proxy.reset(3, match=_listing)

    with caplog.at_level(logging.WARNING), TornWatcher(s3_server, url) as watcher:
        faulty = _run(
            tiny_step,
            url,
            steps=5,
            storage_options=_through(s3_server, proxy),
            progress=lambda done, total, metrics: faults[done](),
        )

    errors = {line.split("error=")[1].split(":")[0] for line in _retries(caplog)}
    assert [] == diff_states(clean.state, faulty.state)
    assert clean.history == faulty.history
    assert ([], True) == (watcher.torn, bool(watcher.verified))
    assert {"EndpointConnectionError", "OSError"} <= errors
    assert any("action=commit" in line for line in _retries(caplog))


def test_a_commit_stalled_past_the_read_timeout_is_sent_again(
    s3_server: S3Server,
    proxy: FaultProxy,
    tiny_step: resumable.Step[TinyState],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A manifest PUT held unanswered past the read timeout is retried to success."""
    clean = _run(tiny_step, _bucket_url(), steps=2)
    url = _bucket_url()
    # s3fs itself sends a timed-out request 5 times: the 6th stall reaches resumable.
    proxy.stall(10.0, 6, match=_manifest_put)

    with caplog.at_level(logging.WARNING):
        faulty = _run(
            tiny_step, url, steps=2, storage_options=_through(s3_server, proxy)
        )

    retried = [
        line
        for line in _retries(caplog)
        if "action=commit" in line and "ReadTimeoutError" in line
    ]
    assert [] == diff_states(clean.state, faulty.state)
    assert (True, 6) == (len(retried) >= 1, proxy.faults)


def _data_get(request: Request) -> bool:
    return request.method == "GET" and request.target.split("?")[0].endswith(
        "/data.bin"
    )


def test_a_failed_read_of_the_data_is_retried_and_the_restore_ends_identical(
    s3_server: S3Server,
    proxy: FaultProxy,
    tiny_step: resumable.Step[TinyState],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """
    500 answers to the data object's reads at resume are retried from its start,
    so the newest snapshot is restored, not passed over for an older one.
    """
    clean = _run(tiny_step, _bucket_url(), steps=5)
    url = _bucket_url()
    _run(tiny_step, url, steps=3)
    proxy.answer(500, 2, match=_data_get)

    with caplog.at_level(logging.INFO):
        resumed = _run(
            tiny_step, url, steps=5, storage_options=_through(s3_server, proxy)
        )

    messages = [record.getMessage() for record in caplog.records]
    assert 2 == proxy.faults
    assert 2 == sum("action=read" in line for line in _retries(caplog))
    assert any(line.startswith("resumed: step=3,") for line in messages)
    assert [] == diff_states(clean.state, resumed.state)


def test_a_server_that_keeps_failing_gives_a_clear_error_and_a_restart_resumes(
    s3_server: S3Server,
    proxy: FaultProxy,
    tiny_step: resumable.Step[TinyState],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """
    Retries run out within seconds with a StorageError that says what to do; the
    snapshots committed before stay as they were, and a start on a healthy link
    resumes from the newest of them and ends as an uninterrupted run.
    """
    clean = _run(tiny_step, _bucket_url())
    url = _bucket_url()
    watcher = TornWatcher(s3_server, url)
    seen: dict[str, Any] = {}

    def fail_from_step_3(done: int, total: int, metrics: Any) -> None:
        if done == 3:
            seen["committed"] = sorted(watcher.archive.storage.committed())
            seen["started"] = time.monotonic()
            proxy.answer(500, None)

    with pytest.raises(StorageError) as caught:
        _run(
            tiny_step,
            url,
            storage_options=_through(s3_server, proxy),
            progress=fail_from_step_3,
        )
    elapsed = time.monotonic() - seen["started"]
    committed = sorted(watcher.archive.storage.committed())
    watcher.verify_all()
    with caplog.at_level(logging.INFO):
        resumed = _run(tiny_step, url)

    message = str(caught.value)
    assert "gave up after 6 attempts over" in message
    assert "InternalError" in message or "[Errno 121]" in message
    assert message.endswith("resumes from the newest committed snapshot.")
    assert elapsed < 10
    assert (seen["committed"], []) == (committed, watcher.torn)
    assert 2 == len(committed)
    assert any(
        record.getMessage().startswith("resumed: step=2,") for record in caplog.records
    )
    assert [] == diff_states(clean.state, resumed.state)


def test_a_stall_during_preemption_ends_at_the_grace_deadline(
    s3_server: S3Server, proxy: FaultProxy
) -> None:
    """
    A final snapshot that stalls after SIGTERM is cut off when the grace period
    ends; every snapshot committed before still verifies.
    """
    url = _bucket_url()
    # s3fs's own read timeout (15 s) is kept: only the watchdog can end this.
    options = {**s3_server.options, "endpoint_url": proxy.endpoint}
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), url, str(GRACE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FSSPEC_S3": json.dumps(options)},
    )
    try:
        ready = child.stdout.readline() if child.stdout else ""
        proxy.stall(3600.0, None)
        signalled = time.monotonic()
        os.kill(child.pid, signal.SIGTERM)
        _, stderr = child.communicate(timeout=30)
        elapsed = time.monotonic() - signalled
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    proxy.passthrough()
    watcher = TornWatcher(s3_server, url)
    watcher.verify_all()

    assert "ready\n" == ready, stderr[-2000:]
    assert (1, True) == (child.returncode, elapsed < GRACE + EXIT_MARGIN), stderr[
        -2000:
    ]
    assert "grace period spent" in stderr
    assert ([], True) == (watcher.torn, len(watcher.verified) >= 3)
