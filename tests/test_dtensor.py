"""An FSDP2 model's gradients are taken as shards and put back as DTensors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from resumable._dtensor import local_shard, sharded_like


@pytest.fixture
def sharded(tmp_path: Path) -> Iterator[nn.Module]:
    """A model sharded by FSDP2 on a group of this process alone, after a backward."""
    from torch.distributed.fsdp import fully_shard

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = fully_shard(nn.Linear(4, 2))
        model(torch.ones(3, 4)).sum().backward()  # type: ignore[no-untyped-call]
        yield model
    finally:
        dist.destroy_process_group()


def test_a_plain_tensor_is_its_own_shard() -> None:
    """A tensor that is no DTensor comes back as it is."""
    tensor = torch.ones(3)

    assert tensor is local_shard(tensor)


def test_a_gradient_goes_back_laid_out_as_its_parameter(sharded: nn.Module) -> None:
    """A DTensor gradient's shard, put back, equals the gradient and its layout."""
    weight = sharded.weight
    grad = weight.grad
    assert grad is not None
    shard = local_shard(grad)

    again = sharded_like(weight, shard.clone())

    assert type(grad) is type(again)
    assert (grad.placements, grad.shape) == (again.placements, again.shape)
    assert torch.equal(shard, again.to_local())
