"""Progress output for long work: a bar with an ETA on a terminal, a plain line every few seconds in a log file,
and numbers as a person reads them in a progress line. Every phase that takes more than a moment uses it (data
preparation, evaluation, sampling, the training steps' bar in lifecycle/metrics.py)."""

from __future__ import annotations

import math
import sys
import time


def fmt(value) -> str:
    """A number as a person reads it in a progress line: 4 significant digits (9024, 37.41, 0.001234)."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def clock(seconds: float) -> str:
    """Seconds as m:ss, or h:mm:ss past an hour."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Where a long phase is and when it will end. On a terminal, a bar redrawn in place after every item; when the
    output goes to a file, a plain line whenever `every` seconds passed without one (so a log holds no bars, and no
    stretch of more than `every` seconds goes without output). write() prints a line above the bar."""

    def __init__(self, total: int, what: str, enabled: bool = True, every: float = 10.0, stream=None):
        self.total, self.what, self.enabled, self.every = max(total, 1), what, enabled, every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = self.last_output = time.time()
        self.done = 0

    def eta(self) -> float | None:
        """Seconds left at the pace so far (None before the first item)."""
        return (time.time() - self.start) / self.done * (self.total - self.done) if self.done else None

    def status(self) -> str:
        bar = "#" * round(20 * self.done / self.total)
        where = f"[{bar:<20}] {self.done}/{self.total}" if self.tty else f"{self.done}/{self.total}"
        eta = self.eta()
        return f"{self.what} {where}" + (f", eta {clock(eta)}" if eta is not None else "")

    def update(self, done: int | None = None):
        """Count one more item done (or set the count)."""
        self.done = self.done + 1 if done is None else done
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self.status())
            self.stream.flush()
        elif time.time() - self.last_output >= self.every:
            self.write(self.status())

    def write(self, line: str):
        """A line of its own (a log line), above the bar."""
        if not self.enabled:
            return
        self.stream.write(("\r\033[K" if self.tty else "") + line + "\n")
        if self.tty and self.done < self.total:
            self.stream.write(self.status())
        self.stream.flush()
        self.last_output = time.time()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def progress(items, what: str, enabled: bool = True, total: int | None = None, **kwargs):
    """Iterate over items, showing a Progress bar for them (see Progress; kwargs: every, stream)."""
    items = list(items) if total is None else items
    bar = Progress(len(items) if total is None else total, what, enabled, **kwargs)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
