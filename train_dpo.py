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

import json
import sys

import torch
import torch.nn.functional as F

from nanotune import generate, load_tokenizer
from nanotune.data import PREFERENCES_URL, default_file, read_records
from nanotune.flags import Parser, add_common_args, integer, parse_run_args, real
from nanotune.instruct import (
    check_answerable,
    collate,
    encode_pair,
    format_prompt,
    normalize_examples,
    sequence_logprobs,
    split_examples,
)
from nanotune.loader import load_model
from nanotune.metrics import progress
from nanotune.peft import apply_peft, describe_trainable
from nanotune.plot import plot_curves
from nanotune.run import Run
from nanotune.training import clip_gradients, lr_at, make_optimizer, no_sync_unless_last, wrap_model
from nanotune.utils import NanotuneError, gather_rows


# z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
# loss = mean( -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z) )     (eps = label_smoothing)
# rewards = beta * (pi - ref), for chosen and rejected. All log-probs are (B,) sequence sums.
# eps > 0 is conservative DPO (cDPO, Mitchell 2023): each label is assumed flipped with probability eps, so the
# loss is the expected DPO loss under that noise and stops pushing once sigmoid(z) reaches 1 - eps.
def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    z = beta * (chosen_logratios - rejected_logratios)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return loss.mean(), chosen_rewards, rejected_rewards


def preference_metrics(loss, chosen_rewards, rejected_rewards) -> dict:
    """The loss, the reward accuracy (the share of pairs whose chosen reward is higher), the margin and the mean
    rewards, as tensors (read back when they are logged)."""
    return {
        "loss": loss.detach(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margin": (chosen_rewards - rejected_rewards).mean(),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
    }


def encode_pairs(enc, examples, args, path):
    """Preference examples -> [((prompt ids, chosen ids), (prompt ids, rejected ids))], answers truncated to
    --max-len. -> pairs, how many answers were truncated"""
    pairs, truncated = [], 0
    for ex in examples:
        prompt, where = format_prompt(ex, args.template), f"{path}: record {ex['record']}"
        p, chosen, cut_chosen = encode_pair(enc, prompt, ex["chosen"], args.max_len, where)
        _, rejected, cut_rejected = encode_pair(enc, prompt, ex["rejected"], args.max_len, where)
        pairs.append(((p, chosen), (p, rejected)))
        truncated += cut_chosen + cut_rejected
    return pairs, truncated


def pair_logprobs(model, pairs, pad_id: int, device, ctx):
    """One forward over the chosen and the rejected rows together -> (chosen logps (B,), rejected logps (B,))."""
    input_ids, labels = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id, device)
    with ctx:
        logits = model(input_ids)  # (2B, T, V)
    logps = sequence_logprobs(logits, labels)  # (2B,)
    return logps[: len(pairs)], logps[len(pairs) :]


@torch.no_grad()
def all_pair_logprobs(model, pairs, batch_size: int, pad_id: int, device, ctx, shown: str | None = None):
    """pair_logprobs over every pair, --batch-size pairs at a time (with a progress bar named `shown`).
    -> chosen logps (N,), rejected logps (N,)"""
    starts = progress(range(0, len(pairs), batch_size), shown or "", enabled=shown is not None)
    chunks = [pair_logprobs(model, pairs[i : i + batch_size], pad_id, device, ctx) for i in starts]
    empty = torch.zeros(0, device=device)  # (a process whose share of the pairs is empty)
    return torch.cat([empty] + [c for c, _ in chunks]), torch.cat([empty] + [r for _, r in chunks])


def reference_logprobs(reference, pairs, name: str, args, pad_id: int, run):
    """The reference's log-probs of every pair, computed once; under torchrun each process computes a share of the
    pairs and the shares are gathered. -> chosen logps (N,), rejected logps (N,)"""
    shown = f"reference log-probs, {name}" if run.master else None

    def share(rows):  # -> (len(rows), 2)
        chosen, rejected = all_pair_logprobs(
            reference, [pairs[i] for i in rows], args.batch_size, pad_id, run.device, run.ctx, shown
        )
        return torch.stack([chosen, rejected], dim=-1)

    return gather_rows(len(pairs), share, run.device).unbind(-1)


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p, lr=5e-6, steps=100, batch_size=8)
    data = "JSON/JSONL: instruction, input?, chosen, rejected (default: download the set of 'LLMs from scratch')"
    p.add_argument("--data", default=None, help=data)
    p.add_argument("--ref-model", default=None, help="reference model (default: a frozen copy of --model)")
    beta = "strength of the pull toward the reference (default 0.1)"
    p.add_argument("--beta", type=real(0, low_open=True), default=0.1, help=beta)
    smoothing = "conservative DPO (cDPO): the assumed probability that a preference label is flipped (default 0)"
    p.add_argument("--label-smoothing", type=real(0, 0.5, high_open=True), default=0.0, help=smoothing)
    p.add_argument("--template", default="alpaca", choices=["alpaca", "plain"], help="prompt layout (as in SFT)")
    p.add_argument("--max-len", type=integer(2), default=256, help="longest sequence; longer responses are truncated")
    p.add_argument("--limit", type=integer(1), default=None, help="use only the first N examples (quick runs)")
    p.add_argument("--eval-every", type=integer(1), default=25, help="held-out metrics every N steps (default 25)")
    responses = "held-out prompts answered before and after training (default 5)"
    p.add_argument("--responses", type=integer(0), default=5, help=responses)
    p.add_argument("--max-new-tokens", type=integer(1), default=128, help="length limit of those answers")
    # what this recipe trained and measured: a --resume keeps them (nanotune/flags.py adds the model and --peft)
    return parse_run_args(p, argv, fixed_on_resume="--data --template --limit --max-len --ref-model --beta")


def main(argv=None):
    args = parse_args(argv)
    show = ("loss", "reward_accuracy", "val_loss", "val_reward_accuracy", "val_margin")
    # device, processes, the --out folder, metrics, checkpoints, Ctrl-C: see nanotune/run.py
    with Run(args, __file__, outputs=("responses.jsonl", "loss.svg"), show=show) as run:
        train(args, run)


def train(args, run):
    device = run.device
    enc = load_tokenizer()

    # ---- data: the same split as SFT, so the held-out prompts were never trained on there either
    path = args.data or default_file("instruction-data-with-preference.json", PREFERENCES_URL)
    examples = normalize_examples(read_records(path, args.limit), path, response_keys=("chosen", "rejected"))
    train, val, test = split_examples(examples, args.seed)
    if not train or not val:
        raise NanotuneError(
            f"{path}: {len(examples)} examples give {len(train)} training and {len(val)} "
            "validation pairs; need at least one of each"
        )
    (pairs_train, cut_train), (pairs_val, cut_val) = (encode_pairs(enc, s, args, path) for s in (train, val))
    pairs, truncated = {"train": pairs_train, "val": pairs_val}, cut_train + cut_val
    same = sum(chosen == rejected for chosen, rejected in pairs_train)  # no preference: the loss stays log 2
    if same == len(pairs_train):
        raise NanotuneError(f"{path}: every training pair's chosen answer is its rejected one: nothing to learn")
    if same and run.master:
        print(f"warning: {same} of {len(pairs_train)} training pairs have chosen == rejected", file=sys.stderr)

    policy, model_name = load_model(args.model, device, quiet=not run.master)
    context = policy.config.n_positions - (args.prompt_tokens if args.peft == "prompt" else 0)  # (less prompt tuning's)
    if args.max_len > context:
        raise NanotuneError(f"--max-len {args.max_len} exceeds the model's context of {context}")
    answered = test[: args.responses]
    answer_prompts = check_answerable(enc, answered, args.template, context, path)

    def logprobs(model, batch, shown=None):  # -> chosen logps (B,), rejected logps (B,)
        return all_pair_logprobs(model, batch, args.batch_size, enc.eot_token, device, run.ctx, shown)

    # ---- the reference never changes, so its log-probs are computed once, up front, without gradients
    # (on --resume too: the policy is reloaded from --model for this, then the checkpoint replaces its weights)
    reference = load_model(args.ref_model, device, "--ref-model", quiet=True)[0] if args.ref_model else policy
    run.summary.update(model=model_name, ref_model=args.ref_model, beta=args.beta, world_size=run.world)
    if run.master:
        print(
            f"policy {model_name}, reference {args.ref_model or 'a frozen copy of the policy'}, on {device} "
            f"({run.dtype}); {len(train)} train / {len(val)} val pairs, {truncated} responses truncated; beta "
            f"{args.beta}; effective batch {args.batch_size * run.world}",
            flush=True,
        )
    reference.eval()
    ref_logps = {
        name: reference_logprobs(reference, split, name, args, enc.eot_token, run) for name, split in pairs.items()
    }
    del reference
    apply_peft(policy, args, model_name)  # --peft: freeze the base, add what trains (nanotune/peft.py)
    if run.master:
        print(f"--peft {args.peft}: {describe_trainable(policy)}", flush=True)

    def evaluate():
        policy.eval()
        chosen, rejected = logprobs(policy, pairs["val"])
        policy.train()
        metrics = preference_metrics(*dpo_loss(chosen, rejected, *ref_logps["val"], args.beta, args.label_smoothing))
        return {f"val_{k}": v.item() for k, v in metrics.items()}

    def answers():
        """Greedy answers to the first --responses test prompts (each was checked to fit the context)."""
        if not answer_prompts:
            return []
        policy.eval()
        budget = min(args.max_new_tokens, context - max(map(len, answer_prompts)))
        with run.ctx:
            outputs = generate(policy, answer_prompts, budget, temperature=0, eos_token=enc.eot_token)
        policy.train()
        return [
            enc.decode([t for t in seq[len(p) :] if t != enc.eot_token]).strip()
            for p, seq in zip(answer_prompts, outputs)
        ]

    if run.master and not run.resumed:
        before = evaluate()
        run.summary.update(
            val_reward_accuracy_before=before["val_reward_accuracy"],
            val_margin_before=before["val_margin"],
            val_loss_before=before["val_loss"],
        )
        run.log(0, **before)
        # the answers before training go to disk now, so that a resumed run can put its own beside them
        keys = ("record", "instruction", "input", "chosen", "rejected")
        rows = [{k: ex[k] for k in keys} | {"before": answer} for ex, answer in zip(answered, answers())]
        run.write_text("responses.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    optimizer = make_optimizer(policy, "adamw", args.lr, 0.0, device)
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws its own pairs
    first_step = run.track(policy, optimizer, data_rng)  # with --resume: the checkpoint's weights, optimizer, RNG
    train_model = wrap_model(policy, device, run.world, args.compile, args.activation_checkpointing)
    policy.train()
    for step in range(first_step, args.steps + 1):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = torch.randint(len(pairs["train"]), (args.batch_size,), generator=data_rng)
        metrics_sum, n_tokens = {}, 0
        for k in range(args.grad_accum):
            micro = ids[k :: args.grad_accum]
            micro_pairs = [pairs["train"][i] for i in micro.tolist()]
            ref_chosen_logps, ref_rejected_logps = ref_logps["train"][0][micro], ref_logps["train"][1][micro]
            # under DDP the gradients are all-reduced once, in the last micro-batch's backward
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                policy_chosen_logps, policy_rejected_logps = pair_logprobs(
                    train_model, micro_pairs, enc.eot_token, device, run.ctx
                )
                ref_logps_micro = (ref_chosen_logps, ref_rejected_logps)
                loss, chosen_rewards, rejected_rewards = dpo_loss(
                    policy_chosen_logps, policy_rejected_logps, *ref_logps_micro, args.beta, args.label_smoothing
                )
                # the loss is a mean over pairs and micro-batches hold equal numbers of pairs: 1/grad_accum each
                (loss / args.grad_accum).backward()
            for key, value in preference_metrics(loss, chosen_rewards, rejected_rewards).items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value / args.grad_accum
            n_tokens += sum(len(p) + len(r) for pair in micro_pairs for p, r in pair)
        grad_norm = clip_gradients(policy, args.grad_clip)  # the norm before clipping
        run.check(step, metrics_sum["loss"], grad_norm)  # NaN/inf or an exploding loss stops here, before the update
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.master and (step % args.eval_every == 0 or step == args.steps):
            run.log(step, **evaluate())
        run.log_step(step, n_tokens, **metrics_sum, lr=lr, grad_norm=grad_norm)
        run.checkpoint_if_due(step)  # every --save-every steps and at the end; on Ctrl-C: save, then exit 130

    # ---- training is over: the weights and the summary so far are saved before anything that might fail
    if not run.master:
        return
    after = [m for m in run.history if "val_loss" in m][-1]
    run.summary.update(
        val_reward_accuracy_after=after["val_reward_accuracy"],
        val_margin_after=after["val_margin"],
        val_loss_after=after["val_loss"],
        steps=args.steps,
        lr=args.lr,
    )
    run.save_model(policy)
    with run.optional("answering the test prompts"):
        rows = [json.loads(line) for line in (run.out / "responses.jsonl").read_text().splitlines()]
        for row, answer in zip(rows, answers()):
            row["after"] = answer
        run.write_text("responses.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with run.optional("the loss plot"):
        plot_curves(run.out / "loss.svg", {"train": run.curve("loss"), "validation": run.curve("val_loss")}, "DPO loss")
    s = run.summary
    print(
        f"held-out reward accuracy {s['val_reward_accuracy_before']:.3f} -> {s['val_reward_accuracy_after']:.3f}, "
        f"margin {s['val_margin_after']:.3f}, loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}; "
        f"outputs in {run.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
