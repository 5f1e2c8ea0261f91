"""
Train the digits CNN of ``digits.py`` data-parallel, resumably, on several processes.

Each process (rank) holds a copy of the model wrapped in DistributedDataParallel;
every batch is split between the ranks, and DDP averages their gradients, so the
copies stay equal. Run it with torchrun, from the repository root::

    torchrun --standalone --nproc-per-node 2 -m resumable examples/digits_ddp.py

The runtime sets up the process group from torchrun's variables (gloo on CPU,
nccl with CUDA) before ``init()``. A SIGTERM or Ctrl-C to any one rank makes every
rank snapshot at the same batch and exit with code 1; running the same command
again resumes every rank where it stopped. Snapshots go to
``examples/.resumable/digits_ddp.train/`` unless ``--storage`` says otherwise:
every rank must see the same storage (one machine here; a shared file system or
s3:// across machines). The model, data and augmentation are those of
``digits.py``, imported from it.
"""

from __future__ import annotations

import random

import attrs
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from digits import Split, build_model, evaluate, load_split, random_shift
from torch import nn

import resumable

SEED = 0
EPOCHS = 15
# Images per batch over all ranks together; each rank trains on its share.
BATCH_SIZE = 64
LEARNING_RATE = 3e-3


@attrs.define
class State:
    """What one epoch reads or changes, on each rank; the runtime snapshots it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # Seeded alike on every rank and drawn alike: every rank shuffles and shifts
    # the same images, then keeps its own share of each batch. Saved with the
    # state, so a resumed epoch replays the same order.
    generator: torch.Generator
    held_out_accuracy: list[float] = attrs.Factory(list)
    epoch_loss_sum: float = 0.0
    data: Split = resumable.transient()


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of ranks (0 and 1 without torchrun)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init() -> State:
    """Build a fresh state, alike on every rank; a resume loads the snapshot into it."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    model = build_model()
    if dist.is_initialized():
        # DDP also makes sure every rank starts from rank 0's weights.
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    return State(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=torch.Generator().manual_seed(SEED),
        data=load_split(),
    )


@resumable.step(init=init, steps=EPOCHS)
def train(state: State, step: int) -> dict[str, float]:
    """Train one epoch on this rank's shares, then report loss and accuracy."""
    data = state.data
    rank, size = rank_and_size()
    state.model.train()
    n = len(data.train_x)
    order = torch.randperm(n, generator=state.generator)
    state.epoch_loss_sum = 0.0
    # Every rank runs the same batches (the same number of safe points), so a
    # stop asked on one rank is taken by all at the same batch.
    for start in resumable.iterate(range(0, n, BATCH_SIZE)):
        batch = order[start : start + BATCH_SIZE]
        images = random_shift(data.train_x[batch], state.generator)
        mine = slice(rank, None, size)
        loss = F.cross_entropy(state.model(images[mine]), data.train_y[batch][mine])
        state.optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients of all ranks here.
        state.optimizer.step()
        state.epoch_loss_sum += loss.item() * len(images[mine])
    state.scheduler.step()
    # Through the DDP wrapper, the forward first copies rank 0's BatchNorm
    # statistics to every rank, so every rank measures the same model.
    accuracy = evaluate(state.model, data.test_x, data.test_y)
    state.held_out_accuracy.append(accuracy)
    loss_sum = torch.tensor([state.epoch_loss_sum])
    if size > 1:
        dist.all_reduce(loss_sum)
    return {"loss": float(loss_sum) / n, "accuracy": accuracy}


if __name__ == "__main__":
    result = train.run()
    accuracy = result.state.held_out_accuracy[-1]
    print(f"{result.step} epochs done, held-out accuracy {accuracy:.4f}")
