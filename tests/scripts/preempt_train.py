"""
A training run for the preemption tests: ``python -m resumable preempt_train.py``.

Each step shuffles a small data set with the state's generator and trains on its
batches through ``resumable.iterate``; every batch appends ``[step, *ids]`` to
``state.log``, so that the log holds exactly the items whose effect is in the state.
Everything that varies between incarnations comes from environment variables, so
that every incarnation runs the same command:

- ``PREEMPT_STEPS`` / ``PREEMPT_EVERY`` / ``PREEMPT_KEEP``: the decorator's values.
- ``PREEMPT_BALLAST_MB``: extra state in MiB, to make ``data.bin`` large.
- ``PREEMPT_IMPORT_SLEEP``: seconds the import of this script sleeps, after the
  event ``import`` (a slow import: the command line has not started the run yet).
- ``PREEMPT_INIT_SLEEP``: seconds ``init()`` sleeps (start-up, handlers installed).
- ``PREEMPT_ITEM_SLEEP`` / ``PREEMPT_END_SLEEP``: seconds each item sleeps after its
  work, and each step after its loop.
- ``PREEMPT_CHUNK_BYTES`` / ``PREEMPT_CHUNK_SLEEP``: the write throttle; ``data.bin``
  is written in chunks of at most that many bytes, sleeping after each.
- ``PREEMPT_SLOW_FROM``: the first ``data.bin`` write of this process (1-based)
  that is throttled; the earlier ones run at full speed (default 1).
- ``PREEMPT_EVENTS``: a file that gets one line per event: ``import``, ``init``,
  ``step N``, ``item N K``, ``end N``, ``native N``, ``write-start NAME``,
  ``write-end NAME``, ``crash N``.
- ``PREEMPT_RESULT``: at a normal exit, a JSON file with a digest of the final
  state and global RNGs, and the log.
- ``PREEMPT_USER_HANDLER``: a file; a SIGTERM handler installed at import time
  appends the signal number to it.
- ``PREEMPT_CRASH_AT``: the step index whose start is replaced by ``os._exit(9)``.
- ``PREEMPT_NATIVE_SECONDS``: in the first step of each incarnation, after the
  first item, one native call (PBKDF2) that holds the main thread for about that
  long without returning to the interpreter.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import signal
import time
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

import resumable
from resumable._snapshot import DATA_OBJECT
from resumable._storage import Storage

torch.set_num_threads(1)

STEPS = int(os.environ.get("PREEMPT_STEPS", "8"))
EVERY = int(os.environ.get("PREEMPT_EVERY", "1"))
KEEP = int(os.environ.get("PREEMPT_KEEP", "3"))
BALLAST_MB = float(os.environ.get("PREEMPT_BALLAST_MB", "0"))
INIT_SLEEP = float(os.environ.get("PREEMPT_INIT_SLEEP", "0"))
ITEM_SLEEP = float(os.environ.get("PREEMPT_ITEM_SLEEP", "0"))
END_SLEEP = float(os.environ.get("PREEMPT_END_SLEEP", "0"))
CHUNK_BYTES = int(os.environ.get("PREEMPT_CHUNK_BYTES", "0"))
CHUNK_SLEEP = float(os.environ.get("PREEMPT_CHUNK_SLEEP", "0"))
SLOW_FROM = int(os.environ.get("PREEMPT_SLOW_FROM", "1"))
EVENTS = os.environ.get("PREEMPT_EVENTS", "")
RESULT = os.environ.get("PREEMPT_RESULT", "")
USER_HANDLER = os.environ.get("PREEMPT_USER_HANDLER", "")
CRASH_AT = int(os.environ.get("PREEMPT_CRASH_AT", "-1"))
NATIVE_SECONDS = float(os.environ.get("PREEMPT_NATIVE_SECONDS", "0"))
IMPORT_SLEEP = float(os.environ.get("PREEMPT_IMPORT_SLEEP", "0"))

INPUTS, OUTPUTS, SAMPLES, BATCH = 6, 2, 32, 8
SEED = 4321


def event(text: str) -> None:
    """Append one line to the events file, in one write."""
    if not EVENTS:
        return
    descriptor = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, f"{text}\n".encode())
    finally:
        os.close(descriptor)


@attrs.define
class State:
    """A small MLP, its optimizer, a shuffling generator and the items trained on."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    ballast: torch.Tensor
    # One [step, *batch ids] per item whose update is in the model.
    log: list[list[int]] = attrs.Factory(list)
    # Loss summed over the items of the running step: on the state, since a resumed
    # step skips the items done before the snapshot.
    running: float = 0.0
    losses: list[float] = attrs.Factory(list)
    data: tuple[torch.Tensor, torch.Tensor] = resumable.transient()


# The state that init() built; the runtime restores into it.
FINAL: list[State] = []
# Whether this incarnation already made its native call.
NATIVE_DONE: list[bool] = []


def init() -> State:
    event("init")
    if INIT_SLEEP:
        time.sleep(INIT_SLEEP)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(INPUTS, 16), nn.Tanh(), nn.Linear(16, OUTPUTS))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    data_generator = torch.Generator().manual_seed(SEED + 1)
    inputs = torch.randn(SAMPLES, INPUTS, generator=data_generator)
    targets = torch.randn(SAMPLES, OUTPUTS, generator=data_generator)
    ballast = torch.zeros(int(BALLAST_MB * 2**20) // 4)
    state = State(model, optimizer, torch.Generator().manual_seed(SEED), ballast)
    state.data = (inputs, targets)
    FINAL[:] = [state]
    return state


@resumable.step(init=init, steps=STEPS, every=EVERY, keep=KEEP)
def train(state: State, step: int) -> dict[str, float]:
    if step == CRASH_AT:
        event(f"crash {step}")
        os._exit(9)
    event(f"step {step}")
    inputs, targets = state.data
    order = torch.randperm(SAMPLES, generator=state.generator)
    batches = [order[start : start + BATCH] for start in range(0, SAMPLES, BATCH)]
    state.running = 0.0
    for number, ids in enumerate(resumable.iterate(batches), start=1):
        # Each global generator adds noise, so that each must be restored exactly.
        noise = torch.randn(BATCH, INPUTS) * random.random()
        noise += torch.from_numpy(np.random.standard_normal((BATCH, INPUTS))).float()
        loss = nn.functional.mse_loss(
            state.model(inputs[ids] + 0.1 * noise), targets[ids]
        )
        state.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it bare
        state.optimizer.step()
        state.running += loss.item()
        if state.ballast.numel():
            state.ballast[random.randrange(state.ballast.numel())] += 1.0
        state.log.append([step, *ids.tolist()])
        event(f"item {step} {number}")
        if ITEM_SLEEP:
            time.sleep(ITEM_SLEEP)
        if NATIVE_SECONDS and not NATIVE_DONE:
            NATIVE_DONE.append(True)
            event(f"native {step}")
            _native_call(NATIVE_SECONDS)
    state.losses.append(state.running)
    event(f"end {step}")
    if END_SLEEP:
        time.sleep(END_SLEEP)
    return {"loss": state.running}


def _native_call(seconds: float) -> None:
    """Hold the main thread in one C call for about ``seconds``."""
    sample = 200_000
    started = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", b"preempt", b"salt", sample)
    rate = sample / max(time.perf_counter() - started, 1e-6)
    hashlib.pbkdf2_hmac("sha256", b"preempt", b"salt", int(rate * seconds))


_WRITES: list[str] = []


def _throttled(chunks: Iterable[Any]) -> Iterator[Any]:
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        for start in range(0, view.nbytes, CHUNK_BYTES):
            yield view[start : start + CHUNK_BYTES]
            time.sleep(CHUNK_SLEEP)


_write_object = Storage.write_object


def write_object(self: Storage, snapshot: str, name: str, chunks: Any) -> int:
    """Write as the library does; data.bin slowly, in small chunks, when asked."""
    if name != DATA_OBJECT:
        return _write_object(self, snapshot, name, chunks)
    _WRITES.append(snapshot)
    if CHUNK_BYTES and len(_WRITES) >= SLOW_FROM:
        chunks = _throttled(chunks)
    event(f"write-start {snapshot}")
    size = _write_object(self, snapshot, name, chunks)
    event(f"write-end {snapshot}")
    return size


Storage.write_object = write_object  # type: ignore[method-assign]  # throttle


def _user_handler(signum: int, frame: FrameType | None) -> None:
    with open(USER_HANDLER, "a") as file:
        file.write(f"{signum}\n")


if USER_HANDLER:
    signal.signal(signal.SIGTERM, _user_handler)
if IMPORT_SLEEP:
    event("import")
    time.sleep(IMPORT_SLEEP)


def _sha(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            flat = part.detach().contiguous().reshape(-1)
            digest.update(str(part.dtype).encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(part, np.ndarray):
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


def digest(state: State) -> dict[str, str]:
    """Return a sha256 of each part of the final state and of the global RNGs."""
    optimizer = state.optimizer.state_dict()
    numpy = np.random.get_state(legacy=False)
    moments = [
        tensor
        for index in sorted(optimizer["state"])
        for _, tensor in sorted(optimizer["state"][index].items())
    ]
    return {
        "model": _sha(*state.model.state_dict().values()),
        "optimizer": _sha(*moments, optimizer["param_groups"]),
        "generator": _sha(state.generator.get_state()),
        "ballast": _sha(state.ballast),
        "losses": _sha(*[loss.hex() for loss in state.losses]),
        "running": state.running.hex(),
        "python_rng": _sha(random.getstate()),
        "numpy_rng": _sha(
            numpy["state"]["key"],
            numpy["state"]["pos"],
            numpy["has_gauss"],
            numpy["gauss"],
        ),
        "torch_rng": _sha(torch.get_rng_state()),
    }


def _write_result() -> None:
    if not (RESULT and FINAL):
        return
    result = {"digest": digest(FINAL[0]), "log": FINAL[0].log}
    temporary = RESULT + ".tmp"
    with open(temporary, "w") as file:
        json.dump(result, file)
    os.replace(temporary, RESULT)


atexit.register(_write_result)
