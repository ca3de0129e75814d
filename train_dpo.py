"""Preference-tune GPT-2 with Direct Preference Optimization (DPO).

Recipe 4 of the research notes. For each prompt we have a chosen and a rejected response. DPO raises the
policy's log-probability of the chosen response relative to a frozen reference model, and lowers that of
the rejected one, with no reward model and no sampling. Start from an instruction-tuned model:

    python train_sft.py --out out/sft
    python train_dpo.py --model out/sft --out out/dpo        # reference = frozen copy of out/sft

Reward of a response = beta * (log pi(response | prompt) - log ref(response | prompt)); reward accuracy is
the share of pairs whose chosen reward beats the rejected one, and the margin is their mean difference.
Outputs in --out: metrics.jsonl, summary.json, responses.jsonl (before/after answers side by side),
loss.svg and the fine-tuned weights.
"""

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F

from nanotune import generate, load_tokenizer
from nanotune.data import PREFERENCES_URL, default_file, read_records
from nanotune.utils import (
    RunLog, add_common_args, all_reduce_mean, autocast, check_common_args, check_finite, cleanup_distributed,
    default_dtype, die, load_model, make_optimizer, make_out_dir, no_sync_unless_last, pick_device, plot_curves,
    save_json, seed_everything, setup_distributed, wrap_model,
)  # fmt: skip
from train_sft import collate, encode_pair, format_prompt, normalize_examples, split_examples, token_logprobs


# Sum of log p over the response tokens of each row (prompt and padding are IGNORE in labels).
# logits (B, T, V), labels (B, T) -> (B,)
def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_logprobs(logits, labels).sum(dim=-1)


# z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
# loss = mean( -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z) )     (eps = label_smoothing)
# rewards = beta * (pi - ref), for chosen and rejected. All log-probs are (B,) sequence sums.
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0):  # fmt: skip
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    z = beta * (chosen_logratios - rejected_logratios)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return loss.mean(), chosen_rewards, rejected_rewards


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, lr=5e-6, steps=100, batch_size=8)
    p.add_argument("--data", default=None, help="JSON/JSONL with instruction, input?, chosen, rejected (default: "
                   "download the preference set of the book 'LLMs from scratch' into data/)")  # fmt: skip
    p.add_argument("--ref-model", default=None, help="reference model (default: a frozen copy of --model)")
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference (> 0)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="assumed share of flipped labels, in [0, 0.5)")
    p.add_argument("--template", default="alpaca", choices=["alpaca", "plain"], help="prompt layout (as in SFT)")
    p.add_argument("--max-len", type=int, default=256, help="longest sequence; longer responses are truncated")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples (quick runs)")
    p.add_argument("--eval-every", type=int, default=25, help="held-out metrics every N steps")
    p.add_argument("--responses", type=int, default=5, help="held-out prompts answered before and after")
    p.add_argument("--max-new-tokens", type=int, default=128)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_common_args(args)
    if args.beta <= 0:
        die(f"--beta must be > 0, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        die(f"--label-smoothing must lie in [0, 0.5), got {args.label_smoothing}")
    rank, world, device = setup_distributed(pick_device(args.device))
    seed_everything(args.seed + rank)
    dtype = args.dtype or default_dtype(device)
    ctx = autocast(device, dtype)
    enc = load_tokenizer()

    # ---- data: the same split as SFT, so the held-out prompts were never trained on there either
    path = args.data or default_file("instruction-data-with-preference.json", PREFERENCES_URL)
    examples = normalize_examples(read_records(path)[: args.limit], path, response_keys=("chosen", "rejected"))
    train, val, test = split_examples(examples, args.seed)
    if not train or not val:
        die(f"{path}: {len(examples)} examples give {len(train)} training and {len(val)} validation pairs; "
            "need at least one of each")  # fmt: skip
    pairs, truncated = {}, 0
    for name, split in (("train", train), ("val", val)):
        pairs[name] = []
        for i, ex in enumerate(split):
            prompt = format_prompt(ex, args.template)
            where = f"{path}: {name} example {i}"
            p, chosen, cut_c = encode_pair(enc, prompt, ex["chosen"], args.max_len, where)
            _, rejected, cut_r = encode_pair(enc, prompt, ex["rejected"], args.max_len, where)
            pairs[name].append(((p, chosen), (p, rejected)))
            truncated += cut_c + cut_r

    policy, model_name = load_model(args.model, device, quiet=rank != 0)
    if args.max_len > policy.config.n_positions:
        die(f"--max-len {args.max_len} exceeds the model's context of {policy.config.n_positions}")

    def batch_logps(model, batch):
        """One forward over chosen and rejected rows together -> (chosen logps (B,), rejected logps (B,))."""
        input_ids, labels = collate([c for c, _ in batch] + [r for _, r in batch], enc.eot_token, device)
        with ctx:
            logits = model(input_ids)  # (2B, T, V)
        logps = sequence_logprobs(logits, labels)  # (2B,)
        return logps[: len(batch)], logps[len(batch) :]

    # ---- the reference never changes, so its log-probs are computed once, up front, without gradients
    reference = load_model(args.ref_model, device, quiet=True)[0] if args.ref_model else policy
    ref_logps = {}
    with torch.no_grad():
        reference.eval()
        for name in ("train", "val"):
            chunks = [batch_logps(reference, pairs[name][i : i + args.batch_size])
                      for i in range(0, len(pairs[name]), args.batch_size)]  # fmt: skip
            ref_logps[name] = (torch.cat([c for c, _ in chunks]), torch.cat([r for _, r in chunks]))
    del reference

    out = make_out_dir(args.out, "dpo") if rank == 0 else None
    log = RunLog(out) if rank == 0 else None
    if rank == 0:
        print(f"policy {model_name}, reference {args.ref_model or 'frozen copy of the policy'}: "
              f"{policy.num_params() / 1e6:.1f}M parameters on {device} ({dtype}); {len(train)} train / "
              f"{len(val)} val pairs; {truncated} responses truncated; beta {args.beta}; "
              f"effective batch {args.batch_size * world}", flush=True)  # fmt: skip

    def preference_metrics(loss, chosen_rewards, rejected_rewards, prefix):
        return {
            f"{prefix}loss": loss.item(),
            f"{prefix}reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            f"{prefix}margin": (chosen_rewards - rejected_rewards).mean().item(),
            f"{prefix}chosen_reward": chosen_rewards.mean().item(),
            f"{prefix}rejected_reward": rejected_rewards.mean().item(),
        }

    @torch.no_grad()
    def evaluate():
        policy.eval()
        chunks = [batch_logps(policy, pairs["val"][i : i + args.batch_size])
                  for i in range(0, len(pairs["val"]), args.batch_size)]  # fmt: skip
        policy.train()
        chosen, rejected = torch.cat([c for c, _ in chunks]), torch.cat([r for _, r in chunks])
        return preference_metrics(*dpo_loss(chosen, rejected, *ref_logps["val"], args.beta, args.label_smoothing),
                                  prefix="val_")  # fmt: skip

    def answers():
        policy.eval()
        prompts = [enc.encode_ordinary(format_prompt(ex, args.template)) for ex in test[: args.responses]]
        if not prompts:
            return []
        budget = min(args.max_new_tokens, policy.config.n_positions - max(map(len, prompts)))
        outputs = generate(policy, prompts, budget, temperature=0, eos_token=enc.eot_token)
        policy.train()
        return [enc.decode([t for t in seq[len(p) :] if t != enc.eot_token]).strip() for p, seq in zip(prompts, outputs)]

    before = evaluate() if rank == 0 else {}
    answers_before = answers() if rank == 0 else []
    if rank == 0:
        log.log(step=0, **before)

    train_model = wrap_model(policy, device, world, args.compile)
    optimizer = make_optimizer(policy, "adamw", args.lr, 0.0, device)
    policy.train()
    rng = random.Random(args.seed + rank)  # each rank draws its own pairs
    after, t_log = before, time.time()
    for step in range(1, args.steps + 1):
        ids = [rng.randrange(len(pairs["train"])) for _ in range(args.batch_size)]
        metrics_sum = {}
        for k in range(args.grad_accum):
            micro = ids[k :: args.grad_accum]
            micro_pairs = [pairs["train"][i] for i in micro]
            ref_chosen_logps, ref_rejected_logps = (ref_logps["train"][0][micro], ref_logps["train"][1][micro])
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                policy_chosen_logps, policy_rejected_logps = batch_logps(train_model, micro_pairs)
                loss, chosen_rewards, rejected_rewards = dpo_loss(
                    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    args.beta, args.label_smoothing,
                )  # fmt: skip
                (loss / args.grad_accum).backward()
            for key, value in preference_metrics(loss, chosen_rewards, rejected_rewards, "").items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value / args.grad_accum
        check_finite(loss, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_metrics = {k: all_reduce_mean(v, device) for k, v in metrics_sum.items()}
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            log.log(step=step, **train_metrics, lr=args.lr, pairs_per_s=args.log_every * args.batch_size * world
                    / (time.time() - t_log))  # fmt: skip
            t_log = time.time()
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            after = evaluate()
            log.log(step=step, **after)

    if rank == 0:
        answers_after = answers()
        with open(out / "responses.jsonl", "w") as f:
            for ex, a, b in zip(test, answers_before, answers_after):
                f.write(json.dumps({"instruction": ex["instruction"], "input": ex["input"], "chosen": ex["chosen"],
                                    "rejected": ex["rejected"], "before": a, "after": b}) + "\n")  # fmt: skip
        summary = {
            "val_reward_accuracy_before": before["val_reward_accuracy"],
            "val_reward_accuracy_after": after["val_reward_accuracy"],
            "val_margin_before": before["val_margin"], "val_margin_after": after["val_margin"],
            "val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"], "beta": args.beta,
            "steps": args.steps, "lr": args.lr, "model": model_name, "world_size": world, "args": vars(args),
        }  # fmt: skip
        save_json(out / "summary.json", summary)
        plot_curves(out / "loss.svg", {"train": log.curve("loss"), "validation": log.curve("val_loss")}, "DPO loss")
        if not args.no_save:
            policy.save_pretrained(out)
        log.close()
        print(f"held-out reward accuracy {before['val_reward_accuracy']:.3f} -> {after['val_reward_accuracy']:.3f}, "
              f"margin {after['val_margin']:.3f}, loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}; "
              f"outputs in {out}", flush=True)  # fmt: skip
    cleanup_distributed()


if __name__ == "__main__":
    main()
