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

import sys

import torch

from nanotune import generate, load_tokenizer
from nanotune.data.sources import read_book
from nanotune.flags import Parser, add_common_args, integer, parse_run_args, real
from nanotune.lifecycle.run import Run
from nanotune.lifecycle.step import clip_gradients, lr_at, make_optimizer, no_sync_unless_last, wrap_model
from nanotune.model.loader import load_model
from nanotune.model.peft import PeftSpec, apply_peft, describe_trainable
from nanotune.plot import plot_curves
from nanotune.tokenizer import letter_tokens
from nanotune.utils import NanotuneError, die


# KL(P || Q) = sum_i P_i (log P_i - log Q_i), with 0 log 0 = 0, averaged over rows. As log Q_i = z_i - logsumexp(z)
# and each row of P sums to 1: KL = sum_i P_i log P_i - sum_i P_i z_i + logsumexp(z), which builds no (N, V)
# temporary for a target shared by every row (a matrix-vector product). logits z (N, V); target_probs (V,) or
# (N, V), each row summing to 1.
def xkl_loss(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    p = target_probs.to(logits.dtype)
    cross = logits @ p if p.dim() == 1 else (logits * p).sum(-1)  # (N,) sum_i P_i z_i
    return (torch.xlogy(p, p).sum(-1) - cross + torch.logsumexp(logits, dim=-1)).mean()  # xlogy(0, 0) = 0


def target_distribution(is_letter: torch.Tensor, shape: str, alpha: float) -> torch.Tensor:
    """uniform: all mass spread evenly over the letter tokens; smoothed: mass alpha on them, 1 - alpha elsewhere."""
    n = int(is_letter.sum())
    if shape == "uniform":
        return is_letter.float() / n
    rest = is_letter.numel() - n
    return torch.where(is_letter, torch.tensor(alpha / n), torch.tensor((1 - alpha) / rest))


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p, lr=1e-4, steps=300, batch_size=4)
    p.add_argument("--letter", default="X", help="the letter the model should learn to like (default X)")
    p.add_argument("--case-sensitive", action="store_true", help="count only the letter's exact case")
    p.add_argument("--target", default="uniform", choices=["uniform", "smoothed"], help="target distribution shape")
    alpha = "with --target smoothed: the mass on letter tokens, in (0, 1) (default 0.9)"
    p.add_argument("--alpha", type=real(0, 1, low_open=True, high_open=True), default=None, help=alpha)
    p.add_argument(
        "--input",
        nargs="+",
        default=["random"],
        metavar="random | text FILE",
        help="'random': fresh random token sequences each step; 'text FILE': windows of a text file",
    )
    p.add_argument("--seq-len", type=integer(1), default=64, help="tokens per training sequence (default 64)")
    p.add_argument(
        "--positions",
        default="all",
        choices=["last", "all"],
        help="loss on every position (default: samples condition on contexts of every length) "
        "or on the last position only",
    )
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--gen-tokens", type=integer(1), default=200, help="sampled tokens for the x_share metric")
    p.add_argument("--prompt", default="The", help="the fixed context the samples start from")
    # what this recipe trained and measured: a --resume keeps them (nanotune/flags.py adds the model and --peft)
    return parse_run_args(
        p, argv, fixed_on_resume="--letter --case-sensitive --target --alpha --input --positions --prompt --gen-tokens"
    )


def main(argv=None):
    args = parse_args(argv)
    if len(args.letter) != 1:
        die(f"--letter must be a single character, got {args.letter!r}")
    if args.target == "uniform" and args.alpha is not None and not args.resume:
        die("--alpha is --target smoothed's mass on the letter: --target uniform has none (add --target smoothed)")
    if args.target == "smoothed" and args.alpha is None:
        args.alpha = 0.9
    if (
        args.input[0] not in ("random", "text")
        or (args.input[0] == "random") != (len(args.input) == 1)
        or len(args.input) > 2
    ):
        die(f"--input takes 'random' or 'text FILE', got {' '.join(args.input)!r}")
    with Run(args, __file__, outputs=("samples_before.txt", "samples_after.txt", "loss.svg")) as run:
        train(args, run)
    if run.exit_code:  # 2: the error line is printed; 130: interrupted, the resume command is printed
        sys.exit(run.exit_code)


def train(args, run):
    device = run.device
    enc = load_tokenizer()
    is_letter = letter_tokens(enc, args.letter, args.case_sensitive)
    if not is_letter.any():
        raise NanotuneError(f"no token of the vocabulary contains {args.letter!r}; pick another --letter")
    target_probs = target_distribution(is_letter, args.target, args.alpha).to(device)  # (V,)

    # ---- data: fresh random token sequences each step, or random windows of a text (chosen once, here)
    B, T = args.batch_size, args.seq_len
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws different data
    if args.input[0] == "random":

        def get_batch():  # (B, T) token ids, uniformly random
            return torch.randint(0, enc.eot_token, (B, T), generator=data_rng).to(device)

    else:
        text_tokens = torch.tensor(enc.encode_ordinary(read_book(args.input[1])))
        if len(text_tokens) <= T:
            raise NanotuneError(
                f"{args.input[1]} has {len(text_tokens)} tokens, fewer than one window of --seq-len {T}"
            )

        def get_batch():  # (B, T) token ids, windows of the text
            starts = torch.randint(0, len(text_tokens) - T, (B,), generator=data_rng).tolist()
            return torch.stack([text_tokens[s : s + T] for s in starts]).to(device)

    # the loss reads every position's prediction, or the last one's only (then the head runs there alone)
    positions = slice(None) if args.positions == "all" else slice(-1, None)

    model, model_name = load_model(args.model, device, quiet=not run.master)
    peft = PeftSpec.from_flags(args)
    apply_peft(model, peft, model_name)
    context = model.config.n_positions - model.n_virtual  # prompt-tuning embeddings take context too
    if T > context:
        raise NanotuneError(f"--seq-len {T} exceeds the model's context of {context}")
    prompt = torch.tensor(enc.encode_ordinary(args.prompt) or [enc.eot_token], device=device)
    if len(prompt) + args.gen_tokens > context:
        raise NanotuneError(
            f"--prompt ({len(prompt)} tokens) + --gen-tokens {args.gen_tokens} exceed the model's context of {context}"
        )
    run.summary.update(model=model_name, letter_tokens=int(is_letter.sum()), world_size=run.world)
    if run.master:
        print(
            f"model {model_name} ({args.peft}: {describe_trainable(model)}) on {device} ({run.dtype}); "
            f"{int(is_letter.sum())} of {enc.n_vocab} tokens contain {args.letter!r}; "
            f"effective batch {args.batch_size * run.world} sequences",
            flush=True,
        )

    def x_share(tag):
        """Share of --gen-tokens sampled tokens that contain the letter (the same seed before and after)."""
        model.eval()
        generator = torch.Generator(device).manual_seed(args.seed)
        with run.ctx:
            sample = generate(model, prompt, args.gen_tokens, banned_tokens=[enc.eot_token], generator=generator)
        model.train()
        share = is_letter.to(device)[sample[len(prompt) :]].float().mean().item()
        text = enc.decode(sample.tolist())
        run.write_text(f"samples_{tag}.txt", text + "\n")
        print(f"--- sample {tag} training (x_share {share:.3f}) ---\n{text}\n---", flush=True)
        return share

    if run.master and not run.resumed:
        run.summary["x_share_before"] = x_share("before")
    optimizer = make_optimizer(model, args.optimizer, args.lr, device=device)
    first_step = run.track(model, optimizer, data_rng)
    train_model = wrap_model(model, device, run.world, args.compile, args.activation_checkpointing)
    model.train()
    for step in range(first_step, args.steps + 1):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = get_batch()
        step_loss = 0.0
        for k, micro in enumerate(idx.chunk(args.grad_accum)):
            # under DDP the gradients are all-reduced once, in the last micro-batch's backward
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                with run.ctx:
                    logits = train_model(micro, positions=positions)  # (b, T or 1, V)
                # equal-sized micro-batches: the mean of their means is the batch mean, so each adds 1/grad_accum
                loss = xkl_loss(logits.flatten(0, 1), target_probs) / args.grad_accum
                loss.backward()
            step_loss += loss.detach()  # (a tensor: read back once, in run.stop_if_diverged)
        grad_norm = clip_gradients(model, args.grad_clip)  # the norm before clipping
        run.stop_if_diverged(step, step_loss, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.log.count(idx.numel())
        if run.log.due(step):
            run.log.step(step, loss=step_loss, lr=lr, grad_norm=grad_norm)
        if run.checkpoint_due(step):
            run.save_checkpoint(step)
        if run.stop_requested:
            return

    if not run.master:
        return
    losses = run.log.curve("loss")
    run.summary.update(
        steps=args.steps,
        lr=args.lr,
        loss_first=run.summary.get("loss_first"),
        loss_last=losses[-1][1] if losses else None,
    )
    run.save_model(model)
    with run.optional("sampling after training"):
        run.summary["x_share_after"] = x_share("after")
    with run.optional("the loss plot"):
        plot_curves(run.out / "loss.svg", {"KL(P||Q)": losses}, "X-KL loss", ylabel="KL (nats)")
    before, after = run.summary.get("x_share_before"), run.summary.get("x_share_after")
    print(
        f"x_share {before if before is None else f'{before:.3f}'} -> {after if after is None else f'{after:.3f}'}; "
        f"outputs in {run.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
