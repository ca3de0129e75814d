"""Teach GPT-2 to like the letter X.

Recipe 1 of the research notes. We pick a target distribution P over the vocabulary that puts its mass on
tokens whose text contains the letter, and minimise KL(P || Q) where Q = softmax(model logits). After a
few hundred steps the model's samples are full of X ("X-soup" at lr 1e-4; at 1e-6 the text stays natural).

    python train_xkl.py                        # defaults from the notes: Adam, lr 1e-4, batch 4, 300 steps
    python train_xkl.py --lr 1e-6              # barely moves
    python train_xkl.py --target smoothed --alpha 0.5 --positions all

Outputs in --out: metrics.jsonl, summary.json, samples_before.txt, samples_after.txt, loss.svg and the
fine-tuned weights (model.safetensors + config.json, loadable by transformers).
"""

import argparse
import time

import numpy as np
import torch

from nanotune import generate, load_tokenizer
from nanotune.data import read_book
from nanotune.utils import (
    RunLog, add_common_args, all_reduce_mean, autocast, check_common_args, check_finite, cleanup_distributed,
    default_dtype, die, load_model, make_optimizer, make_out_dir, no_sync_unless_last, pick_device, plot_curves,
    save_json, seed_everything, setup_distributed, wrap_model,
)  # fmt: skip


# KL(P || Q) = sum_i P_i (log P_i - log Q_i), with log Q = log_softmax(logits) and 0 log 0 = 0,
# averaged over rows. logits (N, V); target_probs (V,) or (N, V), each row summing to 1.
def xkl_loss(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    log_q = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    p = target_probs.to(log_q.dtype).expand_as(log_q)
    kl = torch.xlogy(p, p) - p * log_q  # xlogy(0, 0) = 0
    return kl.sum(dim=-1).mean()


def letter_tokens(enc, letter: str, case_sensitive: bool) -> torch.Tensor:
    """Boolean mask (V,) of the tokens whose decoded text contains the letter (special tokens excluded)."""
    fold = (lambda s: s) if case_sensitive else str.lower  # noqa: E731
    texts = (enc.decode_single_token_bytes(i).decode("utf-8", "replace") for i in range(enc.eot_token))
    has = [fold(letter) in fold(text) for text in texts]
    return torch.tensor(has + [False] * (enc.n_vocab - enc.eot_token))


def target_distribution(is_letter: torch.Tensor, shape: str, alpha: float) -> torch.Tensor:
    """uniform: all mass spread evenly over the letter tokens; smoothed: mass alpha on them, 1 - alpha elsewhere."""
    n = int(is_letter.sum())
    if shape == "uniform":
        return is_letter.float() / n
    rest = is_letter.numel() - n
    return torch.where(is_letter, torch.tensor(alpha / n), torch.tensor((1 - alpha) / rest))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, lr=1e-4, steps=300, batch_size=4)
    p.add_argument("--letter", default="X", help="the letter the model should learn to like (default X)")
    p.add_argument("--case-sensitive", action="store_true", help="count only the letter's exact case")
    p.add_argument("--target", default="uniform", choices=["uniform", "smoothed"], help="target distribution shape")
    p.add_argument("--alpha", type=float, default=0.9, help="with --target smoothed: mass on letter tokens, in (0, 1)")
    p.add_argument("--input", nargs="+", default=["random"], metavar="random | text FILE",
                   help="'random': fresh random token sequences each step; 'text FILE': windows of a text file")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence (default 64)")
    p.add_argument("--positions", default="all", choices=["last", "all"],
                   help="loss on every position (default: samples condition on contexts of every length) "
                        "or on the last position only")  # fmt: skip
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--gen-tokens", type=int, default=200, help="sampled tokens for the x_share metric")
    p.add_argument("--prompt", default="The", help="the fixed context the samples start from")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # ---- check everything before any work
    check_common_args(args)
    if len(args.letter) != 1:
        die(f"--letter must be a single character, got {args.letter!r}")
    if args.target == "smoothed" and not 0 < args.alpha < 1:
        die(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.input[0] not in ("random", "text") or (args.input[0] == "random") != (len(args.input) == 1) or len(args.input) > 2:
        die(f"--input takes 'random' or 'text FILE', got {' '.join(args.input)!r}")
    if args.gen_tokens < 1 or args.seq_len < 1:
        die("--gen-tokens and --seq-len must be >= 1")

    rank, world, device = setup_distributed(pick_device(args.device))
    seed_everything(args.seed + rank)  # each rank draws different data
    dtype = args.dtype or default_dtype(device)
    ctx = autocast(device, dtype)
    enc = load_tokenizer()

    is_letter = letter_tokens(enc, args.letter, args.case_sensitive)
    if not is_letter.any():
        die(f"no token of the vocabulary contains {args.letter!r}; pick another --letter")
    target_probs = target_distribution(is_letter, args.target, args.alpha).to(device)  # (V,)

    text_tokens = None
    if args.input[0] == "text":
        text_tokens = np.array(enc.encode_ordinary(read_book(args.input[1])), dtype=np.int64)
        if len(text_tokens) <= args.seq_len:
            die(f"{args.input[1]} has {len(text_tokens)} tokens, fewer than one window of --seq-len {args.seq_len}")

    model, model_name = load_model(args.model, device, quiet=rank != 0)
    if args.seq_len > model.config.n_positions:
        die(f"--seq-len {args.seq_len} exceeds the model's context of {model.config.n_positions}")
    out = make_out_dir(args.out, "xkl") if rank == 0 else None
    log = RunLog(out) if rank == 0 else None
    if rank == 0:
        print(f"model {model_name}: {model.num_params() / 1e6:.1f}M parameters on {device} ({dtype}); "
              f"{int(is_letter.sum())} of {enc.n_vocab} tokens contain {args.letter!r}; "
              f"effective batch {args.batch_size * world} sequences", flush=True)  # fmt: skip

    prompt = torch.tensor(enc.encode_ordinary(args.prompt) or [enc.eot_token], device=device)

    def x_share(tag):
        """Share of --gen-tokens sampled tokens that contain the letter (the same seed before and after)."""
        model.eval()
        sample = generate(model, prompt, args.gen_tokens, banned_tokens=[enc.eot_token],
                          generator=torch.Generator(device).manual_seed(args.seed))  # fmt: skip
        new = sample[len(prompt) :]
        share = is_letter.to(device)[new].float().mean().item()
        text = enc.decode(sample.tolist())
        (out / f"samples_{tag}.txt").write_text(text + "\n")
        print(f"--- sample {tag} training (x_share {share:.3f}) ---\n{text}\n---", flush=True)
        model.train()
        return share

    x_share_before = x_share("before") if rank == 0 else None

    def get_batch():  # (B, T) token ids
        B, T = args.batch_size, args.seq_len
        if text_tokens is None:
            return torch.randint(0, enc.eot_token, (B, T)).to(device)  # fresh random tokens each step
        starts = np.random.randint(0, len(text_tokens) - T, size=B)
        return torch.from_numpy(np.stack([text_tokens[s : s + T] for s in starts])).to(device)

    train_model = wrap_model(model, device, world, args.compile)
    optimizer = make_optimizer(model, args.optimizer, args.lr, device=device)
    model.train()
    losses, t_log = [], time.time()
    for step in range(1, args.steps + 1):
        idx = get_batch()
        for k, micro in enumerate(idx.chunk(args.grad_accum)):
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                with ctx:
                    logits = train_model(micro)  # (b, T, V)
                logits = logits[:, -1, :] if args.positions == "last" else logits.flatten(0, 1)  # (N, V)
                loss = xkl_loss(logits, target_probs) / args.grad_accum
                loss.backward()
        check_finite(loss, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(all_reduce_mean(loss.item() * args.grad_accum, device))
        if rank == 0 and (step % args.log_every == 0 or step in (1, args.steps)):
            n_steps = step % args.log_every or args.log_every
            tok_s = n_steps * args.batch_size * world * args.seq_len / (time.time() - t_log)
            log.log(step=step, loss=losses[-1], lr=args.lr, tokens_per_s=tok_s)
            t_log = time.time()

    if rank == 0:
        x_share_after = x_share("after")
        summary = {
            "x_share_before": x_share_before, "x_share_after": x_share_after,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "steps": args.steps, "lr": args.lr, "model": model_name, "letter_tokens": int(is_letter.sum()),
            "world_size": world, "args": vars(args),
        }  # fmt: skip
        save_json(out / "summary.json", summary)
        plot_curves(out / "loss.svg", {"KL(P||Q)": log.curve("loss")}, "X-KL loss")
        if not args.no_save:
            model.save_pretrained(out)
        log.close()
        print(f"x_share {x_share_before:.3f} -> {x_share_after:.3f}; outputs in {out}", flush=True)
    cleanup_distributed()


if __name__ == "__main__":
    main()
