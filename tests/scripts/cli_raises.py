"""A script for the command-line tests whose step raises at step 1."""

from __future__ import annotations

import attrs

import resumable


@attrs.define
class State:
    total: int = 0


@resumable.step(init=State, steps=3)
def train(state: State, step: int) -> None:
    """Count, then fail in the second step."""
    if step == 1:
        raise ValueError("boom at step 1")
    state.total += 1
