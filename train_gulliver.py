"""Fine-tune GPT-2 on Gulliver's Travels with the plain next-token loss.

Recipe 2 of the research notes. The model reads random windows of the book and learns to predict each next
token. Two things to watch: the share of generated tokens that are among the book's 100 most frequent tokens
(the notes saw ~40% before and ~60% after), and the held-out loss, which first falls and then, as the model
starts to memorise the training split, rises again (overfitting).

    python train_gulliver.py                                 # downloads the book (Gutenberg #829) once
    python train_gulliver.py --data path/to/gulliver.txt --steps 1000 --eval-every 50

Outputs in --out: metrics.jsonl, summary.json, samples_before.txt, samples_after.txt, loss.svg, weights.
"""

import sys
from collections import Counter

import torch

from nanotune import generate, load_tokenizer
from nanotune.data.sources import GULLIVER_URL, default_file, read_book
from nanotune.flags import Parser, add_common_args, integer, parse_run_args, real
from nanotune.lifecycle.run import Run
from nanotune.lifecycle.step import clip_gradients, lr_at, make_optimizer, no_sync_unless_last, wrap_model
from nanotune.model.loader import load_model
from nanotune.model.peft import PeftSpec, apply_peft, describe_trainable
from nanotune.plot import plot_curves
from nanotune.utils import NanotuneError, perplexity


# Position t predicts token t+1: NLL = -mean_{b, t < T-1} log softmax(logits[b, t])[tokens[b, t+1]], with
# log softmax(z)[y] = z[y] - logsumexp(z) (backward then keeps no (B, T, V) tensor but the logits).
# logits (B, T, V), tokens (B, T) -> scalar.
def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logits, targets = logits[:, :-1].float(), tokens[:, 1:]  # (B, T-1, V), (B, T-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (torch.logsumexp(logits, dim=-1) - picked).mean()


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p, lr=5e-5, steps=300, batch_size=16)
    p.add_argument("--data", default=None, help="the book as plain text (default: download Gutenberg #829 into data/)")
    p.add_argument("--seq-len", type=integer(2), default=256, help="tokens per training window (default 256)")
    p.add_argument("--weight-decay", type=real(0), default=0.0, help="AdamW weight decay (default 0)")
    held_out = "the last share of the book, held out (default 0.1)"
    p.add_argument("--val-fraction", type=real(0, 1, low_open=True, high_open=True), default=0.1, help=held_out)
    p.add_argument("--eval-every", type=integer(1), default=25, help="held-out loss every N steps (default 25)")
    p.add_argument("--eval-batches", type=integer(1), default=8, help="batches of held-out windows per evaluation")
    p.add_argument("--samples", type=integer(1), default=10, help="samples for the top100_share metric")
    p.add_argument("--sample-tokens", type=integer(1), default=100, help="tokens per sample (default 100)")
    p.add_argument("--prompt", default="", help="samples continue this text (default: start of a document)")
    # what this recipe trained and measured: a --resume keeps them (nanotune/flags.py adds the model and --peft)
    fixed = "--data --val-fraction --seq-len --eval-batches --samples --sample-tokens --prompt"  # (top100_share's)
    return parse_run_args(p, argv, fixed_on_resume=fixed)


def main(argv=None):
    args = parse_args(argv)
    outputs = ("samples_before.txt", "samples_after.txt", "loss.svg")
    with Run(args, __file__, outputs=outputs, show=("loss", "val_loss")) as run:
        train(args, run)
    if run.exit_code:  # 2: the error line is printed; 130: interrupted, the resume command is printed
        sys.exit(run.exit_code)


def train(args, run):
    device = run.device
    enc = load_tokenizer()

    # ---- data: the book without its Gutenberg header and footer, last 10% held out
    path = args.data or default_file("gulliver.txt", GULLIVER_URL)
    tokens = torch.tensor(enc.encode_ordinary(read_book(path)))
    cut = int(len(tokens) * (1 - args.val_fraction))
    train_tokens, val_tokens = tokens[:cut], tokens[cut:]
    T = args.seq_len
    if len(train_tokens) <= T or len(val_tokens) <= T:
        raise NanotuneError(
            f"{path}: {len(tokens)} tokens is too short for windows of --seq-len {T} in both the "
            f"training and the held-out split ({len(train_tokens)} / {len(val_tokens)} tokens)"
        )
    top100 = torch.tensor([t for t, _ in Counter(train_tokens.tolist()).most_common(100)], device=device)

    model, model_name = load_model(args.model, device, quiet=not run.master)
    peft = PeftSpec.from_flags(args)
    apply_peft(model, peft, model_name)
    context = model.config.n_positions - model.n_virtual  # prompt-tuning embeddings take context too
    if T > context:
        raise NanotuneError(f"--seq-len {T} exceeds the model's context of {context}")
    prompt = enc.encode_ordinary(args.prompt) or [enc.eot_token]
    if len(prompt) + args.sample_tokens > context:
        raise NanotuneError(
            f"--prompt ({len(prompt)} tokens) + --sample-tokens {args.sample_tokens} exceed the "
            f"model's context of {context}"
        )
    run.summary.update(model=model_name, world_size=run.world)
    if run.master:
        print(
            f"model {model_name} ({args.peft}: {describe_trainable(model)}) on {device} ({run.dtype}); book "
            f"{len(train_tokens):,} train / {len(val_tokens):,} held-out tokens; effective batch "
            f"{args.batch_size * run.world} x {T} tokens",
            flush=True,
        )

    @torch.no_grad()
    def val_loss():
        """Mean NLL over the same held-out windows every time (non-overlapping, from the start of the split)."""
        model.eval()
        n_windows = min(args.eval_batches * args.batch_size, len(val_tokens) // T)
        windows = val_tokens[: n_windows * T].view(n_windows, T).to(device)
        total = 0.0
        for chunk in windows.split(args.batch_size):
            with run.ctx:
                total += next_token_nll(model(chunk), chunk).item() * len(chunk)
        model.train()
        return total / n_windows

    def top100_share(tag):
        """Share of sampled tokens that are among the book's 100 most frequent (same seed before and after)."""
        model.eval()
        prompts = torch.tensor([prompt] * args.samples, device=device)
        generator = torch.Generator(device).manual_seed(args.seed)
        with run.ctx:
            samples = generate(model, prompts, args.sample_tokens, banned_tokens=[enc.eot_token], generator=generator)
        model.train()
        new = samples[:, len(prompt) :]  # (samples, sample_tokens): every sample has full length
        share = torch.isin(new, top100).float().mean().item()
        texts = [enc.decode(s.tolist()) for s in new]
        run.write_text(f"samples_{tag}.txt", "\n\n=====\n\n".join(texts) + "\n")
        print(f"--- a sample {tag} training (top100_share {share:.3f}) ---\n{texts[0]}\n---", flush=True)
        return share

    if run.master and not run.resumed:
        run.summary["top100_share_before"] = top100_share("before")
        run.log(0, val_loss=val_loss())

    optimizer = make_optimizer(model, "adamw", args.lr, args.weight_decay, device)
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws different windows
    first_step = run.track(model, optimizer, data_rng)
    train_model = wrap_model(model, device, run.world, args.compile, args.activation_checkpointing)
    model.train()
    for step in range(first_step, args.steps + 1):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_tokens) - T, (args.batch_size,), generator=data_rng).tolist()
        batch = torch.stack([train_tokens[s : s + T] for s in starts]).to(device)  # (B, T)
        step_loss = 0.0
        for k, micro in enumerate(batch.chunk(args.grad_accum)):
            # under DDP the gradients are all-reduced once, in the last micro-batch's backward
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                with run.ctx:
                    logits = train_model(micro)  # (b, T, V)
                # equal-sized micro-batches: the mean of their means is the batch mean, so each adds 1/grad_accum
                loss = next_token_nll(logits, micro) / args.grad_accum
                loss.backward()
            step_loss += loss.detach()  # (a tensor: read back once, in run.stop_if_diverged)
        grad_norm = clip_gradients(model, args.grad_clip)  # the norm before clipping
        run.stop_if_diverged(step, step_loss, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.master and (step % args.eval_every == 0 or step == args.steps):
            run.log(step, val_loss=val_loss())
        run.log.count(batch.numel())
        if run.log.due(step):
            run.log.step(step, loss=step_loss, lr=lr, grad_norm=grad_norm)
        if run.checkpoint_due(step):
            run.save_checkpoint(step)
        if run.stop_requested:
            return

    if not run.master:
        return
    val_losses = [v for _, v in run.log.curve("val_loss")]
    train_losses = run.log.curve("loss")
    run.summary.update(
        train_loss_last=train_losses[-1][1] if train_losses else None,
        val_loss_first=val_losses[0],
        val_loss_best=min(val_losses),
        val_loss_last=val_losses[-1],
        val_ppl_last=perplexity(val_losses[-1]),
        steps=args.steps,
        lr=args.lr,
    )
    run.save_model(model)
    with run.optional("sampling after training"):
        run.summary["top100_share_after"] = top100_share("after")
    with run.optional("the loss plot"):
        plot_curves(
            run.out / "loss.svg",
            {"train": train_losses, "held-out": run.log.curve("val_loss")},
            title="Gulliver fine-tuning: next-token NLL (nats)",
            ylabel="NLL (nats per token)",
        )
    s = run.summary
    print(
        f"top100_share {s.get('top100_share_before', float('nan')):.3f} -> "
        f"{s.get('top100_share_after', float('nan')):.3f}; "
        f"held-out loss {s['val_loss_first']:.3f} -> best {s['val_loss_best']:.3f} -> last {s['val_loss_last']:.3f}; "
        f"outputs in {run.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
