"""
A run whose step 2 sleeps without a safe point, for tests that send real signals.

Usage: python preempt_sleeper.py STORAGE_URL GRACE_SECONDS. It prints "ready" when
step 2 starts sleeping; steps 0 and 1 are committed by then.
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


@resumable.step(init=start, steps=4, every=1, keep=5)
def train(state: Progress, step: int) -> None:
    if step == 2:
        print("ready", flush=True)
        # A handler only sets a flag, so the sleep goes on after a signal.
        time.sleep(30)
    state.done.append(step)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = resumable.run(train, storage=sys.argv[1], grace=float(sys.argv[2]))
    sys.exit(1 if result.preempted else 0)
