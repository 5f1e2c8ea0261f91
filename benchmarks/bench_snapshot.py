"""
Durable save and restore of a flat state: resumable against raw writes and torch.save.

    python benchmarks/bench_snapshot.py [--mib 256] [--tensors 16] [--repeat 3]

Prints seconds (best of --repeat) and each method's ratio to the raw floor, measured
side by side in one run, on the local disk under a temporary folder. Restore is timed
twice: warm, right after the save, and cold, after the files' pages were dropped
from the page cache (posix_fadvise, no root needed).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import tempfile
import time
from collections.abc import Callable

import attrs
import torch

from resumable._archive import Archive
from resumable._state import decode_snapshot, encode_snapshot, place_snapshot, schema
from resumable._storage import Storage


@attrs.define
class FlatState:
    tensors: list[torch.Tensor]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    torch.manual_seed(0)
    count = options.mib * 2**20 // 4 // options.tensors
    state = FlatState([torch.randn(count) for _ in range(options.tensors)])
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    )
    print(f"state: {options.tensors} float32 tensors, {options.mib} MiB in all")
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as folder:
        rows = measure(state, folder, options.repeat)
    floor_save, floor_load, floor_cold = rows[0][1:]
    print(
        f"{'method':34} {'save s':>8} {'x floor':>8} {'restore s':>10} {'x floor':>8}"
        f" {'cold s':>8} {'x floor':>8}"
    )
    for name, save, load, cold in rows:
        print(
            f"{name:34} {save:8.3f} {save / floor_save:8.2f} "
            f"{load:10.3f} {load / floor_load:8.2f} "
            f"{cold:8.3f} {cold / floor_cold:8.2f}"
        )


def measure(
    state: FlatState, folder: str, repeat: int
) -> list[tuple[str, float, float, float]]:
    raw_path = os.path.join(folder, "raw.bin")
    torch_path = os.path.join(folder, "torch.pt")
    archive = Archive(Storage.open(os.path.join(folder, "snapshots")), "bench")
    manifests = []

    def resumable_save() -> None:
        content = encode_snapshot(state, [])
        lineage = ("bench", len(manifests) + 1, 1)
        manifests.append(archive.write(1, lineage, schema(state), content))

    def resumable_load() -> None:
        # As a resume does: read into the state's own tensors where they fit.
        loaded = archive.read(manifests[-1], functools.partial(place_snapshot, state))
        decode_snapshot(state, loaded.tree, loaded.buffers)

    methods = {
        "raw bytes + fsync (floor)": (
            lambda: raw_save(state, raw_path),
            lambda: raw_load(state, raw_path),
        ),
        "torch.save + fsync / torch.load": (
            lambda: torch_save(state, torch_path),
            lambda: torch_load(state, torch_path),
        ),
        "resumable (checksums, commit)": (resumable_save, resumable_load),
    }
    times: dict[str, tuple[list[float], ...]] = {name: ([], [], []) for name in methods}
    # Interleaved, so that a noisy neighbour slows every method alike.
    for _ in range(repeat):
        for name, (save, load) in methods.items():
            times[name][0].append(timed(save))
            times[name][1].append(timed(load))
            drop_cached_pages(folder)
            times[name][2].append(timed(load))
            archive.prune(1)

    return [(name, *(min(each) for each in kinds)) for name, kinds in times.items()]


def drop_cached_pages(folder: str) -> None:
    """Evict every file under ``folder`` from the page cache: the next read is cold."""
    for parent, _, names in os.walk(folder):
        for name in names:
            descriptor = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                # Only clean pages are dropped: written back first.
                os.fsync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def raw_save(state: FlatState, path: str) -> None:
    with open(path, "wb") as file:
        for tensor in state.tensors:
            file.write(tensor.numpy().data)
        file.flush()
        os.fsync(file.fileno())


def raw_load(state: FlatState, path: str) -> None:
    with open(path, "rb") as file:
        for tensor in state.tensors:
            file.readinto(tensor.numpy().data)


def torch_save(state: FlatState, path: str) -> None:
    with open(path, "wb") as file:
        torch.save(state.tensors, file)
        file.flush()
        os.fsync(file.fileno())


def torch_load(state: FlatState, path: str) -> None:
    for tensor, loaded in zip(state.tensors, torch.load(path), strict=True):
        tensor.copy_(loaded)


if __name__ == "__main__":
    main()
