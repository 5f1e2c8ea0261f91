"""
SIGKILL in the middle of an upload to S3: a real ``python -m resumable`` run on an
s3:// URL is killed while the multipart upload of a snapshot's data.bin is in flight.
Nothing torn is listed, the kill leaves an incomplete upload that the rerun aborts,
and the run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import fsspec
import pytest

from resumable._snapshot import DATA_OBJECT, parse_snapshot_name
from resumable._storage import Storage
from tests.conftest import import_script

harness = import_script("crash_harness")

pytestmark = pytest.mark.slow

# The snapshot whose upload is killed.
THROTTLED = 2
RUN = {
    "CRASH_STEPS": 3,
    "CRASH_KEEP": 2,
    "CRASH_BALLAST_MB": 24,
    "CRASH_BALLAST_PARTS": 4,
}
# The snapshot of step 2 streams at about 12 MiB/s in parts of 5 MiB, so that its
# multipart upload is in flight for about a second.
PACING = {
    "CRASH_CHUNK_BYTES": 256 * 1024,
    "CRASH_CHUNK_SLEEP": 0.02,
    "CRASH_THROTTLE_STEPS": THROTTLED,
    "RESUMABLE_UPLOAD_PART_MIB": 5,
}
# Seconds between two looks at the server's uploads; each look costs it CPU.
LOOK_EVERY = 0.05


class S3Run(harness.Run):  # type: ignore[misc]  # harness.Run is Any to mypy
    """A crash_train run whose storage is an s3:// URL."""

    def __init__(self, folder: Path, settings: Mapping[str, object], url: str) -> None:
        super().__init__(folder, settings)
        self.url = url

    @property
    def storage(self) -> str:
        return self.url


@attrs.define
class Observed:
    """What the storage showed after the kill, and after the rerun."""

    killed_upload: str
    after_kill: dict[str, Any]
    final_rc: int | None
    after_rerun: dict[str, Any]
    digest: dict[str, str]


def _uploads(bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = fsspec.filesystem("s3").list_multipart_uploads(
        bucket
    )
    return uploads


def _data_upload_with_parts(bucket: str, found: list[str]) -> Callable[[], bool]:
    """An event: the upload of step 2's data.bin has a part on the server."""
    fs = fsspec.filesystem("s3")
    looked = [0.0]

    def event() -> bool:
        if time.monotonic() < looked[0] + LOOK_EVERY:
            return False
        looked[0] = time.monotonic()
        for upload in _uploads(bucket):
            *_, folder, name = upload["Key"].split("/")
            if (parse_snapshot_name(folder), name) != (THROTTLED, DATA_OBJECT):
                continue
            parts = fs.call_s3(
                "list_parts",
                Bucket=bucket,
                Key=upload["Key"],
                UploadId=upload["UploadId"],
            )
            if parts.get("Parts"):
                found.append(upload["Key"])
                return True
        return False

    return event


def _storage_state(run: Any, bucket: str) -> dict[str, Any]:
    storage = Storage.open(run.storage)
    return {
        "committed": harness.committed_steps(run),
        "unverified": harness.unverified(run),
        "uncommitted": {
            name: sorted(storage.sizes(name)) for name in storage.uncommitted()
        },
        "uploads": sorted(upload["Key"] for upload in _uploads(bucket)),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The digest of an uninterrupted run, on local storage."""
    run = harness.Run(tmp_path_factory.mktemp("reference"), RUN)
    finished = run.run_to_end()
    assert finished.returncode == 0, finished.log()
    digest: dict[str, str] = run.digest()
    return digest


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> Observed:
    """Kill a run on S3 in the middle of data.bin's upload, then run it to the end."""
    fs = fsspec.filesystem("s3")
    bucket = f"resumable-crash-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    run = S3Run(
        tmp_path_factory.mktemp("killed-on-s3"),
        {**RUN, **PACING},
        f"s3://{bucket}/store",
    )
    found: list[str] = []
    with run.start() as incarnation:
        killed = incarnation.kill_when(_data_upload_with_parts(bucket, found))
    assert killed, incarnation.log()
    after_kill = _storage_state(run, bucket)
    final = run.run_to_end()
    observed = Observed(
        killed_upload=found[0],
        after_kill=after_kill,
        final_rc=final.returncode,
        after_rerun=_storage_state(run, bucket),
        digest=run.digest() if final.returncode == 0 else {},
    )
    fs.rm(bucket, recursive=True)
    return observed


def test_kill_mid_upload_lists_nothing_torn(observed: Observed) -> None:
    """After the kill, step 1 is listed and verifies; the upload is not an object."""
    attempt = observed.killed_upload.split("/")[-2]
    expected = {
        "committed": [1],
        "unverified": [],
        "uncommitted": {attempt: ["attempt.json"]},
        "uploads": [observed.killed_upload],
    }

    actual = observed.after_kill

    assert expected == actual


def test_rerun_aborts_leftover_upload_and_finishes(observed: Observed) -> None:
    """The rerun finishes, aborts the killed upload and leaves only good snapshots."""
    expected = (
        0,
        {"committed": [2, 3], "unverified": [], "uncommitted": {}, "uploads": []},
    )

    actual = (observed.final_rc, observed.after_rerun)

    assert expected == actual


def test_run_killed_mid_upload_ends_bit_identical(
    observed: Observed, reference: dict[str, str]
) -> None:
    """A run killed in an upload to S3 ends with the uninterrupted run's state."""
    expected = reference

    actual = observed.digest

    assert expected == actual
