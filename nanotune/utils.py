"""Small helpers every script shares: errors, device and precision, seeding, atomic files, plots, the
learning-rate schedule, gradient clipping, model resolution, and (optionally) torch.distributed. Nothing here
hides the training loop; the run's lifecycle (folder, log, checkpoints) is in run.py."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


class NanotuneError(Exception):
    """Bad input or a run that cannot go on, with a message that says what and where. Library code raises it;
    the scripts turn it into one `error:` line and exit code 2 (see run.Run and die)."""


def die(message: str):
    """Scripts only: print `error: message` and exit with code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ---------------------------------------------------------------- device, precision, seeds


def pick_device(name: str = "auto") -> torch.device:
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NanotuneError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NanotuneError(f"--device {name} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise NanotuneError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not mps:
        raise NanotuneError("--device mps asked for, but MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise NanotuneError(f"--device {name}: nanotune runs on cpu, cuda or mps")
    return device


def autocast(device: torch.device, dtype: str):
    """float32: plain; bfloat16/float16: autocast (weights stay float32, matmuls run in half precision)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def default_dtype(device: torch.device) -> str:
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- distributed (torchrun)


def setup_distributed(device: torch.device):
    """Under torchrun: join the process group and pin this rank's GPU. -> (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def cleanup_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_mean(value: float, device) -> float:
    """The mean of a scalar over ranks (the identity when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


# ---------------------------------------------------------------- files: written whole or not at all


def temp_path(path: Path) -> Path:
    """A unique temporary name in the same folder (so that os.replace onto path is an atomic rename)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, data: str | bytes):
    """Write to a temporary file beside path, flush it to disk, rename it over path: a reader (or a crash)
    sees the old file or the new one, never half of one, and no temporary is left behind."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_safe(value):
    """JSON has no NaN or infinity: write them as null rather than as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def perplexity(loss: float) -> float:
    """exp(loss), infinite instead of an OverflowError for a diverged loss."""
    return math.exp(loss) if loss < 700 else float("inf")


def save_json(path: Path, data: dict):
    atomic_write(path, json.dumps(_json_safe(data), indent=2, default=str) + "\n")


def plot_curves(path: Path, series: dict[str, list[tuple[float, float]]], title: str = "loss", xlabel: str = "step"):
    """A dependency-free SVG line plot: {name: [(step, value), ...]} (or other x values, named by xlabel)."""
    points = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not points:
        return
    W, H, pad = 640, 400, 50
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    sx = lambda x: pad + (x - x0) / (x1 - x0) * (W - 2 * pad)  # noqa: E731
    sy = lambda y: H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad)  # noqa: E731
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle">{title}</text>',
        f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
        f'<text x="{pad}" y="{H - pad + 15}">{x0:g}</text>',
        f'<text x="{W - pad}" y="{H - pad + 15}" text-anchor="end">{xlabel} {x1:g}</text>',
        f'<text x="{pad - 5}" y="{H - pad}" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{pad - 5}" y="{pad + 4}" text-anchor="end">{y1:.3g}</text>',
    ]
    for i, (name, pts) in enumerate(series.items()):
        pts = [p for p in pts if math.isfinite(p[1])]
        if not pts:
            continue
        color = colors[i % len(colors)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{line}"/>')
        svg.append(f'<text x="{W - pad - 5}" y="{pad + 15 * (i + 1)}" fill="{color}" text-anchor="end">{name}</text>')
    svg.append("</svg>")
    atomic_write(path, "\n".join(svg) + "\n")


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


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Scale the gradients down so that their global L2 norm is at most max_norm (0: leave them) and return
    the norm before clipping, the number worth watching: spikes come before divergence."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")).item()


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


# ---------------------------------------------------------------- models


def load_model(name: str, device: torch.device, flag: str = "--model", quiet: bool = False):
    """GPT.from_pretrained with the 'auto' rule: official gpt2 if it is here or can be downloaded, else the
    bundled nano model, with one line saying so. An explicit name never falls back. -> (model, name)."""
    from .model import GPT
    from .weights import WeightsNotFoundError, find_or_download_preset

    source = name
    if name == "auto":
        try:
            source = str(find_or_download_preset("gpt2", quick=True)[0])  # load the file found, no second search
            name = "gpt2"
        except WeightsNotFoundError:
            name = source = str(ROOT / "weights" / "nano")
            if not quiet:
                print(
                    "nanotune: official gpt2 weights unavailable (offline?); using the bundled weights/nano model. "
                    "Get the real one with: hf download openai-community/gpt2 model.safetensors config.json "
                    "--local-dir weights/gpt2",
                    flush=True,
                )
    try:
        model = GPT.from_pretrained(source, device=device)
    except (OSError, KeyError, ValueError) as e:
        raise NanotuneError(f"could not load {flag} {name}: {e}") from None
    return model, name


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

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model
