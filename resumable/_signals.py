"""
Stop requests: signal handlers that only record the request, and a watchdog.

A handler sets a flag and nothing else; the runtime acts on it at its next safe
point. A second signal exits at once. Handlers the user installed are called too,
and restored when the run ends. The watchdog ends the process when the grace
period runs out, whatever the main thread is doing: every committed snapshot
stays as it was, since commits are atomic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

# How often the watchdog looks at the clock.
_WATCH_INTERVAL = 0.05

Handler = Callable[[int, FrameType | None], Any] | int | None


class StopRequest:
    """The request to stop: which signal, and when it came (monotonic seconds)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.since: float | None = None
        self.count = 0

    @property
    def requested(self) -> bool:
        return self.since is not None

    def request(self, signum: int | None) -> None:
        """Record a request; safe to call from a signal handler."""
        self.count += 1
        self.arrived(signum)

    def arrived(self, signum: int | None) -> None:
        """Start the grace period's clock, once: the signal came now."""
        if self.since is None:
            self.signal, self.since = signum, time.monotonic()

    def elapsed(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    """
    Turn names such as ``SIGTERM`` or ``TERM`` into signals.

    Raises:
        ValueError: A name is no signal of this platform.
    """
    found = []
    for name in names:
        text = name.strip().upper()
        text = text if text.startswith("SIG") else "SIG" + text
        try:
            found.append(signal.Signals[text])
        except KeyError:
            msg = f"{name!r} is not a signal here; use names such as SIGTERM or USR1."
            raise ValueError(msg) from None
    return found


class SignalCatcher:
    """Installs the flag-setting handlers for a run, then restores what was there."""

    def __init__(
        self,
        stop: StopRequest,
        signals: Sequence[signal.Signals],
        exit_code: int,
    ) -> None:
        self._stop = stop
        self.signals = list(signals)
        self._exit_code = exit_code
        self._previous: dict[signal.Signals, Handler] = {}
        self._pid = os.getpid()
        # Read end of the pipe that Python's C-level handler writes each signal's
        # number to at once, even while the main thread is stuck in native code.
        self.wakeup: int | None = None
        self._write_end: int | None = None
        self._previous_wakeup = -1

    def install(self) -> bool:
        """Install the handlers; return False where this is not the main thread."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("signals not caught: reason=run outside the main thread")
            return False
        try:
            for signum in self.signals:
                if signum not in self._previous:
                    self._previous[signum] = signal.signal(signum, self._handle)
        except (OSError, ValueError):
            self.restore()
            raise
        self.wakeup, self._write_end = os.pipe()
        os.set_blocking(self.wakeup, False)
        os.set_blocking(self._write_end, False)
        self._previous_wakeup = signal.set_wakeup_fd(
            self._write_end, warn_on_full_buffer=False
        )
        return True

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """
        Keep stop signals from the main thread while it is in long system calls.

        A signal delivered to a thread inside a large write waits for the call
        to return; blocked here, it goes to the watchdog's thread instead, which
        starts the grace period's clock at once and can end the process in time.
        """
        if (
            not self._previous
            or threading.current_thread() is not threading.main_thread()
        ):
            yield
            return
        before = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def restore(self) -> None:
        """Put back the handlers that were there, where ours are still installed."""
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        if self._write_end is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for end in (self.wakeup, self._write_end):
                os.close(end)  # type: ignore[arg-type]  # both set together
            self.wakeup = self._write_end = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Forked children (DataLoader workers) inherit this handler: there it
        # does nothing, so a signal to the whole group cannot kill them first.
        if os.getpid() != self._pid:
            return
        self._stop.request(signum)
        if self._stop.count > 1:
            # Invariant: commits are atomic, so exiting now leaves every committed
            # snapshot intact; an attempt in flight stays uncommitted.
            os.write(2, b"resumable: second signal, exiting now\n")
            os._exit(self._exit_code)
        previous = self._previous.get(signal.Signals(signum))
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)


class Watchdog:
    """
    Ends the process when a stop request outlives the grace period.

    It also starts the grace period's clock when a stop signal arrives, read from
    the catcher's wakeup pipe, for the handler itself only runs once the main
    thread is back in Python.
    """

    def __init__(
        self,
        stop: StopRequest,
        deadline: float,
        exit_code: int,
        catcher: SignalCatcher | None = None,
    ) -> None:
        self._stop = stop
        self._deadline = deadline
        self._exit_code = exit_code
        self._catcher = catcher
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="resumable-watchdog", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.is_set():
            self._wait_for_signals()
            if self._stop.requested and self._stop.elapsed() >= self._deadline:
                logger.error(
                    "grace period spent: seconds=%.1f, exiting now, "
                    "committed snapshots untouched",
                    self._stop.elapsed(),
                )
                os._exit(self._exit_code)

    def _wait_for_signals(self) -> None:
        catcher = self._catcher
        wakeup = None if catcher is None else catcher.wakeup
        if catcher is None or wakeup is None:
            self._done.wait(_WATCH_INTERVAL)
            return
        try:
            readable, _, _ = select.select([wakeup], [], [], _WATCH_INTERVAL)
            data = os.read(wakeup, 512) if readable else b""
        except OSError:  # closed by restore() while waiting
            self._done.wait(_WATCH_INTERVAL)
            return
        stops = {int(number) for number in catcher.signals}
        for number in data:
            if number in stops:
                self._stop.arrived(number)
