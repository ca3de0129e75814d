"""Preference-tune GPT-2 with Direct Preference Optimization (DPO) and its family of losses.

Recipe 4 of the research notes. For each prompt we have a chosen and a rejected response. DPO raises the
policy's log-probability of the chosen response relative to a frozen reference model, and lowers that of
the rejected one, with no reward model and no sampling. Start from an instruction-tuned model:

    python train_sft.py --out out/sft
    python train_dpo.py --model out/sft --out out/dpo        # reference = frozen copy of out/sft
    python train_dpo.py --model out/sft --loss simpo --beta 2   # SimPO: no reference model at all

--loss: sigmoid (DPO), ipo, hinge, robust or simpo, each a small function below with its maths. Reward of a
response = beta * (log pi(response | prompt) - log ref(response | prompt)); reward accuracy is the share of pairs
whose chosen reward beats the rejected one, and the margin is their mean difference. Outputs in --out: metrics.jsonl,
summary.json, responses.jsonl (before/after answers), loss.svg, logps.svg (squeezing_diagnostic), the weights.
"""

import json
import sys
from functools import partial

import torch
import torch.nn.functional as F

from nanotune import generate, load_tokenizer
from nanotune.data.instruct import (
    TEMPLATES,
    all_pair_logprobs,
    answers_end,
    check_answerable,
    encode_pair,
    load_splits,
    pair_logprobs,
    prompt_ids,
    response_logprobs,
)
from nanotune.data.sources import PREFERENCES_URL, default_file
from nanotune.flags import Parser, add_common_args, integer, parse_run_args, real
from nanotune.lifecycle.run import Run
from nanotune.lifecycle.step import clip_gradients, lr_at, make_optimizer, no_sync_unless_last, wrap_model
from nanotune.model.loader import load_model
from nanotune.model.peft import PeftSpec, apply_peft, describe_trainable
from nanotune.plot import plot_curves
from nanotune.utils import NanotuneError, die, gather_rows


# h = (pi_c - ref_c) - (pi_r - ref_r), z = beta * h
# loss = mean( -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z) )     (eps = label_smoothing)
# rewards = beta * (pi - ref), for chosen and rejected. All log-probs are (B,) sequence sums, in every loss below.
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


# IPO (Azar et al. 2023): loss = mean( (h - 1/(2 beta))^2 )
# DPO rewards a larger h for ever (deterministic preferences pull the policy from the reference without bound);
# IPO pulls h to a finite target. h sums over tokens, as the paper's sequence log-likelihoods; TRL averages per token.
def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1):
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    loss = (h - 1 / (2 * beta)) ** 2
    return loss.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# The hinge of SLiC (Zhao et al. 2023) on the reference-normalised h, as RSO's "hinge-norm" (Liu et al. 2023) and
# TRL's hinge: loss = mean( relu(1 - beta * h) ), a margin of 1 / beta nats
# A pair ranked right by the margin (beta * h >= 1) gives no gradient at all, where DPO's only fades.
def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1):
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    loss = F.relu(1 - beta * (chosen_logratios - rejected_logratios))
    return loss.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# Robust DPO (Chowdhury et al. 2024), eps = label_smoothing < 1/2 the probability that a label is flipped, z = beta h:
# loss = mean( ((1 - eps) * -log sigmoid(z) + eps * log sigmoid(-z)) / (1 - 2 eps) )
# Unlike cDPO, unbiased: its expectation over the flips is the clean DPO loss. eps = 0 is DPO; eps > 0: no floor.
def robust_dpo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, label_smoothing=0.0
):
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    z = beta * (chosen_logratios - rejected_logratios)
    eps = label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return loss.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# SimPO (Meng et al. 2024), reference-free and length-normalised: rewards = beta * pi / |answer| (|answer|: the
# answer's token count, (B,)), z = r_c - r_r - gamma (a target margin), loss = mean( -log sigmoid(z) )
# Per token, a longer answer does not lose merely for having more tokens; with no reference there is nothing to
# load or run. The per-token reward is small: the paper uses beta 2 to 2.5 and gamma / beta ~ 0.5.
def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta=2.0, gamma=0.5):
    # (an empty answer, <|endoftext|> sampled first under --template raw, has no token: counted as one)
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)  # (B,)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)  # (B,)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return loss.mean(), chosen_rewards.detach(), rejected_rewards.detach()


LOSSES = {"sigmoid": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss, "robust": robust_dpo_loss, "simpo": simpo_loss}
SMOOTHED = ("sigmoid", "robust")  # the losses that read --label-smoothing


def make_loss(args):
    """--loss as one function of (policy logps, reference logps, answer lengths), each a pair (chosen (B,),
    rejected (B,)), so that training and evaluate() call any loss alike. SimPO: no reference (an empty pair)."""
    if args.loss == "simpo":
        return lambda policy, _reference, lengths: simpo_loss(*policy, *lengths, args.beta, args.simpo_gamma)
    smoothing = {"label_smoothing": args.label_smoothing} if args.loss in SMOOTHED else {}
    loss = partial(LOSSES[args.loss], beta=args.beta, **smoothing)
    return lambda policy, reference, _lengths: loss(*policy, *reference)


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


def load_pairs(enc, args, master: bool):
    """The preference data, split as SFT splits it (so the held-out prompts were never trained on there either);
    train and validation encoded as [((prompt ids, chosen ids), (prompt ids, rejected ids))], answers truncated to
    --max-len and ended by <|endoftext|> unless --template raw. -> {split: pairs}, test examples, truncated"""
    sources = args.data or [default_file("instruction-data-with-preference.json", PREFERENCES_URL)]
    train, val, test = load_splits(sources, "preference", args.limit, args.seed)
    if not train or not val:
        raise NanotuneError(
            f"{' '.join(map(str, sources))}: {len(train) + len(val) + len(test)} examples give {len(train)} "
            f"training and {len(val)} validation pairs; need at least one of each"
        )
    pairs, truncated, end = {"train": [], "val": []}, 0, answers_end(args.template)
    for name, split in (("train", train), ("val", val)):
        for ex in split:
            prompt, where = prompt_ids(enc, ex, args.template), f"{ex['source']}: record {ex['record']}"
            p, chosen, cut_chosen = encode_pair(enc, prompt, ex["chosen"], args.max_len, where, end)
            _, rejected, cut_rejected = encode_pair(enc, prompt, ex["rejected"], args.max_len, where, end)
            pairs[name].append(((p, chosen), (p, rejected)))
            truncated += cut_chosen + cut_rejected
    same = sum(chosen == rejected for chosen, rejected in pairs["train"])  # no preference: the loss stays log 2
    if same == len(pairs["train"]):
        raise NanotuneError(f"{sources[0]}: every training pair's chosen answer is its rejected one: nothing to learn")
    if same and master:
        print(f"warning: {same} of {len(pairs['train'])} training pairs have chosen == rejected", file=sys.stderr)
    return pairs, test, truncated


def reference_logprobs(args, policy, pairs: dict, pad_id: int, run) -> dict:
    """{split: the reference's log-probs (2, N)}, once, up front: the reference never changes. It is --ref-model,
    else the policy before training (on --resume too: reloaded from --model for this). SimPO: an empty pair."""
    if args.loss == "simpo":
        return {name: () for name in pairs}
    reference = load_model(args.ref_model, run.device, "--ref-model", quiet=True)[0] if args.ref_model else policy
    reference.eval()
    ref_logps = {}
    for name, split in pairs.items():
        shown = f"reference log-probs, {name}" if run.master else None

        def share(rows, split=split, shown=shown):  # this process's rows -> (len(rows), 2)
            subset = [split[i] for i in rows]
            return all_pair_logprobs(reference, subset, args.batch_size, pad_id, run.device, run.ctx, shown)[0].T

        # under torchrun each process computes a share of the split's pairs, and the shares are gathered
        ref_logps[name] = gather_rows(len(split), share, run.device).T  # (2, N)
    return ref_logps


SQUEEZE_PROMPTS, SQUEEZE_TOKENS = 16, 32  # the diagnostic's greedy answers: how many, and up to how long
SUMMARISED = ("val_reward_accuracy", "val_margin", "val_loss")  # in summary.json, before and after training


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p, lr=5e-6, steps=100, batch_size=8, lora_dropout=False)  # (see add_common_args)
    data = "preference data, one or more sources of any format in docs/data.md (default: download the set of "
    data += "'LLMs from scratch')"
    p.add_argument("--data", nargs="+", action="extend", default=None, metavar="SOURCE", help=data)
    p.add_argument("--ref-model", default=None, help="reference model (default: a frozen copy of --model)")
    loss = "sigmoid (DPO, default), ipo, hinge (SLiC), robust (robust DPO) or simpo (SimPO, no reference model)"
    p.add_argument("--loss", default="sigmoid", choices=list(LOSSES), help=loss)
    beta = "strength of the pull toward the reference (default 0.1; 2 with --loss simpo, whose rewards are per token)"
    p.add_argument("--beta", type=real(0, low_open=True), default=None, help=beta)
    smoothing = "--loss sigmoid (cDPO) or robust: the assumed probability that a label is flipped (default 0)"
    p.add_argument("--label-smoothing", type=real(0, 0.5, high_open=True), default=0.0, help=smoothing)
    gamma = "--loss simpo's target reward margin (default --beta / 2, the paper's recommended ratio)"
    p.add_argument("--simpo-gamma", type=real(0), default=None, help=gamma)
    template = "prompt layout (as in SFT); raw: the prompt verbatim, the answer continues it, no <|endoftext|>"
    p.add_argument("--template", default="alpaca", choices=TEMPLATES, help=template)
    p.add_argument("--max-len", type=integer(2), default=256, help="longest sequence; longer responses are truncated")
    p.add_argument("--limit", type=integer(1), default=None, help="use only the first N examples (quick runs)")
    p.add_argument("--eval-every", type=integer(1), default=25, help="held-out metrics every N steps (default 25)")
    responses = "held-out prompts answered before and after training (default 5)"
    p.add_argument("--responses", type=integer(0), default=5, help=responses)
    new_tokens = f"length limit of those answers (and, up to {SQUEEZE_TOKENS}, of the greedy ones in logps.svg)"
    p.add_argument("--max-new-tokens", type=integer(1), default=128, help=new_tokens)
    # what this recipe trained and measured: a --resume keeps them (nanotune/flags.py adds the model and --peft)
    fixed = "--data --template --limit --max-len --ref-model --loss --beta --label-smoothing --simpo-gamma"
    args = parse_run_args(p, argv, fixed_on_resume=fixed)
    if args.label_smoothing and args.loss not in SMOOTHED:
        die(f"--label-smoothing is for --loss {' or '.join(SMOOTHED)}, not --loss {args.loss}")
    if args.loss != "simpo" and args.simpo_gamma is not None:
        die(f"--simpo-gamma is for --loss simpo, not --loss {args.loss}")
    if args.loss == "simpo" and args.ref_model:
        die("--loss simpo is reference-free: it loads no --ref-model; leave --ref-model out")
    if args.beta is None:
        args.beta = 2.0 if args.loss == "simpo" else 0.1
    if args.loss == "simpo" and args.simpo_gamma is None:
        args.simpo_gamma = args.beta / 2
    return args


def main(argv=None):
    args = parse_args(argv)
    show = ("loss", "reward_accuracy", "val_loss", "val_reward_accuracy", "val_margin")
    with Run(args, __file__, outputs=("responses.jsonl", "loss.svg", "logps.svg"), show=show) as run:
        train(args, run)
    if run.exit_code:  # 2: the error line is printed; 130: interrupted, the resume command is printed
        sys.exit(run.exit_code)


def train(args, run):
    device = run.device
    enc = load_tokenizer()
    pairs, test, truncated = load_pairs(enc, args, run.master)

    policy, model_name = load_model(args.model, device, quiet=not run.master)
    context = policy.config.n_positions - (args.prompt_tokens if args.peft == "prompt" else 0)  # (less prompt tuning's)
    if args.max_len > context:
        raise NanotuneError(f"--max-len {args.max_len} exceeds the model's context of {context}")
    answered = test[: args.responses]
    answer_prompts = check_answerable(enc, answered, args.template, context)
    squeeze_prompts = [prompt for (prompt, _), _ in pairs["val"][:SQUEEZE_PROMPTS]]
    squeeze_budget = min(args.max_new_tokens, SQUEEZE_TOKENS, context - max(map(len, squeeze_prompts)))

    loss_fn = make_loss(args)  # --loss, chosen once
    settings = {k: getattr(args, k) for k in ("ref_model", "loss", "beta", "label_smoothing", "simpo_gamma")}
    run.summary.update(model=model_name, **settings, world_size=run.world)
    if run.master:
        reference = "none (SimPO)" if args.loss == "simpo" else args.ref_model or "a frozen copy of the policy"
        print(
            f"policy {model_name}, reference {reference}, on {device} ({run.dtype}); {len(pairs['train'])} train / "
            f"{len(pairs['val'])} val pairs, {truncated} responses truncated; --loss {args.loss}, beta {args.beta}; "
            f"effective batch {args.batch_size * run.world}",
            flush=True,
        )
    # the reference is the model before --peft: the policy at step 0 for LoRA and adapters (they start as the
    # identity); prompt tuning's embeddings start random, so its policy starts a little off the plain model, which
    # stays the reference (as in PPO and GRPO)
    ref_logps = reference_logprobs(args, policy, pairs, enc.eot_token, run)  # SimPO: none
    peft = PeftSpec.from_flags(args)
    apply_peft(policy, peft, model_name)
    if run.master:
        print(f"--peft {args.peft}: {describe_trainable(policy)}", flush=True)

    def evaluate():
        policy.eval()
        logps, lengths = all_pair_logprobs(policy, pairs["val"], args.batch_size, enc.eot_token, device, run.ctx)
        squeezing = squeezing_diagnostic(
            policy, logps, lengths, squeeze_prompts, squeeze_budget, enc.eot_token, device, run.ctx
        )
        policy.train()
        metrics = preference_metrics(*loss_fn(logps, ref_logps["val"], lengths)) | squeezing
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
        run.summary.update({f"{key}_before": before[key] for key in SUMMARISED})
        run.log(0, **before)
        # the answers before training go to disk now, so that a resumed run can put its own beside them
        keys = ("source", "record", "prompt", "chosen", "rejected")
        rows = [{k: ex[k] for k in keys} | {"before": answer} for ex, answer in zip(answered, answers())]
        run.write_text("responses.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    optimizer = make_optimizer(policy, "adamw", args.lr, 0.0, device)
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws its own pairs
    first_step = run.track(policy, optimizer, data_rng)
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
            ref_logps_micro = [logps[micro] for logps in ref_logps["train"]]  # chosen (B,), rejected (B,); SimPO: none
            # under DDP the gradients are all-reduced once, in the last micro-batch's backward
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                policy_logps, lengths = pair_logprobs(train_model, micro_pairs, enc.eot_token, device, run.ctx)
                loss, chosen_rewards, rejected_rewards = loss_fn(policy_logps, ref_logps_micro, lengths)
                # the loss is a mean over pairs and micro-batches hold equal numbers of pairs: 1/grad_accum each
                (loss / args.grad_accum).backward()
            for key, value in preference_metrics(loss, chosen_rewards, rejected_rewards).items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value / args.grad_accum
            n_tokens += sum(len(p) + len(r) for pair in micro_pairs for p, r in pair)
        grad_norm = clip_gradients(policy, args.grad_clip)  # the norm before clipping
        run.stop_if_diverged(step, metrics_sum["loss"], grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.master and (step % args.eval_every == 0 or step == args.steps):
            run.log(step, **evaluate())
        run.log.count(n_tokens)
        if run.log.due(step):
            run.log.step(step, **metrics_sum, lr=lr, grad_norm=grad_norm)
        if run.checkpoint_due(step):
            run.save_checkpoint(step)
        if run.stop_requested:
            return

    if not run.master:
        return
    after = [m for m in run.log.history if "val_loss" in m][-1]
    run.summary.update({f"{key}_after": after[key] for key in SUMMARISED}, steps=args.steps, lr=args.lr)
    run.save_model(policy, template=args.template)
    with run.optional("answering the test prompts"):
        rows = [json.loads(line) for line in (run.out / "responses.jsonl").read_text().splitlines()]
        for row, answer in zip(rows, answers()):
            row["after"] = answer
        run.write_text("responses.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with run.optional("the loss plot"):
        curves = {"train": run.log.curve("loss"), "validation": run.log.curve("val_loss")}
        plot_curves(run.out / "loss.svg", curves, f"DPO loss (--loss {args.loss})", ylabel="loss")
    with run.optional("the log-prob plot"):
        curves = {name: run.log.curve(f"val_{name}_logp_token") for name in ("chosen", "rejected", "greedy")}
        plot_curves(run.out / "logps.svg", curves, "held-out answers: the policy's log-prob per token", ylabel="nats")
    s = run.summary
    print(
        f"held-out reward accuracy {s['val_reward_accuracy_before']:.3f} -> {s['val_reward_accuracy_after']:.3f}, "
        f"margin {s['val_margin_after']:.3f}, loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}; "
        f"outputs in {run.out}",
        flush=True,
    )


# ---- diagnostics: what the evaluation measures beside the loss


# The squeezing diagnostic (Ren & Sutherland, ICLR 2025, "Learning dynamics of LLM finetuning"): off-policy DPO's
# push down on the rejected answers moves probability mass toward what the model already finds most likely, so
# the chosen answers' log-prob can fall along with the rejected ones' while the greedy answers' rises. Each
# figure is per token: log-probs summed over all the answers, over their summed token counts.
@torch.no_grad()
def squeezing_diagnostic(model, val_logps, val_lengths, prompts, budget: int, eot: int, device, ctx) -> dict:
    """val_logps, val_lengths (2, N) from the evaluation; prompts greedy-decoded in one batch, up to `budget`
    tokens each. -> the model's log-prob per token of the chosen, the rejected and its greedy answers"""
    with ctx:
        outputs = generate(model, prompts, budget, temperature=0, eos_token=eot)
    greedy = [(prompt, seq[len(prompt) :]) for prompt, seq in zip(prompts, outputs)]
    greedy_logps, greedy_lengths = response_logprobs(model, greedy, eot, device, ctx)  # (n,), (n,)
    chosen, rejected = val_logps.sum(-1) / val_lengths.sum(-1)  # (2,) -> two scalars
    greedy_logp = greedy_logps.sum() / greedy_lengths.sum()
    return {"chosen_logp_token": chosen, "rejected_logp_token": rejected, "greedy_logp_token": greedy_logp}


if __name__ == "__main__":
    main()
