"""
Many processes on gloo, launched as torchrun launches them: a signal or a kill of
one rank, then a restart, ends bit-identical to an uninterrupted run; a rank that
hangs makes the others exit within the bound; no partial snapshot is ever listed.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from resumable._archive import Archive
from resumable._loading import list_snapshots
from resumable._storage import Storage
from tests.ranks import Job, started, wait_for_step

pytestmark = pytest.mark.slow

STEPS = 5
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
    """Each rank's digest of its final state, as the script wrote it at exit."""
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


# The model of each world size's runs: 2 processes shard it with FSDP2, 3
# replicate it with DDP.
SHARDED = {2: 1, 3: 0}


def _reference(folder: Path, world_size: int) -> Path:
    codes, job = _run(
        folder, world_size, DIST_STEP_SLEEP=0, DIST_FSDP=SHARDED[world_size]
    )
    assert [0] * world_size == codes, job.log()
    return folder


@pytest.fixture(scope="module")
def reference2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder (digests, store) of an uninterrupted run of 2 processes, FSDP2."""
    return _reference(tmp_path_factory.mktemp("reference2"), 2)


@pytest.fixture(scope="module")
def reference3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder (digests, store) of an uninterrupted run of 3 processes, DDP."""
    return _reference(tmp_path_factory.mktemp("reference3"), 3)


@pytest.mark.parametrize("world_size", [2, 3], ids=["2-fsdp", "3-ddp"])
def test_sigterm_then_sigkill_of_one_rank_resume_exactly(
    world_size: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """
    With a model sharded by FSDP2 (2 processes) or replicated by DDP (3), SIGTERM
    to the last rank stops every rank with code 1; after a restart, SIGKILL
    of rank 1 makes the others exit at once, with code 6 (or 3 where the script's
    own collective saw it first), committing nothing partial; a last restart
    ends equal to the uninterrupted run.
    """
    expected = request.getfixturevalue(f"reference{world_size}")
    sharded = SHARDED[world_size]
    environment = _environment(tmp_path, DIST_FSDP=sharded)
    with started(tmp_path, world_size, environment) as job:
        wait_for_step(tmp_path / "progress", world_size - 1, 1)
        job.signal(world_size - 1, signal.SIGTERM)
        stopped = job.wait()
    assert [1] * world_size == stopped, job.log()
    assert "preempted: cause=rank" in job.log()

    with started(tmp_path, world_size, environment) as job:
        wait_for_step(tmp_path / "progress", 1, 3)
        job.signal(1, signal.SIGKILL)
        killed_at = time.monotonic()
        codes = job.wait()
        waited = time.monotonic() - killed_at
    assert [-signal.SIGKILL] == codes[1:2], job.log()
    assert set(codes) - {-signal.SIGKILL} <= {3, 6}, job.log()
    # Far inside the 600 s bound: a dead rank's connections close at once.
    assert waited < 60
    assert [] == _unverified(tmp_path)

    codes, job = _run(tmp_path, world_size, DIST_STEP_SLEEP=0, DIST_FSDP=sharded)
    assert [0] * world_size == codes, job.log()
    assert _digests(expected, world_size) == _digests(tmp_path, world_size)
    assert [] == _unverified(tmp_path)


def test_other_world_size_is_refused_naming_both(
    reference3: Path, tmp_path: Path
) -> None:
    """A snapshot of 3 processes with parts of their own resumed by 2 fails with 4."""
    shutil.copytree(reference3 / "store", tmp_path / "store")

    codes, job = _run(tmp_path, 2, DIST_STEPS=STEPS + 1)

    assert [4, 4] == codes, job.log()
    assert "written by 3 processes and this run has 2" in job.log()


def test_hung_rank_stops_the_others_and_replicated_state_re_lays_out(
    tmp_path: Path,
) -> None:
    """
    A rank that stops itself (SIGSTOP) between two safe points makes the other
    exit with code 6 within the bound;
    the snapshot before, every part of it equal to rank 0's, resumes with 3.
    """
    environment = _environment(
        tmp_path, RESUMABLE_DIST_TIMEOUT=2, DIST_PER_RANK=0, DIST_HANG="1:2"
    )
    with started(tmp_path, 2, environment) as job:
        wait_for_step(tmp_path / "progress", 1, 2)
        started_at = time.monotonic()
        code = job.processes[0].wait(30)
        waited = time.monotonic() - started_at
    assert 6 == code, job.log()
    assert waited < 20
    assert "lost the other ranks" in job.log()

    codes, job = _run(tmp_path, 3, DIST_PER_RANK=0, DIST_STEP_SLEEP=0)

    assert [0, 0, 0] == codes, job.log()
    assert "re-laid out: snapshot=" in job.log()


def test_ls_checks_every_rank_s_part(reference3: Path, tmp_path: Path) -> None:
    """A flipped byte in rank 2's part makes that snapshot fail verification in ls."""
    shutil.copytree(reference3 / "store", tmp_path / "store")
    newest = max((tmp_path / "store").glob("step-*/data-rank00002.bin"))
    damaged = bytearray(newest.read_bytes())
    damaged[0] ^= 0xFF
    newest.write_bytes(bytes(damaged))

    rows = list_snapshots(str(tmp_path / "store"))

    problems = {entry.name: problem for entry, problem in rows}
    assert "checksum" in str(problems[newest.parent.name])
    assert 1 == sum(problem is not None for problem in problems.values())
