"""
B14: a resume inside an epoch skips the items done in that epoch's own order, once.

Ten items, batch size 1, shuffled by a torch.Generator on the state; each step is one
epoch of ten items, three steps in all (the case's 30 batch steps). The case's kill
points are a stop after item 4 of epoch 1, a second stop after item 7 of the same
epoch, and a stop at the epoch boundary after the second epoch (the end of step 1,
"after step 20" in the case's count), with a resume after each. Edge points (the
first and the last item of an epoch, then a whole epoch after a mid-epoch resume)
cover the rest of the class. Stops are simulated in process with
resumable.testing.run_preempted; num_workers=0, so the dataset counts its loads.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import resumable
from resumable import testing

ITEMS = 10
EPOCHS = 3
SEED = 14
# Preemption points (step, item; None: the end of the step), in order.
CASE = [(1, 4), (1, 7), (1, None)]
EDGES = [(0, 1), (0, 10), (1, 9)]


class CountingData(Dataset[int]):
    """Ten items that remember each index loaded, in order."""

    def __init__(self) -> None:
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, index: int) -> int:
        self.loaded.append(index)
        return index


@attrs.define
class State:
    generator: torch.Generator
    # [epoch counter, global item counter, index] for each item consumed.
    record: list[list[int]] = attrs.Factory(list)
    epoch: int = 0
    items: int = 0
    data: CountingData = resumable.transient()
    loader: DataLoader[int] = resumable.transient()
    # What this incarnation consumed, never snapshotted.
    consumed: list[int] = resumable.transient(factory=list)


def init() -> State:
    state = State(torch.Generator().manual_seed(SEED))
    state.data = CountingData()
    state.loader = DataLoader(
        state.data, batch_size=1, shuffle=True, generator=state.generator
    )
    return state


@resumable.step(init=init, steps=EPOCHS, every=1, keep=2)
def train(state: State, step: int) -> None:
    for batch in resumable.iterate(state.loader):
        index = int(batch[0])
        state.items += 1
        state.record.append([state.epoch, state.items, index])
        state.consumed.append(index)
    state.epoch += 1


def _incarnations(
    points: list[tuple[int, int | None]], every: int
) -> tuple[list[resumable.Result[State]], list[tuple[int, bool]]]:
    """Run preempted at each point in turn, then to the end, on one storage."""
    storage = testing.memory_storage()
    results = [
        testing.run_preempted(train, at_step, at_item, storage=storage, every=every)
        for at_step, at_item in points
    ]
    results.append(testing.run_steps(train, storage=storage, every=every))
    ends = [(result.step, result.preempted) for result in results]

    return results, ends


def _expected_ends(points: list[tuple[int, int | None]]) -> list[tuple[int, bool]]:
    """Steps done and whether preempted, for each incarnation."""
    ends = [(at_step + (at_item is None), True) for at_step, at_item in points]
    return [*ends, (EPOCHS, False)]


@pytest.fixture(scope="module")
def uninterrupted() -> State:
    return testing.run_steps(train).state


def test_b14_reference_run_shuffles_each_epoch_differently(
    uninterrupted: State,
) -> None:
    """The uninterrupted run consumes three different permutations of ten items."""
    epochs = [
        [index for epoch, _, index in uninterrupted.record if epoch == number]
        for number in range(EPOCHS)
    ]

    assert [sorted(range(ITEMS))] * EPOCHS == [sorted(order) for order in epochs]
    assert EPOCHS == len({tuple(order) for order in epochs})


@pytest.mark.parametrize(
    ("points", "every"),
    [(CASE, 1), (CASE, 5), (EDGES, 1)],
    ids=["case-every-1", "case-every-5", "edges"],
)
def test_b14_incarnations_together_consume_the_uninterrupted_order(
    uninterrupted: State, points: list[tuple[int, int | None]], every: int
) -> None:
    """Indices consumed by all incarnations, joined, are the uninterrupted 30."""
    results, ends = _incarnations(points, every)
    joined = [index for result in results for index in result.state.consumed]

    assert _expected_ends(points) == ends
    assert [index for _, _, index in uninterrupted.record] == joined


@pytest.mark.parametrize(
    ("points", "every"),
    [(CASE, 1), (CASE, 5), (EDGES, 1)],
    ids=["case-every-1", "case-every-5", "edges"],
)
def test_b14_counters_and_record_match_the_uninterrupted_run(
    uninterrupted: State, points: list[tuple[int, int | None]], every: int
) -> None:
    """The epoch and item counters beside each index match an uninterrupted run."""
    results, _ = _incarnations(points, every)
    final = results[-1].state

    assert uninterrupted.record == final.record
    assert (EPOCHS, EPOCHS * ITEMS) == (final.epoch, final.items)
    testing.assert_states_equal(uninterrupted, final)


@pytest.mark.parametrize("points", [CASE, EDGES], ids=["case", "edges"])
def test_b14_fast_forward_loads_no_skipped_sample(
    points: list[tuple[int, int | None]],
) -> None:
    """Each incarnation calls __getitem__ only for the items it consumes."""
    results, _ = _incarnations(points, 1)
    loaded: list[Any] = [result.state.data.loaded for result in results]

    assert [result.state.consumed for result in results] == loaded
