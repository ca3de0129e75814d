"""The ground floor: errors, device and precision, seeding, torch.distributed helpers, files written whole.
Every other module may import this one; it imports nothing of nanotune."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


class NanotuneError(Exception):
    """Bad input or a run that cannot go on, with a message that says what and where. Library code raises it;
    the scripts turn it into one `error:` line and exit code 2 (see run.Run and die)."""


class DivergedError(NanotuneError):
    """Training went wrong in a way the numbers show (NaN, an exploding loss, an impossible KL): the run stops
    before the update, its summary says "diverged", the last good checkpoint stays."""


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
    """float32: plain; bfloat16: autocast (weights stay float32, matmuls run in bfloat16)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def default_dtype(device: torch.device) -> str:
    """bfloat16 autocast on a GPU that computes in it natively (compute capability 8.0 and up: A100, H100, RTX 30xx
    and later), else float32: a V100 or T4 only emulates bfloat16, slower than float32."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "bfloat16"
    return "float32"


def configure_device(device: torch.device):
    """What stays float32 on a GPU (the tied head, the optimizer's maths) may use TF32 tensor cores."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far in MiB: the most tensors held on a CUDA device at once, or on a CPU the
    peak resident set size (the whole process: Python, the data, the weights)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource  # (Unix: kilobytes on Linux, bytes on macOS)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def device_rng_state(device: torch.device):
    """The random state of a GPU's generator (what sampling on it draws from), or None on the CPU (whose state
    torch.get_rng_state holds)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_device_rng_state(device: torch.device, state):
    if device.type == "cuda" and state is not None:
        torch.cuda.set_rng_state(state, device)


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
    # rank 0 alone evaluates, samples and writes checkpoints (~25 GB for gpt2-xl with AdamW's state) while the
    # others wait in their next collective: NCCL's default 10-minute timeout would end them, so allow two hours
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return rank, world, device


def cleanup_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gather_rows(n: int, compute, device) -> torch.Tensor:
    """compute(rows) -> a tensor of len(rows) rows, for rows of range(n): under torchrun every process computes
    every world-th row and the shares are gathered, so each ends with all n rows for 1/world of the work."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return compute(list(range(n)))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = list(range(rank, n, world))
    local = compute(mine).to(device)
    share = torch.zeros((-(-n // world), *local.shape[1:]), dtype=local.dtype, device=device)  # equal sizes
    share[: len(mine)] = local
    shares = [torch.empty_like(share) for _ in range(world)]
    torch.distributed.all_gather(shares, share)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=device)
    for r, part in enumerate(shares):
        out[r::world] = part[: len(range(r, n, world))]
    return out


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


def check_writable(folder: Path):
    """Create the folder (with its parents) and write a file in it, before any work: a NanotuneError naming the
    folder if that fails (read-only, a file in the way, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise NanotuneError(f"{folder} cannot be written: {e.strerror or e}") from None


def perplexity(loss: float) -> float:
    """exp(loss), infinite instead of an OverflowError for a diverged loss."""
    return math.exp(loss) if loss < 700 else float("inf")


def save_json(path: Path, data: dict):
    atomic_write(path, json.dumps(_json_safe(data), indent=2, default=str) + "\n")
