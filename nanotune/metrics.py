"""What a run tells: metrics.jsonl (every number, one JSON object per logged step), and on the screen a short
progress line with the few numbers that matter, and a progress bar with an ETA for every long phase."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from .utils import atomic_write


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


class MetricsLog:
    """metrics.jsonl, appended to and flushed line by line (a killed run keeps every line written), and the same
    metrics in memory (history) for the summary and the plots. A tracker (nanotune/tracking.py: --tracker) is
    given every line too, from the first write on, the history kept by a --resume first."""

    def __init__(self, path: Path, history: list[dict] | None = None, tracker=None):
        self.path, self.tracker = path, tracker
        self.history = list(history or [])
        self._mirrored = 0  # the lines of history the tracker has
        self._file = open(path, "a")

    def write(self, metrics: dict):
        self.history.append(metrics)
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        if self.tracker is not None:
            for line in self.history[self._mirrored :]:
                self.tracker.log(line)
                self._mirrored += 1

    def rewrite(self):
        """metrics.jsonl as history holds it (whole or not at all), and appended to from there."""
        self._file.close()
        atomic_write(self.path, "".join(json.dumps(m) + "\n" for m in self.history))
        self._file = open(self.path, "a")

    def curve(self, key: str) -> list[tuple[float, float]]:
        """[(step, value)] of every logged entry that has key, for plot_curves."""
        return [(m["step"], m[key]) for m in self.history if m.get(key) is not None]

    def close(self, status: str = "finished"):
        self._file.close()
        if self.tracker is not None:
            self.tracker.close(status)


def progress_line(metrics: dict, keys, steps: int | None = None) -> str:
    """step N/M | key value | ... for the keys present, each number to 4 significant digits."""
    step = f"step {metrics['step']}" + (f"/{steps}" if steps else "")
    return " | ".join([step] + [f"{k} {fmt(metrics[k])}" for k in keys if metrics.get(k) is not None])
