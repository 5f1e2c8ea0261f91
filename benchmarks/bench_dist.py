"""
The cost of many processes: per step and per snapshot, gloo ranks against one process.

    python benchmarks/bench_dist.py [--ranks 2] [--steps 2000] [--mib 128] [--repeat 3]

Each measurement runs once in one process and once in --ranks processes, which
the script launches itself with torchrun's variables on 127.0.0.1 (gloo, CPU).
Per step: the time from one step body's start to the next, for an empty step and
for a step with one resumable.iterate item, against a plain loop calling the same
function; under torchrun each safe point (a step's end, each item) costs one
all-reduce, shown beside a bare gloo all-reduce of one number. Per snapshot: the
loop's stall for a blocking snapshot of a --mib MiB state (16 float32 tensors),
equal on every rank (as DDP's parameters are, written once by rank 0) or
different on each (each rank writes its own), and the bytes written by all ranks
together. One process and the ranks take turns, --repeat runs each; figures are
rank 0's (the ranks move in step); snapshots are written under --folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resumable
from benchmarks._common import MIB, flat_tensors, print_machine, print_table

# Where each step body starts and ends, for the worker's current measurement.
STARTS: list[float] = []
ENDS: list[float] = []
# A worker's figures come back to the launcher on this line of its stdout.
RESULT = "bench_dist result: "
# Snapshots timed in each run, after one left out (the first write is slow).
SNAPSHOTS = 2


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--mib", type=float, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each")
    parser.add_argument("--folder", default=os.getcwd())
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        print(RESULT + json.dumps(work(options)), flush=True)
        return
    print_machine(options.folder)
    print(
        f"{options.ranks} gloo ranks on 127.0.0.1; {options.steps} steps; "
        f"snapshots of {options.mib:g} MiB; {options.repeat} runs each, "
        f"{SNAPSHOTS} snapshots timed per run"
    )
    runs: dict[int, list[dict[str, Any]]] = {1: [], options.ranks: []}
    with tempfile.TemporaryDirectory(dir=options.folder) as folder:
        # One process and the ranks take turns, so that a burst of load on the
        # shared machine, or a slow disk, hits both.
        for attempt in range(options.repeat):
            for ranks, results in runs.items():
                where = os.path.join(folder, f"ranks-{ranks}-{attempt}")
                results.append(launch(options, where, ranks))
    single, many = merged(runs[1]), merged(runs[options.ranks])
    report_steps(single, many, options.ranks)
    report_snapshots(single, many, options)


def launch(options: argparse.Namespace, where: str, ranks: int) -> dict[str, Any]:
    """Measure once in ``ranks`` new processes; return rank 0's figures."""
    os.makedirs(where)
    command = [sys.executable, __file__, "--worker", "--folder", where]
    command += ["--steps", str(options.steps), "--mib", str(options.mib)]
    port = str(free_port())
    processes = []
    for rank in range(ranks):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if ranks > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), MASTER_PORT=port)
            env.update(WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks))
            env.update(MASTER_ADDR="127.0.0.1")
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        )
    try:
        outputs = [process.communicate(timeout=900)[0] for process in processes]
    finally:
        # A rank that failed leaves the others waiting in a collective.
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [process.returncode for process in processes if process.returncode]
    if failed:
        msg = f"a rank of {ranks} failed with exit codes {failed}; see above"
        raise RuntimeError(msg)
    line = next(line for line in outputs[0].splitlines() if line.startswith(RESULT))

    return json.loads(line[len(RESULT) :])  # type: ignore[no-any-return]


def merged(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The best µs per step of each loop, and every snapshot's stall, of all runs."""
    best: dict[str, Any] = {}
    for name, first in results[0].items():
        if isinstance(first, float):
            best[name] = min(result[name] for result in results)
        else:
            stalls = [stall for result in results for stall in result[name]["stalls"]]
            best[name] = {"stalls": stalls, "written": first["written"]}

    return best


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@attrs.define
class Counter:
    count: int = 0


@attrs.define
class Flat:
    tensors: list[torch.Tensor]


def work(options: argparse.Namespace) -> dict[str, Any]:
    """Measure in this process, one of a job's ranks or alone."""
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        # Made here, not by the runtime, so that every run below shares it.
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    figures = measure_steps(options.steps, options.folder)
    seeds = {"replicated": 0}
    if dist.is_initialized():
        seeds["per rank"] = dist.get_rank()
    for name, seed in seeds.items():
        state = Flat(flat_tensors(options.mib, 16, seed))
        folder = os.path.join(options.folder, name.replace(" ", "-"))
        figures[name] = measure_snapshots(state, folder)
    if dist.is_initialized():
        dist.destroy_process_group()

    return figures


def measure_steps(steps: int, folder: str) -> dict[str, Any]:
    """Return µs per step: the plain loop, resumable's two steps, an all-reduce."""

    @resumable.step(init=Counter, steps=steps, every=steps)
    def empty(state: Counter, step: int) -> None:
        STARTS.append(time.perf_counter())
        state.count += 1

    @resumable.step(init=Counter, steps=steps, every=steps)
    def one_item(state: Counter, step: int) -> None:
        STARTS.append(time.perf_counter())
        for _ in resumable.iterate(range(1)):
            state.count += 1

    STARTS.clear()
    state = Counter()
    for step in range(steps):
        empty(state, step)
    figures = {"plain": per_step()}
    for name, step_function in [("empty", empty), ("one item", one_item)]:
        STARTS.clear()
        resumable.run(step_function, storage=os.path.join(folder, name))
        figures[name] = per_step()
    if dist.is_initialized():
        flag = torch.zeros(1, dtype=torch.int64)
        STARTS.clear()
        for _ in range(steps):
            STARTS.append(time.perf_counter())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        figures["all-reduce"] = per_step()

    return figures


def per_step() -> float:
    """Microseconds from the first step body's start to the last's, per step."""
    return (STARTS[-1] - STARTS[0]) / (len(STARTS) - 1) * 1e6


def measure_snapshots(state: Flat, folder: str) -> dict[str, Any]:
    """Return the loop's stall per blocking snapshot, the first one left out."""

    @resumable.step(init=lambda: state, steps=SNAPSHOTS + 2)
    def snapshots(state: Flat, step: int) -> None:
        STARTS.append(time.perf_counter())
        ENDS.append(time.perf_counter())

    STARTS.clear()
    ENDS.clear()
    resumable.run(snapshots, storage=folder, every=1, background=False)
    stalls = [start - end for start, end in zip(STARTS[2:], ENDS[1:-1], strict=True)]
    newest = max(path for path in Path(folder).glob("step-*") if path.is_dir())
    written = sum(path.stat().st_size for path in newest.iterdir())

    return {"stalls": stalls, "written": written}


def report_steps(single: dict[str, Any], many: dict[str, Any], ranks: int) -> None:
    floor = single["plain"]
    rows = [["plain Python loop calling the step", f"{floor:.2f}", "0.00", "-"]]
    added = []
    for name, label in [("empty", "empty step"), ("one item", "one iterate item")]:
        alone, spread = single[name] - floor, many[name] - floor
        rows.append([f"resumable, 1 process, {label}", f"{single[name]:.2f}"])
        rows[-1] += [f"{alone:.2f}", "1.00"]
        rows.append([f"resumable, {ranks} ranks, {label}", f"{many[name]:.2f}"])
        rows[-1] += [f"{spread:.2f}", f"{spread / alone:.1f}" if alone > 0 else "-"]
        added.append((label, many[name] - single[name]))
    print("\nper step, best of the runs")
    print_table(["loop", "µs per step", "overhead µs", "x 1 process"], rows)
    bare = many["all-reduce"]
    rows = []
    # A step's end is a safe point, and so is each resumable.iterate item.
    for (label, extra), points in zip(added, [1, 2], strict=True):
        each = extra / points
        rows.append([label, f"{extra:.2f}", str(points), f"{each:.2f}"])
        rows[-1].append(f"{each / bare:.2f}")
    print(f"\nadded by {ranks} ranks; a bare gloo all-reduce of an int: {bare:.2f} µs")
    headers = ["step", "µs added", "safe points", "µs per safe point"]
    print_table([*headers, "x bare all-reduce"], rows)


def report_snapshots(
    single: dict[str, Any], many: dict[str, Any], options: argparse.Namespace
) -> None:
    base = min(single["replicated"]["stalls"])
    rows = [row("1 process", single["replicated"], base)]
    for name in ["replicated", "per rank"]:
        label = f"{options.ranks} ranks, state {name}"
        rows.append(row(label, many[name], base))
    print(f"\nper blocking snapshot of {options.mib:g} MiB")
    headers = ["processes", "stall s, best (median)", "x 1 process", "MiB written"]
    print_table(headers, rows)


def row(label: str, figures: dict[str, Any], base: float) -> list[str]:
    stalls = figures["stalls"]
    best, median = min(stalls), statistics.median(stalls)
    written = f"{figures['written'] / MIB:.1f}"

    return [label, f"{best:.3f} ({median:.3f})", f"{best / base:.2f}", written]


if __name__ == "__main__":
    main()
