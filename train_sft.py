"""Instruction-tune GPT-2: supervised fine-tuning with the loss on response tokens only.

Recipe 3 of the research notes. Each example becomes `prompt + response + <|endoftext|>` (the Alpaca
template below). The labels mask every prompt token and every padding position, so the model is trained to
answer, not to repeat instructions. Validation perplexity = exp(mean NLL over response tokens).

    python train_sft.py                                         # downloads the 1,100-example Alpaca-style set
    python train_sft.py --data my.jsonl --template plain        # {"prompt", "response"} pairs work too
    python train_dpo.py --model out/sft-.../                    # then preference-tune the result

Outputs in --out: metrics.jsonl, summary.json, responses.jsonl (greedy answers to the test prompts),
loss.svg and the fine-tuned weights.
"""

import json

import torch

from nanotune import generate, load_tokenizer
from nanotune.data import INSTRUCTIONS_URL, default_file, read_records
from nanotune.flags import Parser, add_common_args, integer, parse_run_args, real
from nanotune.instruct import (
    IGNORE,
    check_answerable,
    collate,
    encode_pair,
    format_prompt,
    normalize_examples,
    split_examples,
    token_logprobs,
)
from nanotune.loader import load_model
from nanotune.metrics import progress
from nanotune.peft import apply_peft, describe_trainable
from nanotune.plot import plot_curves
from nanotune.run import Run
from nanotune.training import clip_gradients, lr_at, make_optimizer, no_sync_unless_last, wrap_model
from nanotune.utils import NanotuneError, perplexity


# L3 = L2 + lm_weight * L1, GPT-1's auxiliary objective (Radford et al. 2018): L2 = mean NLL of the response
# tokens (labels), L1 = mean NLL of the prompt's own next tokens (prompt_labels), i.e. plain language modelling
# of the instruction. n_response / n_prompt are the token counts the two means divide by: the whole batch's when
# it is split into micro-batches (so the micro-batch losses add up to the batch's L3), else this call's own.
def sft_loss(logits, labels, prompt_labels=None, lm_weight: float = 0.0, n_response=None, n_prompt=None):
    lse = torch.logsumexp(logits.float(), dim=-1)  # (B, T): log softmax's normaliser, shared by both terms
    n_response = (labels != IGNORE).sum() if n_response is None else n_response
    loss = -token_logprobs(logits, labels, lse).sum() / n_response  # L2
    if lm_weight:
        n_prompt = (prompt_labels != IGNORE).sum() if n_prompt is None else n_prompt
        loss = loss + lm_weight * -token_logprobs(logits, prompt_labels, lse).sum() / max(n_prompt, 1)  # + L * L1
    return loss


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p, lr=5e-5, steps=200, batch_size=8)
    data = "JSON list or JSONL of examples (default: download the 1,100-example set of 'LLMs from scratch' into data/)"
    p.add_argument("--data", default=None, help=data)
    p.add_argument("--template", default="alpaca", choices=["alpaca", "plain"], help="prompt layout (default alpaca)")
    p.add_argument("--max-len", type=integer(2), default=256, help="longest sequence; longer ones are truncated")
    p.add_argument("--limit", type=integer(1), default=None, help="use only the first N examples (quick runs)")
    p.add_argument("--weight-decay", type=real(0), default=0.0, help="AdamW weight decay (default 0)")
    lm_weight = "add this times the next-token loss on the prompt tokens (GPT-1's L3 = L2 + L * L1; default 0)"
    p.add_argument("--lm-weight", type=real(0), default=0.0, help=lm_weight)
    p.add_argument("--eval-every", type=integer(1), default=25, help="validation loss every N steps (default 25)")
    responses = "test prompts answered after training (default 20; 0: none)"
    p.add_argument("--responses", type=integer(0), default=20, help=responses)
    p.add_argument("--max-new-tokens", type=integer(1), default=128, help="length limit of those answers")
    # what this recipe trained and measured: a --resume keeps them (nanotune/flags.py adds the model and --peft)
    return parse_run_args(p, argv, fixed_on_resume="--data --template --limit --max-len")


def main(argv=None):
    args = parse_args(argv)
    # device, processes, the --out folder, metrics, checkpoints, Ctrl-C: see nanotune/run.py
    with Run(args, __file__, outputs=("responses.jsonl", "loss.svg"), show=("loss", "val_loss", "val_ppl")) as run:
        train(args, run)


def train(args, run):
    device = run.device
    enc = load_tokenizer()

    # ---- data: every example checked, templated and tokenised before any training
    path = args.data or default_file("instruction-data.json", INSTRUCTIONS_URL)
    examples = normalize_examples(read_records(path, args.limit), path)
    train, val, test = split_examples(examples, args.seed)
    if not train or not val:
        raise NanotuneError(
            f"{path}: {len(examples)} examples give {len(train)} training and {len(val)} validation "
            "examples; need at least one of each"
        )
    encoded, truncated = {}, 0
    for name, split in (("train", train), ("val", val)):
        encoded[name] = []
        for ex in split:
            prompt_ids, response_ids, cut = encode_pair(
                enc, format_prompt(ex, args.template), ex["output"], args.max_len, f"{path}: record {ex['record']}"
            )
            encoded[name].append((prompt_ids, response_ids))
            truncated += cut

    model, model_name = load_model(args.model, device, quiet=not run.master)
    apply_peft(model, args, model_name)  # --peft: freeze the base, add what trains (nanotune/peft.py)
    context = model.config.n_positions - model.n_virtual  # prompt-tuning embeddings take context too
    if args.max_len > context:
        raise NanotuneError(
            f"--max-len {args.max_len} exceeds the model's context of {context}"
            + (f" ({model.n_virtual} taken by --prompt-tokens)" if model.n_virtual else "")
        )
    answered = test[: args.responses]
    answer_prompts = check_answerable(enc, answered, args.template, context, path)
    run.summary.update(model=model_name, train_examples=len(train), truncated_examples=truncated, world_size=run.world)
    if run.master:
        print(
            f"model {model_name} ({args.peft}: {describe_trainable(model)}) on {device} ({run.dtype}); "
            f"{len(train)} train / {len(val)} val / {len(test)} test examples; {truncated} truncated to "
            f"--max-len {args.max_len}; effective batch {args.batch_size * run.world}",
            flush=True,
        )

    @torch.no_grad()
    def val_loss():
        """Mean NLL over every response token of the validation split (token-weighted, like the training loss)."""
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(encoded["val"]), args.batch_size):
            input_ids, labels = collate(encoded["val"][i : i + args.batch_size], enc.eot_token, device)
            with run.ctx:
                logits = model(input_ids)
            total -= token_logprobs(logits, labels).sum().item()
            count += int((labels != IGNORE).sum())
        model.train()
        return total / count

    if run.master and not run.resumed:
        loss = val_loss()
        run.log(0, val_loss=loss, val_ppl=perplexity(loss))

    optimizer = make_optimizer(model, "adamw", args.lr, args.weight_decay, device)
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws its own examples
    first_step = run.track(model, optimizer, data_rng)  # with --resume: the checkpoint's weights, optimizer, RNG
    train_model = wrap_model(model, device, run.world, args.compile, args.activation_checkpointing)
    model.train()
    for step in range(first_step, args.steps + 1):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = torch.randint(len(encoded["train"]), (args.batch_size,), generator=data_rng).tolist()
        batch = [encoded["train"][i] for i in ids]
        # micro-batches hold different numbers of response tokens, so a plain mean per micro-batch divided by
        # grad_accum would weight a token of a short micro-batch more: dividing every micro-batch's sum by the
        # whole batch's token count makes the micro-batch losses add up to exactly the batch's per-token mean
        # (this process's batch: under DDP the processes' means are averaged, each weighing the same, as nanoGPT's)
        n_response = sum(len(r) for _, r in batch)
        n_prompt = sum(len(p) - 1 for p, _ in batch)  # prompt tokens that have a next prompt token
        step_loss, n_tokens = 0.0, 0
        for k in range(args.grad_accum):
            micro = batch[k :: args.grad_accum]
            input_ids, labels, prompt_labels = collate(micro, enc.eot_token, device, prompt_labels=True)
            # under DDP the gradients are all-reduced once, in the last micro-batch's backward
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                with run.ctx:
                    logits = train_model(input_ids)  # (b, T, V)
                loss = sft_loss(logits, labels, prompt_labels, args.lm_weight, n_response, n_prompt)
                loss.backward()
            step_loss += loss.detach()  # (a tensor: read back once, in run.check)
            n_tokens += input_ids.numel()
        grad_norm = clip_gradients(model, args.grad_clip)  # the norm before clipping
        run.check(step, step_loss, grad_norm)  # NaN/inf or an exploding loss stops here, before the update
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.master and (step % args.eval_every == 0 or step == args.steps):
            loss = val_loss()
            run.log(step, val_loss=loss, val_ppl=perplexity(loss))
        run.log_step(step, n_tokens, loss=step_loss, lr=lr, grad_norm=grad_norm)
        run.checkpoint_if_due(step)  # every --save-every steps and at the end; on Ctrl-C: save, then exit 130

    # ---- training is over: the weights and the summary so far are saved before anything that might fail
    if not run.master:
        return
    val_losses = [v for _, v in run.curve("val_loss")]
    train_losses = run.curve("loss")
    run.summary.update(
        val_loss_before=val_losses[0],
        val_loss_after=val_losses[-1],
        val_ppl_before=perplexity(val_losses[0]),
        val_ppl_after=perplexity(val_losses[-1]),
        train_loss_last=train_losses[-1][1] if train_losses else None,
        steps=args.steps,
        lr=args.lr,
    )
    run.save_model(model)
    with run.optional("answering the test prompts"):
        # greedy answers to held-out test prompts, stopping at <|endoftext|> (each prompt was checked to fit)
        model.eval()
        responses = []
        for i in progress(range(0, len(answered), 8), "answering the test prompts"):
            prompts = answer_prompts[i : i + 8]
            budget = min(args.max_new_tokens, context - max(map(len, prompts)))
            with run.ctx:
                outputs = generate(model, prompts, budget, temperature=0, eos_token=enc.eot_token)
            for ex, prompt, seq in zip(answered[i : i + 8], prompts, outputs):
                answer = enc.decode([t for t in seq[len(prompt) :] if t != enc.eot_token]).strip()
                responses.append(
                    {
                        "record": ex["record"],
                        "instruction": ex["instruction"],
                        "input": ex["input"],
                        "reference": ex["output"],
                        "model": answer,
                    }
                )
        run.write_text("responses.jsonl", "".join(json.dumps(r) + "\n" for r in responses))
        if responses:
            first = responses[0]
            print(f"--- test prompt ---\n{first['instruction']}\n--- model ---\n{first['model']}\n---", flush=True)
    with run.optional("the loss plot"):
        plot_curves(
            run.out / "loss.svg",
            {"train": train_losses, "validation": run.curve("val_loss")},
            title="SFT: response-token NLL (nats)",
        )
    s = run.summary
    print(
        f"validation perplexity {s['val_ppl_before']:.2f} -> {s['val_ppl_after']:.2f} "
        f"(loss {s['val_loss_before']:.3f} -> {s['val_loss_after']:.3f}); outputs in {run.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
