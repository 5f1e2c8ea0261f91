"""A small step for the command-line tests: sums the steps and echoes its arguments."""

from __future__ import annotations

import sys

import attrs

import resumable

print(f"script argv: {sys.argv[1:]}")


@attrs.define
class State:
    total: int = 0


@resumable.step(init=State, steps=3)
def train(state: State, step: int) -> dict[str, float]:
    """Add the step index to the total."""
    state.total += step
    print(f"ran step {step}")
    return {"total": state.total}
