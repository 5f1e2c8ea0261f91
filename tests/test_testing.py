"""
Tests of ``resumable.testing``: the helpers run steps, simulate a kill, and the
resume assertion passes for a correct step and fails, readably, for a wrong one.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from torch import nn

import resumable
from resumable._archive import Archive
from resumable._storage import Storage
from resumable.testing import (
    assert_resumes_identically,
    assert_states_equal,
    diff_states,
    memory_storage,
    run_killed,
    run_steps,
)


@pytest.fixture(autouse=True)
def no_resumable_variables(monkeypatch):
    """Keep RESUMABLE_* variables of the environment out of these runs."""
    for name in ("STORAGE", "STEPS", "EVERY", "KEEP"):
        monkeypatch.delenv(f"RESUMABLE_{name}", raising=False)


@attrs.define
class ModelState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    noise: list[float] = attrs.Factory(list)


def init_model_state() -> ModelState:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return ModelState(model, optimizer, torch.Generator().manual_seed(1))


CALLS: list[int] = []


@resumable.step(init=init_model_state, steps=6)
def fit(state: ModelState, step: int) -> dict[str, float]:
    """A correct step: all its state, and every generator it reads, is restored."""
    CALLS.append(step)
    x = torch.randn(4, 3, generator=state.generator)
    y = x.sum(dim=1, keepdim=True) + torch.rand(4, 1)
    loss = ((state.model(x) - y) ** 2).mean()
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.noise.append(random.random() + float(np.random.rand()))
    return {"loss": loss.item()}


@attrs.define
class Totals:
    total: int = 0
    weights: torch.Tensor = attrs.Factory(lambda: torch.zeros(3))


# State kept outside the state object: a resumed run starts it over.
HIDDEN = {"calls": 0}


def init_totals() -> Totals:
    HIDDEN["calls"] = 0
    return Totals()


@resumable.step(init=init_totals, steps=6)
def leaky(state: Totals, step: int) -> None:
    """A wrong step: it computes with a module-level counter that is not restored."""
    HIDDEN["calls"] += 1
    state.total += HIDDEN["calls"]


@resumable.step(init=init_totals, steps=6)
def leaky_tensor(state: Totals, step: int) -> None:
    """A wrong step whose hidden counter reaches one element of a tensor."""
    HIDDEN["calls"] += 1
    state.weights[1] += HIDDEN["calls"]


@resumable.step(init=init_totals, steps=6)
def leaky_metrics(state: Totals, step: int) -> dict[str, float]:
    """A wrong step whose hidden counter reaches only the metrics."""
    HIDDEN["calls"] += 1
    return {"calls": HIDDEN["calls"]}


def test_memory_storage_gives_new_in_memory_urls():
    """Each call names a new memory:// storage."""
    first, second = memory_storage(), memory_storage()

    assert first.startswith("memory://")
    assert first != second


def test_run_steps_runs_the_steps_on_memory_storage():
    """run_steps runs N steps and returns their state and history."""
    CALLS.clear()

    result = run_steps(fit, 4)

    assert [0, 1, 2, 3] == CALLS
    assert (4, 4) == (result.step, len(result.history))
    assert result.finished
    assert result.storage.startswith("memory://")


def test_run_steps_seeds_the_global_rngs():
    """Two runs with one seed agree; another seed gives other global randomness."""
    first = run_steps(fit, 3, seed=5)
    second = run_steps(fit, 3, seed=5)
    other = run_steps(fit, 3, seed=6)

    assert [] == diff_states(first.state, second.state)
    assert first.history == second.history
    assert first.state.noise != other.state.noise


def test_run_killed_stops_after_the_step_and_leaves_its_snapshot():
    """A killed run stops after step k; its snapshot is where the next run resumes."""
    storage = memory_storage()
    killed = run_killed(fit, 2, storage=storage)
    CALLS.clear()

    resumed = run_steps(fit, storage=storage)

    assert (2, False) == (killed.step, killed.finished)
    assert [2, 3, 4, 5] == CALLS
    assert (6, 6) == (resumed.step, len(resumed.history))


def test_run_killed_between_snapshots_resumes_from_the_last_one():
    """With every=3, a kill after step 4 loses step 4 and resumes from step 3."""
    storage = memory_storage()
    run_killed(fit, 4, storage=storage, every=3)
    archive = Archive(Storage.open(storage), fit.program)
    committed = [entry.step for entry in archive.listing()]
    CALLS.clear()

    run_steps(fit, storage=storage, every=3)

    assert [3] == committed
    assert [3, 4, 5] == CALLS


def test_assert_resumes_identically_passes_for_a_correct_step():
    """A step whose whole state is on the state object resumes identically."""
    assert_resumes_identically(fit, kill_after=[2, 4], steps=6)
    assert_resumes_identically(fit, kill_after=[3, 4], steps=6, every=2)


def test_assert_resumes_identically_fails_naming_the_differing_field():
    """A step that keeps a counter outside the state fails, naming state.total."""
    with pytest.raises(AssertionError) as caught:
        assert_resumes_identically(leaky, kill_after=[3], steps=6)

    message = str(caught.value)
    assert "Resumed run differs from the uninterrupted one" in message
    assert "state.total: 21 != 12" in message
    assert "state.weights" not in message


def test_assert_resumes_identically_fails_naming_the_differing_tensor():
    """A hidden counter that reaches a tensor is reported with the element count."""
    with pytest.raises(AssertionError, match=r"state\.weights: 1 of \[3\] elements"):
        assert_resumes_identically(leaky_tensor, kill_after=[2], steps=6)


def test_assert_resumes_identically_fails_on_a_differing_history():
    """Metrics that differ after resume are reported even when the state agrees."""
    with pytest.raises(AssertionError, match="history: expected"):
        assert_resumes_identically(leaky_metrics, kill_after=[3], steps=6)


@attrs.define
class Pair:
    first: Any
    second: Any
    scratch: Any = resumable.transient()


def test_diff_states_of_equal_states_is_empty():
    """Equal states, tensors and NaNs included, have no differences."""
    nan = float("nan")

    def make() -> Pair:
        return Pair(
            {"w": torch.tensor([1.0, nan]), 3: [np.arange(2.0)]}, (nan, "a"), object()
        )

    assert [] == diff_states(make(), make())


def test_diff_states_names_each_differing_field():
    """Each difference is a line naming the field's path and what differs."""
    expected = Pair({"w": torch.tensor([1.0, 2.0, 3.0]), "n": 1}, [1, 2])
    actual = Pair({"w": torch.tensor([1.0, 2.5, 3.0]), "n": 1}, [1, 2, 3])

    problems = diff_states(expected, actual)

    assert [
        'state.first["w"]: 1 of [3] elements differ, largest difference 0.5',
        "state.second: [1, 2] != [1, 2, 3]",
    ] == problems


def test_diff_states_reports_only_the_field_that_differs():
    """A field that differs does not make later, equal fields look different."""
    expected = Pair([torch.ones(1), torch.ones(1)], torch.arange(3.0))
    actual = Pair([torch.ones(1)], torch.arange(3.0))

    problems = diff_states(expected, actual)

    assert ["state.first: 2 items vs 1"] == problems


def test_diff_states_reports_different_kinds_and_types():
    """A tensor against a list, or states of two classes, are reported as such."""
    assert ["state.first: tensor vs json"] == diff_states(
        Pair(torch.ones(1), 0), Pair([1.0], 0)
    )
    assert ["state: Pair vs Totals"] == diff_states(Pair(1, 2), Totals())


def test_diff_states_ignores_transient_fields():
    """Transient fields are not compared: snapshots never hold them."""
    assert [] == diff_states(Pair(1, 2, scratch="a"), Pair(1, 2, scratch="b"))


def test_assert_states_equal_passes_or_raises_with_the_diff():
    """assert_states_equal is silent for equal states and lists the differences."""
    assert_states_equal(Pair(1, [2]), Pair(1, [2]))

    with pytest.raises(AssertionError) as caught:
        assert_states_equal(Pair(1, [2]), Pair(1, [3]))

    assert "States differ:\n  state.second: [2] != [3]" == str(caught.value)
