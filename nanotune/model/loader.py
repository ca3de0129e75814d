"""What a --model (or --ref-model, --judge, model:DIR) names, turned into a model: the one place that knows
every kind of name.

- `auto`: the official gpt2 if it is in weights/gpt2/, the Hugging Face cache or downloadable; else the bundled
  weights/nano model, with one line saying so. An explicit name never falls back.
- a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a folder holding model.safetensors, or a .safetensors file:
  GPT.from_pretrained.
- a folder of LoRA, adapters or prompt tuning without a full model (adapter_config.json): its base model with
  the saved tensors added (peft.load_adapter_folder).
- a reward-model folder (GPT2ForSequenceClassification, num_labels 1): RewardModel.from_pretrained.
"""

from __future__ import annotations

import torch

from ..utils import ROOT, NanotuneError
from .gpt import GPT
from .peft import is_adapter_folder, load_adapter_folder
from .reward_model import RewardModel
from .weights import WeightsNotFoundError, find_or_download_preset, resolve_checkpoint

NANO = ROOT / "weights" / "nano"
LOAD_ERRORS = (OSError, KeyError, ValueError)  # what reading a model file can raise: a missing, wrong or bad file


def resolve_auto(quiet: bool = False) -> tuple[str, str]:
    """-> (name, source) for --model auto: ("gpt2", its file) when the official weights can be had, else nano."""
    try:
        return "gpt2", str(find_or_download_preset("gpt2", quick=True)[0])  # the file found: no second search
    except WeightsNotFoundError:
        if not quiet:
            print(
                "nanotune: official gpt2 weights unavailable (offline?); using the bundled weights/nano model. "
                "Get the real one with: hf download openai-community/gpt2 model.safetensors config.json "
                "--local-dir weights/gpt2",
                flush=True,
            )
        return str(NANO), str(NANO)


def load_model(name: str, device: torch.device, flag: str = "--model", quiet: bool = False) -> tuple[GPT, str]:
    """A GPT-2 language model from anything --model accepts. -> (model, the name it goes by)."""
    source = name
    if name == "auto":
        name, source = resolve_auto(quiet)
    try:
        if is_adapter_folder(source):  # LoRA, adapters or prompt tuning saved without a full model
            return load_adapter_folder(source, device=device), name
        return GPT.from_pretrained(source, device=device), name
    except LOAD_ERRORS as e:
        raise NanotuneError(f"could not load {flag} {name}: {e}") from None


def check_model(name: str, flag: str = "--model"):
    """That load_model will find name, without loading it: for a tool that loads several models one after another,
    so that the last one missing shows before the first has worked."""
    if name == "auto" or is_adapter_folder(name):  # (an adapter folder's base is checked when it loads)
        return
    try:
        resolve_checkpoint(name)
    except LOAD_ERRORS as e:
        raise NanotuneError(f"could not load {flag} {name}: {e}") from None


def load_reward_model(path: str, device: torch.device) -> RewardModel:
    """A reward model folder (a train_reward.py output, or any GPT2ForSequenceClassification with one label)."""
    try:
        return RewardModel.from_pretrained(path, device=device)
    except LOAD_ERRORS as e:
        raise NanotuneError(f"could not load the reward model {path}: {e}") from None
