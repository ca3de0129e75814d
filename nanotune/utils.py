"""Small helpers every script shares: device and precision, seeding, run folders, metric logs, plots,
model resolution, and (optionally) torch.distributed. Nothing here hides the training loop."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def die(message: str):
    """Stop before any training with a message that says what is wrong."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------- device, precision, seeds


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {name} asked for, but no CUDA device is available")
    return torch.device(name)


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


# ---------------------------------------------------------------- run folder and logs


def make_out_dir(out: str | None, script: str) -> Path:
    path = Path(out) if out else ROOT / "out" / f"{script}-{datetime.now():%Y%m%d-%H%M%S}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_finite(loss: torch.Tensor, step: int, what: str = "loss"):
    if not torch.isfinite(loss).all():
        raise FloatingPointError(
            f"{what} is {loss.item()} at step {step}: training diverged (try a lower --lr, or --dtype float32)"
        )


class RunLog:
    """metrics.jsonl (one JSON object per logged step) plus a progress line on stdout."""

    def __init__(self, out_dir: Path):
        self.start = time.time()
        self.file = open(out_dir / "metrics.jsonl", "w")
        self.history: list[dict] = []

    def log(self, **metrics):
        metrics["elapsed_s"] = round(time.time() - self.start, 2)
        self.history.append(metrics)
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        parts = []
        for k, v in metrics.items():
            if isinstance(v, float):
                v = f"{v:.3e}" if k == "lr" else (f"{v:.0f}" if k == "tokens_per_s" else f"{v:.4f}")
            parts.append(f"{k} {v}")
        print(" | ".join(parts), flush=True)

    def curve(self, key: str) -> list[tuple[float, float]]:
        """[(step, value)] of every logged entry that has key, for plot_curves."""
        return [(m["step"], m[key]) for m in self.history if key in m]

    def close(self):
        self.file.close()


def save_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def plot_curves(path: Path, series: dict[str, list[tuple[float, float]]], title: str = "loss"):
    """A dependency-free SVG line plot: {name: [(step, value), ...]}."""
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
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle">{title}</text>',
           f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
           f'<text x="{pad}" y="{H - pad + 15}">{x0:g}</text>',
           f'<text x="{W - pad}" y="{H - pad + 15}" text-anchor="end">step {x1:g}</text>',
           f'<text x="{pad - 5}" y="{H - pad}" text-anchor="end">{y0:.3g}</text>',
           f'<text x="{pad - 5}" y="{pad + 4}" text-anchor="end">{y1:.3g}</text>']  # fmt: skip
    for i, (name, pts) in enumerate(series.items()):
        pts = [p for p in pts if math.isfinite(p[1])]
        if not pts:
            continue
        color = colors[i % len(colors)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{line}"/>')
        svg.append(f'<text x="{W - pad - 5}" y="{pad + 15 * (i + 1)}" fill="{color}" text-anchor="end">{name}</text>')
    svg.append("</svg>")
    path.write_text("\n".join(svg) + "\n")


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def add_common_args(parser, lr: float, steps: int, batch_size: int):
    """The flags every train_*.py shares (see the README's conventions)."""
    parser.add_argument("--model", default="auto",
                        help="auto (gpt2 if available, else the bundled weights/nano), a preset "
                             "(gpt2, gpt2-medium, gpt2-large, gpt2-xl), a directory or a .safetensors file")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute precision; default float32 on CPU, bf16 autocast on CUDA")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1337, help="random seed for data order, init and sampling")
    parser.add_argument("--out", default=None, help="output folder (default out/<script>-<timestamp>)")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"sequences per optimizer step per process (default {batch_size})")  # fmt: skip
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="split each batch into this many micro-batches (same maths, less memory)")  # fmt: skip
    parser.add_argument("--log-every", type=int, default=10, help="print and record metrics every N steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPU)")
    parser.add_argument("--no-save", action="store_true", help="do not write the fine-tuned weights")


def check_common_args(args):
    if args.lr <= 0:
        die(f"--lr must be > 0, got {args.lr}")
    if args.steps < 0:
        die(f"--steps must be >= 0, got {args.steps}")
    if args.batch_size < 1 or args.grad_accum < 1 or args.batch_size % args.grad_accum:
        die(f"--batch-size ({args.batch_size}) must be a positive multiple of --grad-accum ({args.grad_accum})")
    if args.log_every < 1:
        die(f"--log-every must be >= 1, got {args.log_every}")


def load_model(name: str, device: torch.device, quiet: bool = False):
    """GPT.from_pretrained with the 'auto' rule: official gpt2 if it is here or can be downloaded, else the
    bundled nano model, with one line saying so. An explicit name never falls back."""
    from .model import GPT
    from .weights import WeightsNotFoundError, find_or_download_preset

    source = name
    if name == "auto":
        try:
            source = str(find_or_download_preset("gpt2")[0])  # load the file found, without a second search
            name = "gpt2"
        except WeightsNotFoundError:
            name = source = str(ROOT / "weights" / "nano")
            if not quiet:
                print("nanotune: official gpt2 weights unavailable (offline?); using the bundled weights/nano model. "
                      "Get the real one with: hf download openai-community/gpt2 model.safetensors config.json "
                      "--local-dir weights/gpt2", flush=True)  # fmt: skip
    try:
        model = GPT.from_pretrained(source, device=device)
    except (FileNotFoundError, KeyError, ValueError) as e:
        die(f"could not load --model {name}: {e}")
    return model, name


def no_sync_unless_last(train_model: torch.nn.Module, last: bool):
    """Gradient accumulation under DDP: the all-reduce runs once per optimizer step, in the backward of the
    last micro-batch (which then averages the accumulated sums), instead of once per micro-batch. The context
    must hold the forward and the backward. Without DDP it does nothing."""
    ddp = getattr(train_model, "_orig_mod", train_model)  # under torch.compile, DDP is the wrapped module
    if last or not hasattr(ddp, "no_sync"):
        return contextlib.nullcontext()
    return ddp.no_sync()


def wrap_model(model: torch.nn.Module, device: torch.device, world: int, compile: bool = False):
    """The module the training step calls: DistributedDataParallel under torchrun, then torch.compile if
    asked. Evaluation, sampling and saving keep using the plain model."""
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model
