"""Side-by-side benchmark: nanotune's GPT-2 against transformers.GPT2LMHeadModel (sdpa attention), built from
the same weights, in one run on one machine.

    python -m nanotune.bench                                   # gpt2 shape, batch 4 x 256, fp32, CPU
    python -m nanotune.bench --preset gpt2-medium --device cuda --dtype bfloat16 --compile
    python -m nanotune.bench --preset gpt2-medium --peft --skip generate  # full fine-tuning vs LoRA vs adapters

Rows: training step (forward + backward + AdamW step) tokens/s and peak memory; KV-cache generation new
tokens/s at batch 1 and 8 (200 greedy tokens); on CUDA, model FLOPs utilisation against the bf16 peak.
Each measurement runs in a fresh child process (so peak RSS belongs to one model) that warms up and then
times --repeats runs. The two sides alternate for --rounds rounds (transformers, nanotune, transformers, ...),
so a slow spell of a shared machine hits both, and the table reports the median of all timed runs.
Both sides use the same loss code and the same optimizer, so the model code is what differs. Before timing
anything it checks that both models give the same logits. --peft adds a second table: nanotune's training step
with full fine-tuning, LoRA (r 8 on c_attn) and bottleneck adapters (size 64), same weights, same batch, and
full fine-tuning and LoRA again with activation checkpointing (--activation-checkpointing in the recipes), of
every block and, for LoRA, of half and of two thirds of the blocks (--activation-checkpointing N).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue as queue_module
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanotune.flags import Parser, integer
from nanotune.generate import generate
from nanotune.model.config import PRESETS
from nanotune.model.gpt import GPT
from nanotune.model.peft import PeftSpec, apply_peft
from nanotune.utils import autocast

# dense bf16 peak (TFLOP/s) by device name, for MFU
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


def parse_args(argv=None):
    p = Parser(__doc__, prog="python -m nanotune.bench")
    p.add_argument("--preset", default="gpt2", choices=list(PRESETS))
    p.add_argument("--n-layer", type=integer(1), default=None, help="override the preset's depth (quick runs)")
    p.add_argument("--batch-size", type=integer(1), default=4)
    p.add_argument("--seq-len", type=integer(2), default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast precision")
    p.add_argument("--repeats", type=integer(1), default=5, help="timed runs per child process")
    p.add_argument("--rounds", type=integer(1), default=2, help="alternating child processes per side (default 2)")
    p.add_argument("--warmup", type=integer(0), default=2)
    p.add_argument("--gen-tokens", type=integer(1), default=200)
    p.add_argument("--gen-batches", default="1,8", help="comma-separated batch sizes for generation")
    p.add_argument("--compile", action="store_true", help="also time nanotune with torch.compile")
    p.add_argument("--peft", action="store_true", help="also time full fine-tuning vs LoRA vs adapters (nanotune)")
    p.add_argument("--skip", default="", help="comma-separated rows to skip: train, generate")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def build_weights(args, directory: Path):
    """A random transformers GPT-2 of the preset's shape, saved; both sides load these same tensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = dict(PRESETS[args.preset])
    if args.n_layer:
        shape["n_layer"] = args.n_layer
    torch.manual_seed(0)
    config = GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return shape


def load(side: str, directory: Path, device):
    if side == "transformers":
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(directory, attn_implementation="sdpa").to(device)
    return GPT.from_pretrained(directory, device=device)


def logits_of(side, model, idx):
    return model(idx).logits if side == "transformers" else model(idx)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_times(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


PEFT_SETTINGS = dict(
    lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="c_attn", adapter_size=64, prompt_tokens=20, seed=0
)  # the recipes' defaults


def train_row(side, directory, args, variant, queue):
    """Child process: time forward + backward + AdamW step; report tokens/s and peak memory.
    variant: False (eager), True (torch.compile), or a PEFT method for nanotune ("none", "lora", "adapter"),
    with " + checkpointing" for activation checkpointing of every block, " + checkpointing N" of the first N."""
    device = torch.device(args.device)
    model = load(side, directory, device).train()
    if isinstance(variant, str):
        method, _, checkpointing = variant.partition(" + ")  # "lora + checkpointing 12": the first 12 blocks
        apply_peft(model, PeftSpec(method, **PEFT_SETTINGS), "bench")
        blocks = checkpointing.removeprefix("checkpointing").strip()  # "" (every block) or N
        model.checkpointing = int(blocks) if blocks else checkpointing == "checkpointing"
    compiled = variant is True
    step_model = torch.compile(model) if compiled else model
    # the same loss and optimizer (fused where PyTorch has it) for both sides: the model code is what differs;
    # with PEFT the optimizer holds only the trainable tensors, as in the recipes
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type in ("cuda", "cpu"))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50257, (args.batch_size, args.seq_len), generator=g).to(device)
    # next-token targets, the last position ignored (as transformers' own labels= loss does it)
    labels = F.pad(idx[:, 1:], (0, 1), value=-100)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast(device, args.dtype):
            logits = logits_of(side, step_model, idx)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = run_times(step, device, args.warmup + (2 if compiled else 0), args.repeats)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    queue.put({"times": times, "peak_mib": peak})


def generate_row(side, directory, args, batch, queue):
    """Child process: time greedy KV-cache generation of --gen-tokens new tokens."""
    device = torch.device(args.device)
    model = load(side, directory, device).eval()
    prompt = torch.randint(0, 50257, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)

    @torch.no_grad()
    def run():
        with autocast(device, args.dtype):
            if side == "transformers":
                return model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=args.gen_tokens,
                    min_new_tokens=args.gen_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            return generate(model, prompt, args.gen_tokens, temperature=0)

    queue.put({"times": run_times(run, device, 1, max(1, args.repeats // 2))})


def in_child(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    # its result, or its end: a child that dies (out of memory, an error) must not leave the bench waiting
    result = None
    while result is None and proc.is_alive():
        try:
            result = queue.get(timeout=1.0)
        except queue_module.Empty:
            pass
    if result is None:
        try:
            result = queue.get(timeout=5.0)  # (it ended just after reporting)
        except queue_module.Empty:
            message = f"{target.__name__} {args[0]}: the child process ended with exit code {proc.exitcode}"
            raise SystemExit(message + " before reporting") from None
    proc.join()
    return result


def alternate(target, sides, directory, args):
    """Run each side's child process --rounds times, alternating sides; pool the timed runs per side.
    A side is (model, extra argument of target): (name, compiled) for training, (name, batch) for generation."""

    def name(side):
        return side[0] + (" compiled" if side[1] is True else f" {side[1]}" if isinstance(side[1], str) else "")

    pooled = {side: {"name": name(side), "times": [], "peak_mib": 0.0} for side in sides}
    for r in range(args.rounds):
        for side in sides:
            result = in_child(target, side[0], directory, args, side[1])
            pooled[side]["times"] += result["times"]
            pooled[side]["peak_mib"] = max(pooled[side]["peak_mib"], result.get("peak_mib", 0.0))
            print(
                f"  round {r + 1}/{args.rounds} {target.__name__} {pooled[side]['name']}: median "
                f"{statistics.median(result['times']):.3f} s",
                flush=True,
            )
    for result in pooled.values():
        result["median_s"] = statistics.median(result["times"])
    return pooled


def check_parity(directory, args):
    device = torch.device(args.device)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ours = load("nanotune", directory, device)(idx).float()
        theirs = load("transformers", directory, device)(idx).logits.float()
    diff = (ours - theirs).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"parity check failed: max |logit difference| {diff:.2e}; not benchmarking a wrong model")
    return diff


def mfu(tokens_per_s, shape, seq_len, device):
    """6N + 12 L T C FLOPs per trained token (PaLM appendix B), against the device's bf16 peak."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        return None
    C, L = shape["n_embd"], shape["n_layer"]
    n = 12 * L * C * C + 50257 * C  # matmul parameters (tied head counted once, as it is used once)
    return tokens_per_s * (6 * n + 12 * L * seq_len * C) / (peak * 1e12)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    rows, timings = [], {}  # timings: every timed run in seconds, per measurement and side (for --json)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        shape = build_weights(args, directory)
        diff = check_parity(directory, args)
        print(
            f"{args.preset} ({shape['n_layer']} layers, width {shape['n_embd']}) on {args.device}, {args.dtype}; "
            f"parity: max |logit difference| {diff:.2e}",
            flush=True,
        )
        tokens = args.batch_size * args.seq_len
        if "train" not in skip:
            label = f"train step, batch {args.batch_size} x {args.seq_len}"
            sides = [("transformers", False), ("nanotune", False)] + ([("nanotune", True)] if args.compile else [])
            train = alternate(train_row, sides, directory, args)
            theirs, ours = train[sides[0]], train[sides[1]]
            timings[label] = {result["name"]: result["times"] for result in train.values()}
            rows.append((label, "tokens/s", tokens / ours["median_s"], tokens / theirs["median_s"]))
            rows.append((label, "peak MiB", ours["peak_mib"], theirs["peak_mib"]))
            if args.compile:
                compiled = train[sides[2]]
                rows.append(
                    (
                        label + ", nanotune compiled",
                        "tokens/s",
                        tokens / compiled["median_s"],
                        tokens / theirs["median_s"],
                    )
                )
                rows.append((label + ", nanotune compiled", "peak MiB", compiled["peak_mib"], theirs["peak_mib"]))
            for name, result in (("eager", ours), ("compiled", compiled if args.compile else None)):
                value = result and mfu(tokens / result["median_s"], shape, args.seq_len, device)
                if value is not None:
                    theirs_mfu = mfu(tokens / theirs["median_s"], shape, args.seq_len, device)
                    rows.append((f"MFU, nanotune {name}", "fraction", value, theirs_mfu))
        if "generate" not in skip:
            for batch in map(int, args.gen_batches.split(",")):
                sides = [("transformers", batch), ("nanotune", batch)]
                gen = alternate(generate_row, sides, directory, args)
                timings[f"generate batch {batch}"] = {result["name"]: result["times"] for result in gen.values()}
                new_tokens = batch * args.gen_tokens
                label = f"generate {args.gen_tokens} tokens, batch {batch}"
                rows.append(
                    (
                        label,
                        "new tokens/s",
                        new_tokens / gen[sides[1]]["median_s"],
                        new_tokens / gen[sides[0]]["median_s"],
                    )
                )

        peft_rows = []
        if args.peft:
            L = shape["n_layer"]
            titles = {
                "none": "full fine-tuning",
                "lora": "LoRA r 8, c_attn",
                "adapter": "adapters, size 64",
                "none + checkpointing": "full + act. ckpt",
                "lora + checkpointing": "LoRA + act. ckpt",
            }
            # and LoRA recomputing only some blocks: half, two thirds (--activation-checkpointing N)
            titles.update({f"lora + checkpointing {n}": f"LoRA + ckpt {n}/{L}" for n in sorted({L // 2, 2 * L // 3})})
            sides = [("nanotune", variant) for variant in titles]
            runs = alternate(train_row, sides, directory, args)
            full = runs[sides[0]]
            timings["peft train step"] = {result["name"]: result["times"] for result in runs.values()}
            for side, title in zip(sides, titles.values()):
                run = runs[side]
                peft_rows.append(
                    (
                        title,
                        tokens / run["median_s"],
                        run["peak_mib"],
                        full["median_s"] / run["median_s"],
                        run["peak_mib"] / full["peak_mib"],
                    )
                )

    if rows:
        print(f"\n| {'measurement':<48} | {'unit':<12} | {'nanotune':>10} | {'transformers':>12} | ratio |")
        print(f"|{'-' * 50}|{'-' * 14}|{'-' * 12}|{'-' * 14}|-------|")
    for label, unit, a, b in rows:
        print(f"| {label:<48} | {unit:<12} | {a:>10.4g} | {b:>12.4g} | {a / b:5.2f} |")
    if peft_rows:
        print(f"\nnanotune training step, batch {args.batch_size} x {args.seq_len}, {args.preset} shape, {args.dtype}:")
        print(f"| {'method':<18} | tokens/s | peak MiB | throughput vs full | peak memory vs full |")
        print(f"|{'-' * 20}|----------|----------|--------------------|---------------------|")
        for title, tok_s, peak, speed, memory in peft_rows:
            print(f"| {title:<18} | {tok_s:>8.1f} | {peak:>8.0f} | {speed:>17.2f}x | {memory:>18.2f}x |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "parity_max_diff": diff,
                    "rows": [
                        {
                            "measurement": r[0],
                            "unit": r[1],
                            "nanotune": r[2],
                            "transformers": r[3],
                            "ratio": r[2] / r[3],
                        }
                        for r in rows
                    ],
                    "peft": [
                        dict(zip(("method", "tokens_per_s", "peak_mib", "speed_vs_full", "memory_vs_full"), r))
                        for r in peft_rows
                    ],
                    "timings_s": timings,
                },
                indent=2,
            )
        )
    return rows + peft_rows
