"""
B11: forward, backward, optimizer.step(), then state.step += 1, with slow moments.

Run as ``python -m resumable case_b11_train.py``. Environment variables:

- ``B11_STEPS`` / ``B11_EVERY``: steps in the run and snapshot cadence.
- ``B11_PROGRESS``: a file that gets ``step <n>`` as step n starts and
  ``save <step>`` as the snapshot of that step starts being written.
- ``B11_PHASE_SLEEP``: seconds slept inside backward (a gradient hook), inside
  optimizer.step() before the update and after it (step hooks): a signal at a
  random moment lands in those phases most of the time.
- ``B11_SLOW_STEP`` / ``B11_SLOW_STEP_SLEEP``: that step sleeps this long right after
  optimizer.step() updated the weights, before the step counter moves.
- ``B11_SLOW_SAVES`` / ``B11_SAVE_SECONDS``: snapshots of these steps (comma
  separated) are written slowly, in chunks, taking about that many seconds.
- ``B11_TRACE``: the digest of the state after each step (and after init) is
  appended there, one JSON line each, for the reference run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import torch
from torch import nn

import resumable
from resumable._snapshot import DATA_OBJECT, parse_snapshot_name
from resumable._storage import Storage

torch.set_num_threads(1)

STEPS = int(os.environ.get("B11_STEPS", "12"))
EVERY = int(os.environ.get("B11_EVERY", "4"))
PROGRESS = os.environ.get("B11_PROGRESS", "")
PHASE_SLEEP = float(os.environ.get("B11_PHASE_SLEEP", "0"))
SLOW_STEP = int(os.environ.get("B11_SLOW_STEP", "-1"))
SLOW_STEP_SLEEP = float(os.environ.get("B11_SLOW_STEP_SLEEP", "0"))
SLOW_SAVES = {
    int(part) for part in os.environ.get("B11_SLOW_SAVES", "").split(",") if part
}
SAVE_SECONDS = float(os.environ.get("B11_SAVE_SECONDS", "0"))
TRACE = os.environ.get("B11_TRACE", "")

FEATURES, HIDDEN, BATCH = 16, 64, 32
# Chunks of a slow save, and the bytes of ballast that make the save big enough.
CHUNKS, BALLAST_BYTES = 16, 1 << 20


@attrs.define
class State:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ballast: torch.Tensor
    step: int = 0


def init() -> State:
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, 1),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    state = State(model, optimizer, torch.zeros(BALLAST_BYTES // 4))
    if PHASE_SLEEP:
        model[2].register_forward_hook(_slow_backward)
        optimizer.register_step_pre_hook(_before_update)
    optimizer.register_step_post_hook(_after_update)
    if TRACE and not os.path.exists(TRACE):
        _trace(state)
    return state


@resumable.step(init=init, steps=STEPS, every=EVERY, keep=100)
def train(state: State, step: int) -> dict[str, float]:
    _progress(f"step {step}")
    generator = torch.Generator().manual_seed(step)
    inputs = torch.randn(BATCH, FEATURES, generator=generator)
    targets = torch.randn(BATCH, 1, generator=generator)
    loss = nn.functional.mse_loss(state.model(inputs), targets)
    state.optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it bare
    state.optimizer.step()
    state.step += 1
    if TRACE:
        _trace(state)
    return {"loss": loss.item()}


def digest(state: State) -> dict[str, Any]:
    """Return hashes of the weights and the Adam state, and the Adam step counts."""
    optimizer = state.optimizer.state_dict()
    return {
        "step": state.step,
        "adam_steps": [int(entry["step"]) for entry in optimizer["state"].values()],
        "model": _sha(state.model.state_dict()),
        "adam": _sha(optimizer["state"]),
    }


def _sha(tree: dict[Any, Any]) -> str:
    hashed = hashlib.sha256()
    for key in sorted(tree, key=repr):
        value = tree[key]
        hashed.update(repr(key).encode())
        if isinstance(value, dict):
            hashed.update(_sha(value).encode())
        else:
            hashed.update(value.detach().numpy().tobytes())
    return hashed.hexdigest()


def _trace(state: State) -> None:
    with open(TRACE, "a") as file:
        file.write(json.dumps(digest(state)) + "\n")


def _progress(line: str) -> None:
    if PROGRESS:
        with open(PROGRESS, "a") as file:
            file.write(line + "\n")


def _slow_backward(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    if output.requires_grad:
        output.register_hook(_sleep)  # type: ignore[no-untyped-call]  # bare in torch


def _sleep(grad: torch.Tensor) -> None:
    time.sleep(PHASE_SLEEP)


def _before_update(optimizer: torch.optim.Optimizer, *args: Any) -> None:
    time.sleep(PHASE_SLEEP)


def _after_update(optimizer: torch.optim.Optimizer, *args: Any) -> None:
    # The weights and Adam's counts have moved, state.step not yet.
    time.sleep(PHASE_SLEEP)
    steps = {int(entry["step"]) for entry in optimizer.state.values()}
    if SLOW_STEP_SLEEP and steps == {SLOW_STEP + 1}:
        time.sleep(SLOW_STEP_SLEEP)


_write_object = Storage.write_object


def _slowly(chunks: Iterable[Any]) -> Iterator[Any]:
    data = b"".join(bytes(memoryview(chunk).cast("B")) for chunk in chunks)
    size = -(-len(data) // CHUNKS)
    for start in range(0, len(data), size):
        yield data[start : start + size]
        time.sleep(SAVE_SECONDS / CHUNKS)


def write_object(self: Storage, snapshot: str, name: str, chunks: Any) -> int:
    """Write as the library does; slowly for the snapshots in B11_SLOW_SAVES."""
    step = parse_snapshot_name(snapshot)
    if name == DATA_OBJECT:
        _progress(f"save {step}")
        if step in SLOW_SAVES:
            chunks = _slowly(chunks)
    return _write_object(self, snapshot, name, chunks)


if PROGRESS or SLOW_SAVES:
    # Only in the training process: a test that imports this module is left alone.
    Storage.write_object = write_object  # type: ignore[method-assign]  # throttle
