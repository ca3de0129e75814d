"""Fine-tune GPT-2 on Gulliver's Travels with the plain next-token loss.

Recipe 2 of the research notes. The model reads random windows of the book and learns to predict each next
token. Two things to watch: the share of generated tokens that are among the book's 100 most frequent tokens
(the notes saw ~40% before and ~60% after), and the held-out loss, which first falls and then, as the model
starts to memorise the training split, rises again (overfitting).

    python train_gulliver.py                                 # downloads the book (Gutenberg #829) once
    python train_gulliver.py --data path/to/gulliver.txt --steps 1000 --eval-every 50

Outputs in --out: metrics.jsonl, summary.json, samples_before.txt, samples_after.txt, loss.svg, weights.
"""

import argparse
import math
import time
from collections import Counter

import numpy as np
import torch

from nanotune import generate, load_tokenizer
from nanotune.data import GULLIVER_URL, default_file, read_book
from nanotune.utils import (
    RunLog, add_common_args, all_reduce_mean, autocast, check_common_args, check_finite, cleanup_distributed,
    default_dtype, die, load_model, make_optimizer, make_out_dir, no_sync_unless_last, pick_device, plot_curves,
    save_json, seed_everything, setup_distributed, wrap_model,
)  # fmt: skip


# Position t predicts token t+1: NLL = -mean_{b, t < T-1} log softmax(logits[b, t])[tokens[b, t+1]].
# logits (B, T, V), tokens (B, T) -> scalar.
def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    targets = tokens[:, 1:]  # (B, T-1)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, lr=5e-5, steps=300, batch_size=16)
    p.add_argument("--data", default=None, help="the book as plain text (default: download Gutenberg #829 into data/)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--val-fraction", type=float, default=0.1, help="last share of the book held out (default 0.1)")
    p.add_argument("--eval-every", type=int, default=25, help="validation loss every N steps")
    p.add_argument("--eval-batches", type=int, default=8, help="batches of held-out windows per evaluation")
    p.add_argument("--samples", type=int, default=10, help="samples for the top100_share metric")
    p.add_argument("--sample-tokens", type=int, default=100, help="tokens per sample")
    p.add_argument("--prompt", default="", help="samples continue this text (default: start of a document)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_common_args(args)
    if not 0 < args.val_fraction < 1:
        die(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    if args.eval_every < 1 or args.eval_batches < 1 or args.samples < 1 or args.sample_tokens < 1:
        die("--eval-every, --eval-batches, --samples and --sample-tokens must be >= 1")

    rank, world, device = setup_distributed(pick_device(args.device))
    seed_everything(args.seed + rank)  # each rank draws different windows
    dtype = args.dtype or default_dtype(device)
    ctx = autocast(device, dtype)
    enc = load_tokenizer()

    # ---- data: the book without its Gutenberg header and footer, last 10% held out
    path = args.data or default_file("gulliver.txt", GULLIVER_URL)
    tokens = np.array(enc.encode_ordinary(read_book(path)), dtype=np.int64)
    cut = int(len(tokens) * (1 - args.val_fraction))
    train_tokens, val_tokens = tokens[:cut], tokens[cut:]
    T = args.seq_len
    if len(train_tokens) <= T or len(val_tokens) <= T:
        die(f"{path}: {len(tokens)} tokens is too short for windows of --seq-len {T} in both the training "
            f"and the held-out split ({len(train_tokens)} / {len(val_tokens)} tokens)")  # fmt: skip
    top100 = torch.tensor([t for t, _ in Counter(train_tokens.tolist()).most_common(100)], device=device)

    model, model_name = load_model(args.model, device, quiet=rank != 0)
    if T > model.config.n_positions:
        die(f"--seq-len {T} exceeds the model's context of {model.config.n_positions}")
    out = make_out_dir(args.out, "gulliver") if rank == 0 else None
    log = RunLog(out) if rank == 0 else None
    if rank == 0:
        print(f"model {model_name}: {model.num_params() / 1e6:.1f}M parameters on {device} ({dtype}); book "
              f"{len(train_tokens):,} train / {len(val_tokens):,} held-out tokens; effective batch "
              f"{args.batch_size * world} x {T} tokens", flush=True)  # fmt: skip

    @torch.no_grad()
    def val_loss():
        """Mean NLL over the same held-out windows every time (non-overlapping, from the start of the split)."""
        model.eval()
        n_windows = min(args.eval_batches * args.batch_size, len(val_tokens) // T)
        windows = torch.from_numpy(val_tokens[: n_windows * T].reshape(n_windows, T)).to(device)
        losses = []
        for chunk in windows.split(args.batch_size):
            with ctx:
                losses.append(next_token_nll(model(chunk), chunk).item() * len(chunk))
        model.train()
        return sum(losses) / n_windows

    prompt = enc.encode_ordinary(args.prompt) or [enc.eot_token]

    def top100_share(tag):
        """Share of sampled tokens that are among the book's 100 most frequent (same seed before and after)."""
        model.eval()
        prompts = torch.tensor([prompt] * args.samples, device=device)
        samples = generate(model, prompts, args.sample_tokens, banned_tokens=[enc.eot_token],
                           generator=torch.Generator(device).manual_seed(args.seed))  # fmt: skip
        new = samples[:, len(prompt) :]  # (samples, sample_tokens): every sample has full length
        share = torch.isin(new, top100).float().mean().item()
        texts = [enc.decode(s.tolist()) for s in new]
        (out / f"samples_{tag}.txt").write_text("\n\n=====\n\n".join(texts) + "\n")
        print(f"--- a sample {tag} training (top100_share {share:.3f}) ---\n{texts[0]}\n---", flush=True)
        model.train()
        return share

    top100_before = top100_share("before") if rank == 0 else None
    val_history = []
    if rank == 0:
        val_history.append(val_loss())
        log.log(step=0, val_loss=val_history[-1])

    train_model = wrap_model(model, device, world, args.compile)
    optimizer = make_optimizer(model, "adamw", args.lr, args.weight_decay, device)
    model.train()
    train_loss, t_log = float("nan"), time.time()
    for step in range(1, args.steps + 1):
        starts = np.random.randint(0, len(train_tokens) - T, size=args.batch_size)
        batch = torch.from_numpy(np.stack([train_tokens[s : s + T] for s in starts])).to(device)  # (B, T)
        for k, micro in enumerate(batch.chunk(args.grad_accum)):
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                with ctx:
                    logits = train_model(micro)  # (b, T, V)
                loss = next_token_nll(logits, micro) / args.grad_accum
                loss.backward()
        check_finite(loss, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = all_reduce_mean(loss.item() * args.grad_accum, device)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            n_steps = step % args.log_every or args.log_every
            tok_s = n_steps * args.batch_size * world * T / (time.time() - t_log)
            log.log(step=step, loss=train_loss, lr=args.lr, tokens_per_s=tok_s)
            t_log = time.time()
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            val_history.append(val_loss())
            log.log(step=step, val_loss=val_history[-1])

    if rank == 0:
        top100_after = top100_share("after")
        summary = {
            "top100_share_before": top100_before, "top100_share_after": top100_after,
            "train_loss_last": train_loss, "val_loss_first": val_history[0], "val_loss_best": min(val_history),
            "val_loss_last": val_history[-1], "val_ppl_last": math.exp(val_history[-1]), "steps": args.steps,
            "lr": args.lr, "model": model_name, "world_size": world, "args": vars(args),
        }  # fmt: skip
        save_json(out / "summary.json", summary)
        plot_curves(out / "loss.svg", {"train": log.curve("loss"), "held-out": log.curve("val_loss")},
                    title="Gulliver fine-tuning: next-token NLL (nats)")  # fmt: skip
        if not args.no_save:
            model.save_pretrained(out)
        log.close()
        print(f"top100_share {top100_before:.3f} -> {top100_after:.3f}; held-out loss {val_history[0]:.3f} -> "
              f"best {min(val_history):.3f} -> last {val_history[-1]:.3f}; outputs in {out}", flush=True)  # fmt: skip
    cleanup_distributed()


if __name__ == "__main__":
    main()
