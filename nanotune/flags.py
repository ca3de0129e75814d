"""The flags every recipe shares, each range-checked as it is parsed, and --resume's rule that a run continues
with the flags it was started with.

A bad value stops before anything runs, with one line and exit code 2:
    error: argument --lr: must be > 0, got -1
"""

from __future__ import annotations

import argparse
import math
import sys

from .lifecycle.checkpoint import read_checkpoint_state
from .lifecycle.tracking import TRACKERS
from .model.peft import METHODS, lora_targets
from .utils import NanotuneError, die


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit code 2) instead of a usage block."""

    def __init__(self, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message):
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def integer(minimum: int = 1):
    """An argparse type: a whole number >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def real(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number in [low, high] (an open end with low_open / high_open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = low is not None and (value < low or (low_open and value == low))
        too_high = high is not None and (value > high or (high_open and value == high))
        if not math.isfinite(value) or too_low or too_high:
            if low is not None and high is not None:
                interval = f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            elif low is not None:
                interval = f"be {'>' if low_open else '>='} {low:g}"
            else:
                interval = f"be {'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"must {interval}, got {text}")
        return value

    return parse


def add_common_args(parser, lr: float, steps: int, batch_size: int, peft_methods=METHODS, lora_dropout=True):
    """The flags every train_*.py shares; peft_methods: the --peft choices the recipe supports; lora_dropout=False
    for a recipe that compares the policy's log-probs with ones read without dropout (DPO's reference, PPO's and
    GRPO's sampling policy): there dropout's noise would enter every log-ratio."""
    add = parser.add_argument
    add(
        "--model",
        default="auto",
        help="auto (gpt2 if available, else the bundled weights/nano), a preset (gpt2, gpt2-medium, gpt2-large, "
        "gpt2-xl), an output folder (LoRA and adapter folders too) or a .safetensors file",
    )
    add("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    # no float16: it would need a GradScaler (its small gradients flush to zero); bfloat16 has float32's range
    precision = "float32, or bfloat16 autocast (weights, logits and log-probs stay float32); default float32, "
    add("--dtype", default=None, choices=["float32", "bfloat16"], help=precision + "bf16 on a GPU that has it")
    add("--seed", type=int, default=1337, help="random seed for data order, init and sampling")
    add("--lr", type=real(0, low_open=True), default=lr, help=f"peak learning rate (default {lr:g})")
    schedule = "after warmup: constant, or cosine decay to 10%% of --lr at the last step"
    add("--lr-schedule", default="constant", choices=["constant", "cosine"], help=schedule)
    add("--warmup", type=integer(0), default=0, help="steps of linear learning-rate warmup (default 0)")
    clip = "clip the global gradient norm to this (default 1.0, as nanoGPT and llm.c; 0: off)"
    add("--grad-clip", type=real(0), default=1.0, help=clip)
    add("--steps", type=integer(0), default=steps, help=f"optimizer steps (default {steps})")
    batch = f"sequences per optimizer step per process (default {batch_size})"
    add("--batch-size", type=integer(1), default=batch_size, help=batch)
    accum = "split each batch into this many micro-batches (same maths, less memory)"
    add("--grad-accum", type=integer(1), default=1, help=accum)
    add("--log-every", type=integer(1), default=10, help="record metrics and print a line every N steps")
    add("--compile", action="store_true", help="torch.compile the model (faster on GPU)")
    add(
        "--activation-checkpointing",
        nargs="?",
        type=integer(0),
        const=True,
        default=False,
        metavar="N",
        help="keep only each block's input and recompute the block in backward: much less activation memory for "
        "about one extra forward pass; with N, only the first N blocks (part of the saving for part of the cost)",
    )
    out = "output folder (default out/<script>-<timestamp>); refused if it holds a run, unless --overwrite or --resume"
    add("--out", default=None, help=out)
    add("--overwrite", action="store_true", help="replace the run already in --out")
    resume = "continue the run in DIR from its last checkpoint with its saved flags (flags given here override them)"
    add("--resume", default=None, metavar="DIR", help=resume)
    save = "write a checkpoint every N steps and at the end (default 100; 0: only on Ctrl-C)"
    add("--save-every", type=integer(0), default=100, help=save)
    add("--no-save", action="store_true", help="do not write the fine-tuned weights")
    keep = "keep the last checkpoint (with the optimizer state) after a finished run, to --resume it for more --steps"
    add("--keep-checkpoint", action="store_true", help=keep)
    tracker = (
        "mirror every metrics.jsonl line (same names, same steps) to tensorboard (event files in --out/tensorboard/) "
        "or wandb (Weights & Biases: project $WANDB_PROJECT or nanotune, the run named after --out, files in "
        "--out/wandb/; online if W&B has an API key (WANDB_API_KEY or wandb login), else offline, to upload later "
        "with wandb sync; WANDB_MODE, when set, decides); metrics.jsonl stays the record (default none)"
    )
    add("--tracker", default="none", choices=TRACKERS, help=tracker)
    add_peft_args(parser, peft_methods, lora_dropout)


PEFT_HELP = {
    "none": "none: train every weight",
    "lora": "lora: low-rank updates of --lora-targets",
    "adapter": "adapter: bottleneck adapters after attention and MLP",
    "lora+adapter": "lora+adapter: both",
    "prompt": "prompt: --prompt-tokens embeddings read before every input",
}


def add_peft_args(parser, methods=METHODS, lora_dropout=True):
    """--peft and the sizes of the methods offered (nanotune/model/peft.py); --lora-dropout unless
    lora_dropout=False."""
    add = parser.add_argument
    add("--peft", default="none", choices=methods, help="; ".join(PEFT_HELP[m] for m in methods))
    if any("lora" in m for m in methods):
        add("--lora-r", type=integer(1), default=8, help="LoRA rank (default 8)")
        add("--lora-alpha", type=real(0, low_open=True), default=16, help="LoRA scale: update x alpha / r (16)")
        if lora_dropout:
            add("--lora-dropout", type=real(0, 1, high_open=True), default=0.0, help="dropout on LoRA's input (0)")
        targets = "comma-separated Conv1D layers to adapt: c_attn (default, as the LoRA paper did), c_proj, c_fc, all"
        add("--lora-targets", default="c_attn", help=targets)
    if any("adapter" in m for m in methods):
        add("--adapter-size", type=integer(1), default=64, help="adapter bottleneck width (default 64)")
    if "prompt" in methods:
        add("--prompt-tokens", type=integer(1), default=20, help="prompt-tuning embeddings (default 20)")


# what a run trained and measured: a resumed run keeps them (a recipe adds its own, e.g. PPO's --reward). --seed
# picks the data split and the held-out examples: another seed would evaluate on what the run trained on
FIXED_ON_RESUME = ("model", "seed", "peft", "lora_r", "lora_alpha", "lora_targets", "adapter_size", "prompt_tokens")


def parse_run_args(parser: argparse.ArgumentParser, argv=None, fixed_on_resume: str = "") -> argparse.Namespace:
    """parser.parse_args, except that with --resume DIR the flags saved in DIR's checkpoint become the defaults,
    so `--resume DIR` alone continues the same run and a flag given beside it overrides (--steps to train longer),
    unless it would change what the run trained or measured (FIXED_ON_RESUME, and the recipe's fixed_on_resume:
    its flags, as "--data --template"). Then the checks that involve two flags."""
    args = parser.parse_args(argv)
    if args.resume:
        try:
            saved = read_checkpoint_state(args.resume)["args"]
        except NanotuneError as e:
            die(str(e))
        for action in parser._actions:  # a flag that now takes several values, saved when it took one: a list
            if action.nargs in ("+", "*") and isinstance(saved.get(action.dest), str):
                saved[action.dest] = [saved[action.dest]]
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "overwrite", "out")})
        args = parser.parse_args(argv)
        args.out = args.resume
        for key in FIXED_ON_RESUME + tuple(
            flag.removeprefix("--").replace("-", "_") for flag in fixed_on_resume.split()
        ):
            if key in saved and getattr(args, key, None) != saved[key]:
                flag = "--" + key.replace("_", "-")
                die(
                    f"--resume {args.resume}: the run was trained with {flag} {saved[key]}, not {getattr(args, key)}; "
                    f"a resumed run keeps what it trained and measured: leave {flag} out, or start a new run"
                )
    if args.batch_size % args.grad_accum:
        die(f"--batch-size ({args.batch_size}) must be a multiple of --grad-accum ({args.grad_accum})")
    if args.resume and args.overwrite:
        die("--resume continues the run in its folder and --overwrite replaces it: pick one")
    try:
        if args.peft in ("lora", "lora+adapter"):  # the check argparse cannot make: GPT-2's layer names
            lora_targets(args.lora_targets)
    except NanotuneError as e:
        die(str(e))
    return args
