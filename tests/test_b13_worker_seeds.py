"""
B13: DataLoader workers draw the same random numbers after a resume as they would
have without one, never the first incarnation's stream again.

A dataset returns each index with a draw from NumPy, Python ``random`` and torch
inside the worker; num_workers=2, shuffle off, three steps (epochs) of eight
batches of one item. The run is preempted after item 3 of epoch 1 (the case's
point, inside what the workers prefetch) or after item 6 (beyond it, where a skip
that loads nothing would hand the workers other items than before) with
resumable.testing.run_preempted, in process (the workers are real processes), and
resumed. Persistent and per-epoch workers, seeded from the state's generator or
from the global torch generator, are each covered.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import resumable
from resumable import testing

ITEMS = 8
EPOCHS = 3
WORKERS = 2
# Where the run is preempted (step, item): the case's point, inside the batches
# the workers prefetch when the loader starts (2 workers x prefetch_factor 2), and
# a point beyond them.
STOPS = {"case": (1, 3), "beyond-prefetch": (1, 6)}
# How the loader is made: persistent workers, and its generator on the state.
VARIANTS = {
    "per-epoch-state-generator": (False, True),
    "persistent-state-generator": (True, True),
    "persistent-global-generator": (True, False),
}
LOADER: dict[str, bool] = {"persistent": False, "generator": True}


class NoisyData(Dataset[tuple[int, float, float, float]]):
    """Each index with one draw from each random generator of the worker."""

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, index: int) -> tuple[int, float, float, float]:
        return index, np.random.rand(), random.random(), torch.rand(()).item()


@attrs.define
class State:
    generator: torch.Generator
    # [epoch, index, numpy noise, python noise, torch noise] for each item.
    triples: list[list[float]] = attrs.Factory(list)
    loader: DataLoader[Any] = resumable.transient()
    # What this incarnation consumed, never snapshotted.
    consumed: list[list[float]] = resumable.transient(factory=list)


def init() -> State:
    state = State(torch.Generator().manual_seed(13))
    state.loader = DataLoader(
        NoisyData(),
        batch_size=1,
        shuffle=False,
        num_workers=WORKERS,
        persistent_workers=LOADER["persistent"],
        generator=state.generator if LOADER["generator"] else None,
    )
    return state


@resumable.step(init=init, steps=EPOCHS, every=1, keep=2)
def train(state: State, step: int) -> None:
    for index, *noise in resumable.iterate(state.loader):
        entry = [step, int(index), *(float(value) for value in noise)]
        state.triples.append(entry)
        state.consumed.append(entry)


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, State]:
    """The uninterrupted run of each variant, made when first asked for."""
    return {}


@pytest.fixture(
    params=[(variant, stop) for stop in STOPS for variant in VARIANTS],
    ids=lambda param: "-".join(param),
    scope="module",
)
def runs(
    request: pytest.FixtureRequest, uninterrupted: dict[str, State]
) -> dict[str, Any]:
    """A variant's uninterrupted run, then a preempted one and its resume."""
    variant, stop = request.param
    persistent, on_state = VARIANTS[variant]
    LOADER.update(persistent=persistent, generator=on_state)
    if variant not in uninterrupted:
        uninterrupted[variant] = _release(testing.run_steps(train)).state
    storage = testing.memory_storage()
    preempted = _release(testing.run_preempted(train, *STOPS[stop], storage=storage))

    return {
        "stop": STOPS[stop],
        "uninterrupted": uninterrupted[variant],
        "preempted": preempted,
        "resumed": _release(testing.run_steps(train, storage=storage)),
    }


def _release(result: resumable.Result[State]) -> resumable.Result[State]:
    """Drop the loader, so its workers end now, not when the interpreter exits."""
    result.state.loader = None  # type: ignore[assignment]  # done with it
    return result


def _noise(triples: list[list[float]], epoch: int) -> list[float]:
    return [value for entry in triples if entry[0] == epoch for value in entry[2:]]


def test_b13_resumed_run_draws_the_uninterrupted_worker_noise(
    runs: dict[str, Any],
) -> None:
    """Every (epoch, index, noise) of the resumed run equals the uninterrupted one."""
    expected = runs["uninterrupted"].triples
    preempted = runs["preempted"]

    assert (runs["stop"][0], True) == (preempted.step, preempted.preempted)
    assert (EPOCHS, False) == (runs["resumed"].step, runs["resumed"].preempted)
    assert expected == runs["resumed"].state.triples


def test_b13_resumed_incarnation_continues_after_the_stop(
    runs: dict[str, Any],
) -> None:
    """The second incarnation consumes exactly the items after the stop, once."""
    done = runs["stop"][0] * ITEMS + runs["stop"][1]
    expected = runs["uninterrupted"].triples

    assert expected[:done] == runs["preempted"].state.consumed
    assert expected[done:] == runs["resumed"].state.consumed


def test_b13_noise_differs_across_workers_and_epochs(runs: dict[str, Any]) -> None:
    """No worker draw repeats within the run: workers and epochs are seeded apart."""
    triples = runs["resumed"].state.triples
    epochs = [_noise(triples, epoch) for epoch in range(EPOCHS)]
    every = [value for epoch in epochs for value in epoch]

    assert [3 * ITEMS] * EPOCHS == [len(set(epoch)) for epoch in epochs]
    assert len(every) == len(set(every))
