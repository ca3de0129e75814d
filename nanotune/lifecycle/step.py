"""The pieces of a training step every recipe shares: the learning-rate schedule, the optimizer, gradient
clipping, and the module the step calls (DDP under torchrun, torch.compile, activation checkpointing)."""

from __future__ import annotations

import contextlib
import math

import torch

from ..utils import NanotuneError


def lr_at(
    step: int, max_steps: int, lr: float, warmup: int = 0, schedule: str = "constant", min_lr_ratio: float = 0.1
) -> float:
    """The learning rate of optimizer step `step` (1-based): linear warmup over `warmup` steps, then constant or
    a cosine decay to min_lr_ratio * lr at max_steps (as nanoGPT and llm.c do)."""
    if step <= warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Scale the gradients down so that their global L2 norm is at most max_norm (0: leave them) and return
    the norm before clipping, the number worth watching: spikes come before divergence. A tensor on the device
    (run.stop_if_diverged reads it back with the loss, one wait for the device per step)."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def make_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float = 0.0, device=None):
    """Adam/AdamW with PyTorch's fused kernels where they exist, or plain SGD."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    fused = device is not None and device.type in ("cuda", "cpu")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=fused)
    # AdamW decays matrices, not biases and LayerNorm gains (the usual GPT-2 recipe)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def no_sync_unless_last(train_model: torch.nn.Module, last: bool):
    """Gradient accumulation under DDP: the all-reduce runs once per optimizer step, in the backward of the
    last micro-batch (which then averages the accumulated sums), instead of once per micro-batch. The context
    must hold the forward and the backward. Without DDP it does nothing."""
    ddp = getattr(train_model, "_orig_mod", train_model)  # under torch.compile, DDP is the wrapped module
    if last or not hasattr(ddp, "no_sync"):
        return contextlib.nullcontext()
    return ddp.no_sync()


def wrap_model(
    model: torch.nn.Module, device: torch.device, world: int, compile: bool = False, checkpointing: bool | int = False
):
    """The module the training step calls: DistributedDataParallel under torchrun, then torch.compile if
    asked. Evaluation, sampling and saving keep using the plain model. checkpointing turns on activation
    checkpointing in every GPT inside (it acts in training mode only): True for every block, N for the first N."""
    for module in model.modules():
        if hasattr(module, "checkpointing"):
            n_layer = len(module.h)
            if checkpointing is not True and not 0 <= checkpointing <= n_layer:
                raise NanotuneError(
                    f"--activation-checkpointing {checkpointing}: the model has {n_layer} blocks; "
                    f"pass 1 to {n_layer}, or no number for all of them"
                )
            module.checkpointing = checkpointing
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # gradient_as_bucket_view: the gradients live in DDP's communication buckets, not in a second copy
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    return torch.compile(model) if compile else model
