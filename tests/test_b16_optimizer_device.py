"""
B16: restored optimizer state lands on the device and dtype of its parameters.

Snapshots record a device type, never an index, and loading puts each tensor where
the live parameters built by init() are. Covered with Adam and with a custom
optimizer that allocates its buffers on the parameters' device in ``__init__``.
The CPU tests run everywhere; the CUDA ones carry the gpu marker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import xxhash
from torch import nn

import resumable
from resumable import testing
from resumable._snapshot import _record_checksum

STEPS = 6
KILL_AFTER = 3
OPTIMIZERS = ("adam", "toy")

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"
)
requires_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)


class ToyMomentum(torch.optim.Optimizer):
    """Momentum SGD whose buffers are made on the parameters' device in __init__."""

    def __init__(self, params: Any, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})
        first = self.param_groups[0]["params"][0]
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["momentum_buffer"] = torch.zeros_like(param)
        # Not per parameter, so Optimizer.load_state_dict does not move it.
        self.updates = torch.zeros((), dtype=first.dtype, device=first.device)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["updates"] = self.updates
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.updates = state_dict.pop("updates")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self.updates += 1
        for group in self.param_groups:
            for param in group["params"]:
                buffer = self.state[param]["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(param.grad)
                param.sub_(buffer * group["lr"] / self.updates.sqrt())


@attrs.define
class State:
    model: nn.Module
    optimizer: torch.optim.Optimizer


def make_step(kind: str, placement: dict[str, Any]) -> resumable.Step[State]:
    """Return a step whose init() puts the model where ``placement`` says then."""

    def init() -> State:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        model = model.to(**placement)
        if kind == "adam":
            return State(model, torch.optim.Adam(model.parameters(), lr=0.02))
        return State(model, ToyMomentum(model.parameters()))

    @resumable.step(init=init, steps=STEPS)
    def train(state: State, step: int) -> dict[str, float]:
        first = next(state.model.parameters())
        inputs = torch.randn(16, 4).to(first.device, first.dtype)
        targets = inputs.sum(dim=1, keepdim=True).sin()
        loss = (state.model(inputs) - targets).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        return {"loss": loss.item()}

    return train


def placements(optimizer: torch.optim.Optimizer) -> dict[str, tuple[str, str]]:
    """Return the device and dtype of every tensor the optimizer holds, by name."""
    found = {}
    for index, param in enumerate(optimizer.param_groups[0]["params"]):
        found[f"param {index}"] = (str(param.device), str(param.dtype))
        for key, value in optimizer.state[param].items():
            if isinstance(value, torch.Tensor):
                found[f"state {index} {key}"] = (str(value.device), str(value.dtype))
    if isinstance(optimizer, ToyMomentum):
        found["updates"] = (str(optimizer.updates.device), "")
    return found


def on_parameters(optimizer: torch.optim.Optimizer) -> dict[str, tuple[str, str]]:
    """Return where ``placements`` must find each tensor: with its parameter."""
    expected = {}
    # Adam keeps its step count a float32 CPU scalar unless capturable or fused.
    on_device = optimizer.defaults.get("capturable") or optimizer.defaults.get("fused")
    for index, param in enumerate(optimizer.param_groups[0]["params"]):
        where = (str(param.device), str(param.dtype))
        expected[f"param {index}"] = where
        for key, value in optimizer.state[param].items():
            if isinstance(value, torch.Tensor):
                step = key == "step" and not on_device
                expected[f"state {index} {key}"] = (
                    ("cpu", "torch.float32") if step else where
                )
    if isinstance(optimizer, ToyMomentum):
        expected["updates"] = (str(optimizer.param_groups[0]["params"][0].device), "")
    return expected


def state_tensors(state: State) -> list[torch.Tensor]:
    """Return every parameter and optimizer state tensor, moved to the CPU."""
    tensors = [p.detach().cpu() for p in state.model.parameters()]
    for param in state.optimizer.param_groups[0]["params"]:
        tensors += [
            value.cpu()
            for _, value in sorted(state.optimizer.state[param].items())
            if isinstance(value, torch.Tensor)
        ]
    return tensors


def check_resume_on_parameter_device(kind: str, device: str) -> None:
    """Snapshot at step 3 on ``device``, restore there, step on, end identical."""
    placement = {"device": device}
    train = make_step(kind, placement)
    storage = testing.memory_storage()
    expected_at_kill = testing.run_steps(train, KILL_AFTER)
    testing.run_killed(train, KILL_AFTER, storage=storage)

    restored = resumable.load(train, storage=storage)

    assert on_parameters(restored.optimizer) == placements(restored.optimizer)
    assert placements(expected_at_kill.state.optimizer) == placements(
        restored.optimizer
    )
    train(restored, KILL_AFTER)
    assert on_parameters(restored.optimizer) == placements(restored.optimizer)
    testing.assert_resumes_identically(train, kill_after=[KILL_AFTER])


def rewrite_devices(storage: Path, device: str) -> int:
    """Make the newest snapshot record ``device`` for model and optimizer tensors."""
    manifest_path = max(storage.glob("*.manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    index_path = storage / manifest["name"] / "index.json"
    index = json.loads(index_path.read_bytes())
    changed = 0

    def visit(node: Any) -> None:
        nonlocal changed
        if isinstance(node, dict):
            if node.get("k") == "tensor":
                node["device"] = device
                changed += 1
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit([index["tree"]["state"]["model"], index["tree"]["state"]["optimizer"]])
    data = json.dumps(index).encode()
    index_path.write_bytes(data)
    manifest["objects"]["index.json"] = {
        "size": len(data),
        "checksum": xxhash.xxh3_64_hexdigest(data),
    }
    manifest["manifest_checksum"] = _record_checksum(manifest)
    manifest_path.write_text(json.dumps(manifest))
    return changed


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_b16_optimizer_state_stays_on_parameter_device_after_resume(kind: str) -> None:
    """After a resume every optimizer tensor sits with its parameter; step 4 works."""
    check_resume_on_parameter_device(kind, "cpu")


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_b16_snapshot_of_other_dtype_loads_onto_live_parameters(kind: str) -> None:
    """A float64 snapshot loads into a float32 model as float32, values cast."""
    placement: dict[str, Any] = {"dtype": torch.float64}
    train = make_step(kind, placement)
    storage = testing.memory_storage()
    saved = testing.run_killed(train, KILL_AFTER, storage=storage).state
    placement["dtype"] = torch.float32

    restored = resumable.load(train, storage=storage)

    assert on_parameters(restored.optimizer) == placements(restored.optimizer)
    assert {torch.float32} == {p.dtype for p in restored.model.parameters()}
    expected = [t.to(torch.float32) for t in state_tensors(saved)]
    actual = state_tensors(restored)
    assert [t.dtype for t in expected] == [t.dtype for t in actual]
    assert [True] * len(expected) == [
        torch.equal(want, got) for want, got in zip(expected, actual, strict=True)
    ]
    train(restored, KILL_AFTER)
    assert on_parameters(restored.optimizer) == placements(restored.optimizer)
    result = testing.run_steps(train, storage=storage)
    assert STEPS == result.step
    assert all(torch.isfinite(p).all() for p in result.state.model.parameters())


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_b16_snapshot_from_gpu_host_resumes_on_cpu_only_host(
    kind: str, tmp_path: Path
) -> None:
    """Tensors recorded on "cuda" load onto CPU parameters and end bit-identical."""
    train = make_step(kind, {"device": "cpu"})
    storage = tmp_path / "snapshots"
    testing.run_killed(train, KILL_AFTER, storage=str(storage))
    assert 0 < rewrite_devices(storage, "cuda")

    restored = resumable.load(train, storage=str(storage))

    assert on_parameters(restored.optimizer) == placements(restored.optimizer)
    assert {"cpu"} == {p.device.type for p in restored.model.parameters()}
    train(restored, KILL_AFTER)
    expected = testing.run_steps(train)
    actual = testing.run_steps(train, storage=str(storage))
    assert [] == testing.diff_states(expected.state, actual.state)
    assert expected.history == actual.history


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_b16_gpu_resume_on_cuda_keeps_state_on_cuda(kind: str) -> None:
    """Trained and resumed on CUDA, optimizer state stays with the parameters."""
    check_resume_on_parameter_device(kind, "cuda")


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize(
    ("saved_on", "loaded_on"),
    [
        ("cpu", "cpu"),
        pytest.param("cuda", "cpu", marks=[pytest.mark.gpu, requires_cuda]),
        pytest.param("cpu", "cuda", marks=[pytest.mark.gpu, requires_cuda]),
        pytest.param("cuda:1", "cuda:0", marks=[pytest.mark.gpu, requires_two_gpus]),
    ],
)
def test_b16_snapshot_loads_where_init_now_puts_the_model(
    kind: str, saved_on: str, loaded_on: str
) -> None:
    """A snapshot taken on one device loads onto the device of the live parameters."""
    placement = {"device": saved_on}
    train = make_step(kind, placement)
    storage = testing.memory_storage()
    saved = testing.run_killed(train, KILL_AFTER, storage=storage).state
    placement["device"] = loaded_on

    restored = resumable.load(train, storage=storage)

    assert on_parameters(restored.optimizer) == placements(restored.optimizer)
    live = torch.empty(0, device=loaded_on).device
    assert {live} == {p.device for p in restored.model.parameters()}
    expected, actual = state_tensors(saved), state_tensors(restored)
    assert [True] * len(expected) == [
        torch.equal(want, got) for want, got in zip(expected, actual, strict=True)
    ]
    train(restored, KILL_AFTER)
    assert on_parameters(restored.optimizer) == placements(restored.optimizer)


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda:0", marks=[pytest.mark.gpu, requires_cuda]),
        pytest.param("cuda:1", marks=[pytest.mark.gpu, requires_two_gpus]),
    ],
)
def test_b16_snapshot_records_device_type_never_index(
    kind: str, device: str, tmp_path: Path
) -> None:
    """Every tensor in a snapshot taken on cuda:N records "cuda", never an index."""
    train = make_step(kind, {"device": device})
    storage = tmp_path / "snapshots"
    testing.run_killed(train, KILL_AFTER, storage=str(storage))
    kind_name = torch.device(device).type

    texts = [path.read_text() for path in storage.glob("*/index.json")]

    assert 0 < len(texts)
    for text in texts:
        assert f'"device": "{kind_name}"' in text
        assert [] == re.findall(r'"device": "[^"]*:', text)
        assert f"{kind_name}:" not in text
