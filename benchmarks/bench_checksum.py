"""
Checksum candidates for snapshot objects: throughput, and whether they release the GIL.

    python benchmarks/bench_checksum.py [--mib 256] [--chunk-mib 4] [--repeat 5]

For each candidate it prints the GB/s of one thread over --mib of fresh data in
--chunk-mib pieces (memory speed), over one piece that stays in cache (the case of
bytes just read or written), and the longest time another thread could not run
Python during one call over all --mib, as a share of the call: about 1 where the
function holds the GIL, about 0 where it releases it (and can then run beside the
reads and writes of a thread that needs the GIL back after each syscall).
Candidates whose package is missing are skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

Checksum = Callable[[memoryview], object]


def candidates() -> dict[str, Checksum]:
    """Return each installed candidate as a function over a whole buffer, chunked."""
    found: dict[str, Checksum] = {"zlib.crc32": lambda data: zlib.crc32(data)}
    try:
        import xxhash
    except ImportError:
        print("skipped: xxhash (not installed)")
    else:
        found["xxhash xxh3_64"] = lambda data: xxhash.xxh3_64_intdigest(data)
        found["xxhash xxh3_128"] = lambda data: xxhash.xxh3_128_intdigest(data)
    try:
        import crc32c
    except ImportError:
        print("skipped: crc32c (not installed)")
    else:
        found["crc32c (package crc32c)"] = lambda data: crc32c.crc32c(data)
    try:
        import google_crc32c
    except ImportError:
        print("skipped: google-crc32c (not installed)")
    else:
        # It refuses memoryviews, but takes an array over the same memory.
        found["google-crc32c"] = lambda data: google_crc32c.value(
            np.frombuffer(data, np.uint8)
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    data = np.random.default_rng(0).integers(0, 256, options.mib * 2**20, np.uint8)
    view = memoryview(data).cast("B")
    chunk = options.chunk_mib * 2**20
    pieces = [view[start : start + chunk] for start in range(0, len(view), chunk)]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cpus; {options.mib} MiB in {options.chunk_mib} MiB pieces"
    )
    print(f"{'checksum':26} {'GB/s':>7} {'in cache':>9} {'GIL held':>9}")
    for name, function in candidates().items():
        memory = best(options.repeat, each, function, pieces)
        cached = best(options.repeat, each, function, [pieces[0]] * 64)
        held = min(stall(function, view) for _ in range(options.repeat))
        print(
            f"{name:26} {len(view) / memory / 1e9:7.1f} "
            f"{64 * chunk / cached / 1e9:9.1f} {held:9.2f}"
        )


def each(function: Checksum, pieces: list[memoryview]) -> None:
    for piece in pieces:
        function(piece)


def stall(function: Checksum, data: memoryview) -> float:
    """Return this thread's longest pause while another hashes ``data``, as a share."""
    span: list[float] = []
    go = threading.Event()

    def hash_once() -> None:
        go.wait()
        started = time.perf_counter()
        function(data)
        span.append(time.perf_counter() - started)

    thread = threading.Thread(target=hash_once)
    thread.start()
    # Timed from before the hash starts, so that a pause at its very start counts.
    longest, last = 0.0, time.perf_counter()
    go.set()
    while thread.is_alive():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    thread.join()
    return min(1.0, longest / span[0])


def best(repeat: int, action: Callable[..., None], *arguments: Any) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action(*arguments)
        times.append(time.perf_counter() - started)
    return min(times)


if __name__ == "__main__":
    main()
