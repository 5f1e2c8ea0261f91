"""
DDP's gradient buckets, laid out once for the whole run, so that a resumed run
reduces its gradients exactly as an uninterrupted one.

DDP reduces the first iteration of each process with buckets in parameter order,
then lays them out once more in the order the gradients became ready. A process
that resumes starts a fresh DDP, so its first step after the resume reduces with
the other layout. With 3 ranks or more that changes the bits: the ring all-reduce
splits each flat bucket into segments by offset, and a gradient element's sum of
3 values is taken in another order where it moved to another segment (with 2
ranks a sum of 2 is the same either way). Laying the buckets out in parameter
order before the first step of every run, resumed or not, gives every run of the
job one layout. RESUMABLE_DIST_PIN_BUCKETS=0 keeps DDP's own.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from resumable._knobs import DIST_PIN_BUCKETS, env_int
from resumable._rng import reachable

logger = logging.getLogger(__name__)


def pin_buckets(state: Any) -> int:
    """
    Lay out the buckets of every DDP module in ``state`` in parameter order,
    where DDP has not laid them out a second time yet; return how many were.

    Every rank calls it at the same point: DDP agrees on the layout with one
    broadcast on the module's own process group.
    """
    if env_int(DIST_PIN_BUCKETS, 0, maximum=1) == 0:
        return 0
    pinned = 0
    for module in find_ddp(state):
        reducer = module.reducer
        # Both do nothing where DDP never lays buckets out again
        # (find_unused_parameters without static_graph) or already did.
        reducer._push_all_rebuilt_params()
        if reducer._rebuild_buckets():
            module._has_rebuilt_buckets = True
            pinned += 1
    if pinned:
        logger.debug("gradient buckets laid out in parameter order: modules=%d", pinned)

    return pinned


def find_ddp(value: Any) -> list[Any]:
    """
    Return the DDP modules reachable from a state through attrs fields, dicts,
    lists, tuples and modules (a compiled module's inner one included).
    """
    return reachable(value, _ddp_modules)


def _ddp_modules(value: Any) -> list[Any] | None:
    """The DDP modules in a module, or None to look inside other values."""
    if not isinstance(value, torch.nn.Module):
        return None
    return [
        module
        for module in value.modules()
        if isinstance(module, torch.nn.parallel.DistributedDataParallel)
    ]
