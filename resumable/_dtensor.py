"""
Sharded tensors: the DTensors of a model sharded by FSDP2 (``fully_shard``).

A rank snapshots the gradients of such a model as its own shards, plain tensors
(a DTensor gradient can be a view into FSDP's reduce-scatter buffer, which
cannot be pickled), and puts them back as DTensors laid out as their parameters.
Parameters and optimizer moments go through their objects' ``state_dict()``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def local_shard(tensor: Any) -> Any:
    """Return this rank's shard of a DTensor, else ``tensor`` itself."""
    # No DTensor exists where its module was never imported: no import here.
    module = sys.modules.get("torch.distributed.tensor")
    if module is not None and isinstance(tensor, module.DTensor):
        return tensor.to_local()
    return tensor


def sharded_like(parameter: Any, shard: torch.Tensor) -> Any:
    """Return a DTensor of ``shard`` laid out as ``parameter`` is (its gradient)."""
    return type(parameter).from_local(
        shard.to(parameter.device),
        parameter.device_mesh,
        parameter.placements,
        run_check=False,
        shape=parameter.shape,
        stride=parameter.stride(),
    )
