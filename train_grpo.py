"""Reinforcement learning from a reward with GRPO: group-relative policy optimization, no value model.

Recipe 7. GRPO (Shao et al. 2024, DeepSeekMath) samples --group-size G answers to each prompt and judges each
answer against the others to the same prompt: the group's mean score is the baseline PPO's value model would
have learned. The rewards are train_ppo.py's (nanotune/rewards.py), so the two compare on the same task. One step,
as numbered in train(): 1. sample G answers for each of --prompts-per-step prompts; 2. score them; 3. advantages
relative to each group (--advantage); 4. --epochs passes of the clipped objective over minibatches (--clip-low,
--clip-high, --loss-agg, a k3 KL term with --beta); 5. evaluate, log, checkpoint. The variants:

    python train_grpo.py --reward sentiment                      # GRPO: (r - mean) / std of each group
    python train_grpo.py --reward sentiment --advantage mean --loss-agg constant   # Dr. GRPO (Liu et al. 2025)
    python train_grpo.py --reward letter:X --advantage rloo      # RLOO's leave-one-out baseline (Ahmadian 2024)
    python train_grpo.py --reward letter:X --clip-high 0.28 --loss-agg token --skip-uniform-groups   # DAPO

Outputs in --out: metrics.jsonl, summary.json, samples_before.txt and samples_after.txt, kl_score.svg (held-out
score against KL to the starting model), score.svg and the policy's weights (loadable by transformers).
"""

import sys
import time

import torch

from nanotune import load_tokenizer
from nanotune import rollout as rl  # what every RL step is: sampling, scoring, read-back, held-out
from nanotune.flags import integer, real
from nanotune.lifecycle.run import Run
from nanotune.lifecycle.step import clip_gradients, lr_at, make_optimizer, no_sync_unless_last, wrap_model
from nanotune.metrics import fmt
from nanotune.model.peft import PeftSpec, describe_trainable
from nanotune.rewards import make_prompts, prompt_spec
from nanotune.utils import all_reduce_mean, die


# Group-relative advantages of G answers to each of P prompts, from their scores r (P, G):
#   grpo:  A_i = (r_i - mean(r)) / (std(r) + eps)         Shao et al. 2024 (std with Bessel's correction, as TRL)
#   mean:  A_i = r_i - mean(r)                              Dr. GRPO (Liu et al. 2025): no std, no length bias
#   rloo:  A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))    leave-one-out (Ahmadian et al. 2024)
# A group whose G scores are equal gets 0 everywhere: it carries no signal. scores (P, G) -> (P, G)
def group_advantages(scores: torch.Tensor, kind: str, eps: float = 1e-4) -> torch.Tensor:
    centred = scores - scores.mean(dim=1, keepdim=True)
    if kind == "grpo":
        return centred / (scores.std(dim=1, keepdim=True) + eps)
    if kind == "rloo":
        return centred * scores.shape[1] / (scores.shape[1] - 1)
    return centred


# The clipped surrogate per token, with separate ends (DAPO's clip-higher, Yu et al. 2025):
#   ratio_t = exp(logp_t - old_logp_t)
#   loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A)
# A is the answer's advantage, shared by its tokens. logps, old_logps (B, L), advantages (B,) -> loss (B, L),
# and where the clip bit: low (ratio < 1 - clip_low with A < 0) and high (ratio > 1 + clip_high with A > 0), (B, L)
def clipped_objective(logps, old_logps, advantages, clip_low: float, clip_high: float):
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None]
    loss = -torch.minimum(ratio * A, ratio.clamp(1 - clip_low, 1 + clip_high) * A)
    return loss, (ratio < 1 - clip_low) & (A < 0), (ratio > 1 + clip_high) & (A > 0)


# The k3 estimator of KL(pi || ref) at each sampled token (Schulman 2020; DeepSeekMath's KL term): unbiased,
# always >= 0, exp(ref - logp) - (ref - logp) - 1. logps, ref_logps (B, L) -> (B, L)
# Written as expm1(d) - d: exp(d) - d - 1 rounds to -1e-16 for d near 0, expm1 keeps it >= 0 in floating point.
def k3_kl(logps, ref_logps):
    log_ratio = ref_logps - logps
    return torch.expm1(log_ratio) - log_ratio


# How per-token losses x (B, L) of a minibatch become one number (mask 1 on answer tokens):
#   sequence: mean over each answer's tokens, then over answers      GRPO: a long answer's tokens weigh less
#   token:    sum over every token / number of tokens                DAPO: every token weighs the same
#   constant: sum over every token / (B * max_new_tokens)           Dr. GRPO: a fixed normaliser, no length bias
# For a micro-batch (--grad-accum), x and mask are its rows and minibatch_mask the whole minibatch's (B, L): its
# share is its rows' sum over the minibatch's normaliser, so the micro-batches add up to the minibatch's loss
# (a token mean of micro-batch token means would weigh a micro-batch of short answers as much as one of long ones).
def aggregate(x, mask, kind: str, max_new_tokens: int, minibatch_mask=None):
    minibatch_mask = mask if minibatch_mask is None else minibatch_mask
    if kind == "sequence":
        return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / minibatch_mask.shape[0]
    if kind == "token":
        return (x * mask).sum() / minibatch_mask.sum().clamp(min=1)
    return (x * mask).sum() / (minibatch_mask.shape[0] * max_new_tokens)


# what the run optimised: a --resume keeps it (nanotune/rollout.py adds the reward's flags, flags.py the model's)
GRPO_OBJECTIVE = "--group-size --advantage --clip-low --clip-high --loss-agg --beta --skip-uniform-groups"


def parse_args(argv=None):
    p = rl.make_parser(__doc__, batch_size=16)  # the shared flags and the reward's: nanotune/rollout.py
    add = p.add_argument
    add("--advantage", default="grpo", choices=["grpo", "mean", "rloo"], help="the group baseline (default grpo)")
    add("--group-size", type=integer(2), default=8, help="G: answers sampled for each prompt (default 8)")
    add("--prompts-per-step", type=integer(1), default=8, help="prompts per step per process (default 8)")
    add("--epochs", type=integer(1), default=1, help="passes over each step's answers (default 1: on-policy)")
    add("--clip-low", type=real(0, 1, low_open=True, high_open=True), default=0.2, help="ratio >= 1 - this (0.2)")
    add("--clip-high", type=real(0, low_open=True), default=None, help="ratio <= 1 + this (default: --clip-low)")
    agg = "per-token losses to one: sequence (GRPO), token (DAPO) or constant (Dr. GRPO); default sequence"
    add("--loss-agg", default="sequence", choices=["sequence", "token", "constant"], help=agg)
    add("--beta", type=real(0), default=0.0, help="weight of the k3 KL term toward the reference (default 0)")
    add("--skip-uniform-groups", action="store_true", help="resample groups whose G scores are equal (DAPO)")
    return rl.parse_flags(p, argv, GRPO_OBJECTIVE)


def main(argv=None):
    args = parse_args(argv)
    args.clip_high = args.clip_low if args.clip_high is None else args.clip_high
    answers = args.prompts_per_step * args.group_size
    if answers % args.batch_size:
        die(f"--prompts-per-step x --group-size = {answers} answers: not a multiple of --batch-size {args.batch_size}")
    with Run(args, __file__, outputs=rl.HeldOut.OUTPUTS, show=("score", "uniform_share", "val_score", "val_kl")) as run:
        train(args, run)
    if run.exit_code:  # 2: the error line is printed; 130: interrupted, the resume command is printed
        sys.exit(run.exit_code)


def sample_groups(policy, prompts, reward, eos: int, args, run, data_rng):
    """Steps 1-2: G answers to each of --prompts-per-step prompts, scored. With --skip-uniform-groups a group whose
    G scores are equal is drawn again, up to 4 more rounds (DAPO's dynamic sampling); the step keeps P groups.
    -> rollout (the P * G answers, each group's together), scores (P, G), share of uniform groups among those
    drawn, seconds spent scoring"""
    P, G = args.prompts_per_step, args.group_size
    groups, drawn, score_s = [], 0, 0.0  # (G prompts, G prompt + answer sequences, scores (G,), all G scores equal?)
    for _ in range(5 if args.skip_uniform_groups else 1):
        prompt_ids = [p for p in prompts.sample(P, data_rng) for _ in range(G)]
        rollout = rl.sample_rollout(policy, prompt_ids, args.max_new_tokens, eos, run.ctx, fast=run.sampling)
        start = time.time()
        scores = reward(prompt_ids, rollout.answers, rollout.ended).view(P, G)
        score_s += time.time() - start
        ends = rollout.ended.tolist()
        sequences = [p + a + [eos] * e for p, a, e in zip(prompt_ids, rollout.answers, ends)]
        for i in range(P):
            group = slice(i * G, (i + 1) * G)
            groups.append((prompt_ids[group], sequences[group], scores[i], bool((scores[i] == scores[i, 0]).all())))
        drawn += P
        if not args.skip_uniform_groups or sum(not g[3] for g in groups) >= P:
            break
    share = sum(g[3] for g in groups) / drawn
    if args.skip_uniform_groups:  # the informative groups first, in the order drawn; short of P, uniform ones
        groups = sorted(groups, key=lambda g: g[3])
    groups = groups[:P]
    prompt_ids = [p for g in groups for p in g[0]]
    rollout = rl.layout(prompt_ids, [s for g in groups for s in g[1]], eos, run.device)
    return rollout, torch.stack([g[2] for g in groups]), share, score_s


def grpo_step(args, train_policy, rollout: rl.Rollout, exp: rl.Experience, minibatch, ctx):
    """Step 4's forward and backward on one minibatch of answers, as --grad-accum micro-batches (their gradients
    add up to the minibatch's). -> the minibatch's loss and statistics (token means over it, tensors)"""
    minibatch_mask = rollout.mask[minibatch]  # (batch_size, L)
    tokens, sums = minibatch_mask.sum(), {}  # the statistics below are token means over the minibatch
    for micro, last in rl.micro_batches(minibatch, args.grad_accum):
        m = rollout.mask[micro]
        # under DDP the gradients are all-reduced once, in the last micro-batch's backward
        with no_sync_unless_last(train_policy, last):
            inputs = (rollout.input_ids[micro], rollout.attention_mask[micro], rollout.P, ctx)
            logps, entropy = rl.answer_logprobs(train_policy, *inputs)
            old = exp.old_logps[micro]
            objective, low, high = clipped_objective(logps, old, exp.advantages[micro], args.clip_low, args.clip_high)
            kl = k3_kl(logps, exp.ref_logps[micro]) if args.beta else torch.zeros_like(logps)  # (B, L)
            # this micro-batch's share of the minibatch's loss (the shares add up to it)
            loss = aggregate(objective + args.beta * kl, m, args.loss_agg, args.max_new_tokens, minibatch_mask)
            loss.backward()
        parts = {
            "loss": loss,
            "kl_k3": (kl.detach() * m).sum() / tokens,
            "entropy": (entropy * m).sum() / tokens,
            "clip_low": (low * m).sum() / tokens,
            "clip_high": (high * m).sum() / tokens,
            "ratio": (torch.exp(logps.detach() - old) * m).sum() / tokens,
        }
        rl.add_detached(sums, parts)
    return sums


def train(args, run):
    device, enc = run.device, load_tokenizer()

    # ---- the models: the policy (trains), the reference (frozen: the KL term, and KL measured at evaluations)
    peft = PeftSpec.from_flags(args)
    models = rl.load_rl_models(run, enc, args.model, args.ref_model, args.reward, peft, args.missing_eos_penalty)
    policy, model_name = models.policy, models.name
    # ---- prompts: training prompts are sampled, held-out prompts are fixed (the same answers drawn each time)
    prompts = make_prompts(prompt_spec(args, args.eval_prompts), enc, models.context)
    heldout = rl.HeldOut(
        run, models, prompts.heldout, enc, args.max_new_tokens, args.seed, args.eval_every, args.steps, args.samples
    )

    run.summary.update(model=model_name, reward=args.reward, ref_model=args.ref_model, world_size=run.world)
    if run.master:
        print(
            f"policy {model_name} ({args.peft}: {describe_trainable(policy)}), reward {args.reward}, on {device} "
            f"({run.dtype}); {prompts.described}, {len(prompts.heldout)} held-out prompts; {args.prompts_per_step} "
            f"groups of {args.group_size} answers per step and process; advantage {args.advantage}",
            flush=True,
        )
    heldout.before()

    optimizer = make_optimizer(policy, "adamw", args.lr, 0.0, device)
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws its own prompts (whole groups)
    first_step = run.track(policy, optimizer, data_rng)
    train_policy = wrap_model(policy, device, run.world, args.compile, args.activation_checkpointing)
    policy.train()
    for step in range(first_step, args.steps + 1):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        # ---- 1-2. G answers to each prompt, and their scores (P, G)
        sampled = sample_groups(policy, prompts, models.reward, enc.eot_token, args, run, data_rng)
        rollout, scores, uniform_share, score_s = sampled
        t1 = time.time()
        # ---- 3. each answer against the others to its prompt: advantages (P * G,)
        advantages = group_advantages(scores, args.advantage).flatten().to(device)
        # what the update compares against: the sampling policy's log-probs, the reference's (--beta 0: not run)
        old_logps, ref_logps = rl.read_back_logprobs(policy, models.reference, rollout, run.ctx, bool(args.beta))
        mean_kl = None  # the sampled answers' KL to the reference, per answer, when the update uses it
        if args.beta:
            mean_kl = all_reduce_mean(((old_logps - ref_logps) * rollout.mask).sum(-1).mean().item(), device)
            rl.check_kl(mean_kl, step)
        t2 = time.time()
        # ---- 4. --epochs passes of the clipped objective over shuffled minibatches, one optimizer step each
        exp, update = rl.Experience(old_logps, advantages, ref_logps), rl.StepMeans()
        for minibatch in rl.minibatches(len(advantages), args.batch_size, args.epochs, data_rng, device):
            sums = grpo_step(args, train_policy, rollout, exp, minibatch, run.ctx)  # forward and backward
            sums["grad_norm"] = clip_gradients(policy, args.grad_clip)  # the norm before clipping
            run.stop_if_diverged(step, sums["loss"], sums["grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update.add(sums)
        update = {"first_ratio": update.first["ratio"], **update.means()}  # 1 exactly: the first step is on-policy
        t3 = time.time()
        # ---- 5. evaluate, log, checkpoint
        if heldout.due(step):
            run.log(step, **heldout()[0])
        stats = {"score": scores.mean(), "uniform_share": uniform_share, "answer_len": rollout.mask.sum(-1).mean()}
        # (the phases PPO times: generation; scoring and the read-back of log-probs; the update)
        times = {"time_generate_s": t1 - t0 - score_s, "time_score_s": t2 - t1 + score_s, "time_update_s": t3 - t2}
        run.log.count(rollout.mask.sum())
        if run.log.due(step):
            run.log.step(step, **stats, kl=mean_kl, **update, lr=lr, **times)
        if run.checkpoint_due(step):
            run.save_checkpoint(step)
        if run.stop_requested:
            return

    if not run.master:
        return
    run.summary.update(steps=args.steps, lr=args.lr)
    run.save_model(policy, template=args.template, prompt_source=args.prompt_source)
    heldout.after(f"GRPO ({args.advantage}), reward {args.reward}")
    s = {k: fmt(run.summary.get(k)) for k in ("score_before", "score_after", "kl_after")}
    print(
        f"held-out score {s['score_before']} -> {s['score_after']}, KL to the start {s['kl_after']} nats per answer; "
        f"outputs in {run.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
