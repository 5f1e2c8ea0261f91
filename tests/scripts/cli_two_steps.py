"""A script for the command-line tests with two steps, so one must be chosen."""

from __future__ import annotations

import attrs

import resumable


@attrs.define
class State:
    total: int = 0


@resumable.step(init=State, steps=2)
def first(state: State, step: int) -> None:
    """Count up."""
    state.total += 1
    print(f"ran first {step}")


@resumable.step(init=State, steps=2)
def second(state: State, step: int) -> None:
    """Count down."""
    state.total -= 1
    print(f"ran second {step}")
