"""
Runtime overhead per step: an empty step run by resumable against a plain loop.

    python benchmarks/bench_step_overhead.py [--steps 20000]

One snapshot is written at the end (every = steps), on in-memory storage, so the
figure is the loop's own cost per step, with and without a resumable.iterate loop.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import attrs

import resumable
from resumable import testing


@attrs.define
class Counter:
    count: int = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--steps", type=int, default=20000)
    steps = parser.parse_args().steps

    @resumable.step(init=Counter, steps=steps, every=steps)
    def empty(state: Counter, step: int) -> None:
        state.count += 1

    @resumable.step(init=Counter, steps=steps, every=steps)
    def one_item(state: Counter, step: int) -> None:
        for _ in resumable.iterate(range(1)):
            state.count += 1

    state = Counter()
    started = time.perf_counter()
    for step in range(steps):
        empty(state, step)
    floor = (time.perf_counter() - started) / steps
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, {steps} steps")
    print(f"{'loop':40} {'us/step':>8} {'overhead us':>12}")
    print(f"{'plain python loop calling the step':40} {floor * 1e6:8.2f} {0:12.2f}")
    for name, step in [
        ("resumable, empty step", empty),
        ("resumable, one iterate item", one_item),
    ]:
        started = time.perf_counter()
        testing.run_steps(step)
        per_step = (time.perf_counter() - started) / steps
        print(f"{name:40} {per_step * 1e6:8.2f} {(per_step - floor) * 1e6:12.2f}")


if __name__ == "__main__":
    main()
