"""Reading and writing GPT-2 weights in the official Hugging Face safetensors layout.

The official files (openai-community/gpt2 and friends) store:
  - keys without a "transformer." prefix: wte.weight, wpe.weight, h.{i}.ln_1.weight, ..., ln_f.bias
  - linear weights as (in, out): GPT-2's "Conv1D", the layout nanotune's model keeps too
  - a constant causal-mask buffer h.{i}.attn.bias of shape (1, 1, 1024, 1024)
  - no lm_head.weight: the head is tied to wte.weight
Fine-tunes saved by transformers add the "transformer." prefix, may carry h.{i}.attn.masked_bias and an
lm_head.weight equal to wte.weight. Both layouts load here; save_checkpoint writes the official one
(without the mask buffers, which transformers rebuilds and never reads).
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..utils import ROOT, atomic_write, fsync_file, temp_path
from .config import PRESETS, GPTConfig

HF_REPO = "openai-community/{name}"
HEADS_BY_WIDTH = {p["n_embd"]: p["n_head"] for p in PRESETS.values()}


class WeightsNotFoundError(FileNotFoundError):
    """No weights for a preset locally, in the Hugging Face cache, or from the network."""


def weights_dir() -> Path:
    """Where preset weights are kept: $NANOTUNE_WEIGHTS_DIR, else weights/ at the repository root."""
    env = os.environ.get("NANOTUNE_WEIGHTS_DIR")
    return Path(env) if env else ROOT / "weights"


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint in the official layout, with its on-disk shape."""
    C, V = config.n_embd, config.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (config.n_positions, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    per_block = {
        "ln_1.weight": (C,),
        "ln_1.bias": (C,),
        "ln_2.weight": (C,),
        "ln_2.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C),
        "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C),
        "attn.c_proj.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C),
        "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C),
        "mlp.c_proj.bias": (C,),
    }
    for i in range(config.n_layer):
        shapes.update({f"h.{i}.{k}": s for k, s in per_block.items()})
    return shapes


# ---------------------------------------------------------------- finding the files


def resolve_checkpoint(name_or_path, quick: bool = False) -> tuple[Path, Path | None]:
    """-> (model.safetensors path, config.json path or None). quick: see find_or_download_preset."""
    name = str(name_or_path)
    if name in PRESETS:
        return find_or_download_preset(name, quick=quick)
    path = Path(name).expanduser()
    if path.is_dir():
        file = path / "model.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{path} is a directory but holds no model.safetensors")
        config = path / "config.json"
        return file, config if config.is_file() else None
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file (or a directory holding model.safetensors)")
        config = path.parent / "config.json"
        return path, config if config.is_file() else None
    raise FileNotFoundError(
        f"{name!r} is neither a GPT-2 preset ({', '.join(PRESETS)}) nor an existing directory or .safetensors file"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hugging Face endpoint: a quick answer to "are we offline?" (the hub client
    itself retries for ~25 s before giving up)."""
    from huggingface_hub.constants import ENDPOINT

    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def find_or_download_preset(name: str, quick: bool = False) -> tuple[Path, Path]:
    """weights/<name>/ first, then the Hugging Face cache, then a download into weights/<name>/.
    quick: give up at once when the hub cannot be reached (for --model auto, which has a fallback)."""
    local = weights_dir() / name
    if (local / "model.safetensors").is_file() and (local / "config.json").is_file():
        return local / "model.safetensors", local / "config.json"

    from huggingface_hub import hf_hub_download

    repo = HF_REPO.format(name=name)
    try:  # a copy already in the user's Hugging Face cache
        files = [hf_hub_download(repo, f, local_files_only=True) for f in ("model.safetensors", "config.json")]
        return Path(files[0]), Path(files[1])
    except Exception:
        pass
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    error = "offline mode, HF_HUB_OFFLINE=1"
    if not HF_HUB_OFFLINE and quick and not hub_reachable():
        error = "the hub could not be reached"
    elif not HF_HUB_OFFLINE:
        try:
            print(f"nanotune: downloading {repo} (model.safetensors, config.json) into {local}", flush=True)
            files = [hf_hub_download(repo, f, local_dir=local) for f in ("config.json", "model.safetensors")]
            return Path(files[1]), Path(files[0])
        except Exception as e:  # offline, HF_HUB_OFFLINE=1, proxy, missing repo...
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise WeightsNotFoundError(
        f"no weights for {name!r}: model.safetensors was not found in {local} nor in the Hugging Face cache "
        f"({HF_HUB_CACHE}), and it could not be downloaded from https://huggingface.co/{repo} ({error}).\n"
        f"To get it, on a machine with internet run:\n"
        f"  hf download {repo} model.safetensors config.json --local-dir {local}\n"
        f"(or copy those two files into {local}). A local path also works: --model path/to/dir_or_file.safetensors"
    )


# ---------------------------------------------------------------- reading


def load_checkpoint(path: Path, config_path: Path | None, skip=()) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Read a safetensors file in either layout -> (config, state dict for nanotune.GPT). Raises on any mismatch.
    skip: keys that belong to something else in the same file (a reward model's score.weight)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys() if k not in skip}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or another format?): {e}") from None
    if not raw:
        raise ValueError(f"{path}: the safetensors file holds no tensors")

    tensors = {}
    for key, t in raw.items():
        bare = key.removeprefix("transformer.")
        if bare in tensors:
            raise ValueError(f"{path}: key {bare!r} appears both with and without the 'transformer.' prefix")
        tensors[bare] = t
    bad_dtypes = {
        k: str(t.dtype) for k, t in tensors.items() if not t.is_floating_point() and not k.endswith("attn.bias")
    }
    if bad_dtypes:
        raise ValueError(f"{path}: tensors with non-float dtypes: {bad_dtypes}")

    head = tensors.pop("lm_head.weight", None)
    for key in [k for k in tensors if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", k)]:
        del tensors[key]  # constant causal-mask buffers: attention is causal by construction here

    config = _config_from(tensors, config_path, path)
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors), key=_natural)
    unexpected = sorted(set(tensors) - set(expected), key=_natural)
    if missing or unexpected:
        raise KeyError(
            f"{path}: does not match a GPT-2 with {config.n_layer} layers"
            + (f"; missing keys: {', '.join(missing)}" if missing else "")
            + (f"; unexpected keys: {', '.join(unexpected)}" if unexpected else "")
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{path}: tensor {key} holds {bad} NaN/inf values: the file is corrupt, or it was "
                "saved from a run that diverged"
            )
    if head is not None:
        if head.shape != tensors["wte.weight"].shape or not torch.equal(head, tensors["wte.weight"]):
            raise ValueError(
                f"{path}: lm_head.weight differs from wte.weight; nanotune's GPT-2 ties the two, "
                "so an untied head cannot be loaded"
            )

    return config, {key: t.contiguous() for key, t in tensors.items()}


def _config_from(tensors: dict, config_path: Path | None, path: Path) -> GPTConfig:
    if "wte.weight" not in tensors or "wpe.weight" not in tensors:
        missing = [k for k in ("wte.weight", "wpe.weight") if k not in tensors]
        raise KeyError(f"{path}: missing keys: {', '.join(missing)}")
    vocab, width = tensors["wte.weight"].shape
    positions = tensors["wpe.weight"].shape[0]
    layers = 1 + max((int(m.group(1)) for k in tensors if (m := re.match(r"h\.(\d+)\.", k))), default=-1)
    inferred = dict(n_layer=layers, n_embd=width, n_positions=positions, vocab_size=vocab)
    if config_path is not None:
        try:
            config_dict = json.loads(Path(config_path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path}: not valid JSON: {e}") from None
        config = GPTConfig.from_hf_dict(config_dict, source=str(config_path))
        disagree = {k: (getattr(config, k), v) for k, v in inferred.items() if getattr(config, k) != v}
        if disagree:
            detail = ", ".join(f"{k}={a} in config.json but {b} in the tensors" for k, (a, b) in disagree.items())
            raise ValueError(f"{config_path} disagrees with {path}: {detail}")
        return config
    if width not in HEADS_BY_WIDTH:
        raise ValueError(
            f"{path}: no config.json beside it and width {width} is not an official GPT-2 width, "
            "so the number of heads is unknown; put a config.json (n_head, ...) next to the file"
        )
    return GPTConfig(n_head=HEADS_BY_WIDTH[width], **inferred)


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


# ---------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(model, directory: Path, dtype: torch.dtype | None = None) -> Path:
    """model.safetensors + config.json of a GPT in the official layout (see write_weights)."""
    tensors = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        tensors[key] = t.contiguous().cpu()
    config = model.config.to_hf_dict()
    # the dtype to compute in, which a smaller stored dtype does not change: nanotune reads a float16 file (nano's,
    # half the size) into float32, and transformers, reading this key, does the same
    config["torch_dtype"] = str(model.wte.weight.dtype).removeprefix("torch.")
    return write_weights(Path(directory), tensors, config)


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """model.safetensors + config.json, landing as a pair: config.json first, then model.safetensors, each
    written whole or not at all. A folder holds model.safetensors only once its config.json is there, so an
    interruption at any point leaves either no model or a loadable one."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "config.json", json.dumps(config, indent=2) + "\n")
    save_tensors(tensors, directory / "model.safetensors")
    return directory


def save_tensors(tensors: dict[str, torch.Tensor], path: Path):
    """One safetensors file, written whole or not at all: a temporary name beside it, fsync, rename."""
    tmp = temp_path(path)
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # the permissions a plain open() would give
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
