"""
Ways to save a list of tensors durably and restore them into the same tensors.

Each method writes under a folder of its own and restores into the tensors it was
given, so that every restore is one into existing memory, as a resumed run's is.
resumable is measured through its public API only: ``resumable.run`` of one step
(a blocking snapshot, the final one of a run) and ``resumable.load``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

import attrs
import cloudpickle
import torch
import torch.distributed.checkpoint as dcp

import resumable
from benchmarks._common import fsync_path, optional, quiet_dcp

# DCP's writer threads, as many as this machine has cores.
DCP_THREADS = 2


@attrs.define
class FlatState:
    """The state resumable snapshots: the tensors, as one field."""

    tensors: list[torch.Tensor]


class Method:
    """Save the tensors under a folder, durably, and restore them into place."""

    name = ""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def save(self, folder: str) -> None:
        raise NotImplementedError

    def restore(self, folder: str) -> None:
        raise NotImplementedError

    def named(self) -> dict[str, torch.Tensor]:
        return {f"t{index:05d}": tensor for index, tensor in enumerate(self.tensors)}

    def copy_from(self, loaded: list[torch.Tensor]) -> None:
        for tensor, source in zip(self.tensors, loaded, strict=True):
            tensor.copy_(source)


class RawBytes(Method):
    """The floor: the tensors' memory written to one file, read back with readinto."""

    name = "raw bytes + fsync / readinto (floor)"

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, "raw.bin"), "wb", buffering=0) as file:
            for tensor in self.tensors:
                view = memoryview(tensor.numpy()).cast("B")
                while view:
                    view = view[file.write(view) :]
            os.fsync(file.fileno())

    def restore(self, folder: str) -> None:
        with open(os.path.join(folder, "raw.bin"), "rb", buffering=0) as file:
            for tensor in self.tensors:
                view = memoryview(tensor.numpy()).cast("B")
                while view:
                    view = view[file.readinto(view) :]


class SafeTensors(Method):
    """safetensors' save_file, then fsync; safe_open and a copy into each tensor."""

    name = "safetensors + fsync / safe_open + copy"

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        path = os.path.join(folder, "state.safetensors")
        save_file(self.named(), path)
        fsync_path(path)

    def restore(self, folder: str) -> None:
        from safetensors import safe_open

        path = os.path.join(folder, "state.safetensors")
        with safe_open(path, framework="pt") as file:
            for key, tensor in self.named().items():
                tensor.copy_(file.get_tensor(key))


class DistributedCheckpoint(Method):
    """torch.distributed.checkpoint in one process: save with threads, load in place."""

    name = f"torch.distributed.checkpoint, {DCP_THREADS} threads"

    def save(self, folder: str) -> None:
        writer = dcp.FileSystemWriter(folder, thread_count=DCP_THREADS)
        with quiet_dcp():
            dcp.save(self.named(), storage_writer=writer, no_dist=True)

    def restore(self, folder: str) -> None:
        with quiet_dcp():
            dcp.load(
                self.named(),
                storage_reader=dcp.FileSystemReader(folder),
                no_dist=True,
            )


class TorchSave(Method):
    """torch.save, then fsync; torch.load and a copy into each tensor."""

    name = "torch.save + fsync / torch.load + copy"

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, "state.pt"), "wb") as file:
            torch.save(self.tensors, file)
            file.flush()
            os.fsync(file.fileno())

    def restore(self, folder: str) -> None:
        path = os.path.join(folder, "state.pt")
        self.copy_from(torch.load(path, weights_only=True))


class CloudPickle(Method):
    """cloudpickle.dump, then fsync; cloudpickle.load and a copy into each tensor."""

    name = "cloudpickle + fsync / load + copy"

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, "state.pkl"), "wb") as file:
            cloudpickle.dump(self.tensors, file, protocol=pickle.HIGHEST_PROTOCOL)
            file.flush()
            os.fsync(file.fileno())

    def restore(self, folder: str) -> None:
        with open(os.path.join(folder, "state.pkl"), "rb") as file:
            self.copy_from(cloudpickle.load(file))


class Resumable(Method):
    """A run of one step (its final snapshot blocks), and resumable.load in place."""

    name = "resumable: run of 1 step / load"

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__(tensors)
        self.step = one_step(FlatState(tensors))

    def save(self, folder: str) -> None:
        resumable.run(self.step, storage=folder, steps=1, every=1)

    def restore(self, folder: str) -> None:
        resumable.load(self.step, storage=folder)


def warm_up(tensors: list[torch.Tensor], folder: str) -> None:
    """
    Write the state once, untimed, before measuring.

    Here the first durable write after a state is built ran 2 to 4 times slower
    than the next ones, whichever method made it; left in, it tilts the floor.
    """
    where = os.path.join(folder, "warm-up")
    os.makedirs(where, exist_ok=True)
    RawBytes(tensors).save(where)
    os.unlink(os.path.join(where, "raw.bin"))


def one_step(state: Any, body: Callable[[Any, int], None] | None = None) -> Any:
    """Return a ``@resumable.step`` whose init returns ``state`` itself."""

    def init() -> Any:
        return state

    @resumable.step(init=init, steps=1)
    def bench(state: Any, step: int) -> None:
        if body is not None:
            body(state, step)

    return bench


# Every method, the floor first.
KINDS: list[type[Method]] = [
    RawBytes,
    SafeTensors,
    DistributedCheckpoint,
    TorchSave,
    CloudPickle,
    Resumable,
]


def methods(tensors: list[torch.Tensor]) -> list[Method]:
    """Return every method whose packages are installed, the floor first."""
    missing = {SafeTensors} if optional("safetensors") is None else set()
    return [kind(tensors) for kind in KINDS if kind not in missing]
