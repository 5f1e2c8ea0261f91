"""
A real training run for the crash tests: ``python -m resumable crash_train.py``.

Everything that may vary between incarnations comes from environment variables, so
that every incarnation runs the same command:

- ``CRASH_STEPS``: steps in the run (decorator default; ``--steps`` overrides).
- ``CRASH_EVERY`` / ``CRASH_KEEP``: snapshot cadence and retention (decorator).
- ``CRASH_HIDDEN``: width of the MLP's hidden layer (the snapshot's size).
- ``CRASH_BALLAST_MB`` / ``CRASH_BALLAST_PARTS``: extra state, that many MiB in that
  many tensors, to make ``data.bin`` large.
- ``CRASH_STEP_SLEEP``: seconds each step sleeps after its work.
- ``CRASH_CHUNK_BYTES`` / ``CRASH_CHUNK_SLEEP``: the write throttle; every payload
  object is written in chunks of at most that many bytes, sleeping between them.
- ``CRASH_THROTTLE_STEPS``: comma-separated snapshot steps that are throttled
  (all when unset).
- ``CRASH_PROGRESS``: a file that gets one line ``<step>`` as each step starts.
- ``CRASH_EXIT_BEFORE_COMMIT``: comma-separated snapshot steps whose commit is
  replaced by ``os._exit(137)``, once each: ``CRASH_MARKERS`` (a folder) records which
  crashes happened, so that the next incarnation commits that step normally.
- ``CRASH_EXIT_AFTER_COMMIT``: the same, but ``os._exit(137)`` comes right after the
  commit, before the runtime cleans up.
- ``CRASH_HOLD_STEPS`` / ``CRASH_HOLD_UNTIL``: comma-separated snapshot steps whose
  last object (``index.json``) waits, before it is written, until the file
  ``CRASH_HOLD_UNTIL`` exists; ``<CRASH_HOLD_UNTIL>.held`` is created as the wait
  begins. Holds a snapshot between its data and its commit for as long as a test
  needs.
- ``CRASH_DIGEST``: at exit, write there a JSON digest of the final state (sha256 of
  each part), for comparison with another run.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

import resumable
from resumable._snapshot import INDEX_OBJECT, parse_snapshot_name
from resumable._storage import Storage

torch.set_num_threads(1)

STEPS = int(os.environ.get("CRASH_STEPS", "8"))
EVERY = int(os.environ.get("CRASH_EVERY", "1"))
KEEP = int(os.environ.get("CRASH_KEEP", "3"))
HIDDEN = int(os.environ.get("CRASH_HIDDEN", "32"))
BALLAST_MB = float(os.environ.get("CRASH_BALLAST_MB", "0"))
BALLAST_PARTS = int(os.environ.get("CRASH_BALLAST_PARTS", "4"))
STEP_SLEEP = float(os.environ.get("CRASH_STEP_SLEEP", "0"))
CHUNK_BYTES = int(os.environ.get("CRASH_CHUNK_BYTES", "0"))
CHUNK_SLEEP = float(os.environ.get("CRASH_CHUNK_SLEEP", "0"))
THROTTLE_STEPS = os.environ.get("CRASH_THROTTLE_STEPS", "")
PROGRESS = os.environ.get("CRASH_PROGRESS", "")
EXIT_BEFORE_COMMIT = os.environ.get("CRASH_EXIT_BEFORE_COMMIT", "")
EXIT_AFTER_COMMIT = os.environ.get("CRASH_EXIT_AFTER_COMMIT", "")
MARKERS = os.environ.get("CRASH_MARKERS", "")
DIGEST = os.environ.get("CRASH_DIGEST", "")
HOLD_STEPS = os.environ.get("CRASH_HOLD_STEPS", "")
HOLD_UNTIL = os.environ.get("CRASH_HOLD_UNTIL", "")

INPUTS, OUTPUTS, SAMPLES, BATCH = 8, 2, 64, 16
SEED = 1234


@attrs.define
class State:
    """A small MLP with everything that resume must restore exactly."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    ballast: list[torch.Tensor]
    losses: list[float] = attrs.Factory(list)
    step: int = 0
    # Rebuilt by init() from a fixed seed, never snapshotted.
    data: tuple[torch.Tensor, torch.Tensor] = resumable.transient()


# The state that init() built; the runtime restores into it, so at exit it is the
# final state of this incarnation.
FINAL: list[State] = []


def init() -> State:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    model = nn.Sequential(
        nn.Linear(INPUTS, HIDDEN), nn.ReLU(), nn.Dropout(0.1), nn.Linear(HIDDEN, 2)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    generator = torch.Generator().manual_seed(SEED)
    data_generator = torch.Generator().manual_seed(SEED + 1)
    inputs = torch.randn(SAMPLES, INPUTS, generator=data_generator)
    targets = torch.randn(SAMPLES, OUTPUTS, generator=data_generator)
    part = int(BALLAST_MB * 2**20) // 4 // max(BALLAST_PARTS, 1)
    ballast = [torch.zeros(part) for _ in range(BALLAST_PARTS if part else 0)]
    state = State(model, optimizer, scheduler, generator, ballast)
    state.data = (inputs, targets)
    FINAL[:] = [state]
    return state


@resumable.step(init=init, steps=STEPS, every=EVERY, keep=KEEP)
def train(state: State, step: int) -> dict[str, float]:
    if PROGRESS:
        with open(PROGRESS, "a") as file:
            file.write(f"{step}\n")
    inputs, targets = state.data
    # The state's generator shuffles; the global python, numpy and torch
    # generators add noise, so that each of them must be restored exactly.
    order = torch.randperm(SAMPLES, generator=state.generator)
    scale = random.random()
    total = 0.0
    for start in range(0, SAMPLES, BATCH):
        index = order[start : start + BATCH]
        noise = torch.from_numpy(np.random.standard_normal((BATCH, INPUTS)))
        batch = inputs[index] + scale * 0.1 * noise.float()
        batch = batch + 0.01 * torch.randn(BATCH, INPUTS)
        loss = nn.functional.mse_loss(state.model(batch), targets[index])
        state.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it bare
        state.optimizer.step()
        total += loss.item()
    state.scheduler.step()
    for tensor in state.ballast:
        where = random.randrange(tensor.numel())
        tensor[where] = float(np.random.random()) + step
    state.losses.append(total)
    state.step += 1
    if STEP_SLEEP:
        time.sleep(STEP_SLEEP)
    return {"loss": total}


def _steps(text: str) -> set[int]:
    return {int(part) for part in text.split(",") if part.strip()}


def _throttled(chunks: Iterable[Any]) -> Iterator[Any]:
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        for start in range(0, view.nbytes, CHUNK_BYTES):
            yield view[start : start + CHUNK_BYTES]
            time.sleep(CHUNK_SLEEP)


_write_object = Storage.write_object
_commit = Storage.commit


def write_object(self: Storage, snapshot: str, name: str, chunks: Any) -> int:
    """Write as the library does, in small chunks with a pause after each."""
    throttled = not THROTTLE_STEPS or parse_snapshot_name(snapshot) in _steps(
        THROTTLE_STEPS
    )
    if CHUNK_BYTES and throttled:
        chunks = _throttled(chunks)
    if name == INDEX_OBJECT and parse_snapshot_name(snapshot) in _steps(HOLD_STEPS):
        _hold()
    return _write_object(self, snapshot, name, chunks)


def _hold() -> None:
    """Wait until the file HOLD_UNTIL exists (at most a minute)."""
    with open(HOLD_UNTIL + ".held", "w"):
        pass
    deadline = time.monotonic() + 60
    while not os.path.exists(HOLD_UNTIL) and time.monotonic() < deadline:
        time.sleep(0.01)


def _exit_once(when: str, step: int | None, snapshot: str) -> None:
    """Exit at once with 137, the first time only for this step and moment."""
    marker = os.path.join(MARKERS, f"exited-{when}-commit-{step}")
    if os.path.exists(marker):
        return
    with open(marker, "w") as file:
        file.write(snapshot)
    os._exit(137)


def commit(self: Storage, snapshot: str, manifest: bytes) -> None:
    """Die right before or right after committing a listed step, once each."""
    step = parse_snapshot_name(snapshot)
    if step in _steps(EXIT_BEFORE_COMMIT):
        _exit_once("before", step, snapshot)
    _commit(self, snapshot, manifest)
    if step in _steps(EXIT_AFTER_COMMIT):
        _exit_once("after", step, snapshot)


Storage.write_object = write_object  # type: ignore[method-assign]  # throttle
Storage.commit = commit  # type: ignore[method-assign]  # crash injection


def _sha(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            flat = part.detach().contiguous().reshape(-1)
            digest.update(str(part.dtype).encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


def _sha_tree(value: Any) -> str:
    """Hash a state_dict-like tree: tensors by their bytes, the rest by repr."""
    parts: list[Any] = []

    def walk(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            parts.append(item)
        elif isinstance(item, np.ndarray):
            parts.append(torch.from_numpy(np.ascontiguousarray(item)))
        elif isinstance(item, dict):
            for key in sorted(item, key=repr):
                parts.append(repr(key))
                walk(item[key])
        elif isinstance(item, list | tuple):
            parts.append(f"{type(item).__name__}{len(item)}")
            for element in item:
                walk(element)
        else:
            parts.append(repr(item))

    walk(value)
    return _sha(*parts)


def digest(state: State) -> dict[str, str]:
    """Return a sha256 of each part of the final state and of the global RNGs."""
    return {
        "model": _sha_tree(state.model.state_dict()),
        "optimizer": _sha_tree(state.optimizer.state_dict()),
        "scheduler": _sha_tree(state.scheduler.state_dict()),
        "generator": _sha(state.generator.get_state()),
        "ballast": _sha(*state.ballast),
        "losses": _sha(*[loss.hex() for loss in state.losses]),
        "step": str(state.step),
        "python_rng": _sha(random.getstate()),
        "numpy_rng": _sha_tree(np.random.get_state(legacy=False)),
        "torch_rng": _sha(torch.get_rng_state()),
    }


def _write_digest() -> None:
    if not (DIGEST and FINAL):
        return
    temporary = DIGEST + ".tmp"
    with open(temporary, "w") as file:
        json.dump(digest(FINAL[0]), file, indent=1, sort_keys=True)
    os.replace(temporary, DIGEST)


atexit.register(_write_digest)
