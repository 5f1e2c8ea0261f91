"""
Case B07: an object-store write that fails part-way never publishes a truncated object.

The snapshot after step 2 fails once 12 MiB of its 16 MiB data object have gone to
the storage: S3, where they are parts of a multipart upload of 5 MiB parts, and
memory://, which publishes a file as it is written. The run raises the original
exception; the failed snapshot leaves no manifest, no payload object and no incomplete
upload, only its attempt record (which the next commit's cleanup removes); the
snapshot of step 1 stays the newest; and the same run started again resumes from it
and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import pytest
import torch

import resumable
from resumable._archive import Archive
from resumable._snapshot import DATA_OBJECT, parse_snapshot_name
from resumable._storage import Storage
from resumable.testing import assert_states_equal, memory_storage, run_steps

MIB = 2**20
# The snapshot that fails, and how much of its data object goes out first.
FAILING_STEP = 2
STREAMED = 12 * MIB


@attrs.define
class State:
    """16 MiB of weights moved by the global torch RNG, and a history of sums."""

    weights: torch.Tensor
    sums: list[float] = attrs.Factory(list)


def init() -> State:
    return State(torch.zeros(4 * MIB))


@resumable.step(init=init, steps=3, every=1, keep=3)
def train(state: State, step: int) -> dict[str, float]:
    state.weights.add_(torch.rand(state.weights.shape))
    state.sums.append(float(state.weights[:1024].sum()))

    return {"sum": state.sums[-1]}


class InjectedFailure(RuntimeError):
    """The error of the failed write, as a user's encoder or a network might raise."""


@attrs.define
class Fault:
    """Fails the data object of one snapshot after ``STREAMED`` bytes, once."""

    url: str
    error: InjectedFailure = attrs.Factory(
        lambda: InjectedFailure(f"injected after {STREAMED} bytes")
    )
    armed: bool = True
    streamed: int = 0
    # Incomplete uploads on the storage when the failure came.
    uploads_then: list[str] = attrs.Factory(list)

    def stream(self, chunks: Iterable[Any]) -> Iterator[Any]:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            for start in range(0, view.nbytes, MIB):
                if self.streamed >= STREAMED:
                    self.uploads_then = _uploads(self.url)
                    raise self.error
                piece = view[start : start + MIB]
                self.streamed += piece.nbytes
                yield piece


def _uploads(url: str) -> list[str]:
    storage = Storage.open(url)
    if not url.startswith("s3://"):
        return []
    bucket = storage.fs.split_path(storage.root)[0]
    return [upload["Key"] for upload in storage.fs.list_multipart_uploads(bucket)]


@pytest.fixture(params=["memory", "s3"])
def url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty storage: in memory, or on S3 with parts of 5 MiB."""
    if request.param == "memory":
        return memory_storage()
    monkeypatch.setenv("RESUMABLE_UPLOAD_PART_MIB", "5")
    s3_url: str = request.getfixturevalue("s3_url")
    return s3_url


@pytest.fixture
def fault(url: str, monkeypatch: pytest.MonkeyPatch) -> Fault:
    """The write of snapshot FAILING_STEP's data object, failing part-way."""
    fault = Fault(url)
    write_object = Storage.write_object

    def failing(self: Storage, snapshot: str, name: str, chunks: Any) -> int:
        step = parse_snapshot_name(snapshot)
        if (
            fault.armed
            and self.url == fault.url
            and (name, step) == (DATA_OBJECT, FAILING_STEP)
        ):
            fault.armed = False
            chunks = fault.stream(chunks)
        return write_object(self, snapshot, name, chunks)

    monkeypatch.setattr(Storage, "write_object", failing)
    return fault


@attrs.define
class Left:
    """What the storage shows after the failed run."""

    committed: list[int]
    # Attempt folders that no manifest commits: the failed one is deleted at once.
    attempts: list[str]
    uploads: list[str]


def _left(url: str) -> Left:
    storage = Storage.open(url)
    listing = Archive(storage, train.program).listing()
    return Left(
        committed=[entry.step for entry in listing],
        attempts=storage.uncommitted(),
        uploads=_uploads(url),
    )


def test_failed_upload_publishes_nothing_and_resumes(
    url: str, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    """A write failing part-way leaves step 1 newest, and the rerun ends identical."""
    reference = run_steps(train, storage=memory_storage())
    with pytest.raises(InjectedFailure) as caught:
        run_steps(train, storage=url)
    left = _left(url)
    caplog.set_level(logging.INFO, logger="resumable")

    resumed = run_steps(train, storage=url)

    expected = (fault.error, STREAMED, Left([1], [], []))
    assert expected == (caught.value, fault.streamed, left)
    assert "resumed: step=1" in caplog.text
    assert_states_equal(reference.state, resumed.state)
    assert reference.history == resumed.history
    assert ([], []) == (Storage.open(url).uncommitted(), _uploads(url))
    if url.startswith("s3://"):
        # The failure came in the middle of a multipart upload.
        assert 1 == len(fault.uploads_then)
