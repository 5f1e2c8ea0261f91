"""A one-line progress display for the command line: step, metrics, rate, time left."""

from __future__ import annotations

import time
from typing import TextIO

# Least time between two printed lines where the stream is no terminal.
_LINE_INTERVAL = 2.0


class ProgressDisplay:
    """Shows the steps done, the latest metrics and the time left on a stream."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._started = time.monotonic()
        self._first: int | None = None
        self._printed = 0.0

    def __call__(self, done: int, total: int, metrics: dict[str, float] | None) -> None:
        now = time.monotonic()
        if self._first is None:
            # The rate counts from the first step shown: start-up is not a step.
            self._first, self._started = done, now
        last = done >= total
        if not self._live and not last and now - self._printed < _LINE_INTERVAL:
            return
        self._printed = now
        line = self.format(done, total, metrics, now)
        if self._live:
            self._stream.write("\r\x1b[2K" + line + ("\n" if last else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def format(
        self, done: int, total: int, metrics: dict[str, float] | None, now: float
    ) -> str:
        width = len(str(total))
        parts = [f"step {done:{width}d}/{total} ({100 * done // max(total, 1):3d}%)"]
        parts += [f"{key}={value:.4g}" for key, value in (metrics or {}).items()]
        ran = done - (self._first or 0)
        if ran > 0:
            per_step = (now - self._started) / ran
            parts.append(f"{per_step:.3g} s/step")
            parts.append(f"{_duration(per_step * (total - done))} left")

        return "  ".join(parts)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    )
