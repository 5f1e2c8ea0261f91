"""
Uploads to S3: resumable's write path against a plain s3fs put of the same bytes.

    python benchmarks/bench_s3.py [--mib 256] [--tensors 16] [--repeat 3] [--grid]

Starts its own moto S3 server on 127.0.0.1 (tests/s3server.py), stopped by its PID
at the end. Prints seconds (best of --repeat, methods interleaved), MiB/s, each
method's ratio to s3fs's ``pipe_file`` of the bytes joined beforehand, and the CPU
seconds of this process (the client's own cost; the server's is not counted).
``--grid`` adds resumable's write with other part sizes and parts in flight.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import fsspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resumable._archive import Archive
from resumable._s3 import UploadSettings
from resumable._snapshot import data_chunks
from resumable._state import encode_snapshot, schema
from resumable._storage import Storage
from tests.s3server import S3Server

MIB = 2**20
NAME = "step-000000001-aaaaaaaaaaaa"
# Part MiB and parts in flight that --grid tries.
GRID = [(5, 1), (8, 8), (16, 1), (16, 4), (16, 8), (32, 8), (64, 4)]


@attrs.define
class FlatState:
    tensors: list[torch.Tensor]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--grid", action="store_true")
    options = parser.parse_args()
    torch.manual_seed(0)
    count = options.mib * MIB // 4 // options.tensors
    state = FlatState([torch.randn(count) for _ in range(options.tensors)])
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    )
    print(f"state: {options.tensors} float32 tensors, {options.mib} MiB in all")
    server = S3Server()
    try:
        rows = measure(server, state, options.repeat, options.grid)
    finally:
        server.stop()
    floor = rows[0][1]
    print(f"{'method':44} {'seconds':>8} {'MiB/s':>7} {'x s3fs put':>10} {'cpu s':>6}")
    for name, seconds, cpu in rows:
        print(
            f"{name:44} {seconds:8.3f} {options.mib / seconds:7.1f} "
            f"{seconds / floor:10.2f} {cpu:6.2f}"
        )


def measure(
    server: S3Server, state: FlatState, repeat: int, grid: bool
) -> list[tuple[str, float, float]]:
    os.environ.update(server.environment())
    fsspec.config.conf["s3"] = server.options
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    storage = Storage.open(f"s3://{bucket}/store")
    archive = Archive(storage, "bench")
    chunks = list(data_chunks(encode_snapshot(state, [])[1]))
    joined = b"".join(chunks)
    path = storage.path(NAME, "data.bin")

    def stream() -> None:
        with fs.open(path, "wb") as file:
            for chunk in chunks:
                file.write(chunk)

    def snapshot() -> None:
        content = encode_snapshot(state, [])
        archive.write(1, ("bench", 1, 1), schema(state), content)

    methods: dict[str, Callable[[], Any]] = {
        "s3fs pipe_file of joined bytes (baseline)": lambda: fs.pipe_file(path, joined),
        "s3fs open('wb') and write each chunk": stream,
        "resumable Storage.write_object": lambda: storage.write_object(
            NAME, "data.bin", chunks
        ),
        "resumable Archive.write (whole snapshot)": snapshot,
    }
    if grid:
        for part_mib, concurrency in GRID:
            settings = UploadSettings(part_mib * MIB, concurrency)
            methods[f"  write_object, {part_mib} MiB parts x {concurrency}"] = (
                lambda settings=settings: _write_with(storage, settings, chunks)
            )
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    # Interleaved, so that a noisy neighbour slows every method alike.
    for _ in range(repeat):
        for name, action in methods.items():
            times[name].append(timed(action))
            # moto keeps objects in memory: each method starts from an empty bucket.
            fs.rm(f"{bucket}/store", recursive=True)

    return [(name, *min(seconds)) for name, seconds in times.items()]


def _write_with(storage: Storage, settings: UploadSettings, chunks: list[Any]) -> None:
    default, storage._upload_settings = storage._upload_settings, settings
    try:
        storage.write_object(NAME, "data.bin", chunks)
    finally:
        storage._upload_settings = default


def timed(action: Callable[[], Any]) -> tuple[float, float]:
    """Return the wall-clock and CPU seconds of this process that ``action`` took."""
    started, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - started, time.process_time() - cpu


if __name__ == "__main__":
    main()
