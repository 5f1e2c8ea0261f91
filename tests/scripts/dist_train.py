"""
A data-parallel training run of several processes for the distributed tests:
``python -m resumable dist_train.py`` in each rank (torchrun's variables set).

- ``DIST_STEPS`` / ``DIST_EVERY``: steps in the run and the snapshot cadence.
- ``DIST_STEP_SLEEP``: seconds each batch sleeps, to give a signal room to land.
- ``DIST_PROGRESS``: a folder that gets ``rank-<R>`` with one line per step started.
- ``DIST_DIGEST``: a folder that gets ``rank-<R>.json`` at exit: a sha256 of each
  part of the final state of that rank.
- ``DIST_PER_RANK``: 0 makes every rank's RNGs the same (a replicated state).
- ``DIST_FSDP``: 1 shards the model with FSDP2 (``fully_shard``) instead of DDP.
- ``DIST_HANG``: ``<rank>:<step>`` makes that rank stop itself (SIGSTOP) after
  the first batch of that step, between its collectives and the next safe
  point: a hang at a known place.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import signal
import time

import attrs
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import resumable

torch.set_num_threads(1)

STEPS = int(os.environ.get("DIST_STEPS", "6"))
EVERY = int(os.environ.get("DIST_EVERY", "1"))
STEP_SLEEP = float(os.environ.get("DIST_STEP_SLEEP", "0"))
PROGRESS = os.environ.get("DIST_PROGRESS", "")
DIGEST = os.environ.get("DIST_DIGEST", "")
PER_RANK = os.environ.get("DIST_PER_RANK", "1") == "1"
HANG = os.environ.get("DIST_HANG", "")
FSDP = os.environ.get("DIST_FSDP", "") == "1"
INPUTS, SAMPLES, BATCH = 8, 48, 8


@attrs.define
class State:
    """A DDP model, its optimizer, and this rank's own random streams."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    losses: list[float] = attrs.Factory(list)
    seen: int = 0
    data: tuple[torch.Tensor, torch.Tensor] = resumable.transient()


FINAL: list[State] = []


def init() -> State:
    rank = dist.get_rank() if PER_RANK else 0
    torch.manual_seed(7)
    model = _wrapped(nn.Sequential(nn.Linear(INPUTS, 16), nn.ReLU(), nn.Linear(16, 1)))
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    torch.manual_seed(100 + rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(200 + rank)
    source = torch.Generator().manual_seed(300 + rank)
    data = (
        torch.randn(SAMPLES, INPUTS, generator=source),
        torch.randn(SAMPLES, 1, generator=source),
    )
    state = State(model, optimizer, generator)
    state.data = data
    FINAL[:] = [state]
    return state


def _wrapped(model: nn.Module) -> nn.Module:
    """DDP, or FSDP2 (each layer and the whole sharded) where DIST_FSDP=1."""
    if not FSDP:
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


@resumable.step(init=init, steps=STEPS, every=EVERY)
def train(state: State, step: int) -> dict[str, float]:
    if PROGRESS:
        with open(os.path.join(PROGRESS, f"rank-{dist.get_rank()}"), "a") as file:
            file.write(f"{step}\n")
    inputs, targets = state.data
    order = torch.randperm(SAMPLES, generator=state.generator).tolist()
    batches = [order[start : start + BATCH] for start in range(0, SAMPLES, BATCH)]
    for index in resumable.iterate(batches):
        noise = random.random() * float(np.random.random())
        batch = inputs[index] + noise + 0.01 * torch.randn(len(index), INPUTS)
        loss = nn.functional.mse_loss(state.model(batch), targets[index])
        state.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it bare
        state.optimizer.step()
        state.losses.append(loss.item())
        state.seen += len(index)
        if HANG == f"{dist.get_rank()}:{step}":
            os.kill(os.getpid(), signal.SIGSTOP)
        if STEP_SLEEP:
            time.sleep(STEP_SLEEP)
    return {"loss": state.losses[-1]}


def digest(state: State) -> dict[str, str]:
    """Return a sha256 of each part of this rank's final state and its RNGs."""

    def sha(*parts: object) -> str:
        hashed = hashlib.sha256()
        for part in parts:
            if isinstance(part, torch.Tensor):
                # An FSDP shard: this rank's own piece.
                if hasattr(part, "to_local"):
                    part = part.to_local()
                hashed.update(
                    part.detach()
                    .contiguous()
                    .view(-1)
                    .view(torch.uint8)
                    .numpy()
                    .tobytes()
                )
            else:
                hashed.update(repr(part).encode())
        return hashed.hexdigest()

    optimizer = state.optimizer.state_dict()["state"]
    return {
        "model": sha(*state.model.state_dict().values()),
        "optimizer": sha(*[t for s in optimizer.values() for t in s.values()]),
        "generator": sha(state.generator.get_state()),
        "losses": sha(*[loss.hex() for loss in state.losses]),
        "seen": str(state.seen),
        "python_rng": sha(random.getstate()),
        "numpy_rng": sha(np.random.get_state(legacy=False)),
        "torch_rng": sha(torch.get_rng_state()),
    }


def _write_digest() -> None:
    if not (DIGEST and FINAL):
        return
    path = os.path.join(DIGEST, f"rank-{os.environ.get('RANK', '0')}.json")
    with open(path + ".tmp", "w") as file:
        json.dump(digest(FINAL[0]), file, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


atexit.register(_write_digest)
