"""Pretrain a small GPT-2 from random init on a folder of plain-text books.

    python -m nanotune.pretrain --data ../shared/data/corpus --out weights/nano

This is how weights/nano was made (its README.md holds the exact command). Same shape as the train_*.py
scripts: flags, progress lines, metrics.jsonl, summary.json; warmup + cosine learning rate, gradient clipping.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanotune import GPT, GPTConfig, generate, load_tokenizer
from nanotune.data.sources import read_book
from nanotune.flags import Parser, integer, real
from nanotune.lifecycle.folder import write_model_files
from nanotune.lifecycle.step import lr_at, make_optimizer
from nanotune.plot import plot_curves
from nanotune.utils import NanotuneError, autocast, die, pick_device, save_json, seed_everything


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--data", required=True, help="folder of .txt files (Gutenberg headers are stripped)")
    p.add_argument("--out", required=True, help="output folder: model.safetensors, config.json, metrics, samples")
    p.add_argument("--n-layer", type=integer(1), default=4)
    p.add_argument("--n-head", type=integer(1), default=4)
    p.add_argument("--n-embd", type=integer(1), default=256)
    p.add_argument(
        "--context", type=integer(2), default=256, help="n_positions of the model and training window length"
    )
    p.add_argument("--batch-size", type=integer(1), default=16)
    p.add_argument("--steps", type=integer(1), default=2000, help="stop after this many steps...")
    p.add_argument(
        "--minutes",
        type=real(0, low_open=True),
        default=None,
        help="...or after this many minutes (the schedule "
        "then follows the expected number of steps, measured over steps 5-25)",
    )
    p.add_argument("--lr", type=real(0, low_open=True), default=3e-3)
    p.add_argument("--warmup", type=integer(0), default=100)
    p.add_argument("--weight-decay", type=real(0), default=0.1)
    p.add_argument("--grad-clip", type=real(0), default=1.0)
    p.add_argument(
        "--val-fraction",
        type=real(0, 1, low_open=True, high_open=True),
        default=0.02,
        help="last share of each book held out",
    )
    p.add_argument("--eval-every", type=integer(1), default=250)
    p.add_argument("--eval-batches", type=integer(1), default=20)
    p.add_argument("--log-every", type=integer(1), default=20)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="autocast precision (bf16 is ~2x faster on CPUs with AVX512-BF16)",
    )
    p.add_argument("--save-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the loss computation")
    p.add_argument("--threads", type=integer(1), default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def load_corpus(folder: Path, val_fraction: float, enc):
    """-> (train tokens, val tokens): each book split at (1 - val_fraction), books joined by <|endoftext|>."""
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise NanotuneError(f"no .txt files in {folder}")
    train, val = [], []
    for f in files:
        ids = enc.encode_ordinary(read_book(f)) + [enc.eot_token]
        cut = int(len(ids) * (1 - val_fraction))
        train += ids[:cut]
        val += ids[cut:]
    return np.array(train, dtype=np.int64), np.array(val, dtype=np.int64), [f.name for f in files]


def batch(tokens: np.ndarray, batch_size: int, T: int, rng: np.random.Generator):
    starts = rng.integers(0, len(tokens) - T - 1, size=batch_size)
    x = np.stack([tokens[s : s + T + 1] for s in starts])
    x = torch.from_numpy(x)
    return x[:, :-1], x[:, 1:]  # inputs, targets (shifted by one)


@torch.no_grad()
def fixed_slice_loss(model, folder: Path, windows: int = 32, context: int = 256, val_fraction: float = 0.02) -> float:
    """Mean next-token NLL on the first `windows` non-overlapping windows of the held-out split: the number the
    model card records and tests/test_nano.py checks, so a broken file or loader shows up."""
    enc = load_tokenizer()
    _, val, _ = load_corpus(Path(folder), val_fraction, enc)
    x = torch.from_numpy(val[: windows * (context + 1)].reshape(windows, context + 1))
    model.eval()
    device = model.wte.weight.device
    losses = [
        F.cross_entropy(model(chunk[:, :-1].to(device)).flatten(0, 1), chunk[:, 1:].flatten().to(device)).item()
        for chunk in x.split(8)
    ]
    return float(np.mean(losses))


def unigram_baseline(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Cross-entropy of val under train's token frequencies (add-one smoothed): what a model must beat."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


@torch.no_grad()
def evaluate(model, tokens, args, device, ctx, n_batches):
    model.eval()
    rng = np.random.default_rng(0)  # the same validation windows every time
    losses = []
    for _ in range(n_batches):
        x, y = batch(tokens, args.batch_size, args.context, rng)
        with ctx:
            logits = model(x.to(device))
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    model.train()
    return float(np.mean(losses))


def main(argv=None):
    args = parse_args(argv)
    try:
        return pretrain(args)
    except NanotuneError as e:
        die(str(e))


def pretrain(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = pick_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ctx = autocast(device, dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    enc = load_tokenizer()

    train, val, files = load_corpus(Path(args.data), args.val_fraction, enc)
    baseline = unigram_baseline(train, val, enc.n_vocab)
    print(
        f"corpus: {len(files)} files, {len(train):,} train / {len(val):,} val tokens; "
        f"unigram baseline {baseline:.3f} nats",
        flush=True,
    )

    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_positions=args.context)
    model = GPT(config).to(device)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {config}", flush=True)
    optimizer = make_optimizer(model, "adamw", args.lr, args.weight_decay, device)

    def compute_loss(x, y):
        with ctx:
            logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    if args.compile:
        compute_loss = torch.compile(compute_loss)
    history, log_file, start = [], open(out / "metrics.jsonl", "w"), time.time()

    def log(**metrics):
        metrics["elapsed_s"] = round(time.time() - start, 2)
        history.append(metrics)
        log_file.write(json.dumps(metrics) + "\n")
        log_file.flush()
        print(
            " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()), flush=True
        )

    curve = lambda key: [(m["step"], m[key]) for m in history if key in m]  # noqa: E731
    rng = np.random.default_rng(args.seed)
    tokens_per_step = args.batch_size * args.context

    max_steps, step, t0, tok_t0 = args.steps, 0, time.time(), time.time()
    val_loss = evaluate(model, val, args, device, ctx, args.eval_batches)
    log(step=0, val_loss=val_loss)
    while step < max_steps:
        lr = lr_at(step + 1, max_steps, args.lr, args.warmup, "cosine")
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batch(train, args.batch_size, args.context, rng)
        loss = compute_loss(x.to(device), y.to(device))
        if not torch.isfinite(loss):
            raise NanotuneError(f"the loss is {loss.item()} at step {step}: training diverged (try a lower --lr)")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step == 5:
            t5 = time.time()  # after warm-up (and compilation)
        if args.minutes and step == 25:
            # fix the schedule's length from the measured step time, so the cosine ends on time
            per_step = (time.time() - t5) / 20
            max_steps = max(step + 1, step + int((args.minutes * 60 - (time.time() - t0)) / per_step))
            print(f"{per_step:.3f}s/step -> {max_steps} steps in {args.minutes} minutes", flush=True)
        if step % args.log_every == 0:
            tok_s = tokens_per_step * args.log_every / (time.time() - tok_t0)
            tok_t0 = time.time()
            log(step=step, loss=loss.item(), lr=lr, tokens_per_s=tok_s)
        if step % args.eval_every == 0 or step == max_steps:
            val_loss = evaluate(model, val, args, device, ctx, args.eval_batches)
            log(step=step, val_loss=val_loss)

    final_val = evaluate(model, val, args, device, ctx, 4 * args.eval_batches)
    model.save_pretrained(out, dtype=getattr(torch, args.save_dtype))
    write_model_files(out, model.config.n_positions)  # tokenizer, generation config, a base model's chat template
    model.eval()
    prompt = torch.tensor([enc.encode_ordinary("It was a dark and stormy night, and")], device=device)
    generator = torch.Generator(device).manual_seed(0)  # on the model's device: multinomial samples there
    sample = generate(model, prompt, 80, temperature=0.8, top_k=50, generator=generator)
    sample_text = enc.decode(sample[0].tolist())
    (out / "sample.txt").write_text(sample_text + "\n")
    summary = {
        "files": files,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "minutes": round((time.time() - t0) / 60, 2),
        "params": model.num_params(),
        "val_loss": final_val,
        "val_ppl": math.exp(final_val),
        "unigram_baseline": baseline,
        "args": vars(args),
    }
    save_json(out / "summary.json", summary)
    # the model card's check, recomputed by tests/test_nano.py: a broken file or loader shows up
    fixed_slice = {"windows": 32, "context": args.context, "val_fraction": args.val_fraction}
    slice_loss = fixed_slice_loss(model, Path(args.data), **fixed_slice)
    record = {"slice": fixed_slice, "fixed_slice_loss": round(slice_loss, 4), "unigram_baseline": round(baseline, 3)}
    save_json(out / "eval.json", record)
    plot_curves(
        out / "loss.svg",
        {"train": curve("loss"), "val": curve("val_loss")},
        "pretraining loss (nats)",
        ylabel="NLL (nats per token)",
    )
    log_file.close()
    print(
        f"done: val loss {final_val:.3f} (ppl {math.exp(final_val):.1f}) vs unigram {baseline:.3f}; "
        f"{summary['tokens_seen']:,} tokens in {summary['minutes']} min\nsample: {sample_text}",
        flush=True,
    )
    return summary


if __name__ == "__main__":
    main()
