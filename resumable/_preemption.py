"""
Preemption of one run: stop requests, the grace budget, and simulated preemption.

The budget: the grace period counts from the first signal; the runtime keeps a
margin for exiting, knows how long its snapshots took, and never starts one that
cannot finish in what is left. The watchdog ends the process at the deadline in
every case.
"""

from __future__ import annotations

import logging
import signal
from contextlib import AbstractContextManager
from types import TracebackType

from resumable._settings import Settings
from resumable._signals import SignalCatcher, StopRequest, Watchdog, parse_signals

logger = logging.getLogger(__name__)

# Part of the grace period kept for exiting (interpreter shutdown, data workers),
# capped at _MARGIN_CAP seconds.
_MARGIN_SHARE = 0.1
_MARGIN_CAP = 2.0
# A snapshot's time is estimated as the slowest recent one times this, plus a bit.
_ESTIMATE_FACTOR = 1.5
_ESTIMATE_PAD = 0.25
# Throughput assumed for a first snapshot, before any was timed (bytes a second).
_ASSUMED_THROUGHPUT = 50e6


class Preemption:
    """Stop requests and the grace budget of one run."""

    def __init__(self, settings: Settings, stop: StopRequest | None = None) -> None:
        # A request may come from handlers installed before the run began.
        self.stop = stop or StopRequest()
        self.grace = settings.grace
        self.deadline = settings.grace - min(
            _MARGIN_CAP, settings.grace * _MARGIN_SHARE
        )
        self.exit_code = settings.preempted_exit_code
        self._catcher = SignalCatcher(
            self.stop, parse_signals(settings.signals), self.exit_code
        )
        self._watchdog = Watchdog(
            self.stop, self.deadline, self.exit_code, self._catcher
        )
        self._write_seconds: list[float] = []
        # Bytes of the state's tensors and arrays, for a first estimate.
        self.state_bytes = 0
        # (step, loop, item) at which resumable.testing asks for a stop; item
        # None means at the end of the step, loop None in any loop.
        self.simulate: tuple[int, int | None, int | None] | None = None
        self.preempted = False
        # The rank whose stop request this one follows, where another rank's.
        self.peer: int | None = None

    def __enter__(self) -> Preemption:
        self._catcher.install()
        self._watchdog.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._watchdog.stop()
        self._catcher.restore()

    def deferred(self) -> AbstractContextManager[None]:
        """A block, such as a snapshot write, during which signals go elsewhere."""
        return self._catcher.deferred()

    @property
    def signals(self) -> list[signal.Signals]:
        """The signals that request a stop."""
        return list(self._catcher.signals)

    @property
    def requested(self) -> bool:
        return self.stop.requested

    def check_simulated(self, index: int, loop: int | None, item: int | None) -> None:
        """Request a stop where resumable.testing asked for one."""
        if self.simulate is None:
            return
        at_step, at_loop, at_item = self.simulate
        if (at_step, at_item) == (index, item) and at_loop in (None, loop):
            self.stop.request(None)

    def stop_for_rank(self, rank: int) -> None:
        """Stop because rank ``rank`` of the job asked to; the grace runs from now."""
        self.peer = rank
        self.stop.arrived(None)

    def record_write(self, seconds: float) -> None:
        self._write_seconds = [*self._write_seconds[-4:], seconds]

    def write_fits(self) -> tuple[bool, str]:
        """Say whether a snapshot started now ends before the deadline, and why."""
        left = self.deadline - self.stop.elapsed()
        if self._write_seconds:
            estimate = max(self._write_seconds) * _ESTIMATE_FACTOR + _ESTIMATE_PAD
        else:
            estimate = self.state_bytes / _ASSUMED_THROUGHPUT + 2 * _ESTIMATE_PAD
        reason = f"estimated {estimate:.2f}s, {left:.2f}s left of grace {self.grace:g}s"
        return estimate <= left, reason

    def cause(self) -> str:
        if self.stop.signal is None:
            return "simulated" if self.peer is None else f"rank {self.peer}"
        return signal.Signals(self.stop.signal).name
