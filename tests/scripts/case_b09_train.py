"""
B09: a step that draws its batches from a DataLoader with persistent workers.

Run as ``python -m resumable case_b09_train.py``. Environment variables:

- ``B09_PROGRESS``: a file that gets a line ``<step> <item> <indices>`` after each
  batch is trained on.
- ``B09_ITEM_SLEEP``: seconds each batch sleeps after its work (pacing).
- ``B09_DIGEST``: after the last step, a JSON digest of the state is written there.
- ``B09_MODULE_LOADER``: when set, the module also keeps the DataLoader (as scripts
  with a module-level loader do), so it lives until the interpreter exits.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import attrs
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import resumable

torch.set_num_threads(1)

ITEMS, BATCH, FEATURES, EPOCHS = 24, 2, 4, 3
PROGRESS = os.environ.get("B09_PROGRESS", "")
ITEM_SLEEP = float(os.environ.get("B09_ITEM_SLEEP", "0"))
DIGEST = os.environ.get("B09_DIGEST", "")
MODULE_LOADER = bool(os.environ.get("B09_MODULE_LOADER"))
# The loaders this module keeps alive, with B09_MODULE_LOADER.
LOADERS: list[DataLoader[tuple[int, torch.Tensor]]] = []


class NoisyData(Dataset[tuple[int, torch.Tensor]]):
    """Fixed features plus noise drawn from the worker's NumPy generator."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(9)
        self.features = torch.randn(ITEMS, FEATURES, generator=generator)

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        noise = torch.from_numpy(np.random.standard_normal(FEATURES)).float()
        return index, self.features[index] + 0.1 * noise


@attrs.define
class State:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    order: list[int] = attrs.Factory(list)
    batches: int = 0
    loader: DataLoader[tuple[int, torch.Tensor]] = resumable.transient()


def init() -> State:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 1))
    state = State(
        model,
        torch.optim.Adam(model.parameters(), lr=0.01),
        torch.Generator().manual_seed(90),
    )
    state.loader = DataLoader(
        NoisyData(),
        batch_size=BATCH,
        shuffle=True,
        generator=state.generator,
        num_workers=2,
        persistent_workers=True,
    )
    if MODULE_LOADER:
        LOADERS.append(state.loader)
    return state


@resumable.step(init=init, steps=EPOCHS, every=1, keep=3)
def train(state: State, step: int) -> dict[str, float]:
    total = 0.0
    for indices, inputs in resumable.iterate(state.loader):
        loss = state.model(inputs).square().mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.order.extend(int(index) for index in indices)
        total += loss.item()
        state.batches += 1
        if PROGRESS:
            item = state.batches - step * len(state.loader)
            with open(PROGRESS, "a") as file:
                file.write(f"{step} {item} {' '.join(map(str, indices.tolist()))}\n")
        time.sleep(ITEM_SLEEP)
    if step == EPOCHS - 1:
        _write_digest(state)
    return {"loss": total}


def _write_digest(state: State) -> None:
    if not DIGEST:
        return
    weights = hashlib.sha256()
    for name, tensor in sorted(state.model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    digest = {"model": weights.hexdigest(), "order": state.order}
    with open(DIGEST, "w") as file:
        json.dump(digest, file)
