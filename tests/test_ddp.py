"""DDP's gradient buckets are laid out once, in parameter order, before step one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import torch
import torch.distributed as dist
from torch import nn

from resumable._ddp import find_ddp, pin_buckets


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """A process group of this process alone, over a file store (no network)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@attrs.define
class Held:
    """A state that holds DDP modules in several places."""

    model: nn.Module
    others: dict[str, list[nn.Module]]


def _ddp() -> nn.parallel.DistributedDataParallel:
    return nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    )


def _layout(module: nn.parallel.DistributedDataParallel) -> str:
    data = module._get_ddp_logging_data()
    return str(data.get("rebuilt_per_bucket_param_indices", ""))


def _train(model: nn.Module) -> None:
    for _ in range(2):
        model(torch.ones(2, 4)).sum().backward()  # type: ignore[no-untyped-call]


def test_buckets_stay_in_parameter_order_once_pinned(one_rank: None) -> None:
    """A pinned DDP module keeps its parameters' order in its buckets."""
    model = _ddp()

    pinned = pin_buckets(Held(model, {}))
    _train(model)

    assert 1 == pinned
    assert "0 1 2 3" == _layout(model)
    assert 0 == pin_buckets(model)


def test_the_knob_keeps_ddps_own_layout(
    one_rank: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RESUMABLE_DIST_PIN_BUCKETS=0 leaves DDP's buckets for DDP to lay out."""
    monkeypatch.setenv("RESUMABLE_DIST_PIN_BUCKETS", "0")
    model = _ddp()

    pinned = pin_buckets(model)

    assert 0 == pinned
    assert (False, "") == (model._has_rebuilt_buckets, _layout(model))


def test_ddp_modules_are_found_wherever_the_state_holds_them(one_rank: None) -> None:
    """DDP modules in fields, dicts, lists and compiled modules are all found."""
    plain, listed, inner = _ddp(), _ddp(), _ddp()
    compiled = torch.compile(inner, backend="eager")
    state = Held(plain, {"more": [listed, compiled, plain]})  # type: ignore[list-item]

    found = find_ddp(state)

    assert [plain, listed, inner] == found
