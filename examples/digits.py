"""
Train a small CNN on scikit-learn's handwritten digits, resumably.

The data (1797 8x8 grey images of the digits 0-9) ships inside scikit-learn, so
nothing is downloaded. One step is one epoch over a fixed training split; each
step reports the training loss and the accuracy on a held-out split.

Run it with the resumable runner (the main way)::

    python -m resumable examples/digits.py

or as a plain script::

    python examples/digits.py

Either way, stopping the run and running the same command again resumes instead
of starting over: Ctrl-C or SIGTERM snapshots at the next batch and exits with
code 1; ``kill -9`` loses the work since the newest snapshot (one per epoch).
Snapshots go to ``examples/.resumable/digits.train/`` unless ``--storage`` (or
``RESUMABLE_STORAGE``) says otherwise. ``--fresh`` starts over.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import resumable

SEED = 0
EPOCHS = 40
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
HELD_OUT_FRACTION = 0.2


class Split(NamedTuple):
    """The fixed train / held-out split: images (N, 1, 8, 8) and labels (N,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@attrs.define
class State:
    """Everything one epoch reads or changes; the runtime snapshots it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # Shuffling and augmentation draw only from this generator, so saving its
    # state makes a resumed epoch order identical to the uninterrupted one.
    generator: torch.Generator
    held_out_accuracy: list[float] = attrs.Factory(list)
    # The epoch's running loss lives on the state, not in a local variable, so
    # that a snapshot taken between two batches keeps it.
    epoch_loss_sum: float = 0.0
    # The data is cheap to rebuild and identical every time (fixed seed), so it
    # is rebuilt by init() rather than written into every snapshot.
    data: Split = resumable.transient()


def build_model() -> nn.Module:
    """Three 3x3 conv blocks and a linear classifier, about 1.5M parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 128, kernel_size=3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.Conv2d(128, 256, kernel_size=3, padding=1),
        nn.BatchNorm2d(256),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(256, 512, kernel_size=3, padding=1),
        nn.BatchNorm2d(512),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4 -> 2x2
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(512 * 2 * 2, 10),
    )


def load_split() -> Split:
    """Load the digits and split them the same way on every run."""
    digits = load_digits()
    # Pixels are 0..16; scale to 0..1 and add the channel axis Conv2d expects.
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    # A fixed random_state gives the same split on every run, including a resumed
    # one, so the held-out digits are never trained on.
    train_x, test_x, train_y, test_y = train_test_split(
        images,
        labels,
        test_size=HELD_OUT_FRACTION,
        random_state=SEED,
        stratify=labels,
    )
    return Split(
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
    )


def init() -> State:
    """Build a fresh state; on resume the runtime then loads the snapshot into it."""
    # Seed every global RNG so a fresh run is reproducible: torch's drives weight
    # init and dropout; Python's and NumPy's are unused here but seeded so added
    # code stays reproducible. On resume the runtime restores all of them.
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    return State(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        data=load_split(),
    )


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """
    Shift each image by up to one pixel in each direction, zero-filling.

    With only ~1400 training images, small translations are cheap augmentation
    that lets more epochs help instead of overfit.
    """
    n, _, height, width = images.shape
    padded = F.pad(images, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None, :, :]


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction of images the model classifies correctly."""
    model.eval()
    with torch.no_grad():
        predictions = model(images).argmax(dim=1)
    return float((predictions == labels).float().mean())


@resumable.step(init=init, steps=EPOCHS)
def train(state: State, step: int) -> dict[str, float]:
    """Train one epoch, then report mean training loss and held-out accuracy."""
    data = state.data
    # evaluate() leaves the model in eval mode (BatchNorm running statistics, no
    # dropout), and a model rebuilt on resume starts in train mode; be explicit.
    state.model.train()
    n = len(data.train_x)
    order = torch.randperm(n, generator=state.generator)
    state.epoch_loss_sum = 0.0
    # resumable.iterate makes each batch boundary a safe point: a SIGTERM
    # snapshots there and a resume continues with the next batch.
    for start in resumable.iterate(range(0, n, BATCH_SIZE)):
        batch = order[start : start + BATCH_SIZE]
        images = random_shift(data.train_x[batch], state.generator)
        loss = F.cross_entropy(state.model(images), data.train_y[batch])
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.epoch_loss_sum += loss.item() * len(batch)
    # One scheduler step per epoch: the cosine schedule spans all EPOCHS steps.
    state.scheduler.step()
    accuracy = evaluate(state.model, data.test_x, data.test_y)
    state.held_out_accuracy.append(accuracy)
    return {"loss": state.epoch_loss_sum / n, "accuracy": accuracy}


if __name__ == "__main__":
    result = train.run()
    accuracy = result.state.held_out_accuracy[-1]
    print(f"{result.step} epochs done, held-out accuracy {accuracy:.4f}")
