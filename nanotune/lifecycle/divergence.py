"""When training has diverged: the rule every recipe's loop applies before each optimizer step (Run.stop_if_diverged).

A NaN/inf loss or gradient norm, or a loss above EXPLODE_FACTOR x max(first loss, 1) for EXPLODE_STEPS steps in
a row. The bound: every recipe's loss is in nats, and a model that starts at L and sits above 10 L (10 nats when
L < 1: a chosen answer e^-10 times less likely than the rejected one for DPO) is not learning but blowing up, as
--lr 1e3 does (losses near 2e8).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..utils import DivergedError

EXPLODE_FACTOR, EXPLODE_STEPS = 10.0, 3


class DivergenceRule:
    def __init__(self, first_loss: float | None = None):
        self.first_loss = first_loss  # the first finite loss (kept across a resume)
        self.exploding = 0  # steps in a row above the bound

    def what_went_wrong(self, loss: float, grad_norm: float | None) -> str | None:
        """None while training is fine, else what is wrong, in words."""
        if self.first_loss is None and math.isfinite(loss):
            self.first_loss = loss
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm} (loss {loss:.4g})"
        if loss <= EXPLODE_FACTOR * max(self.first_loss, 1.0):
            self.exploding = 0
            return None
        self.exploding += 1
        if self.exploding < EXPLODE_STEPS:
            return None
        return (
            f"the loss has exploded: {loss:.4g}, above {EXPLODE_FACTOR:g} x max(first loss {self.first_loss:.4g}, 1) "
            f"for {EXPLODE_STEPS} steps in a row"
        )


def diverged(step: int, what: str, lr: float, latest_checkpoint: Path | None) -> DivergedError:
    """The one line that stops a diverged run: what went wrong, what to try, what is kept."""
    ckpt = latest_checkpoint
    kept = f"the last good checkpoint ({ckpt.name}) is kept in {ckpt.parent}" if ckpt else "no checkpoint yet"
    return DivergedError(
        f"training diverged at step {step}: {what}. Try a lower --lr (now {lr:g}), --warmup, --grad-clip 1.0 or "
        f"--dtype float32; {kept}"
    )
