"""What a run tells: metrics.jsonl (every number, one JSON object per logged step), and on the screen a short
progress line with the few numbers that matter, and a progress bar with an ETA for every long phase."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

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
    metrics in memory (history) for the summary and the plots. A tracker (lifecycle/tracking.py: --tracker) is
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


class StepLog:
    """What a run records of its steps (Run.log): metrics.jsonl through a MetricsLog (rank 0, mirrored to --tracker),
    the progress line of the recipe's `show` metrics, the bar of the steps with its ETA, and the throughput. Values
    may be tensors on the device: they are read back only when logged, averaged over the processes."""

    def __init__(self, show, steps: int, log_every: int):
        self.show, self.steps, self.every = show, steps, log_every
        self.device, self.world, self.master = torch.device("cpu"), 1, True  # (set by Run once it has them)
        self.start = time.time()
        self._log = self._bar = None
        self._tokens, self._t_log = 0, time.time()

    @property
    def is_open(self) -> bool:
        return self._log is not None

    def open(self, out: Path, tracker, upto: int | None = None):
        """metrics.jsonl in the run folder, appended to; with upto (a --resume's checkpoint step) the lines up to
        it are the history (the file itself changes only in rewrite, once the checkpoint has loaded)."""
        path = out / "metrics.jsonl"
        lines = path.read_text().splitlines() if upto is not None and path.is_file() else []
        self._log = MetricsLog(path, [m for m in map(json.loads, lines) if m.get("step", 0) <= upto], tracker)

    def rewrite(self):
        """metrics.jsonl without the steps after the resumed checkpoint: they run again, each is to be there once."""
        self._log.rewrite()

    def discard(self, status: str):
        """Close the log of a run that never began (or a refused resume); an empty metrics.jsonl goes with it."""
        if self._log is not None:
            path = self._log.path
            self._log.close(status)
            self._log = None
            if path.is_file() and path.stat().st_size == 0:
                path.unlink()

    def close(self, status: str):
        if self._log is not None:
            self._log.close(status)
            self._log = None

    def start_steps(self, done: int):
        """Training begins after `done` steps (a --resume's): the bar of the steps and the throughput clock."""
        self._t_log = time.time()
        self._bar = Progress(self.steps - done, "step", enabled=self.master)

    def close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def read_back(self, values: list, average: bool = True) -> list[float]:
        """Numbers and one-element tensors as floats, averaged over the processes (every rank must call it then):
        one collective and one wait for the device for all of them."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        t = torch.stack([torch.as_tensor(v, dtype=dtype).detach().to(self.device).reshape(()) for v in values])
        if average and self.world > 1:
            torch.distributed.all_reduce(t)
            t /= self.world
        return t.tolist()

    def __call__(self, step: int, **metrics):
        """One line in metrics.jsonl (rank 0) and the progress line (an evaluation, say; values read back here)."""
        if not self.master:
            return
        metrics = dict(zip(metrics, self.read_back(list(metrics.values()), average=False))) if metrics else {}
        metrics = {"step": step, **metrics, "elapsed_s": round(time.time() - self.start, 2)}
        self._log.write(metrics)
        line = progress_line(metrics, self.show, self.steps)
        if "tokens_per_s" in metrics:  # a training step: throughput, time so far and to go
            eta = self._bar.eta() if self._bar is not None else None
            line += f" | {fmt(metrics['tokens_per_s'])} tok/s | {clock(metrics['elapsed_s'])}"
            line += f", eta {clock(eta)}" if eta is not None else ""
        if self._bar is not None:
            self._bar.write(line)  # above the bar of the steps
        else:
            print(line, flush=True)

    def count(self, tokens):
        """A step is done: its tokens (this process's; a tensor is fine) count towards the throughput."""
        self._tokens = self._tokens + tokens
        if self._bar is not None:
            self._bar.update()

    def due(self, step: int) -> bool:
        """Every --log-every steps, the first and the last."""
        return step % self.every == 0 or step in (1, self.steps)

    def step(self, step: int, **metrics):
        """The step's metrics (None: a statistic this step has not) averaged over the processes, with the tokens
        per second since the last such line; every rank calls it."""
        metrics = {k: v for k, v in metrics.items() if v is not None}
        numbers = self.read_back([self._tokens, *metrics.values()])
        tokens_per_s = numbers[0] * self.world / max(time.time() - self._t_log, 1e-9)
        self(step, **dict(zip(metrics, numbers[1:])), tokens_per_s=tokens_per_s)
        self._tokens, self._t_log = 0, time.time()

    @property
    def history(self) -> list[dict]:
        return self._log.history if self._log is not None else []

    def curve(self, key: str) -> list[tuple[float, float]]:
        """[(step, value)] of every logged entry that has key, for plot_curves."""
        return self._log.curve(key) if self._log is not None else []
