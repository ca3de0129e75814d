"""What a run saves of its model, and the checkpoints it resumes from.

A run's model is saved in the layout its users load: a GPT-2 as model.safetensors + config.json (official
layout), a reward model in GPT2ForSequenceClassification's, and with --peft only the new tensors (peft.save_peft),
plus, at the end of a LoRA run, the merged model. A checkpoint, checkpoints/step-NNNNNN/, holds that (the weights
as they are mid-run), trainer.pt (optimizer state, every rank's data RNG, the global RNG, extra state such as
PPO's value model) and state.json (step, flags, summary so far). It is written into a temporary folder and
renamed, so it is whole or absent; only the newest is kept.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..model.peft import load_new_tensors, load_peft, merge, save_peft
from ..model.reward_model import RewardModel
from ..model.weights import load_checkpoint, save_tensors
from ..utils import NanotuneError, device_rng_state, save_json, set_device_rng_state
from .folder import FILES, write_model_files

CHECKPOINTS = "checkpoints"
# what writing weights or a checkpoint raises when the disk is full or the folder cannot be written
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)
# what save_trained and save_complete may write into a folder
MODEL_FILES = (
    "model.safetensors",
    "config.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "lora",
    "score.safetensors",
    *FILES,
)


def peft_method(model) -> str:
    body = model.body if isinstance(model, RewardModel) else model
    return getattr(body, "peft", {"method": "none"})["method"]


def save_trained(model, directory: Path, final: bool = True):
    """The model as a run keeps it. final: the run's output (LoRA merged into a plain model beside lora/; a LoRA
    reward model only merged); else a checkpoint (only what trains, so that resume is exact)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    method = peft_method(model)
    if method == "none":
        model.save_pretrained(directory)
        return
    if isinstance(model, RewardModel):
        if final:  # one file transformers loads: the merged body and the score head
            merged = copy.deepcopy(model)
            merge(merged.body)
            merged.save_pretrained(directory)
            return
        save_peft(model.body, directory)
        save_tensors({"score.weight": model.score.weight.detach().contiguous().cpu()}, directory / "score.safetensors")
        return
    save_peft(model, directory)
    if final and method == "lora":
        merge(copy.deepcopy(model)).save_pretrained(directory)  # a merged copy: the run's model keeps training


def save_complete(model, directory: Path, template: str | None, prompt_source: str | None = None):
    """The run's output as a whole Hugging Face model folder: save_trained's weights, then the tokenizer,
    generation config and chat template (nanotune/lifecycle/folder.py), in lora/ as well (peft loads that on its base).
    template: the recipe's --template; PPO and GRPO on book windows (prompt_source books) learned raw text."""
    save_trained(model, directory)
    template = None if prompt_source == "books" else template
    for folder in (Path(directory), Path(directory) / "lora"):
        if folder.is_dir():
            write_model_files(folder, model.config.n_positions, template)


def load_trained(model, directory: Path):
    """Put what save_trained(final=False) wrote back into a model of the same kind (resume)."""
    directory = Path(directory)
    method = peft_method(model)
    if isinstance(model, RewardModel) and method != "none":
        load_peft(model.body, directory)
        load_new_tensors(model, directory / "score.safetensors", expected={"score.weight": model.score.weight})
    elif isinstance(model, RewardModel):
        model.load_state_dict(RewardModel.from_pretrained(directory).state_dict())
    elif method == "none":
        model.load_state_dict(load_checkpoint(directory / "model.safetensors", directory / "config.json")[1])
    else:
        load_peft(model, directory)


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted(p for p in (Path(out) / CHECKPOINTS).glob("step-*") if p.is_dir())
    return steps[-1] if steps else None


def read_checkpoint_state(out: Path) -> dict:
    """state.json of the newest checkpoint in a run folder (step, script, args, summary, world size) + its path."""
    out = Path(out)
    if not out.is_dir():
        raise NanotuneError(f"--resume {out}: no such folder")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise NanotuneError(
            f"--resume {out}: it holds no checkpoint ({out / CHECKPOINTS} is empty or missing); "
            "the run ended before its first --save-every step and was killed, not interrupted"
        )
    return json.loads((ckpt / "state.json").read_text()) | {"path": str(ckpt)}


def write_checkpoint(out: Path, step: int, model, trainer: dict, state: dict) -> Path:
    """checkpoints/step-NNNNNN/ with the model, trainer.pt and state.json; older checkpoints go once it is in place."""
    root = Path(out) / CHECKPOINTS
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_trained(model, tmp, final=False)
        torch.save(trainer, tmp / "trainer.pt")
        save_json(tmp / "state.json", state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # (a full disk: the half-written checkpoint goes, the last stays)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(out: Path):
    """Temporary checkpoint folders a kill interrupted."""
    for stale in (Path(out) / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def why(error: BaseException) -> str:
    """The reason a save failed, in one short line ("No space left on device", ...)."""
    text = str(error)
    for reason in ("No space left on device", "Permission denied", "Read-only file system", "Disk quota exceeded"):
        if reason in text:
            return reason
    return text.splitlines()[0][:200] if text else type(error).__name__


def save_error(what: str, error: BaseException, out: Path) -> NanotuneError:
    """One line for a save that failed (a full disk, a folder that cannot be written), saying what is kept."""
    kept = latest_checkpoint(out)
    held = f"; the last good checkpoint ({kept.name}) is kept: --resume {out}" if kept else ""
    return NanotuneError(f"could not write {what}: {why(error)}{held}")


def restore_training(ckpt: Path, model, optimizer, data_rng, extras: dict, rank: int, device):
    """Everything a checkpoint holds back into the run: the weights, the optimizer state, the extras (modules or
    dicts), this rank's data RNG, the global RNG and this rank's device RNG."""
    load_trained(model, ckpt)
    try:
        trainer = torch.load(Path(ckpt) / "trainer.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError):
        raise ValueError(f"{Path(ckpt) / 'trainer.pt'} cannot be read (truncated, or not a checkpoint)") from None
    optimizer.load_state_dict(trainer["optimizer"])
    for name, obj in extras.items():
        saved = trainer["extras"][name]
        obj.load_state_dict(saved) if hasattr(obj, "load_state_dict") else obj.update(saved)
    data_rng.set_state(trainer["data_rng"][rank])
    torch.set_rng_state(trainer["torch_rng"])
    set_device_rng_state(device, trainer.get("device_rng", [None] * (rank + 1))[rank])


def write_training(out: Path, tracked: tuple, state: dict, rank: int, world: int, device):
    """A run's checkpoint (every rank calls it; rank 0 writes): tracked = (model, optimizer, data RNG, extras) as
    Run.track holds them, state = what state.json records."""
    model, optimizer, data_rng, extras = tracked
    # every rank draws its own data, and samples (PPO's answers, LoRA's dropout) with its device's generator
    rngs = [(data_rng.get_state(), device_rng_state(device))]
    if world > 1:  # keep every rank's
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, (data_rng.get_state(), device_rng_state(device)))
    if rank != 0:
        return
    trainer = {
        "optimizer": optimizer.state_dict(),
        "data_rng": [data for data, _ in rngs],
        "device_rng": [device for _, device in rngs],
        "torch_rng": torch.get_rng_state(),
        "extras": {k: v.state_dict() if hasattr(v, "state_dict") else dict(v) for k, v in extras.items()},
    }
    write_checkpoint(out, state["step"], model, trainer, state)


def resume(out: Path, script: str, world: int, rank: int, device, tracked: tuple, model_flag: str):
    """A --resume: the newest checkpoint of the run in `out` back into tracked = (model, optimizer, data RNG,
    extras), after checking it is this recipe's and this many processes'. -> (its step, the run's first loss)"""
    state = read_checkpoint_state(out)
    if state["script"] != script:
        raise NanotuneError(f"--resume {out}: it is a {state['script']} run, not {script}")
    if state["world_size"] != world:
        raise NanotuneError(
            f"--resume {out}: the run used {state['world_size']} processes, this one {world}; "
            "resume with the same torchrun --nproc_per_node"
        )
    try:
        restore_training(Path(state["path"]), *tracked, rank, device)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise NanotuneError(
            f"--resume {out}: its checkpoint cannot be restored onto --model {model_flag}: {e}"
        ) from None
    return state["step"], state["summary"].get("loss_first")


def save_final(model, out: Path, keep_checkpoint: bool, template: str | None = None, prompt_source: str | None = None):
    """A finished run's model (save_complete: with the chat template and prompt source it was trained with);
    then, unless keep_checkpoint, the checkpoints to resume from go, since the run is finished and saved."""
    try:
        save_complete(model, out, template, prompt_source)
    except SAVE_ERRORS as e:
        raise save_error(f"the trained weights into {out}", e, out) from None
    freed = 0 if keep_checkpoint else remove_checkpoints(out)
    if freed:
        print(f"removed {Path(out) / CHECKPOINTS} ({freed / 2**20:.0f} MiB); --keep-checkpoint keeps it", flush=True)


def remove_checkpoints(out: Path) -> int:
    """checkpoints/ of a finished run, gone. -> the bytes it held (0 if there was none)"""
    root = Path(out) / CHECKPOINTS
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0
    shutil.rmtree(root, ignore_errors=True)
    return size
