"""
Fencing between incarnations of one run that overlap on one storage.

A pod still inside its grace period may be writing while its replacement starts.
Each start claims the next incarnation number by creating its claim exclusively;
the newest claim holds the run. Before every commit and deletion an incarnation
checks that no newer claim exists; an older one stops without writing
(SupersededError) and says which incarnation took over. Its number goes into each
manifest it commits, so that of two commits of one generation the newer
incarnation's comes first.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from resumable._snapshot import incarnation_name
from resumable._storage import Storage
from resumable.errors import StorageError, SupersededError

logger = logging.getLogger(__name__)

# Claims raced for before giving up: each lost race means another start won.
_CLAIM_TRIES = 32
# Older claims kept beside the newest, for the logs of a post-mortem.
_CLAIMS_KEPT = 8
# Seconds between checks at step ends, so that a superseded incarnation stops
# training soon even when it snapshots seldom; each check is one listing.
CHECK_INTERVAL = 10.0


class Lease:
    """This process's claim on a run's storage."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        # The number claimed; 0 before claim().
        self.number = 0
        self._checked = time.monotonic()

    def claim(self) -> int:
        """
        Claim the next incarnation number; return it.

        Raises:
            StorageError: Every number tried was taken by a racing start.
        """
        for _ in range(_CLAIM_TRIES):
            claims = self.storage.claims()
            number = max(claims, default=0) + 1
            if self.storage.create(incarnation_name(number), _record()):
                self.number = number
                self._report(claims)
                self._prune(claims)
                return number
        msg = (
            f"Could not claim an incarnation of the run at {self.storage.url}: "
            f"{_CLAIM_TRIES} other starts claimed first. Run one job per storage."
        )
        raise StorageError(msg)

    def check_now_and_then(self, action: str) -> None:
        """Check as ``check`` does, at most once every CHECK_INTERVAL seconds."""
        if time.monotonic() - self._checked >= CHECK_INTERVAL:
            self.check(action)

    def check(self, action: str) -> None:
        """
        Raise SupersededError where a newer incarnation has claimed the run.

        ``action`` says what is refused (``commit``, ``prune``), for the message.
        """
        if not self.number:
            return
        self._checked = time.monotonic()
        newer = [number for number in self.storage.claims() if number > self.number]
        if not newer:
            return
        newest = max(newer)
        holder = _describe(self._read(newest))
        msg = (
            f"Incarnation {self.number} of this run stops before it could {action}: "
            f"incarnation {newest} ({holder}) started on {self.storage.url} since, "
            "and holds the run now. Nothing of it was overwritten; if this was not "
            "an old pod or job still shutting down, two jobs share one --storage."
        )
        raise SupersededError(msg)

    def _report(self, claims: dict[int, str]) -> None:
        if not claims:
            logger.info("incarnation claimed: number=%d", self.number)
            return
        previous = max(claims)
        logger.info(
            "incarnation claimed: number=%d, fences=%d (%s)",
            self.number,
            previous,
            _describe(self._read(previous)),
        )

    def _prune(self, claims: dict[int, str]) -> None:
        for number in sorted(claims)[:-_CLAIMS_KEPT]:
            self.storage.delete_object(claims[number])

    def _read(self, number: int) -> dict[str, Any]:
        try:
            record = json.loads(self.storage.read(incarnation_name(number)))
        except (StorageError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}


def _record() -> bytes:
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        # Tells this start's claim from any other, should a resend find it.
        "token": uuid.uuid4().hex,
    }
    return json.dumps(record).encode()


def _describe(record: dict[str, Any]) -> str:
    started = record.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
        if isinstance(started, int | float)
        else "unknown time"
    )
    return f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, {when}"
