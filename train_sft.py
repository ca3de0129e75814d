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

import argparse
import json
import math
import random
import time

import torch

from nanotune import generate, load_tokenizer
from nanotune.data import INSTRUCTIONS_URL, default_file, read_records
from nanotune.utils import (
    RunLog, add_common_args, all_reduce_mean, autocast, check_common_args, check_finite, cleanup_distributed,
    default_dtype, die, load_model, make_optimizer, make_out_dir, no_sync_unless_last, pick_device, plot_curves,
    save_json, seed_everything, setup_distributed, wrap_model,
)  # fmt: skip

IGNORE = -100  # label value of positions the loss skips


def format_prompt(example: dict, template: str = "alpaca") -> str:
    """The text the model sees before its answer."""
    if template == "plain":
        text = example["instruction"] + (f"\n{example['input']}" if example.get("input") else "")
        return f"Instruction: {text}\nResponse: "
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{example['instruction']}"
    )
    if example.get("input"):
        prompt += f"\n\n### Input:\n{example['input']}"
    return prompt + "\n\n### Response:\n"


def normalize_examples(records: list[dict], path, response_keys=("output",)) -> list[dict]:
    """Alpaca records (instruction, input?, output...) or prompt/response pairs -> {instruction, input, <keys>}.
    A record missing a key stops everything with its index and the key."""
    examples = []
    for i, r in enumerate(records):
        if "prompt" in r and "instruction" not in r:  # prompt/response pairs (e.g. a scraped Q&A set)
            r = {"instruction": r["prompt"], "input": "", **{k: r[k] for k in r if k != "prompt"}}
            if "response" in r:
                r.setdefault("output", r["response"])
        for key in ("instruction", *response_keys):
            if key not in r:
                die(f"{path}: example {i} has no {key!r} key (it has {', '.join(sorted(r)) or 'none'})")
            if not isinstance(r[key], str):
                die(f"{path}: example {i} key {key!r} is a {type(r[key]).__name__}, expected text")
        examples.append({"instruction": r["instruction"], "input": r.get("input") or "",
                         **{k: r[k] for k in response_keys}})  # fmt: skip
    return examples


def split_examples(examples: list, seed: int, fractions=(0.85, 0.05)):
    """Seeded shuffle, then train / validation / test = 85% / 5% / 10%."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_train, n_val = int(len(order) * fractions[0]), int(len(order) * fractions[1])
    pick = lambda ids: [examples[i] for i in ids]  # noqa: E731
    return pick(order[:n_train]), pick(order[n_train : n_train + n_val]), pick(order[n_train + n_val :])


def encode_pair(enc, prompt: str, response: str, max_len: int, where: str):
    """-> (prompt ids, response ids + <|endoftext|>, truncated?) fitting in max_len + 1 tokens."""
    prompt_ids = enc.encode_ordinary(prompt)
    response_ids = enc.encode_ordinary(response) + [enc.eot_token]
    if len(prompt_ids) >= max_len:
        die(f"{where}: the prompt has {len(prompt_ids)} tokens, leaving no room for a response within "
            f"--max-len {max_len}; raise --max-len or shorten the prompt")  # fmt: skip
    room = max_len + 1 - len(prompt_ids)  # the input is one shorter than prompt + response (see collate)
    return prompt_ids, response_ids[:room], len(response_ids) > room


def collate(pairs, pad_id: int, device):
    """[(prompt ids, response ids)] -> input_ids, labels, both (B, T) right-padded to the longest row.

    labels[b, t] is the token that logits[b, t] must predict, i.e. input_ids shifted left by one, with IGNORE
    wherever that token belongs to the prompt or is padding. Right padding needs no attention mask: causal
    attention never lets a real token see the padding after it.
    """
    rows = [p + r for p, r in pairs]
    T = max(len(row) for row in rows) - 1
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, ((prompt, response), row) in enumerate(zip(pairs, rows)):
        input_ids[b, : len(row) - 1] = torch.tensor(row[:-1])
        labels[b, len(prompt) - 1 : len(row) - 1] = torch.tensor(response)  # targets = the response tokens
    return input_ids.to(device), labels.to(device)


# log p(label) at every position; IGNORE positions give 0. logits (B, T, V), labels (B, T) -> (B, T).
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    mask = labels != IGNORE
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked * mask


# NLL = -sum_{unmasked (b, t)} log p(labels[b, t]) / #unmasked.  logits (B, T, V), labels (B, T) -> scalar.
def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    n = (labels != IGNORE).sum()
    if n == 0:
        raise ValueError("masked_nll: every label is masked, there is nothing to learn from")
    return -token_logprobs(logits, labels).sum() / n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, lr=5e-5, steps=200, batch_size=8)
    p.add_argument("--data", default=None, help="JSON list or JSONL of examples (default: download the "
                   "1,100-example set of the book 'LLMs from scratch' into data/)")  # fmt: skip
    p.add_argument("--template", default="alpaca", choices=["alpaca", "plain"], help="prompt layout")
    p.add_argument("--max-len", type=int, default=256, help="longest training sequence; longer ones are truncated")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples (quick runs)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=25, help="validation loss every N steps")
    p.add_argument("--responses", type=int, default=20, help="test prompts to answer after training (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length limit of those answers")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_common_args(args)
    if args.max_len < 2:
        die(f"--max-len must be >= 2, got {args.max_len}")
    rank, world, device = setup_distributed(pick_device(args.device))
    seed_everything(args.seed + rank)
    dtype = args.dtype or default_dtype(device)
    ctx = autocast(device, dtype)
    enc = load_tokenizer()

    # ---- data: every example checked, templated and tokenised before any training
    path = args.data or default_file("instruction-data.json", INSTRUCTIONS_URL)
    examples = normalize_examples(read_records(path)[: args.limit], path)
    train, val, test = split_examples(examples, args.seed)
    if not train or not val:
        die(f"{path}: {len(examples)} examples give {len(train)} training and {len(val)} validation examples; "
            "need at least one of each")  # fmt: skip
    encoded = {}
    truncated = 0
    for name, split in (("train", train), ("val", val)):
        encoded[name] = []
        for i, ex in enumerate(split):
            prompt_ids, response_ids, cut = encode_pair(enc, format_prompt(ex, args.template), ex["output"],
                                                        args.max_len, f"{path}: {name} example {i}")  # fmt: skip
            encoded[name].append((prompt_ids, response_ids))
            truncated += cut

    model, model_name = load_model(args.model, device, quiet=rank != 0)
    if args.max_len > model.config.n_positions:
        die(f"--max-len {args.max_len} exceeds the model's context of {model.config.n_positions}")
    out = make_out_dir(args.out, "sft") if rank == 0 else None
    log = RunLog(out) if rank == 0 else None
    if rank == 0:
        print(f"model {model_name}: {model.num_params() / 1e6:.1f}M parameters on {device} ({dtype}); "
              f"{len(train)} train / {len(val)} val / {len(test)} test examples; {truncated} truncated to "
              f"--max-len {args.max_len}; effective batch {args.batch_size * world}", flush=True)  # fmt: skip

    @torch.no_grad()
    def val_loss():
        """Mean NLL over every response token of the validation split (token-weighted, like the training loss)."""
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(encoded["val"]), args.batch_size):
            input_ids, labels = collate(encoded["val"][i : i + args.batch_size], enc.eot_token, device)
            with ctx:
                logits = model(input_ids)
            total -= token_logprobs(logits, labels).sum().item()
            count += int((labels != IGNORE).sum())
        model.train()
        return total / count

    val_history = [val_loss()] if rank == 0 else []
    if rank == 0:
        log.log(step=0, val_loss=val_history[0], val_ppl=math.exp(val_history[0]))

    train_model = wrap_model(model, device, world, args.compile)
    optimizer = make_optimizer(model, "adamw", args.lr, args.weight_decay, device)
    model.train()
    rng = random.Random(args.seed + rank)  # each rank draws its own examples
    train_loss, t_log, n_tokens = float("nan"), time.time(), 0
    for step in range(1, args.steps + 1):
        batch = [rng.choice(encoded["train"]) for _ in range(args.batch_size)]
        n_targets = sum(len(r) for _, r in batch)  # response tokens in the whole batch
        step_loss = 0.0
        for k in range(args.grad_accum):
            micro = batch[k :: args.grad_accum]
            input_ids, labels = collate(micro, enc.eot_token, device)
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                with ctx:
                    logits = train_model(input_ids)  # (b, T, V)
                # weight each micro-batch by its share of response tokens: the sum is the batch's token mean
                loss = masked_nll(logits, labels) * sum(len(r) for _, r in micro) / n_targets
                loss.backward()
            step_loss += loss.item()
            n_tokens += input_ids.numel()
        check_finite(torch.tensor(step_loss), step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = all_reduce_mean(step_loss, device)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            log.log(step=step, loss=train_loss, lr=args.lr, tokens_per_s=n_tokens * world / (time.time() - t_log))
            t_log, n_tokens = time.time(), 0
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            val_history.append(val_loss())
            log.log(step=step, val_loss=val_history[-1], val_ppl=math.exp(val_history[-1]))

    if rank == 0:
        # greedy answers to held-out test prompts, stopping at <|endoftext|>
        model.eval()
        responses = []
        for i in range(0, min(args.responses, len(test)), 8):
            group = test[i : min(i + 8, args.responses)]
            prompts = [enc.encode_ordinary(format_prompt(ex, args.template)) for ex in group]
            budget = min(args.max_new_tokens, model.config.n_positions - max(map(len, prompts)))
            outputs = generate(model, prompts, budget, temperature=0, eos_token=enc.eot_token)
            for ex, prompt, seq in zip(group, prompts, outputs):
                answer = enc.decode([t for t in seq[len(prompt) :] if t != enc.eot_token]).strip()
                responses.append({"instruction": ex["instruction"], "input": ex["input"],
                                  "reference": ex["output"], "model": answer})  # fmt: skip
        (out / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
        if responses:
            first = responses[0]
            print(f"--- test prompt ---\n{first['instruction']}\n--- model ---\n{first['model']}\n---", flush=True)
        summary = {
            "val_loss_before": val_history[0], "val_loss_after": val_history[-1],
            "val_ppl_before": math.exp(val_history[0]), "val_ppl_after": math.exp(val_history[-1]),
            "train_examples": len(train), "truncated_examples": truncated, "train_loss_last": train_loss,
            "steps": args.steps, "lr": args.lr, "model": model_name, "world_size": world, "args": vars(args),
        }  # fmt: skip
        save_json(out / "summary.json", summary)
        plot_curves(out / "loss.svg", {"train": log.curve("loss"), "validation": log.curve("val_loss")},
                    title="SFT: response-token NLL (nats)")  # fmt: skip
        if not args.no_save:
            model.save_pretrained(out)
        log.close()
        print(f"validation perplexity {summary['val_ppl_before']:.2f} -> {summary['val_ppl_after']:.2f} "
              f"(loss {val_history[0]:.3f} -> {val_history[-1]:.3f}); outputs in {out}", flush=True)  # fmt: skip
    cleanup_distributed()


if __name__ == "__main__":
    main()
