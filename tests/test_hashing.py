"""
Tests of ``resumable._hashing``: groups are hashed in the order given, whichever
thread hashes them, errors reach the caller, and a failed caller stops the helper.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import pytest

from resumable import _hashing
from resumable._hashing import Hashing, has_idle_core
from resumable._snapshot import checksum


def groups(count: int) -> list[list[memoryview]]:
    """Return ``count`` groups of random buffers, some above the GIL threshold."""
    generator = np.random.default_rng(count)
    return [
        [memoryview(generator.integers(0, 256, size, np.uint8)) for size in sizes]
        for sizes in ([70_000, 3], [200_000], [1, 2, 3], [0], [150_000, 90_000]) * 6
    ][:count]


@pytest.mark.parametrize("beside", [True, False])
@pytest.mark.parametrize("helping", [True, False])
def test_groups_are_hashed_in_order(beside: bool, helping: bool) -> None:
    """The checksum is that of all buffers in order, with or without the helper."""
    given = groups(30)
    whole = b"".join(bytes(view) for group in given for view in group)

    with Hashing("xxh3_64", beside=beside) as hashing:
        for group in given:
            hashing.give(group)
            if helping:
                hashing.help()
        found = hashing.hexdigest()

    assert checksum(whole) == found


def test_error_in_the_helper_reaches_the_caller() -> None:
    """A buffer the helper cannot hash raises from hexdigest(), not in the thread."""
    with Hashing("xxh3_64", beside=True) as hashing:
        hashing.give([memoryview(b"fine"), 12345])

        with pytest.raises(TypeError):
            hashing.hexdigest()


def give_and_fail(hashing: Hashing, count: int) -> None:
    """Give ``count`` groups, then fail as a read would."""
    for _ in range(count):
        hashing.give([b"group"])
    raise RuntimeError("the read failed")


def test_failed_caller_stops_the_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in the caller's block stops the helper without hashing what waits."""
    hashed: list[bytes] = []

    class Slow:
        def __init__(self, algorithm: str) -> None:
            pass

        def update(self, data: Any) -> None:
            time.sleep(0.01)
            hashed.append(bytes(data))

    monkeypatch.setattr(_hashing, "Hasher", Slow)

    with pytest.raises(RuntimeError), Hashing("xxh3_64", beside=True) as hashing:
        give_and_fail(hashing, 50)

    helpers = [t for t in threading.enumerate() if t.name == "resumable-checksum"]
    assert [] == helpers
    assert len(hashed) < 10


@pytest.mark.parametrize(("load", "expected"), [(0.4, True), (1.6, False)])
def test_idle_core_follows_the_load_average(
    monkeypatch: pytest.MonkeyPatch, load: float, expected: bool
) -> None:
    """On two cores, a load under one and a half leaves a core for a helper."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))

    assert expected == has_idle_core()
