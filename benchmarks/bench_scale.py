"""
How the cost of a snapshot grows: with the state's size, and with its tensor count.

    python benchmarks/bench_scale.py [--sizes 64,256,1024,4096] [--tensors 16]
        [--small 10000] [--small-kib 4] [--repeat 3]

For each size, a state of --tensors float32 tensors is saved durably and restored
into its tensors (warm page cache) by the raw floor, torch.save and resumable; the
seconds per GiB should stay flat as the size grows (linear cost). Then a state of
--small tensors of --small-kib KiB each: seconds per snapshot and microseconds per
tensor, against torch.save (bounded cost per tensor); --small 0 leaves it out.
The methods take turns in each repeat; figures are the best of the repeats.
States over 1 GiB are measured once: a 4 GiB one needs about three times that in
memory (the state, torch.load's copy, a read buffer) and a minute.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    GIB,
    MIB,
    flat_tensors,
    fresh_folder,
    nbytes,
    print_machine,
    print_table,
    ratio,
    timed,
)
from benchmarks._methods import Method, RawBytes, Resumable, TorchSave, warm_up

KINDS: list[type[Method]] = [RawBytes, TorchSave, Resumable]
SHORT = {RawBytes: "raw (floor)", TorchSave: "torch.save", Resumable: "resumable"}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--sizes", default="64,256,1024,4096", help="MiB, commas")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--small", type=int, default=10000, help="small tensors")
    parser.add_argument("--small-kib", type=float, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="up to 1 GiB")
    parser.add_argument("--folder", default=os.getcwd())
    options = parser.parse_args(argv)
    sizes = [float(size) for size in options.sizes.split(",") if size.strip()]
    print_machine(options.folder)
    with tempfile.TemporaryDirectory(dir=options.folder) as folder:
        rows = []
        for size in sorted(sizes):
            tensors = flat_tensors(size, options.tensors)
            repeat = options.repeat if size <= 1024 else 1
            rows.append((nbytes(tensors), measure(tensors, folder, repeat)))
            del tensors
            gc.collect()
        report_sizes(rows, options.tensors)
        if options.small:
            mib = options.small * options.small_kib / 1024
            small = flat_tensors(mib, options.small)
            report_small(small, measure(small, folder, options.repeat))


def measure(
    tensors: list[torch.Tensor], folder: str, repeat: int
) -> dict[type[Method], tuple[float, float]]:
    """Return each method's best save and warm restore seconds."""
    chosen = [kind(tensors) for kind in KINDS]
    warm_up(tensors, folder)
    saves: dict[type[Method], list[float]] = {type(method): [] for method in chosen}
    restores: dict[type[Method], list[float]] = {type(method): [] for method in chosen}
    for _ in range(repeat):
        for method in chosen:
            save, restore = save_and_restore(method, fresh_folder(folder, "scale"))
            saves[type(method)].append(save)
            restores[type(method)].append(restore)
            fresh_folder(folder, "scale")

    return {kind: (min(saves[kind]), min(restores[kind])) for kind in saves}


def save_and_restore(method: Method, where: str) -> tuple[float, float]:
    save = timed(lambda: method.save(where))
    return save, timed(lambda: method.restore(where))


def report_sizes(
    rows: list[tuple[int, dict[type[Method], tuple[float, float]]]], count: int
) -> None:
    print(f"\nstate of {count} float32 tensors; seconds (seconds per GiB)\n")
    first_size, first = rows[0]
    smallest = [seconds / first_size for seconds in first[Resumable]]
    for phase, label in ((0, "save (write + fsync)"), (1, "restore, warm cache")):
        table = []
        for size, found in rows:
            row = [f"{size / MIB:.0f}"]
            for kind in KINDS:
                seconds = found[kind][phase]
                row.append(f"{seconds:.3f} ({seconds * GIB / size:.3f})")
            ours = found[Resumable][phase]
            row.append(ratio(ours, found[RawBytes][phase]))
            row.append(ratio(ours / size, smallest[phase]))
            table.append(row)
        headers = [f"{label}: MiB", *(SHORT[kind] for kind in KINDS)]
        headers += ["resumable x raw", "resumable s/GiB x smallest"]
        print_table(headers, table)
        print()


def report_small(
    tensors: list[torch.Tensor], found: dict[type[Method], tuple[float, float]]
) -> None:
    count, size = len(tensors), nbytes(tensors)
    print(f"{count} tensors of {size / count / 1024:.0f} KiB, {size / MIB:.0f} MiB\n")
    baseline = found[TorchSave]
    table = []
    for kind in KINDS:
        save, load = found[kind]
        table.append(
            [
                SHORT[kind],
                f"{save:.3f}",
                f"{save / count * 1e6:.1f}",
                ratio(save, baseline[0]),
                f"{load:.3f}",
                f"{load / count * 1e6:.1f}",
                ratio(load, baseline[1]),
            ]
        )
    headers = ["method", "save s", "µs per tensor", "x torch.save"]
    headers += ["restore s", "µs per tensor", "x torch.save"]
    print_table(headers, table)


if __name__ == "__main__":
    main()
