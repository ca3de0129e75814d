"""--tracker: every line of metrics.jsonl mirrored, under the same names and steps, to TensorBoard or Weights &
Biases, to watch a run (or compare runs) in their viewers. metrics.jsonl stays the record: the summary, the plots
and --resume read it, never a tracker.

The tracker's package is imported when the run opens, so a missing one stops the run before it starts; its files
are written from the first logged line on, so a run refused or stopped before it logs leaves none. A tracker is
given the kept history first (MetricsLog), so that after a --resume it holds what metrics.jsonl holds."""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from ..utils import NanotuneError

TRACKERS = ("none", "tensorboard", "wandb")
TRACKER_FILES = ("tensorboard", "wandb")  # what the trackers write into --out


def scalars(metrics: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl line, by name: all but its step and what is not a number (text, None)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Tracker:
    """log(metrics): one metrics.jsonl line (it has "step"); close(status): flush and end, the run's summary.json
    status given ("finished", "interrupted", "failed", ...). The backend (a subclass's start, write, finish) starts
    at the first line."""

    kind = "none"

    def __init__(self, out_dir: Path, run_name: str, config: dict):
        self.out_dir, self.run_name, self.config = Path(out_dir), run_name, config
        self.started = False

    def log(self, metrics: dict):
        if not self.started:
            try:
                self.start()
            except Exception as e:  # (the backend's own errors: a folder it cannot write, a refused login)
                raise NanotuneError(f"--tracker {self.kind} could not start: {type(e).__name__}: {e}") from None
            self.started = True
        self.write(int(metrics["step"]), scalars(metrics))

    def close(self, status: str = "finished"):
        if self.started:
            self.started = False
            self.finish(status)

    def start(self):
        pass

    def write(self, step: int, values: dict[str, float]):
        pass

    def finish(self, status: str):
        pass


class TensorBoard(Tracker):
    """Event files in --out/tensorboard/ (tensorboard --logdir out); the flags as JSON text under "args"."""

    kind = "tensorboard"

    def start(self):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step=0: a reader hides every event an earlier try of this run wrote (the steps after a resumed
        # run's checkpoint, logged again), and the history the first log replays writes each kept step once more
        self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=0)
        args = json.dumps(self.config, indent=2, default=str)
        self.writer.add_text("args", "\n".join("    " + line for line in args.splitlines()))  # a code block
        self.writer.flush()

    def write(self, step: int, values: dict[str, float]):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # line by line, as metrics.jsonl: a killed run keeps what it logged

    def finish(self, status: str):
        self.writer.close()


def wandb_has_key() -> bool:
    """Whether W&B has an API key to go online with: WANDB_API_KEY, or the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandB(Tracker):
    """A W&B run in project $WANDB_PROJECT (default nanotune), named after --out, with the flags as its config,
    its files in --out/wandb/. WANDB_MODE decides online or offline when set; otherwise online with an API key,
    and offline without one (never a login prompt; `wandb sync` uploads it later). After a --resume, a new W&B
    run of the same name holds the whole history (W&B cannot take back the steps an earlier try logged)."""

    kind = "wandb"

    def start(self):
        import wandb

        mode = None if os.environ.get("WANDB_MODE") else "online" if wandb_has_key() else "offline"
        project = os.environ.get("WANDB_PROJECT") or "nanotune"
        self.run = wandb.init(project=project, name=self.run_name, dir=self.out_dir, config=self.config, mode=mode)

    def write(self, step: int, values: dict[str, float]):
        self.run.log(values, step=step)

    def finish(self, status: str):
        # the exit code W&B shows the run's state by: 0 finished, anything else failed (130: Ctrl-C, as a shell's)
        self.run.finish(exit_code={"finished": 0, "interrupted": 130}.get(status, 1))


def open_tracker(kind: str, out_dir: Path, run_name: str, config: dict) -> Tracker | None:
    """The tracker --tracker names (None for none), its package imported now: a missing one is a one-line error
    naming the extra that installs it."""
    if kind in (None, "none"):
        return None
    if kind not in TRACKERS:
        raise NanotuneError(f"--tracker {kind}: expected one of {', '.join(TRACKERS)}")
    try:
        __import__(kind)  # the package the extra of that name installs (torch's SummaryWriter needs tensorboard)
    except ImportError:
        raise NanotuneError(f"--tracker {kind} needs the {kind} package: pip install -e '.[{kind}]'") from None
    return (TensorBoard if kind == "tensorboard" else WandB)(out_dir, run_name, config)
