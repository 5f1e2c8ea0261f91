"""Fixtures shared by the test files: a storage URL on each backend and a tiny step."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import fsspec
import pytest
import torch

import resumable


@attrs.define
class TinyState:
    """A model, its optimizer and the steps seen: the smallest realistic state."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    seen: list[int] = attrs.Factory(list)


def tiny_init() -> TinyState:
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))

    return TinyState(model, torch.optim.Adam(model.parameters(), lr=0.01))


@resumable.step(init=tiny_init, steps=4, every=1, keep=3)
def tiny_train(state: TinyState, step: int) -> dict[str, float]:
    inputs = torch.full((4, 3), float(step)) + torch.rand(4, 3)
    loss = state.model(inputs).square().mean()
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.seen.append(step)

    return {"loss": loss.item()}


@pytest.fixture(params=["file", "memory"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty storage URL on the local file system or in memory."""
    if request.param == "file":
        yield f"file://{tmp_path}/store"
        return
    url = f"memory://resumable-tests/{uuid.uuid4().hex}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def tiny_step() -> resumable.Step[TinyState]:
    """A Linear model + Adam + a list; program ``conftest.py:tiny_train``, 4 steps."""
    return tiny_train
