"""
The background writer: one worker thread that runs snapshot writes, one at a time.

At most one job is in flight: ``submit`` first waits for the one before it
(back-pressure: the training loop waits rather than memory growing). A job's
failure is kept until the loop asks, at ``flush``, ``submit`` or ``close``: it is
logged once, at ERROR, and raised there as the original exception, exactly once.
The worker blocks the stop signals, so that they reach the main thread (or the
watchdog) at once, never a thread stuck in a long write. Knows nothing of what the
jobs write.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

# Seconds between two looks of a waiting loop at the job in flight, so that the
# main thread's signal handlers run while it waits.
_POLL_SECONDS = 0.25

Job = Callable[[], object]


class BackgroundWriter:
    """A worker thread with at most one job in flight."""

    def __init__(self, block_signals: Sequence[int] = ()) -> None:
        self._block_signals = list(block_signals)
        self._changed = threading.Condition()
        # The job handed over and what it writes, until the worker takes it.
        self._next: tuple[Job, str] | None = None
        # True from submit() until the job has run.
        self._busy = False
        # What failed and how, until the loop is told.
        self._failure: tuple[str, BaseException] | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether a job is in flight."""
        return self._busy

    @property
    def failed(self) -> bool:
        """Whether a job failed and the loop was not told yet; cheap to ask."""
        return self._failure is not None

    def submit(self, job: Job, what: str) -> None:
        """
        Run ``job`` in the background once the job in flight is done.

        ``what`` names what the job writes, for the log.

        Raises:
            BaseException: The job before it failed (the original exception).
        """
        self.flush()
        with self._changed:
            self._next, self._busy = (job, what), True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="resumable-writer", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def flush(self) -> None:
        """
        Wait until no job is in flight.

        Raises:
            BaseException: A job failed since the last flush (the original
                exception, with its traceback); it is raised once.
        """
        with self._changed:
            while self._busy:
                self._changed.wait(_POLL_SECONDS)
            failure, self._failure = self._failure, None
        if failure is not None:
            what, error = failure
            # The error itself is raised: its text is said once, where it lands.
            logger.error(
                "background write failed: what=%s, error=%s", what, type(error).__name__
            )
            # The original exception, raised in this thread: a caller catches what
            # the write itself raised.
            raise error

    def close(self) -> None:
        """Flush, then end the worker thread; its failure is raised as in flush."""
        try:
            self.flush()
        finally:
            with self._changed:
                self._closing = True
                self._changed.notify_all()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            self._closing = False

    def _work(self) -> None:
        if self._block_signals:
            signal.pthread_sigmask(signal.SIG_BLOCK, self._block_signals)
        while True:
            with self._changed:
                while self._next is None and not self._closing:
                    self._changed.wait()
                if self._next is None:
                    return
                (job, what), self._next = self._next, None
            failure = None
            try:
                job()
            except BaseException as error:  # raised in the loop, at its next flush
                failure = (what, error)
            # What the job holds (a staged copy) goes now, not at the next job.
            del job
            with self._changed:
                self._failure = failure or self._failure
                self._busy = False
                self._changed.notify_all()
