"""Parameter-efficient fine-tuning, written out: LoRA, bottleneck adapters and prompt tuning for nanotune's GPT-2.

Each method freezes every weight of the base model and adds a few new ones; only those train, so there are no
gradients or optimizer state for the base (the memory that full fine-tuning spends on them), and the result is
a small file.

- LoRA (Hu et al. 2021): a chosen Conv1D layer y = x W + b gains a low-rank update,
      y = x W + b + (alpha / r) * dropout(x) A B,     A (in, r) Kaiming-uniform, B (r, out) zeros,
  so at step 0 the model is exactly the base model. merge() folds (alpha / r) A B into W: a plain GPT-2 again.
- Bottleneck adapters (Houlsby et al. 2019): after the attention output projection and after the MLP of every
  block, before the residual add, h -> h + up(gelu(down(h))), down (C -> size), up (size -> C) zero-initialised:
  again exactly the base model at step 0. (The hooks, Block.adapter_attn and Block.adapter_mlp, are in model.py.)
- Prompt tuning (Lester et al. 2021): N learnable embeddings, initialised from the embeddings of real vocabulary
  tokens, read before every input (GPT.prompt; model.py's forward puts them in front and returns logits only
  for the real tokens, so losses and metrics never see the virtual positions).

Files: LoRA saves adapter_model.safetensors + adapter_config.json in the Hugging Face peft library's format for
GPT-2 into lora/ (peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), "out/lora") loads them),
and the merged model (model.safetensors + config.json) beside lora/. They are kept apart because transformers
reads an adapter_config.json next to a model.safetensors as "apply this adapter on top", which would add the
update twice. Adapters and prompt tuning, which transformers has no equivalent for, save adapter_model.safetensors with
nanotune's own key names and an adapter_config.json naming the base model ({"peft_type": "NANOTUNE", ...}), and
load_adapter_folder(folder) (and so any --model) rebuilds base + additions.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ..utils import NanotuneError, atomic_write
from .gpt import GPT, Conv1D
from .weights import save_tensors

METHODS = ("none", "lora", "adapter", "lora+adapter", "prompt")
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's Conv1D layers; c_proj is both attention's and the MLP's
PEFT_PREFIX = "base_model.model.transformer."  # where peft puts GPT2LMHeadModel's body in its key names


class LoRAConv1D(Conv1D):
    """A Conv1D (the frozen base W, b) plus LoRA's low-rank update. lora_A (r, in) and lora_B (out, r) are stored
    as peft stores them for GPT-2 (nn.Linear weights), so A = lora_A^T and B = lora_B^T in the formula above."""

    def __init__(self, base: Conv1D, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.weight, self.bias = base.weight, base.bias  # the same (frozen) tensors, not copies
        self.packed = None
        n_in, n_out = base.weight.shape
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, n_in, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft (and nn.Linear) initialise it
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # False: the base layer alone (see without_peft)

    def forward(self, x):
        if x.dim() != 2:  # (B, T, in) as rows (B*T, in), and back to (B, T, out)
            return self.forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        if self.enabled and self.packed is not None and self.packed.reads(x):  # (generation's copy, LoRA merged in)
            return super().forward(x)
        out = torch.addmm(self.bias, x, self.weight)  # x W + b: the base layer alone when disabled
        if self.enabled:  # + (alpha / r) (x A) B, added in the same matmul call (no (rows, out) temporaries)
            down = self.dropout(x) @ self.lora_A.t()  # (rows, r)
            out = torch.addmm(out, down, self.lora_B.t(), alpha=self.scaling)
        return out  # (rows, out)

    def merged(self) -> Conv1D:
        """A plain Conv1D with W + (alpha / r) A B."""
        plain = Conv1D(*self.weight.shape).to(self.weight.device)
        with torch.no_grad():
            plain.weight.copy_(self.weight + self.scaling * (self.lora_A.t() @ self.lora_B.t()))
            plain.bias.copy_(self.bias)
        return plain


class Adapter(nn.Module):
    """Houlsby bottleneck: h -> h + up(gelu(down(h))); up is zero-initialised so the adapter starts as the identity."""

    def __init__(self, n_embd: int, size: int, device=None):
        super().__init__()
        self.down = nn.Linear(n_embd, size, device=device)
        self.up = nn.Linear(size, n_embd, device=device)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True  # False: the identity (see without_peft)

    def forward(self, h):
        if not self.enabled:
            return h
        return h + self.up(F.gelu(self.down(h), approximate="tanh"))


# ---------------------------------------------------------------- adding them to a model


def lora_targets(spec: str) -> list[str]:
    names = list(LORA_TARGETS) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise NanotuneError(
            f"--lora-targets: unknown layer {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(LORA_TARGETS)} or all"
        )
    return names


def add_lora(model: GPT, r: int, alpha: float, dropout: float = 0.0, targets=("c_attn",)):
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name in targets:
                if isinstance(getattr(parent, name, None), Conv1D):
                    setattr(parent, name, LoRAConv1D(getattr(parent, name), r, alpha, dropout))


def add_adapters(model: GPT, size: int):
    device = model.wte.weight.device
    for block in model.h:
        block.adapter_attn = Adapter(model.config.n_embd, size, device)
        block.adapter_mlp = Adapter(model.config.n_embd, size, device)


def add_prompt(model: GPT, n_tokens: int, seed: int = 0):
    """n_tokens learnable embeddings, copied from the embeddings of random vocabulary tokens (Lester et al.
    found this better than random vectors), so they start in the region the model knows."""
    ids = torch.randint(0, model.config.vocab_size - 1, (n_tokens,), generator=torch.Generator().manual_seed(seed))
    model.prompt = nn.Parameter(model.wte.weight.detach()[ids.to(model.wte.weight.device)].clone())


@dataclasses.dataclass(frozen=True)
class PeftSpec:
    """What apply_peft adds: --peft (method), its method's flags (flags.add_peft_args) and --seed (prompt tuning's)."""

    method: str = "none"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # (a recipe that compares log-probs offers no --lora-dropout: 0)
    lora_targets: str = "c_attn"
    adapter_size: int = 64
    prompt_tokens: int = 20
    seed: int = 0

    @classmethod
    def from_flags(cls, args) -> PeftSpec:
        """From a recipe's flags (it offers some methods' flags only: the others keep their defaults)."""
        given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls) if f.name != "method"}
        return cls(args.peft, **{name: value for name, value in given.items() if value is not None})


def apply_peft(model: GPT, spec: PeftSpec, base_name: str) -> GPT:
    """Freeze the base model and add the method spec names (nothing for none). Remembers how, for saving.
    A model that already carries PEFT additions (--model a LoRA or adapter folder) is first made plain: LoRA
    folds into its weights exactly; adapters and prompt tuning cannot, and are refused."""
    loaded = getattr(model, "peft", {"method": "none"})
    if loaded["method"] == "lora":
        merge(model)  # what trains from here is a plain GPT-2 (with new additions if --peft asks)
    elif loaded["method"] != "none":
        raise NanotuneError(
            f"--model {base_name} holds {loaded['method']} on top of {loaded['base']}, which cannot be folded into "
            "GPT-2's weights: continue the run that made it with --resume, or start from its base model"
        )
    model.peft = {"method": spec.method, "base": base_name}
    if spec.method == "none":
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.method in ("lora", "lora+adapter"):
        targets = lora_targets(spec.lora_targets)
        add_lora(model, spec.lora_r, spec.lora_alpha, spec.lora_dropout, targets)
        model.peft.update(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, targets=targets)
    if spec.method in ("adapter", "lora+adapter"):
        add_adapters(model, spec.adapter_size)
        model.peft.update(adapter_size=spec.adapter_size)
    if spec.method == "prompt":
        add_prompt(model, spec.prompt_tokens, seed=spec.seed)
        model.peft.update(prompt_tokens=spec.prompt_tokens)
    return model


@contextlib.contextmanager
def peft_switched_off(model: GPT):
    """Within it, the model is its base: LoRA and adapters skipped, no prompt-tuning embeddings."""
    modules = [m for m in model.modules() if isinstance(m, (LoRAConv1D, Adapter))]
    prompt = model.prompt
    for m in modules:
        m.enabled = False
    model.prompt = None
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True
        model.prompt = prompt


class WithoutPEFT(nn.Module):
    """The base model inside a PEFT model, as a model of its own that holds no weights: each call runs the model
    with its additions switched off. What PPO's KL is measured against under --peft: the model where training
    started, without a second copy of it in memory."""

    def __init__(self, model: GPT):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: no parameters here, and .eval()/.to() leave it alone
        self.config = model.config
        self.n_virtual = 0

    def forward(self, *args, **kwargs):
        with peft_switched_off(self.model):
            return self.model(*args, **kwargs)


def base_model(model: GPT, method: str) -> nn.Module:
    """The model as it is before --peft trains it, frozen: with a PEFT method the same weights, its additions
    switched off (WithoutPEFT, no copy); without one, a copy (the model is about to change). In float32, unlike
    a frozen reward model: a KL penalty compares it with the policy token by token, and rounding its weights to
    bfloat16 would put a KL of its own between two models that start equal."""
    base = copy.deepcopy(model) if method == "none" else WithoutPEFT(model)
    return base.eval().requires_grad_(False)


def describe_trainable(model: GPT) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    count = f"{trainable / 1e6:.2f}M" if trainable >= 10_000 else f"{trainable / 1e3:.1f}K"
    return f"trainable {count} of {total / 1e6:.1f}M ({trainable / total:.2%})"


def merge(model: GPT) -> GPT:
    """Fold every LoRA update into its weight, in place: the model is a plain GPT-2 again (adapters stay)."""
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name, module in list(parent.named_children()):
                if isinstance(module, LoRAConv1D):
                    setattr(parent, name, module.merged())
    return model


# ---------------------------------------------------------------- saving and loading


def trained_state(model: GPT) -> dict[str, torch.Tensor]:
    """The new (trainable) tensors of a PEFT model, by nanotune's names: h.0.attn.c_attn.lora_A, ..., prompt."""
    new = ("lora_A", "lora_B", "adapter_attn.", "adapter_mlp.")
    return {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if k == "prompt" or any(part in k for part in new)
    }


def save_peft(model: GPT, directory: Path):
    """The new tensors of a PEFT model and how to rebuild it. LoRA: lora/ with its weights in peft's format.
    Adapters, LoRA + adapters and prompt tuning: adapter_model.safetensors + adapter_config.json in nanotune's
    format. The config lands first."""
    info = model.peft
    method = info["method"]
    state = trained_state(model)
    folder = Path(directory) / "lora" if method == "lora" else Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    base = info["base"]  # a local base model is named relative to the folder: the two can move together
    base = os.path.relpath(Path(base).resolve(), folder.resolve()) if Path(base).expanduser().exists() else base
    if method == "lora":
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": info["r"],
            "lora_alpha": info["lora_alpha"],
            "lora_dropout": info["lora_dropout"],
            "target_modules": info["targets"],
            "fan_in_fan_out": True,
            "bias": "none",
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
        }
        state = {PEFT_PREFIX + k + ".weight": v for k, v in state.items()}
    else:
        config = {
            "peft_type": "NANOTUNE",
            "method": method,
            "base_model_name_or_path": base,
            **{k: v for k, v in info.items() if k not in ("method", "base")},
        }
    atomic_write(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    save_tensors(state, folder / "adapter_model.safetensors")


def load_peft(model: GPT, directory: Path):
    """Put the tensors save_peft wrote back into a model with the same PEFT method (resume)."""
    folder = Path(directory) / "lora" if model.peft["method"] == "lora" else Path(directory)
    load_new_tensors(model, folder / "adapter_model.safetensors")


def load_new_tensors(model, file: Path, expected: dict | None = None):
    """The tensors of file into model, each checked: every expected key present (by default the PEFT model's new
    tensors), none unexpected, the same shapes, finite."""
    tensors = load_file(str(file))
    tensors = {
        (k.removeprefix(PEFT_PREFIX).removesuffix(".weight") if k.startswith(PEFT_PREFIX) else k): v
        for k, v in tensors.items()
    }
    expected = trained_state(model) if expected is None else expected
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{file}: does not fit the model"
            + (f"; missing: {', '.join(missing[:6])}" if missing else "")
            + (f"; unexpected: {', '.join(unexpected[:6])}" if unexpected else "")
        )
    for key, t in tensors.items():
        if t.shape != expected[key].shape:
            raise ValueError(f"{file}: {key} has shape {tuple(t.shape)}, expected {tuple(expected[key].shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{file}: tensor {key} holds NaN/inf values")
    model.load_state_dict(tensors, strict=False)


def is_adapter_folder(path) -> bool:
    """A folder with adapter_config.json and no full model.safetensors (which, when present, is loaded instead)."""
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "model.safetensors").is_file()


def base_path(folder: Path, base: str) -> str:
    """Where an adapter folder's base model is: a path relative to the folder (as save_peft writes it), else as
    written (a preset name, or a path from where it runs)."""
    beside = Path(folder) / base
    return str(beside) if beside.exists() else base


def load_adapter_folder(folder, dtype=torch.float32, device="cpu") -> GPT:
    """Base model (base_model_name_or_path) + the LoRA, adapters or prompt saved in folder, ready to run."""
    folder = Path(folder).expanduser()
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'adapter_config.json'}: not valid JSON: {e}") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder / 'adapter_config.json'} names no base_model_name_or_path")
    source = base_path(folder, base)
    try:
        if is_adapter_folder(source):  # a LoRA of a LoRA: the base's LoRA folded in first, as apply_peft did
            model = merge(load_adapter_folder(source, dtype, device))
            if any(isinstance(m, Adapter) for m in model.modules()) or model.n_virtual:
                raise ValueError(f"{source} holds adapters or prompt tuning, which cannot be a base model")
        else:
            model = GPT.from_pretrained(source, dtype=dtype, device=device)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(
            f"{folder}: its base model {base!r} (base_model_name_or_path in adapter_config.json) "
            f"could not be loaded: {e}"
        ) from None
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        targets = config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else list(targets)
        if config.get("bias", "none") != "none" or config.get("use_dora") or config.get("use_rslora"):
            raise ValueError(f"{folder}: only plain LoRA (bias none, no DoRA/rsLoRA) loads into nanotune")
        add_lora(model, config["r"], config["lora_alpha"], 0.0, lora_targets(",".join(targets)))
        model.peft = {
            "method": "lora",
            "base": base,
            "r": config["r"],
            "lora_alpha": config["lora_alpha"],
            "lora_dropout": 0.0,
            "targets": targets,
        }
    elif peft_type == "NANOTUNE":
        method = config["method"]
        if method in ("lora", "lora+adapter"):
            add_lora(model, config["r"], config["lora_alpha"], 0.0, config["targets"])
        if method in ("adapter", "lora+adapter"):
            add_adapters(model, config["adapter_size"])
        if method == "prompt":
            add_prompt(model, config["prompt_tokens"])
        model.peft = {
            "method": method,
            "base": base,
            **{k: v for k, v in config.items() if k not in ("peft_type", "method", "base_model_name_or_path")},
        }
    else:
        raise ValueError(f"{folder}: adapter_config.json has peft_type {peft_type!r}; nanotune reads LORA and NANOTUNE")
    load_new_tensors(model, folder / "adapter_model.safetensors")
    return model.to(dtype=dtype).eval()
