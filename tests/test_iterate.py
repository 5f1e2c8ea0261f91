"""
Tests of ``resumable.iterate`` and the replay of a step that a snapshot
interrupted: plain iteration outside a run, safe points after each item, and
resume from any (step, item) with nothing processed twice, nothing skipped and
the final state bit-identical, for lists, ranges, generators, samplers and
DataLoaders (shuffled, map-style, with workers).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    TensorDataset,
)

import resumable
from resumable._archive import Archive
from resumable._iterate import _IgnoreStopSignals
from resumable._storage import Storage
from resumable.errors import ConfigurationError, IncompatibleSnapshotError
from resumable.testing import (
    assert_resumes_identically,
    memory_storage,
    run_preempted,
    run_steps,
)


@pytest.fixture(autouse=True)
def clean_process(monkeypatch):
    """No RESUMABLE_* variables and no leftovers of other tests' module globals."""
    for name in ("STORAGE", "STEPS", "EVERY", "KEEP", "GRACE", "SIGNALS"):
        monkeypatch.delenv(f"RESUMABLE_{name}", raising=False)
    PROCESSED.clear()
    FIRST_LOOP.clear()
    LOADED.clear()
    SETUP.clear()
    yield
    SETUP.clear()


@pytest.fixture
def log(caplog):
    """Capture the package's log records, however its logger is configured."""
    package = logging.getLogger("resumable")
    level = package.level
    package.addHandler(caplog.handler)
    package.setLevel(logging.DEBUG)
    yield caplog
    package.removeHandler(caplog.handler)
    package.setLevel(level)


# Side effects of step bodies, outside the state: what each run really processed.
PROCESSED: list[tuple[int, Any]] = []
FIRST_LOOP: list[tuple[int, int]] = []
LOADED: list[int] = []
# Per-test choices that module-level steps read.
SETUP: dict[str, Any] = {}


@attrs.define
class Items:
    generator: torch.Generator = attrs.Factory(lambda: torch.Generator().manual_seed(7))
    total: float = 0.0
    log: list[list[Any]] = attrs.Factory(list)


# --- plain iteration and the positions of safe points ----------------------------


@resumable.step(init=Items, steps=3, every=1, keep=10)
def shuffled(state: Items, step: int) -> dict[str, float]:
    """Random numbers before the loop and in it, a running sum and an ordered log."""
    order = torch.randperm(6, generator=state.generator).tolist()
    offset = float(torch.rand(()))
    for item in resumable.iterate(order):
        PROCESSED.append((step, item))
        state.total += item + offset + float(torch.rand(()))
        state.log.append([step, item])

    return {"total": state.total}


def test_outside_a_run_iterate_is_plain_iteration():
    """Called as a plain function, a step iterates every item and snapshots nothing."""
    state = Items()

    shuffled(state, 0)

    assert [0] * 6 == [step for step, _ in state.log]
    assert list(range(6)) == sorted(item for _, item in state.log)


def test_outside_a_run_iterate_yields_a_generators_items():
    """Outside a run, iterate gives exactly the items of any iterable."""

    def numbers() -> Iterator[int]:
        yield from (3, 1, 2)

    assert [3, 1, 2] == list(resumable.iterate(numbers()))


@pytest.mark.parametrize(
    "points",
    [
        [(0, 1)],
        [(1, 3)],
        [(1, 6)],
        [(2, 6)],
        [(2, None)],
        [(0, 6), (1, 1)],
        [(1, 2), (1, 5)],
        [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6)],
        [(0, None), (1, 4), (2, 1)],
    ],
)
def test_resume_from_any_item_is_bit_identical(points):
    """Preempted at any item (first, middle, last) or step end, the run ends equal."""
    assert_resumes_identically(shuffled, preempt_at=points)


def test_kills_and_preemptions_mixed_resume_identically():
    """A kill after a step followed by a preemption inside a step still ends equal."""
    assert_resumes_identically(shuffled, kill_after=[1], preempt_at=[(2, 3)])


def test_each_item_is_processed_once_in_the_uninterrupted_order():
    """Across the preempted run and its resume, items run once each, in order."""
    expected = run_steps(shuffled).state.log
    PROCESSED.clear()
    storage = memory_storage()
    run_preempted(shuffled, 1, 4, storage=storage)

    actual = run_steps(shuffled, storage=storage).state.log

    assert expected == actual
    assert [tuple(entry) for entry in expected] == PROCESSED


def test_snapshot_inside_a_step_records_the_position(log):
    """A stop after item 4 of step 1 commits a snapshot at loop 0, item 4."""
    storage = memory_storage()

    result = run_preempted(shuffled, 1, 4, storage=storage)
    run_steps(shuffled, storage=storage)

    archive = Archive(Storage.open(storage), shuffled.program)
    inside = [entry.manifest.inside_step for entry in archive.listing()]
    assert (True, 1) == (result.preempted, result.step)
    assert [None, None, {"loop": 0, "item": 4}, None] == inside
    assert [[1, item] for _, item in result.state.log[6:]] == result.state.log[6:]
    assert 6 + 4 == len(result.state.log)
    assert any(
        line.startswith("resumed: step=1 (inside: loop=0, item=4)")
        for line in log.messages
    )


# --- two loops in one step ----------------------------------------------------------


@resumable.step(init=Items, steps=2)
def two_loops(state: Items, step: int) -> None:
    """A first loop of two items, then a second of six."""
    for item in resumable.iterate(range(2)):
        FIRST_LOOP.append((step, item))
        state.total += item * 0.5
    for letter in resumable.iterate("abcdef"):
        PROCESSED.append((step, letter))
        state.log.append([step, letter])


def test_interrupted_second_loop_does_not_rerun_the_first():
    """Resumed in the second loop, the step skips its finished first loop."""
    storage = memory_storage()
    run_preempted(two_loops, 1, 4, storage=storage)
    FIRST_LOOP.clear()
    PROCESSED.clear()

    result = run_steps(two_loops, storage=storage)

    assert [] == FIRST_LOOP
    assert [(1, "e"), (1, "f")] == PROCESSED
    assert 2 * 0.5 == result.state.total


@pytest.mark.parametrize("points", [[(1, 1)], [(1, 2)], [(1, 4)], [(0, 6)]])
def test_two_loops_resume_identically(points):
    """Preempted in either loop of a step, the run ends equal to one run."""
    assert_resumes_identically(two_loops, preempt_at=points)


# --- kinds of iterables --------------------------------------------------------------


def numbers(count: int) -> Iterator[int]:
    """A generator function: made again on resume and consumed up to the position."""
    for number in range(count):
        LOADED.append(number)
        yield number


def make_iterable(kind: str) -> Any:
    if kind == "list":
        return [4, 1, 3, 0, 2]
    if kind == "tuple":
        return (4, 1, 3, 0, 2)
    if kind == "range":
        return range(5)
    if kind == "generator":
        return numbers(5)
    if kind == "sampler":
        generator = torch.Generator().manual_seed(3)
        return torch.utils.data.RandomSampler(range(5), generator=generator)
    return torch.arange(5)


@resumable.step(init=Items, steps=2)
def over_kind(state: Items, step: int) -> None:
    for item in resumable.iterate(make_iterable(SETUP["kind"])):
        PROCESSED.append((step, int(item)))
        state.log.append([step, int(item)])
        state.total += float(torch.rand(())) * int(item)


KINDS = ["list", "tuple", "range", "generator", "sampler", "tensor"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("points", [[(0, 1)], [(1, 3)], [(1, 5)]])
def test_every_kind_of_iterable_resumes_identically(kind, points):
    """Lists, tuples, ranges, generators, samplers and tensors all resume equal."""
    SETUP["kind"] = kind

    assert_resumes_identically(over_kind, preempt_at=points)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_iterable_processes_each_item_once(kind):
    """Across a preemption, each item of every kind is processed exactly once."""
    SETUP["kind"] = kind
    expected = [tuple(entry) for entry in run_steps(over_kind).state.log]
    PROCESSED.clear()
    storage = memory_storage()
    run_preempted(over_kind, 0, 2, storage=storage)
    run_steps(over_kind, storage=storage)

    assert expected == PROCESSED


# --- DataLoaders ---------------------------------------------------------------------


@attrs.define
class Loading:
    generator: torch.Generator
    weights: torch.Tensor = attrs.Factory(lambda: torch.zeros(3))
    log: list[list[int]] = attrs.Factory(list)
    loader: Any = resumable.transient()


def make_loading() -> Loading:
    generator = torch.Generator().manual_seed(11)
    data = TensorDataset(torch.arange(20), torch.randn(20, 3, generator=generator))
    loader = DataLoader(data, batch_size=3, shuffle=True, generator=generator)

    return Loading(generator, loader=loader)


@resumable.step(init=make_loading, steps=3)
def shuffled_loader(state: Loading, step: int) -> dict[str, float]:
    for indices, rows in resumable.iterate(state.loader):
        state.log.append(indices.tolist())
        state.weights += rows.sum(dim=0) * torch.rand(3)

    return {"weight": float(state.weights[0])}


@pytest.mark.parametrize(
    "points", [[(0, 1)], [(1, 3)], [(1, 7)], [(2, None)], [(0, 2), (0, 5), (2, 6)]]
)
def test_shuffled_loader_with_its_generator_on_the_state_resumes(points):
    """A DataLoader shuffled by a generator on the state resumes bit-identical."""
    assert_resumes_identically(shuffled_loader, preempt_at=points)


class CountingDataset(Dataset[torch.Tensor]):
    """Twelve items; records each index it loads, in the main process."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        LOADED.append(index)
        return torch.tensor([index])


@resumable.step(init=Items, steps=1)
def counted(state: Items, step: int) -> None:
    loader = DataLoader(
        CountingDataset(), batch_size=2, shuffle=True, generator=state.generator
    )
    for batch in resumable.iterate(loader):
        state.log.append(batch.flatten().tolist())


def test_skipped_batches_are_not_loaded_without_workers():
    """A resumed map-style loader loads only the batches after the position."""
    order = [index for batch in run_steps(counted).state.log for index in batch]
    storage = memory_storage()
    run_preempted(counted, 0, 3, storage=storage)
    LOADED.clear()

    result = run_steps(counted, storage=storage)

    assert order[6:] == LOADED
    assert order == [index for batch in result.state.log for index in batch]


class SharedCounts(Dataset[torch.Tensor]):
    """Counts loads in shared memory, so worker processes' loads are seen."""

    def __init__(self, size: int, noisy: bool = False) -> None:
        self.counts = torch.zeros(size, dtype=torch.int32).share_memory_()
        self.noisy = noisy

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.counts[index] += 1
        value = torch.tensor([float(index)])
        # Random augmentation, drawn from the worker's own generator.
        return value + torch.rand(1) if self.noisy else value


@resumable.step(init=Items, steps=2)
def with_workers(state: Items, step: int) -> None:
    loader = DataLoader(
        SETUP["dataset"],
        batch_size=2,
        shuffle=SETUP.get("shuffle", False),
        generator=state.generator,
        num_workers=2,
    )
    for batch in resumable.iterate(loader):
        state.log.append(batch.flatten().tolist())


def test_workers_make_skipped_batches_again_once():
    """
    With workers, a resume makes each skipped batch once more and drops it.

    Workers' random streams advance with every item they load, and only the main
    process's generators are put back after the skip, so the skipped batches
    are made again for the rest to replay exactly (README, Limitations).
    """
    dataset = SETUP["dataset"] = SharedCounts(24)
    storage = memory_storage()
    run_preempted(with_workers, 0, 8, storage=storage, steps=1)
    dataset.counts.zero_()

    result = run_steps(with_workers, storage=storage, steps=1)

    assert [1] * 24 == dataset.counts.tolist()
    assert [[float(i), float(i + 1)] for i in range(0, 24, 2)] == result.state.log


@pytest.mark.parametrize("points", [[(0, 1)], [(0, 7), (1, 3)], [(1, 10)]])
def test_shuffled_loader_with_workers_resumes_identically(points):
    """Two workers and a shuffle from the state's generator resume bit-identical."""
    SETUP.update(dataset=SharedCounts(20), shuffle=True)

    assert_resumes_identically(with_workers, preempt_at=points)


def test_random_augmentation_in_workers_resumes_identically():
    """Items drawn at random inside workers come out the same after a resume."""
    SETUP.update(dataset=SharedCounts(16, noisy=True))

    assert_resumes_identically(with_workers, preempt_at=[(0, 6)], steps=1)


def test_worker_init_fn_ignores_stop_signals_and_calls_the_users():
    """Workers leave stop signals to the main process and run the user's init."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    called: list[int] = []
    try:
        _IgnoreStopSignals(called.append)(3)
        seen = [signal.getsignal(s) for s in saved]
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)

    assert ([3], [signal.SIG_IGN, signal.SIG_IGN]) == (called, seen)


def test_loader_generator_not_on_the_state_is_warned_about(log):
    """A DataLoader whose generator the state lacks gets a WARNING that says so."""
    SETUP["loader"] = DataLoader(
        range(4), shuffle=True, generator=torch.Generator().manual_seed(0)
    )

    run_steps(stray_loader)

    assert any(
        "loader order not replayable" in record.getMessage()
        for record in log.records
        if record.levelno == logging.WARNING
    )


@resumable.step(init=Items, steps=1)
def stray_loader(state: Items, step: int) -> None:
    for batch in resumable.iterate(SETUP["loader"]):
        state.log.append(batch.tolist())


@resumable.step(init=Items, steps=3)
def distributed(state: Items, step: int) -> None:
    """A DistributedSampler whose order comes from set_epoch(step)."""
    data = TensorDataset(torch.arange(10))
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=5)
    sampler.set_epoch(step)
    for (batch,) in resumable.iterate(DataLoader(data, batch_size=2, sampler=sampler)):
        state.log.append(batch.tolist())
        state.total += float(torch.rand(())) * float(batch.sum())


@pytest.mark.parametrize("points", [[(0, 1)], [(1, 2)], [(1, 5), (2, 3)]])
def test_sampler_with_set_epoch_resumes_identically(points):
    """A DistributedSampler reshuffled by set_epoch resumes bit-identical."""
    assert_resumes_identically(distributed, preempt_at=points)


class Counting(IterableDataset[torch.Tensor]):
    """An iterable-style dataset: no index to skip by."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        for number in range(6):
            yield torch.tensor([number])


@resumable.step(init=Items, steps=2)
def streamed(state: Items, step: int) -> None:
    loader = DataLoader(Counting(), batch_size=None)
    for item in resumable.iterate(loader):
        PROCESSED.append((step, int(item)))
        state.log.append([step, int(item)])


def test_iterable_dataset_loader_skips_the_items_done():
    """A DataLoader over an iterable-style dataset resumes after the items done."""
    storage = memory_storage()
    run_preempted(streamed, 1, 3, storage=storage)
    PROCESSED.clear()

    result = run_steps(streamed, storage=storage)

    assert [(1, 3), (1, 4), (1, 5)] == PROCESSED
    assert [[s, n] for s in range(2) for n in range(6)] == result.state.log


# --- what a replay must and cannot rebuild --------------------------------------------


MODE = {"loop": True}


@resumable.step(init=Items, steps=2)
def changing(state: Items, step: int) -> None:
    if MODE["loop"]:
        for item in resumable.iterate(range(4)):
            state.log.append([step, item])
    state.total += 1


def test_step_that_no_longer_reaches_the_loop_is_incompatible():
    """A resumed step that ends without reaching the interrupted loop is refused."""
    storage = memory_storage()
    run_preempted(changing, 1, 2, storage=storage)
    MODE["loop"] = False
    try:
        with pytest.raises(IncompatibleSnapshotError, match="loop 0 of step 1"):
            run_steps(changing, storage=storage)
    finally:
        MODE["loop"] = True

    archive = Archive(Storage.open(storage), changing.program)
    assert [1, 1] == [entry.step for entry in archive.listing()]


@attrs.define
class Gains:
    total: float = 0.0
    gains: list[float] = attrs.Factory(list)


@attrs.define
class Marked:
    total: float = 0.0
    start: float = 0.0
    gains: list[float] = attrs.Factory(list)


@resumable.step(init=Gains, steps=2)
def measured(state: Gains, step: int) -> None:
    """Code before the loop reads into a local the state that the loop changes."""
    start = state.total
    for item in resumable.iterate([1.0, 2.0, 3.0, 4.0]):
        state.total += item
    state.gains.append(state.total - start)


@resumable.step(init=Marked, steps=2)
def marked(state: Marked, step: int) -> None:
    """Code before the loop keeps what it reads from the state on the state."""
    state.start = state.total
    for item in resumable.iterate([1.0, 2.0, 3.0, 4.0]):
        state.total += item
    state.gains.append(state.total - state.start)


def test_values_kept_on_the_state_before_the_loop_replay_exactly():
    """What code before the loop stores on the state is as it was after a resume."""
    assert_resumes_identically(marked, preempt_at=[(1, 2)])


def test_locals_read_from_the_state_before_the_loop_see_the_snapshot():
    """
    A local read from the state before the loop sees the state at the snapshot.

    This pins the README's limitation: the replayed code runs against the state
    as the snapshot holds it, so the resumed gain of step 1 counts items 3 and 4
    only (7.0), where the uninterrupted run counts all four (10.0).
    """
    storage = memory_storage()
    run_preempted(measured, 1, 2, storage=storage)

    resumed = run_steps(measured, storage=storage)

    assert [10.0, 7.0] == resumed.state.gains


@attrs.define
class Model:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


def make_model() -> Model:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)

    return Model(model, torch.optim.SGD(model.parameters(), lr=0.1))


@resumable.step(init=make_model, steps=2)
def accumulated(state: Model, step: int) -> None:
    """Gradient accumulation: one optimizer step per loop over micro-batches."""
    state.optimizer.zero_grad()
    for item in resumable.iterate(range(4)):
        inputs = torch.full((1, 2), float(item + step))
        state.model(inputs).sum().backward()
    state.optimizer.step()


def test_gradients_accumulated_over_items_survive_a_resume():
    """Gradients summed over the items before the snapshot still count after it."""
    assert_resumes_identically(accumulated, preempt_at=[(1, 2)])


@resumable.step(init=Items, steps=1)
def nested(state: Items, step: int) -> None:
    for outer in resumable.iterate(range(3)):
        for inner in resumable.iterate(range(3)):
            state.log.append([outer, inner])


def test_nested_loops_are_refused_with_a_clear_error():
    """Nesting resumable.iterate loops fails at once, saying to use one loop."""
    with pytest.raises(ConfigurationError, match="cannot be nested"):
        run_steps(nested)
