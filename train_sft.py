"""Instruction-tune GPT-2: supervised fine-tuning with the loss on response tokens only.

Recipe 3 of the research notes. Each example becomes `prompt + response + <|endoftext|>` in the chat template
(nanotune/data/chat.py); a conversation, every exchange so, each answer ending in <|endoftext|>. The labels mask every
prompt and user token and every padding position, so the model is trained to answer, not to repeat
instructions. Validation perplexity = exp(mean NLL over response tokens), overall and per source.

    python train_sft.py                                         # downloads the 1,100-example Alpaca-style set
    python train_sft.py --data chats.jsonl --template plain     # any format of docs/data.md: messages, ShareGPT...
    python train_sft.py --data a.jsonl org/name:train --mix 3,1 # several sources at once, drawn 3 to 1
    python train_dpo.py --model out/sft-.../                    # then preference-tune the result

Outputs in --out: metrics.jsonl, summary.json, responses.jsonl (greedy answers to the test prompts),
loss.svg and the fine-tuned weights.
"""

import itertools
import json
import sys

import torch

from nanotune import generate, load_tokenizer
from nanotune.data.formats import last_user
from nanotune.data.instruct import (
    IGNORE,
    Mixture,
    check_answerable,
    collate_masked,
    encode_example,
    load_examples,
    parse_mix,
    sft_loss,
    source_names,
    split_examples,
    token_logprobs,
)
from nanotune.data.sources import INSTRUCTIONS_URL, default_file
from nanotune.flags import Parser, add_common_args, integer, parse_run_args, real
from nanotune.lifecycle.run import Run
from nanotune.lifecycle.step import clip_gradients, lr_at, make_optimizer, no_sync_unless_last, wrap_model
from nanotune.metrics import progress
from nanotune.model.loader import load_model
from nanotune.model.peft import PeftSpec, apply_peft, describe_trainable
from nanotune.plot import plot_curves
from nanotune.utils import NanotuneError, perplexity


def load_data(enc, sources: list, args):
    """Each source read and split on its own -> {"train"|"val": one list of (token ids, trained mask) per source},
    the test examples that have a question (plain text has none), how many examples were cut to --max-len."""
    encoded, tests, truncated = {"train": [], "val": []}, [], 0
    for source in sources:
        train_split, val_split, test_split = split_examples(load_examples(source, "sft", args.limit), args.seed)
        if not train_split or not val_split:
            raise NanotuneError(
                f"{source}: {len(train_split) + len(val_split) + len(test_split)} examples give {len(train_split)} "
                f"training and {len(val_split)} validation examples; need at least one of each"
            )
        for split, examples in (("train", train_split), ("val", val_split)):
            rows = []
            for ex in examples:
                ids, mask, cut = encode_example(
                    enc, ex, args.template, args.max_len, f"{source}: record {ex['record']}"
                )
                rows.append((ids, mask))
                truncated += cut
            encoded[split].append(rows)
        tests.append([ex for ex in test_split if ex["text"] is None])
    # the sources' test examples taken in turn, so that --responses answers some of each
    return encoded, [ex for turn in itertools.zip_longest(*tests) for ex in turn if ex is not None], truncated


@torch.no_grad()
def validation_nll(model, sources: list, batch_size: int, pad_id: int, device, ctx) -> list[tuple[float, int]]:
    """Per source: the summed NLL of its validation rows' trained tokens, and how many there are."""
    sums = []
    for rows in sources:
        total, count = 0.0, 0
        for i in range(0, len(rows), batch_size):
            input_ids, labels = collate_masked(rows[i : i + batch_size], pad_id, device)
            with ctx:
                logits = model(input_ids)  # (B, T, V)
            total -= token_logprobs(logits, labels).sum().item()
            count += int((labels != IGNORE).sum())
        sums.append((total, count))
    return sums


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p, lr=5e-5, steps=200, batch_size=8)
    data = (
        "one or more sources: .json/.jsonl/.parquet/.csv files, datasets folders, Hub names (org/name[:config]:split);"
    )
    data += " any format of docs/data.md (default: download the 1,100-example set of 'LLMs from scratch' into data/)"
    p.add_argument("--data", nargs="+", action="extend", default=None, metavar="SOURCE", help=data)
    mix = "with several --data: how often each is drawn, e.g. 3,1,1 (default: in proportion to their sizes)"
    p.add_argument("--mix", type=parse_mix, default=None, help=mix)
    p.add_argument("--template", default="alpaca", choices=["alpaca", "plain"], help="chat template (default alpaca)")
    p.add_argument("--max-len", type=integer(2), default=256, help="longest sequence; longer ones are truncated")
    p.add_argument("--limit", type=integer(1), default=None, help="use only the first N examples of each source")
    p.add_argument("--weight-decay", type=real(0), default=0.0, help="AdamW weight decay (default 0)")
    lm_weight = "add this times the next-token loss on the prompt tokens (GPT-1's L3 = L2 + L * L1; default 0)"
    p.add_argument("--lm-weight", type=real(0), default=0.0, help=lm_weight)
    p.add_argument("--eval-every", type=integer(1), default=25, help="validation loss every N steps (default 25)")
    responses = "test prompts answered after training (default 20; 0: none)"
    p.add_argument("--responses", type=integer(0), default=20, help=responses)
    p.add_argument("--max-new-tokens", type=integer(1), default=128, help="length limit of those answers")
    # what this recipe trained and measured: a --resume keeps them (nanotune/flags.py adds the model and --peft)
    args = parse_run_args(p, argv, fixed_on_resume="--data --mix --template --limit --max-len --lm-weight")
    if args.mix is not None and len(args.mix) != len(args.data or [None]):
        p.error(f"--mix gives {len(args.mix)} weights for {len(args.data or [None])} --data sources")
    return args


def main(argv=None):
    args = parse_args(argv)
    per_source = [f"val_ppl/{name}" for name in source_names(args.data)] if len(args.data or []) > 1 else []
    show = ("loss", "val_loss", "val_ppl", *per_source)
    with Run(args, __file__, outputs=("responses.jsonl", "loss.svg"), show=show) as run:
        train(args, run)
    if run.exit_code:  # 2: the error line is printed; 130: interrupted, the resume command is printed
        sys.exit(run.exit_code)


def train(args, run):
    device = run.device
    enc = load_tokenizer()

    # ---- data: every source read, each record's format detected, templated and tokenised before any training
    sources = args.data or [default_file("instruction-data.json", INSTRUCTIONS_URL)]
    names = source_names(sources)
    encoded, test, truncated = load_data(enc, sources, args)
    mixture = Mixture([len(rows) for rows in encoded["train"]], args.mix)

    model, model_name = load_model(args.model, device, quiet=not run.master)
    peft = PeftSpec.from_flags(args)
    apply_peft(model, peft, model_name)
    context = model.config.n_positions - model.n_virtual  # prompt-tuning embeddings take context too
    if args.max_len > context:
        raise NanotuneError(
            f"--max-len {args.max_len} exceeds the model's context of {context}"
            + (f" ({model.n_virtual} taken by --prompt-tokens)" if model.n_virtual else "")
        )
    answered = test[: args.responses]
    answer_prompts = check_answerable(enc, answered, args.template, context)
    n_train, n_val = sum(map(len, encoded["train"])), sum(map(len, encoded["val"]))
    run.summary.update(
        model=model_name,
        train_examples=n_train,
        truncated_examples=truncated,
        world_size=run.world,
        sources={name: {"train": n, "weight": w} for name, n, w in zip(names, mixture.sizes, mixture.weights)},
    )
    if run.master:
        print(
            f"model {model_name} ({args.peft}: {describe_trainable(model)}) on {device} ({run.dtype}); "
            f"{n_train} train / {n_val} val / {len(test)} test examples from {mixture.describe(names)}; "
            f"{truncated} truncated to --max-len {args.max_len}; effective batch {args.batch_size * run.world}",
            flush=True,
        )

    def validate() -> dict:
        """Mean NLL per response token of the validation split (token-weighted, like the training loss) and its
        perplexity, overall and, with several sources, per source (val_loss/<name>, val_ppl/<name>)."""
        model.eval()
        sums = validation_nll(model, encoded["val"], args.batch_size, enc.eot_token, device, run.ctx)
        model.train()
        losses = {"val_loss": sum(total for total, _ in sums) / sum(n for _, n in sums)}
        losses |= {f"val_loss/{name}": total / n for name, (total, n) in zip(names, sums)} if len(names) > 1 else {}
        return losses | {key.replace("loss", "ppl"): perplexity(loss) for key, loss in losses.items()}

    if run.master and not run.resumed:
        run.log(0, **validate())

    optimizer = make_optimizer(model, "adamw", args.lr, args.weight_decay, device)
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws its own examples
    first_step = run.track(model, optimizer, data_rng)
    train_model = wrap_model(model, device, run.world, args.compile, args.activation_checkpointing)
    model.train()
    for step in range(first_step, args.steps + 1):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [encoded["train"][source][i] for source, i in mixture.sample(args.batch_size, data_rng)]
        # micro-batches hold different numbers of response tokens, so a plain mean per micro-batch divided by
        # grad_accum would weight a token of a short micro-batch more: dividing every micro-batch's sum by the
        # whole batch's token count makes the micro-batch losses add up to exactly the batch's per-token mean
        # (this process's batch: under DDP the processes' means are averaged, each weighing the same, as nanoGPT's)
        n_response = sum(int(mask[1:].sum()) for _, mask in batch)  # the tokens that are labels
        n_prompt = sum(len(mask) - 1 for _, mask in batch) - n_response  # the untrained ones that are labels
        step_loss, n_tokens = 0.0, 0
        for k in range(args.grad_accum):
            micro = batch[k :: args.grad_accum]
            input_ids, labels, prompt_labels = collate_masked(micro, enc.eot_token, device, prompt_labels=True)
            # under DDP the gradients are all-reduced once, in the last micro-batch's backward
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                with run.ctx:
                    logits = train_model(input_ids)  # (b, T, V)
                loss = sft_loss(logits, labels, prompt_labels, args.lm_weight, n_response, n_prompt)
                loss.backward()
            step_loss += loss.detach()  # (a tensor: read back once, in run.stop_if_diverged)
            n_tokens += input_ids.numel()
        grad_norm = clip_gradients(model, args.grad_clip)  # the norm before clipping
        run.stop_if_diverged(step, step_loss, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.master and (step % args.eval_every == 0 or step == args.steps):
            run.log(step, **validate())
        run.log.count(n_tokens)
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
        val_loss_before=val_losses[0],
        val_loss_after=val_losses[-1],
        val_ppl_before=perplexity(val_losses[0]),
        val_ppl_after=perplexity(val_losses[-1]),
        train_loss_last=train_losses[-1][1] if train_losses else None,
        steps=args.steps,
        lr=args.lr,
    )
    run.save_model(model, template=args.template)
    for name in names if len(names) > 1 else ():  # each source's validation perplexity before and after
        curve = run.log.curve(f"val_loss/{name}")
        run.summary.setdefault("per_source", {})[name] = {
            "val_ppl_before": perplexity(curve[0][1]),
            "val_ppl_after": perplexity(curve[-1][1]),
        }
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
                row = {key: ex[key] for key in ("source", "record", "prompt")}
                responses.append(row | {"reference": ex["answer"], "model": answer})
        run.write_text("responses.jsonl", "".join(json.dumps(r) + "\n" for r in responses))
        if responses:
            first = responses[0]
            print(f"--- test prompt ---\n{last_user(answered[0])}\n--- model ---\n{first['model']}\n---", flush=True)
    with run.optional("the loss plot"):
        plot_curves(
            run.out / "loss.svg",
            {"train": train_losses, "validation": run.log.curve("val_loss")},
            title="SFT: response-token NLL (nats)",
            ylabel="NLL (nats per token)",
        )
    s = run.summary
    print(
        f"validation perplexity {s['val_ppl_before']:.2f} -> {s['val_ppl_after']:.2f} "
        f"(loss {s['val_loss_before']:.3f} -> {s['val_loss_after']:.3f}); outputs in {run.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
