"""
Checksums computed beside the caller's reads and writes, in order.

A helper thread hashes the groups of buffers it is given while the caller goes on
reading or writing: xxhash, os.readv and os.writev all release the GIL. Where the
helper gets no core of its own and falls behind, the caller hashes waiting groups
itself. Small objects, and reads on a machine with no idle core, are hashed
inline, without a thread.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from resumable._snapshot import Hasher


def has_idle_core() -> bool:
    """
    Say whether a helper thread would likely find a core of its own: the
    1-minute load average leaves at least half a core of those this process
    may use. On a busy machine, a helper only adds switching between threads.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores > 1

    return load < cores - 0.5


class Hashing:
    """Hashes groups of buffers in the order given; see the module docstring."""

    def __init__(self, algorithm: str, *, beside: bool) -> None:
        self._hasher = Hasher(algorithm)
        self._waiting: collections.deque[Sequence[Any]] = collections.deque()
        # Held while one group is hashed, so that groups go in the order given.
        self._turn = threading.Lock()
        self._wake = threading.Condition()
        self._idle = self._stopping = self._abandoned = False
        self._error: BaseException | None = None
        self._helper: threading.Thread | None = None
        if beside:
            self._helper = threading.Thread(
                target=self._run, name="resumable-checksum", daemon=True
            )
            self._helper.start()

    def __enter__(self) -> Hashing:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is not None:
            self._abandoned = True
        self._stop()

    def give(self, group: Sequence[Any]) -> None:
        """Queue ``group`` to be hashed after those given before."""
        self._waiting.append(group)
        if self._helper is None:
            self._hash_waiting(blocking=True)
        elif self._idle:
            with self._wake:
                self._wake.notify()

    def help(self) -> None:
        """Hash waiting groups here if the helper has fallen more than one behind."""
        if len(self._waiting) > 1:
            self._hash_waiting(blocking=False)

    def hexdigest(self) -> str:
        """Return the checksum of all groups given, hashing what still waits."""
        self._hash_waiting(blocking=True)
        self._stop()
        if self._error is not None:
            raise self._error
        return self._hasher.hexdigest()

    def _hash_waiting(self, *, blocking: bool) -> None:
        while self._waiting and not self._abandoned:
            if not self._turn.acquire(blocking=blocking):
                return
            try:
                # Invariant: a group leaves the queue only while its hash is held.
                group = self._waiting.popleft() if self._waiting else ()
                for buffer in group:
                    self._hasher.update(buffer)
            finally:
                self._turn.release()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._idle = True
                self._wake.wait_for(self._has_work)
                self._idle = False
                if self._stopping:
                    return
            try:
                self._hash_waiting(blocking=True)
            except BaseException as error:  # raised in hexdigest(), never lost
                self._error, self._abandoned = error, True
                return

    def _has_work(self) -> bool:
        return self._stopping or (bool(self._waiting) and not self._abandoned)

    def _stop(self) -> None:
        if self._helper is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._helper.join()
        self._helper = None
