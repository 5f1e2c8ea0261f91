"""
A run of many short steps, a snapshot after each, for the stall-during-preemption test.

Usage: python stall_train.py STORAGE_URL GRACE_SECONDS. It prints "ready" when
step 4 starts; snapshots 1 to 3 are committed by then (snapshot 4 may still be
written in the background). Exits 1 when preempted.
"""

from __future__ import annotations

import logging
import sys
import time

import attrs

import resumable


@attrs.define
class Progress:
    done: list[int] = attrs.Factory(list)


def start() -> Progress:
    return Progress()


@resumable.step(init=start, steps=10_000, every=1, keep=3)
def train(state: Progress, step: int) -> None:
    if step == 4:
        print("ready", flush=True)
    state.done.append(step)
    time.sleep(0.01)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = resumable.run(train, storage=sys.argv[1], grace=float(sys.argv[2]))
    sys.exit(1 if result.preempted else 0)
