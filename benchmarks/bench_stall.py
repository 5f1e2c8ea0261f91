"""
The training loop's stall per snapshot, and the memory a snapshot takes, side by side.

    python benchmarks/bench_stall.py [--mib 1024] [--steps 5] [--hide 2] [--repeat 1]
        [--states flat,model] [--methods copy,resumable,dcp] [--work sleep]

A step's body sleeps (or, with --work compute, multiplies matrices) for --hide
times a raw durable write of the state, long enough to hide a write made in the
background, and changes every tensor in place. Each method runs the same loop of
--steps steps twice: snapshotting after every step, and only after the last one.

  stall per snapshot = (wall time with snapshots - wall time without)
                       / (steps - 1)

that is, the wall time less the steps' time and the loop's own overhead, measured
in the same process by the run without snapshots (both end with a snapshot that
the run waits for, the final one). The time between one
step's body and the next gives the stall of each snapshot: the first (which may
allocate staging memory) and the median of the others. Each is printed with its
ratio to one copy of the state into memory allocated beforehand, the best of ten
in the same process, before and after the runs (target: the median at most
1.5 x). A median far above the first stall means the step did not hide the
write: the loop waited for the previous snapshot (back-pressure).

Peak extra memory is the rise of the resident high-water mark (VmHWM) over both
runs (staging memory kept from the first still counts), in MiB and as a ratio to
the state (target: one staging copy plus a small constant).

Methods: ``copy`` (the ideal: a copy into buffers reused, nothing written),
``resumable`` (``resumable.run`` with every=1, as a user runs it) and ``dcp``
(torch.distributed.checkpoint's async_save after each step, waiting for the
previous one first). States: ``flat`` (16 float32 tensors, --mib) and ``model``
(a transformer of torch.nn modules and its AdamW state, 352 tensors, --width).
Each method runs in a process of its own, so that each starts with clean memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resumable
from benchmarks._common import (
    MIB,
    PeakMemory,
    flat_tensors,
    fresh_folder,
    nbytes,
    print_machine,
    print_table,
    quiet_dcp,
    ratio,
    timed,
)
from benchmarks._methods import DCP_THREADS, FlatState, RawBytes, warm_up

# The target: a snapshot stalls the loop at most this many copies.
STALL_TARGET = 1.5
METHODS = ("copy", "resumable", "dcp")
STATES = ("flat", "model")


def main(argv: Sequence[str] | None = None) -> None:
    options = parse(argv)
    print_machine(options.folder)
    with tempfile.TemporaryDirectory(dir=options.folder) as folder:
        for state in options.states:
            print()
            measure_state(options, state, folder)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=float, default=1024, help="flat state size")
    parser.add_argument("--tensors", type=int, default=16, help="flat state tensors")
    parser.add_argument("--width", type=int, default=1024, help="model width")
    parser.add_argument("--vocab", type=int, default=8192, help="model vocabulary")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hide", type=float, default=2, help="step / raw write")
    parser.add_argument("--step-seconds", type=float, help="instead of --hide")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--states", type=_names(STATES), default=list(STATES))
    parser.add_argument("--methods", type=_names(METHODS), default=list(METHODS))
    parser.add_argument("--work", choices=("sleep", "compute"), default="sleep")
    parser.add_argument("--folder", default=os.getcwd())
    parser.add_argument(
        "--in-process", action="store_true", help="no child processes (quick checks)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.steps < 3:
        parser.error("--steps must be at least 3")

    return options


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            msg = f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}"
            raise argparse.ArgumentTypeError(msg)
        return names

    return parse


def measure_state(options: argparse.Namespace, state: str, folder: str) -> None:
    spec = {
        "state": state,
        "mib": options.mib,
        "tensors": options.tensors,
        "width": options.width,
        "vocab": options.vocab,
        "steps": options.steps,
        "work": options.work,
        "folder": folder,
    }
    calibration = run_role(options, {**spec, "role": "calibrate"})
    seconds = options.step_seconds or options.hide * calibration["write"]
    print(
        f"state {state}: {calibration['description']}; raw durable write "
        f"{calibration['write']:.3f} s; {options.steps} steps of {seconds:.3f} s "
        f"({options.work}); {options.repeat} repeat(s)\n"
    )
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in options.methods}
    for _ in range(options.repeat):
        for method in options.methods:
            role = {**spec, "role": method, "seconds": seconds}
            results[method].append(run_role(options, role))
    report(results, calibration["bytes"], options.steps)


def run_role(options: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Measure in a child process of its own, or here with --in-process."""
    if options.in_process:
        return child(spec)
    completed = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        msg = f"{spec['role']} failed:\n{completed.stdout}{completed.stderr}"
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(completed.stdout.splitlines()[-1])
    return result


def report(results: dict[str, list[dict[str, Any]]], size: int, steps: int) -> None:
    rows = []
    for method, runs in results.items():
        best = min(runs, key=lambda run: stalls(run, steps)["median"])
        found = stalls(best, steps)
        copy = best["copy"]
        extra = best["extra"]
        rows.append(
            [
                method,
                f"{copy:.3f}",
                f"{found['first']:.3f}",
                f"{found['median']:.3f}",
                ratio(found["median"], copy),
                f"{found['mean']:.3f}",
                ratio(found["mean"], copy),
                "-" if extra is None else f"{extra / MIB:.0f}",
                ratio(extra, size),
            ]
        )
    headers = ["method", "copy s", "first stall s", "median stall s", "x copy"]
    headers += ["mean stall s (wall)", "x copy", "peak extra MiB", "x state"]
    print_table(headers, rows)
    print(
        f"\nstall target: median <= {STALL_TARGET} x copy; memory target: about "
        "1 x state (one staging copy) plus a small constant"
    )


def stalls(run: dict[str, Any], steps: int) -> dict[str, float]:
    """Return the first, median and mean stall per snapshot of one measurement."""
    base = statistics.median(run["base"]["gaps"])
    gaps = [gap - base for gap in run["snap"]["gaps"]]
    wall = run["snap"]["wall"] - run["base"]["wall"]
    return {
        "first": gaps[0],
        "median": statistics.median(gaps[1:]),
        "mean": wall / (steps - 1),
    }


# What runs in the child process.


@attrs.define
class ModelState:
    """The state resumable snapshots for the real model."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


@attrs.define
class Subject:
    """A state to snapshot, in the forms each method takes."""

    state: Any
    tensors: list[torch.Tensor]
    state_dict: Callable[[], dict[str, Any]]
    description: str


def child(spec: dict[str, Any]) -> dict[str, Any]:
    subject = build(spec)
    if spec["role"] == "calibrate":
        return calibrate(subject, spec["folder"])
    copy = measure_copy(subject.tensors)
    body, times = make_body(subject, spec["seconds"], spec["work"])
    loop = LOOPS[spec["role"]]
    where = fresh_folder(spec["folder"], f"{spec['role']}-{os.getpid()}")
    # Over both runs: staging memory kept from the first run's final snapshot
    # still counts.
    with PeakMemory() as memory:
        base = loop(subject, body, times, spec["steps"], False, where)
        snap = loop(subject, body, times, spec["steps"], True, where)
    fresh_folder(spec["folder"], f"{spec['role']}-{os.getpid()}")
    # Copies before and after the runs, so that a busy moment spoils neither.
    copy = min(copy, measure_copy(subject.tensors))

    return {"copy": copy, "base": base, "snap": snap, "extra": memory.extra}


def build(spec: dict[str, Any]) -> Subject:
    if spec["state"] == "flat":
        tensors = flat_tensors(spec["mib"], spec["tensors"])
        return Subject(
            FlatState(tensors),
            tensors,
            lambda: {f"t{index:05d}": t for index, t in enumerate(tensors)},
            f"{len(tensors)} float32 tensors, {nbytes(tensors) / MIB:.0f} MiB",
        )
    model, optimizer = build_model(spec["width"], spec["vocab"])
    tensors = [*model.state_dict().values()]
    tensors += [
        value
        for moments in optimizer.state.values()
        for value in moments.values()
        if isinstance(value, torch.Tensor)
    ]
    return Subject(
        ModelState(model, optimizer),
        tensors,
        lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        f"transformer of width {spec['width']} with AdamW state: {len(tensors)} "
        f"tensors, {nbytes(tensors) / MIB:.0f} MiB",
    )


def build_model(
    width: int, vocab: int, layers: int = 7
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """
    Return a transformer and its AdamW optimizer after one training step.

    7 layers of 12 parameters, an embedding, a final norm (2) and a head: 88
    parameters, each with two moments and a step count in AdamW's state.
    """
    torch.manual_seed(0)
    heads = max(1, width // 64)
    layer = torch.nn.TransformerEncoderLayer(
        width, heads, 4 * width, dropout=0.0, batch_first=True
    )
    model = torch.nn.Sequential(
        torch.nn.Embedding(vocab, width),
        torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
        torch.nn.LayerNorm(width),
        torch.nn.Linear(width, vocab, bias=False),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(vocab, (2, 16))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    return model, optimizer


def calibrate(subject: Subject, folder: str) -> dict[str, Any]:
    raw = RawBytes(subject.tensors)
    where = fresh_folder(folder, f"calibrate-{os.getpid()}")
    warm_up(subject.tensors, folder)
    write = min(timed(lambda: raw.save(where)) for _ in range(2))
    fresh_folder(folder, f"calibrate-{os.getpid()}")
    return {
        "write": write,
        "bytes": nbytes(subject.tensors),
        "description": subject.description,
    }


def measure_copy(tensors: list[torch.Tensor]) -> float:
    """Return the best of five copies of ``tensors`` into memory touched before."""
    copies = [tensor.clone() for tensor in tensors]

    return min(timed(lambda: copy_into(copies, tensors)) for _ in range(5))


def copy_into(copies: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
    for copy, tensor in zip(copies, tensors, strict=True):
        copy.copy_(tensor)


def make_body(
    subject: Subject, seconds: float, work: str
) -> tuple[Callable[[Any, int], None], list[float]]:
    """Return a step body that takes ``seconds``, and the list its times go to."""
    times: list[float] = []
    changed = [tensor for tensor in subject.tensors if tensor.is_floating_point()]
    compute = make_compute(seconds) if work == "compute" else None

    def body(state: Any, step: int) -> None:
        times.append(time.perf_counter())
        with torch.no_grad():
            for tensor in changed:
                tensor.view(-1)[0] += 1
        if compute is None:
            time.sleep(seconds)
        else:
            compute()
        times.append(time.perf_counter())

    return body, times


def make_compute(seconds: float) -> Callable[[], None]:
    """Return work of about ``seconds`` on this machine alone: matrix products."""
    left, right = torch.randn(256, 256), torch.randn(256, 256)
    one = min(timed(lambda: torch.mm(left, right)) for _ in range(20))
    count = max(1, round(seconds / one))

    def compute() -> None:
        for _ in range(count):
            torch.mm(left, right)

    return compute


def gaps(times: list[float]) -> list[float]:
    """Return the time between each step body's end and the next one's start."""
    return [times[index + 1] - times[index] for index in range(1, len(times) - 1, 2)]


Loop = Callable[
    [Subject, Callable[[Any, int], None], list[float], int, bool, str],
    dict[str, Any],
]


def loop_copy(
    subject: Subject,
    body: Callable[[Any, int], None],
    times: list[float],
    steps: int,
    snapshots: bool,
    folder: str,
) -> dict[str, Any]:
    """The ideal: each snapshot a copy into buffers made once, nothing written."""
    times.clear()
    copies: list[torch.Tensor] = []
    started = time.perf_counter()
    for index in range(steps):
        body(subject.state, index)
        if snapshots or index == steps - 1:
            if copies:
                copy_into(copies, subject.tensors)
            else:
                copies = [tensor.clone() for tensor in subject.tensors]

    return {"wall": time.perf_counter() - started, "gaps": gaps(times)}


def loop_resumable(
    subject: Subject,
    body: Callable[[Any, int], None],
    times: list[float],
    steps: int,
    snapshots: bool,
    folder: str,
) -> dict[str, Any]:
    """A user's run: resumable.run of the step, snapshots every step or at the end."""
    times.clear()
    every = 1 if snapshots else steps
    state = subject.state

    @resumable.step(init=lambda: state, steps=steps, every=every)
    def train(state: Any, step: int) -> None:
        body(state, step)

    where = fresh_folder(folder, f"resumable-every-{every}")
    started = time.perf_counter()
    resumable.run(train, storage=where, steps=steps, every=every)

    return {"wall": time.perf_counter() - started, "gaps": gaps(times)}


def loop_dcp(
    subject: Subject,
    body: Callable[[Any, int], None],
    times: list[float],
    steps: int,
    snapshots: bool,
    folder: str,
) -> dict[str, Any]:
    """DCP's way: async_save after a step, once the previous one has finished."""
    times.clear()
    future = None
    started = time.perf_counter()
    with quiet_dcp():
        for index in range(steps):
            body(subject.state, index)
            writer = dcp.FileSystemWriter(
                fresh_folder(folder, f"dcp-{snapshots}-{index}"),
                thread_count=DCP_THREADS,
            )
            if snapshots:
                if future is not None:
                    future.result()
                future = dcp.async_save(
                    subject.state_dict(), storage_writer=writer, no_dist=True
                )
            elif index == steps - 1:
                dcp.save(subject.state_dict(), storage_writer=writer, no_dist=True)
        if future is not None:
            future.result()

    return {"wall": time.perf_counter() - started, "gaps": gaps(times)}


LOOPS: dict[str, Loop] = {
    "copy": loop_copy,
    "resumable": loop_resumable,
    "dcp": loop_dcp,
}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
