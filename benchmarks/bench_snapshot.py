"""
Durable save and restore of a flat state: resumable and the usual ways, side by side.

    python benchmarks/bench_snapshot.py [--mib 1024] [--tensors 16] [--repeat 3]

Each method saves the state (write + fsync) and restores it into the existing
tensors from a warm page cache, then again after evicting its files
(POSIX_FADV_DONTNEED). The methods take turns in each repeat, so that a noisy
neighbour slows them alike; each figure is the best and the median of the repeats,
and each ratio is a best against the raw floor's best. Two references for the stall
of a snapshot taken in the background follow: a copy of the state into memory
allocated beforehand, and the time torch.distributed.checkpoint's async_save keeps
its caller. Files go to a temporary folder under --folder (the current one).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    MIB,
    best_median,
    drop_cache,
    flat_tensors,
    fresh_folder,
    print_machine,
    print_table,
    quiet_dcp,
    ratio,
    timed,
)
from benchmarks._methods import DCP_THREADS, Method, Resumable, methods, warm_up

# The targets for resumable, as ratios to the raw floor.
SAVE_TARGET = 1.1
RESTORE_TARGET = 1.2
PHASES = ("save", "warm", "cold")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=float, default=1024)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", default=os.getcwd())
    options = parser.parse_args(argv)
    print_machine(options.folder)
    tensors = flat_tensors(options.mib, options.tensors)
    size = sum(tensor.numel() * 4 for tensor in tensors)
    print(f"state: {len(tensors)} float32 tensors, {size / MIB:.0f} MiB in all")
    print(f"{options.repeat} repeats, methods interleaved; best (median) seconds\n")
    with tempfile.TemporaryDirectory(dir=options.folder) as folder:
        times = measure(methods(tensors), folder, options.repeat)
        report(times)
        print()
        report_stall_references(tensors, folder, options.repeat)


def measure(
    chosen: list[Method], folder: str, repeat: int
) -> dict[str, dict[str, list[float]]]:
    """Return each method's save, warm and cold restore seconds, one per repeat."""
    warm_up(chosen[0].tensors, folder)
    times = {method.name: {phase: [] for phase in PHASES} for method in chosen}
    for _ in range(repeat):
        for index, method in enumerate(chosen):
            where = fresh_folder(folder, f"method-{index}")
            measured = save_and_restore(method, where)
            for phase, seconds in zip(PHASES, measured, strict=True):
                times[method.name][phase].append(seconds)
            fresh_folder(folder, f"method-{index}")

    return times


def save_and_restore(method: Method, where: str) -> tuple[float, float, float]:
    """Return the seconds of a save, a warm restore and a cold one."""
    save = timed(lambda: method.save(where))
    warm = timed(lambda: method.restore(where))
    drop_cache(where)
    cold = timed(lambda: method.restore(where))

    return save, warm, cold


def report(times: dict[str, dict[str, list[float]]]) -> None:
    floor = {phase: min(values) for phase, values in next(iter(times.values())).items()}
    rows = []
    for name, phases in times.items():
        row = [name]
        for phase in PHASES:
            best, median = best_median(phases[phase])
            row += [f"{best:.3f} ({median:.3f})", ratio(best, floor[phase])]
        rows.append(row)
    headers = ["method", "save (write + fsync) s", "x floor"]
    headers += ["restore, warm cache s", "x floor", "restore, cold cache s", "x floor"]
    print_table(headers, rows)
    ours = times.get(Resumable.name)
    if ours is None:
        return
    ratios = {phase: ratio(min(ours[phase]), floor[phase]) for phase in PHASES}
    targets = {"save": SAVE_TARGET, "warm": RESTORE_TARGET, "cold": RESTORE_TARGET}
    verdict = {
        phase: "met" if float(ratios[phase]) <= target else "missed"
        for phase, target in targets.items()
    }
    print(
        f"\nresumable against its targets: save {ratios['save']} x floor "
        f"(target <= {SAVE_TARGET}: {verdict['save']}); restore {ratios['warm']} x "
        f"floor warm ({verdict['warm']}), {ratios['cold']} x floor cold "
        f"({verdict['cold']}; target <= {RESTORE_TARGET}). The loop's stall per "
        "snapshot is measured by bench_stall.py."
    )


def report_stall_references(
    tensors: list[torch.Tensor], folder: str, repeat: int
) -> None:
    """Print what a background snapshot's stall is measured against."""
    copies = [tensor.clone() for tensor in tensors]  # touched before it is timed
    named = {f"t{index:05d}": tensor for index, tensor in enumerate(tensors)}
    copy_times, stalls, totals = [], [], []
    for attempt in range(repeat):
        copy_times.append(timed(lambda: copy_into(copies, tensors)))
        writer = dcp.FileSystemWriter(
            fresh_folder(folder, f"async-{attempt}"), thread_count=DCP_THREADS
        )
        with quiet_dcp():
            started = time.perf_counter()
            future = dcp.async_save(named, storage_writer=writer, no_dist=True)
            stalls.append(time.perf_counter() - started)
            future.result()
            totals.append(time.perf_counter() - started)
    floor = min(copy_times)
    rows = []
    for name, values in [
        ("copy into memory allocated beforehand", copy_times),
        (f"DCP async_save, {DCP_THREADS} threads: the caller's stall", stalls),
        ("DCP async_save: until its write is durable", totals),
    ]:
        best, median = best_median(values)
        rows.append([name, f"{best:.3f} ({median:.3f})", ratio(best, floor)])
    print_table(["stall reference", "seconds", "x copy"], rows)


def copy_into(copies: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
    for copy, tensor in zip(copies, tensors, strict=True):
        copy.copy_(tensor)


if __name__ == "__main__":
    main()
