"""
Tests of restoring into the live state: a snapshot's bytes are read straight into
the tensors and arrays that init() built, verified on the way; whatever cannot be
read there (changed shapes or dtypes, tied or strided tensors, CUDA) is copied as
before, to the same values.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from torch import nn

import resumable
from resumable import _resume, testing
from resumable._archive import Archive, Loaded
from resumable._snapshot import DATA_OBJECT, INDEX_OBJECT, Manifest
from resumable._state import (
    decode_snapshot,
    encode_snapshot,
    place_snapshot,
    schema,
)
from resumable._storage import Storage
from resumable.errors import SnapshotCorruptError, StateDefinitionError
from resumable.testing import diff_states


@attrs.define
class Trained:
    """A model, its optimizer with state, loose tensors and arrays."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    tensors: list[torch.Tensor]
    arrays: dict[str, np.ndarray]


def trained(seed: int) -> Trained:
    """Build a state whose values depend on ``seed`` and whose shapes do not."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 16, generator=generator)).square().sum().backward()
    optimizer.step()
    tensors = [
        torch.randn(3, 5, generator=generator),
        torch.randint(0, 9, (7,), generator=generator),
        torch.randn(2, generator=generator).to(torch.bfloat16),
        torch.randn(300_000, generator=generator),
    ]
    arrays = {"weights": np.random.default_rng(seed).normal(size=(4, 6))}

    return Trained(model, optimizer, tensors, arrays)


def addresses(state: Trained) -> list[int]:
    """Return where each tensor and array of a Trained state keeps its bytes."""
    optimizer = [
        value.data_ptr()
        for values in state.optimizer.state.values()
        for value in values.values()
    ]
    model = [value.data_ptr() for value in state.model.state_dict().values()]
    loose = [tensor.data_ptr() for tensor in state.tensors]

    return model + optimizer + loose + [state.arrays["weights"].ctypes.data]


def save(url: str, state: Any, step: int = 1) -> tuple[Archive, Manifest]:
    """Write and commit a snapshot of ``state`` at ``url``."""
    archive = Archive(Storage.open(url), "restore-tests")
    lineage = ("restore-tests", step, 1)
    content = encode_snapshot(state, [])

    return archive, archive.write(step, lineage, schema(state), content)


def restore(archive: Archive, manifest: Manifest, state: Any) -> Loaded:
    """Read a snapshot into ``state``'s own memory where it can, and decode it."""
    loaded = archive.read(manifest, functools.partial(place_snapshot, state))
    decode_snapshot(state, loaded.tree, loaded.buffers)
    return loaded


def where(buffers: list[memoryview]) -> set[int]:
    """Return the address of each non-empty buffer."""
    return {np.frombuffer(view, np.uint8).ctypes.data for view in buffers if view}


def test_restore_reads_into_the_same_tensors(storage_url: str) -> None:
    """Restore reads the exact bytes into the very tensors and arrays init() built."""
    saved, live = trained(1), trained(2)
    archive, manifest = save(storage_url, saved)
    before = addresses(live)

    loaded = restore(archive, manifest, live)

    expected = (before, set(before), [])
    assert expected == (
        addresses(live),
        set(before) & where(loaded.buffers),
        diff_states(saved, live),
    )


def test_unplaced_restore_copies_to_the_same_values(tmp_path: Any) -> None:
    """Without places, a read gets memory of its own and decoding copies from it."""
    saved, live = trained(1), trained(2)
    archive, manifest = save(f"file://{tmp_path}", saved)
    before = addresses(live)

    loaded = archive.read(manifest)
    decode_snapshot(live, loaded.tree, loaded.buffers)

    # The optimizer takes the copies as its new state; the rest is copied into.
    expected = (before[:6] + before[-5:], set(), [])
    assert expected == (
        addresses(live)[:6] + addresses(live)[-5:],
        set(before) & where(loaded.buffers),
        diff_states(saved, live),
    )


@attrs.define
class Loose:
    """Tensors and an array, to be rebuilt with other shapes, dtypes and layouts."""

    dtype: torch.Tensor
    shape: torch.Tensor
    strided: torch.Tensor
    tied: torch.Tensor
    also_tied: torch.Tensor
    plain: torch.Tensor
    array: np.ndarray


def loose(shift: float, *, changed: bool) -> Loose:
    """Build the state; ``changed`` rebuilds it as a later version of the code would."""
    values = torch.arange(12, dtype=torch.float32) + shift
    tied = values[:6].clone()
    array = np.arange(6.0) + shift
    if not changed:
        return Loose(
            values[:4].clone(), values[:6].clone(), values.reshape(3, 4).clone(),
            tied, tied, values[6:].clone(), array,
        )  # fmt: skip
    return Loose(
        values[:4].double(), values[:6].reshape(2, 3).clone(),
        values.reshape(4, 3).clone().t(), tied, tied, values[6:].clone(),
        array.astype(np.float32),
    )  # fmt: skip


def test_changed_tensors_take_the_copying_path() -> None:
    """Changed dtypes and shapes get the snapshot's tensor; strided and tied copy."""
    saved, live = loose(100.0, changed=False), loose(0.0, changed=True)
    archive, manifest = save("memory://restore-tests/changed", saved)
    kept = (live.strided, live.tied, live.plain)

    loaded = restore(archive, manifest, live)

    read_into = where(loaded.buffers) & {
        tensor.data_ptr() for tensor in (live.strided, live.tied, live.plain)
    }
    expected = ([], (True, True, True, True), {live.plain.data_ptr()})
    assert expected == (
        diff_states(saved, live),
        (
            live.strided is kept[0],
            live.tied is kept[1],
            live.also_tied is kept[1],
            live.plain is kept[2],
        ),
        read_into,
    )


@pytest.mark.gpu
def test_cuda_tensors_are_restored_through_host_memory() -> None:
    """CUDA tensors are not read into; decoding copies into the same CUDA tensors."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    url = "memory://restore-tests/cuda"
    saved = loose(100.0, changed=False)
    live = loose(0.0, changed=False)
    live.plain = live.plain.cuda()
    archive, manifest = save(url, saved)
    before = live.plain.data_ptr()

    restore(archive, manifest, live)

    expected = (before, saved.plain.tolist())
    assert expected == (live.plain.data_ptr(), live.plain.cpu().tolist())


def test_snapshot_inside_a_step_keeps_its_bytes_apart() -> None:
    """A snapshot with a resume point is decoded twice, so nothing is placed."""
    live = trained(2)
    tree, buffers = encode_snapshot(live, [], resume={"loop": 0, "item": 1})
    table = [[0, memoryview(buffer).nbytes] for buffer in buffers]

    places = place_snapshot(live, json.loads(json.dumps(tree)), table)

    expected = [None] * len(buffers)
    assert expected == places


def test_tree_that_does_not_fit_is_left_to_the_decoder() -> None:
    """A tree the placement cannot follow places nothing, and raises nothing."""
    live = trained(2)
    tree = {"state": {"model": {"k": "module", "state": {"k": "dict"}}}}

    places = place_snapshot(live, tree, [[0, 4]])

    assert [None] == places


@attrs.define
class Moving:
    """Weights moved by a momentum each step, all allocated by init()."""

    weights: torch.Tensor
    momentum: torch.Tensor
    seen: list[int] = attrs.Factory(list)


def moving_init() -> Moving:
    generator = torch.Generator().manual_seed(0)
    return Moving(torch.randn(50_000, generator=generator), torch.zeros(50_000))


@resumable.step(init=moving_init, steps=5, every=1, keep=10)
def moving_train(state: Moving, step: int) -> None:
    state.momentum.mul_(0.9).add_(torch.randn(50_000))
    state.weights.add_(state.momentum, alpha=0.1)
    state.seen.append(step)


def flip_inside(storage: Storage, name: str, field: str) -> None:
    """Flip one byte in the middle of a state field's bytes in data.bin."""
    index = json.loads(storage.read(name, INDEX_OBJECT))
    offset, size = index["buffers"][index["tree"]["state"][field]["b"]]
    data = bytearray(storage.read(name, DATA_OBJECT))
    data[offset + size // 2] ^= 0x40
    storage.fs.pipe_file(storage.path(name, DATA_OBJECT), bytes(data))


def test_damaged_snapshot_falls_back_and_the_run_ends_exact(
    storage_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A data.bin damaged inside a live tensor is skipped; the run still ends exact."""
    expected = resumable.testing.run_steps(moving_train)
    resumable.testing.run_steps(moving_train, 3, storage=storage_url)
    storage = Storage.open(storage_url)
    newest = max(storage.committed())
    flip_inside(storage, newest, "weights")

    with caplog.at_level(logging.WARNING):
        actual = resumable.run(moving_train, storage=storage_url)

    skipped = [r.getMessage() for r in caplog.records if newest in r.getMessage()]
    assert [] == diff_states(expected.state, actual.state)
    assert [2, 3, 4] == actual.state.seen[2:]
    assert 1 == len(skipped)
    assert "damaged bytes" in skipped[0]


def test_runtime_resume_reads_into_what_init_built(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume through the runtime places every tensor of the state it restores."""
    resumable.run(moving_train, storage=storage_url, steps=2)
    placed: list[int] = []

    def counting(state: Any, tree: Any, table: Any) -> Any:
        places = place_snapshot(state, tree, table)
        placed.append(sum(place is not None for place in places))
        return places

    monkeypatch.setattr(_resume, "place_snapshot", counting)
    result = resumable.run(moving_train, storage=storage_url, steps=3)

    # The weights and momentum, and the global torch RNG's state is not placed.
    expected = ([2], [0, 1, 2])
    assert expected == (placed, result.state.seen)


def test_old_checksum_verifies_after_a_change(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshots keep the checksum they were written with; both kinds verify."""
    url = f"file://{tmp_path}"
    archive, old = save(url, trained(1), step=1)
    monkeypatch.setattr("resumable._archive.CHECKSUM_ALGORITHM", "xxh3_128")
    _, new = save(url, trained(3), step=2)
    live = trained(2)

    restore(archive, old, live)
    before = diff_states(trained(1), live)
    restore(archive, new, live)

    expected = (("xxh3_64", 16), ("xxh3_128", 32), [], [])
    assert expected == (
        (old.checksum_algorithm, len(old.objects[DATA_OBJECT].checksum)),
        (new.checksum_algorithm, len(new.objects[DATA_OBJECT].checksum)),
        before,
        diff_states(trained(3), live),
    )


def test_new_checksum_still_detects_damage(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot written with another checksum still fails on a flipped byte."""
    monkeypatch.setattr("resumable._archive.CHECKSUM_ALGORITHM", "xxh3_128")
    archive, manifest = save(f"file://{tmp_path}", moving_init())
    flip_inside(archive.storage, manifest.name, "momentum")

    with pytest.raises(SnapshotCorruptError) as caught:
        restore(archive, manifest, moving_init())

    assert "damaged bytes" in str(caught.value)


def throttled(chunks: Any) -> Iterator[memoryview]:
    """Yield the chunks in small slices, as the test scripts' write throttle does."""
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        for start in range(0, view.nbytes, 256 * 1024):
            yield view[start : start + 256 * 1024]


@pytest.mark.parametrize("form", ["views", "contiguous"])
def test_blocking_write_round_trips_through_a_throttled_storage(
    storage_url: str, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """A snapshot written through a wrapping generator reads back exact."""
    write_object = Storage.write_object

    def slow(self: Storage, snapshot: str, name: str, chunks: Any) -> int:
        return write_object(self, snapshot, name, throttled(chunks))

    monkeypatch.setattr(Storage, "write_object", slow)
    saved, live = trained(1), trained(2)
    if form == "contiguous":
        saved.tensors = [torch.randn(2_000_000)]
        live.tensors = [torch.zeros(2_000_000)]
    archive, manifest = save(storage_url, saved)

    restore(archive, manifest, live)

    assert [] == diff_states(saved, live)


@attrs.define
class Frozen:
    """Embeddings mapped read-only from a file, and weights trained on them."""

    embeddings: torch.Tensor
    weights: torch.Tensor


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
@pytest.mark.parametrize("inside", [False, True])
def test_a_tensor_over_read_only_memory_is_refused_clearly(
    tmp_path: Path, inside: bool
) -> None:
    """A resume into a read-only memory map says so: no crash, no storage error."""
    mapped = tmp_path / "embeddings.npy"
    np.save(mapped, np.arange(64, dtype=np.float32))

    def init() -> Frozen:
        array = np.load(mapped, mmap_mode="r")
        return Frozen(torch.from_numpy(array), torch.zeros(8))

    @resumable.step(init=init, steps=3, every=1)
    def train(state: Frozen, step: int) -> None:
        for _ in resumable.iterate(range(2)):
            state.weights += state.embeddings[:8]

    url = str(tmp_path / "store")
    if inside:
        testing.run_preempted(train, 1, 1, storage=url)
    else:
        testing.run_steps(train, 2, storage=url)
    with pytest.raises(StateDefinitionError, match="read-only memory") as caught:
        resumable.run(train, storage=url)

    assert "resumable.transient()" in str(caught.value)
