"""
B17: models wrapped by torch.compile or DDP resume across any change of wrapping.

Wrappers rename parameters (``_orig_mod.``, ``module.``). Snapshots hold canonical
names, so a run may be snapshotted wrapped and resumed unwrapped, or the reverse, and
still end bit-identical to an uninterrupted run; a real mismatch fails loudly, naming
the keys, before any step runs. DDP runs with world size 1 on gloo.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import torch.distributed as dist
from torch import nn

import resumable
from resumable import testing

STEPS = 6
KILL_AFTER = 3
WRAPPINGS = ("plain", "compiled", "ddp", "ddp_compiled", "compiled_ddp")


@attrs.define
class State:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


def build_mlp(setup: dict[str, Any]) -> nn.Module:
    """Return the model that ``setup`` describes, inside its wrappers."""
    width = setup.get("width", 8)
    layers: list[nn.Module] = [nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1)]
    if setup.get("extra_layer"):
        layers += [nn.Tanh(), nn.Linear(1, 1)]
    model: nn.Module = nn.Sequential(*layers)
    wrapping = setup["wrapping"]
    if wrapping in ("compiled", "ddp_compiled"):
        model = torch.compile(model, backend="eager")
    if wrapping in ("ddp", "ddp_compiled", "compiled_ddp"):
        model = nn.parallel.DistributedDataParallel(model)
    if wrapping == "compiled_ddp":
        model = torch.compile(model, backend="eager")
    return model


def make_step(setup: dict[str, Any]) -> resumable.Step[State]:
    """Return a step whose init() builds the model as ``setup`` says at that moment."""

    def init() -> State:
        torch.manual_seed(0)
        model = build_mlp(setup)
        if setup.get("named"):
            optimizer = torch.optim.Adam(model.named_parameters(), lr=0.02)
        else:
            # Two groups with their own rates: any mix-up of parameters shows.
            named = list(model.named_parameters())
            weights = [p for name, p in named if name.endswith("weight")]
            biases = [p for name, p in named if name.endswith("bias")]
            optimizer = torch.optim.Adam(
                [{"params": weights, "lr": 0.02}, {"params": biases, "lr": 0.005}]
            )
        return State(model, optimizer, torch.Generator().manual_seed(1))

    @resumable.step(init=init, steps=STEPS)
    def train(state: State, step: int) -> dict[str, float]:
        setup["calls"] = setup.get("calls", 0) + 1
        inputs = torch.randn(16, 4, generator=state.generator)
        targets = inputs.sum(dim=1, keepdim=True).sin()
        loss = (state.model(inputs) - targets).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        return {"loss": loss.item()}

    return train


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A gloo process group of world size 1, rendezvous through a local file."""
    rendezvous = tmp_path_factory.mktemp("b17-process-group") / "rendezvous"
    dist.init_process_group(
        "gloo", init_method=rendezvous.as_uri(), rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def uninterrupted(process_group: Any) -> dict[str, resumable.Result[State]]:
    """The result of an uninterrupted run for each wrapping."""
    results = {}
    for wrapping in WRAPPINGS:
        results[wrapping] = testing.run_steps(make_step({"wrapping": wrapping}))
    return results


def resume_across(
    saved: dict[str, Any], resumed: dict[str, Any]
) -> tuple[resumable.Result[State], dict[str, Any]]:
    """Run to KILL_AFTER with one setup, then resume to the end with the other."""
    setup = dict(saved)
    train = make_step(setup)
    storage = testing.memory_storage()
    testing.run_killed(train, KILL_AFTER, storage=storage)
    setup.clear()
    setup.update(resumed)
    result = testing.run_steps(train, storage=storage)

    return result, setup


def test_b17_uninterrupted_runs_agree_across_wrappings(
    uninterrupted: dict[str, resumable.Result[State]],
) -> None:
    """Wrapping does not change the numbers here, so any wrapping is a reference."""
    for wrapping in WRAPPINGS:
        problems = testing.diff_states(
            uninterrupted["plain"].state, uninterrupted[wrapping].state
        )

        assert [] == problems, wrapping


@pytest.mark.parametrize(
    ("saved", "resumed"), list(itertools.product(WRAPPINGS, WRAPPINGS))
)
def test_b17_every_wrapping_combination_resumes_bit_identically(
    uninterrupted: dict[str, resumable.Result[State]], saved: str, resumed: str
) -> None:
    """A snapshot of any wrapping resumes into any other, bit-identical at the end."""
    result, setup = resume_across({"wrapping": saved}, {"wrapping": resumed})
    reference = uninterrupted[resumed]

    assert STEPS - KILL_AFTER == setup["calls"]
    assert [] == testing.diff_states(reference.state, result.state)
    assert reference.history == result.history
    expected = list(reference.state.model.parameters())
    actual = list(result.state.model.parameters())
    assert [True] * len(expected) == [
        torch.equal(want, got) for want, got in zip(expected, actual, strict=True)
    ]


@pytest.mark.parametrize(
    ("saved", "resumed"),
    [
        ("compiled", "plain"),
        ("plain", "compiled"),
        ("ddp", "plain"),
        ("plain", "ddp_compiled"),
        ("ddp_compiled", "compiled"),
    ],
)
def test_b17_optimizer_parameter_names_follow_the_live_model(
    process_group: Any, saved: str, resumed: str
) -> None:
    """An optimizer built from named_parameters() names the live model's parameters."""
    result, _ = resume_across(
        {"wrapping": saved, "named": True}, {"wrapping": resumed, "named": True}
    )
    reference = testing.run_steps(make_step({"wrapping": resumed, "named": True}))
    live = [name for name, _ in result.state.model.named_parameters()]

    expected = [
        group["param_names"] for group in reference.state.optimizer.param_groups
    ]
    actual = [group["param_names"] for group in result.state.optimizer.param_groups]
    assert [live] == expected
    assert expected == actual


@pytest.mark.parametrize("resumed", ["plain", "compiled", "ddp", "ddp_compiled"])
@pytest.mark.parametrize(
    ("saved_shape", "resumed_shape", "keys"),
    [
        ({}, {"extra_layer": True}, ["Missing key", "4.weight", "4.bias"]),
        ({"extra_layer": True}, {}, ["Unexpected key", "4.weight", "4.bias"]),
        ({}, {"width": 16}, ["size mismatch", "0.weight", "2.weight"]),
    ],
    ids=["layer-added", "layer-removed", "width-changed"],
)
def test_b17_real_mismatch_fails_before_training_naming_the_keys(
    process_group: Any,
    tmp_path: Path,
    resumed: str,
    saved_shape: dict[str, Any],
    resumed_shape: dict[str, Any],
    keys: list[str],
) -> None:
    """A model that does not fit the snapshot fails loudly with the canonical keys."""
    setup = {"wrapping": "compiled", **saved_shape}
    train = make_step(setup)
    storage = str(tmp_path / "snapshots")
    testing.run_killed(train, KILL_AFTER, storage=storage)
    before = sorted(path.name for path in tmp_path.glob("snapshots/*"))
    setup.clear()
    setup.update({"wrapping": resumed, **resumed_shape})

    with pytest.raises(resumable.IncompatibleSnapshotError) as raised:
        testing.run_steps(train, storage=storage)
    message = str(raised.value)
    with pytest.raises(resumable.IncompatibleSnapshotError):
        resumable.load(train, storage=storage)

    assert 0 == setup.get("calls", 0)
    assert [True] * len(keys) == [key in message for key in keys]
    assert [False, False] == [p in message for p in ("_orig_mod", "module.")]
    after = sorted(path.name for path in tmp_path.glob("snapshots/*"))
    assert before == after
