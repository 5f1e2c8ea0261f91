"""
Many processes on gloo, launched as torchrun launches them: a signal or a kill of
one rank, then a restart, ends bit-identical to an uninterrupted run; a rank that
hangs makes the others exit within the bound; no partial snapshot is ever listed.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from resumable._archive import Archive
from resumable._storage import Storage
from tests.ranks import Job, started, wait_for_step

pytestmark = pytest.mark.slow

STEPS = 6
RUN = {"DIST_STEPS": STEPS, "DIST_STEP_SLEEP": 0.04}


def _run(folder: Path, world_size: int, **extra: object) -> tuple[list[int], Job]:
    with started(folder, world_size, _environment(folder, **extra)) as job:
        return job.wait(), job


def _environment(folder: Path, **extra: object) -> dict[str, object]:
    for name in ("digest", "progress"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    return {
        **RUN,
        "DIST_DIGEST": folder / "digest",
        "DIST_PROGRESS": folder / "progress",
        **extra,
    }


def _digests(folder: Path, world_size: int) -> list[dict[str, str]]:
    return [
        json.loads((folder / "digest" / f"rank-{rank}.json").read_text())
        for rank in range(world_size)
    ]


def _unverified(folder: Path) -> list[str]:
    """Committed snapshots that do not verify, every part of them."""
    storage = Storage.open(str(folder / "store"))
    archive = Archive(storage, "dist_train.py:train")
    bad = []
    for entry in archive.listing():
        try:
            assert entry.manifest is not None
            storage_sizes = storage.sizes(entry.name)
            for name, info in entry.manifest.objects.items():
                assert storage_sizes[name] == info.size
        except (AssertionError, KeyError):
            bad.append(entry.name)
    return bad


@pytest.fixture(scope="module", params=[2, 3])
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, list[dict[str, str]]]:
    world_size = request.param
    folder = tmp_path_factory.mktemp(f"reference{world_size}")
    codes, job = _run(folder, world_size)
    assert [0] * world_size == codes, job.log()
    return world_size, _digests(folder, world_size)


def test_sigterm_to_one_rank_stops_all_and_resumes_exactly(
    reference: tuple[int, list[dict[str, str]]], tmp_path: Path
) -> None:
    """SIGTERM to the last rank stops every rank with code 1; a restart ends equal."""
    world_size, expected = reference
    with started(tmp_path, world_size, _environment(tmp_path)) as job:
        wait_for_step(tmp_path / "progress", world_size - 1, 2)
        job.signal(world_size - 1, signal.SIGTERM)
        stopped = job.wait()
    assert [1] * world_size == stopped, job.log()
    assert "preempted: cause=rank" in job.log()
    codes, job = _run(tmp_path, world_size)
    assert [0] * world_size == codes, job.log()

    assert expected == _digests(tmp_path, world_size)
    assert [] == _unverified(tmp_path)


def test_sigkill_of_one_rank_commits_nothing_partial_and_resumes_exactly(
    reference: tuple[int, list[dict[str, str]]],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """
    SIGKILL of rank 1 makes the others exit, with code 6 (or 3 where the user's
    own collective saw it first); a restart ends equal.
    """
    world_size, expected = reference
    with started(tmp_path, world_size, _environment(tmp_path)) as job:
        wait_for_step(tmp_path / "progress", 1, 3)
        job.signal(1, signal.SIGKILL)
        codes = job.wait()
    assert [-signal.SIGKILL] == codes[1:2], job.log()
    assert set(codes) - {-signal.SIGKILL} <= {3, 6}, job.log()
    assert [] == _unverified(tmp_path)
    codes, job = _run(tmp_path, world_size)
    assert [0] * world_size == codes, job.log()

    assert expected == _digests(tmp_path, world_size)
    assert [] == _unverified(tmp_path)


def test_hung_rank_makes_the_others_exit_within_the_bound(tmp_path: Path) -> None:
    """A rank stopped by SIGSTOP makes the others exit with code 6 within the bound."""
    environment = _environment(tmp_path, RESUMABLE_DIST_TIMEOUT=2)
    with started(tmp_path, 2, environment) as job:
        wait_for_step(tmp_path / "progress", 1, 2)
        job.signal(1, signal.SIGSTOP)
        started_at = time.monotonic()
        code = job.processes[0].wait(30)
        waited = time.monotonic() - started_at

    assert 6 == code, job.log()
    assert waited < 20
    assert "lost the other ranks" in job.log()


def test_other_world_size_is_refused_naming_both(tmp_path: Path) -> None:
    """A snapshot of 2 processes resumed by 3 fails with code 4 naming both sizes."""
    codes, job = _run(tmp_path, 2, DIST_STEPS=1)
    assert [0, 0] == codes, job.log()

    codes, job = _run(tmp_path, 3, DIST_STEPS=2)

    assert [4, 4, 4] == codes, job.log()
    assert "written by 2 processes and this run has 3" in job.log()


def test_replicated_state_is_re_laid_out_for_another_world_size(
    tmp_path: Path,
) -> None:
    """A snapshot whose every part equals rank 0's resumes with another world size."""
    codes, job = _run(tmp_path, 2, DIST_STEPS=1, DIST_PER_RANK=0)
    assert [0, 0] == codes, job.log()

    codes, job = _run(tmp_path, 3, DIST_STEPS=2, DIST_PER_RANK=0)

    assert [0, 0, 0] == codes, job.log()
    assert "re-laid out: snapshot=" in job.log()
