"""Reinforcement learning from a reward with PPO, KL-penalised toward the starting model, as in InstructGPT.

Recipe 6 of the research notes. The policy (--model, usually an SFT model) answers prompts; a reward scores the
answers; PPO (Schulman et al. 2017) makes answers that scored better than the value model expected more likely,
while a per-token KL penalty keeps the policy near a frozen reference (a copy of where it started), so that it
cannot drift into text only the reward likes. One step of it is numbered 1-6 in train().

    python train_ppo.py --model out/sft --reward model:out/rm --out out/ppo   # a train_reward.py model
    python train_ppo.py --reward sentiment    # positive VADER sentiment of book continuations (Ziegler et al. 2019)
    python train_ppo.py --reward letter:X --dense-score   # answers full of X: train_xkl.py's goal, by RL instead

Outputs in --out: metrics.jsonl, summary.json, samples_before.txt and samples_after.txt (held-out prompts, answers,
scores), kl_score.svg (held-out score against KL to the reference, Ziegler et al.'s figure), score.svg and the
policy's weights (model.safetensors + config.json, loadable by transformers).
"""

import copy
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanotune import load_tokenizer
from nanotune import rollout as rl  # what every RL step is: sampling, scoring, read-back, held-out
from nanotune.data.instruct import IGNORE, token_logprobs
from nanotune.flags import integer, real
from nanotune.lifecycle.run import Run
from nanotune.lifecycle.step import clip_gradients, lr_at, make_optimizer, no_sync_unless_last, wrap_model
from nanotune.metrics import fmt
from nanotune.model.loader import load_reward_model
from nanotune.model.peft import PeftSpec, describe_trainable
from nanotune.model.reward_model import RewardModel
from nanotune.rewards import make_prompts, parse_reward, prompt_spec
from nanotune.utils import all_reduce_mean, die


# mean of x over the positions where mask is 1. x, mask (B, L) -> scalar
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


# whiten(x) = (x - mean) / sqrt(var + 1e-8), mean and (population) variance over the masked positions;
# shift_mean=False adds the mean back (scales only). x (B, L) or (B,) -> the same shape, 0 where mask is 0.
def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    mask = torch.ones_like(x) if mask is None else mask
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    return (white if shift_mean else white + mean) * mask


# Per-token rewards of each answer (t runs over its tokens; mask is 1 on them):
#   kl_t = log pi(a_t) - log ref(a_t)       the sampled token's log-ratio: summed over an answer, its expectation
#                                           is KL(pi || ref) of whole answers
#   r_t  = -kl_coef * kl_t  +  [t is the answer's last token] * score
# A score that is a sum over tokens (--dense-score) can instead be paid where it is earned: token_scores (B, L)
# are those parts, r_t adds token_score_t, and the last token gets the rest, score - sum_t token_score_t. Each
# answer's return (gamma 1) is the same; each token's advantage is less noisy.
# logps, ref_logps, mask (B, L) with each answer on a prefix of its row; scores (B,) -> rewards (B, L), kl (B,)
def kl_penalized_rewards(scores, logps, ref_logps, mask, kl_coef: float, token_scores=None):
    kl = (logps - ref_logps) * mask  # (B, L)
    token_scores = torch.zeros_like(kl) if token_scores is None else token_scores * mask
    last = mask.sum(-1).long() - 1  # (B,) position of each answer's last token
    at_last = F.one_hot(last, mask.shape[1]).to(kl.dtype)  # (B, L)
    rest = scores - token_scores.sum(-1)  # (B,)
    return -kl_coef * kl + token_scores + at_last * rest[:, None], kl.sum(-1)


# Generalised advantage estimation (Schulman et al. 2016), backwards over each answer's tokens:
#   delta_t = r_t + gamma * V_{t+1} - V_t          (V after the answer's last token is 0: the episode is over)
#   A_t     = delta_t + gamma * lam * A_{t+1}
#   R_t     = A_t + V_t                            (the value model's regression targets)
# rewards, values, mask (B, L), each answer on a prefix of its row -> advantages, returns (B, L), 0 past the end
def gae(rewards, values, mask, gamma: float, lam: float):
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages * mask, (advantages + values) * mask


# PPO's clipped surrogate, as a loss over answer tokens (Schulman et al. 2017):
#   ratio_t = pi(a_t) / pi_old(a_t) = exp(logp_t - old_logp_t)
#   loss    = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip, 1 + clip))
# the max is the pessimistic bound: no gain from moving the ratio beyond the clip range in the advantage's
# direction. logps, old_logps, advantages, mask (B, L) -> loss, share of tokens where the clipped term won
def ppo_policy_loss(logps, old_logps, advantages, mask, clip: float):
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


# The value loss, clipped like the policy around the values of the rollout (V_old):
#   V_clip = V_old + clip(V - V_old, -clip, clip)
#   loss   = mean_t 0.5 * max((V_t - R_t)^2, (V_clip_t - R_t)^2)
# values, old_values, returns, mask (B, L) -> loss, share of tokens where the clipped term won
def ppo_value_loss(values, old_values, returns, mask, clip: float):
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask)


# explained variance = 1 - Var(R - V) / Var(R) over answer tokens: 1 when the value model predicts the returns,
# 0 (or below) when it does no better than their mean. values, returns, mask (B, L) -> scalar
def explained_variance(values, returns, mask):
    variance = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask)  # noqa: E731
    return 1 - variance(returns - values) / variance(returns).clamp(min=1e-8)


# Ziegler et al. 2019's proportional controller toward a target KL (nats per answer):
#   e = clip((KL - target) / target, -0.2, 0.2);   kl_coef <- kl_coef * (1 + e * n / horizon)
# where n is the number of answers the KL was measured on: more data, a larger step.
def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n: int, horizon: float) -> float:
    error = min(max((kl - target) / target, -0.2), 0.2)
    return kl_coef * (1 + error * n / horizon)


# --whiten-scores: scores -> (s - mean) / std over the batch; token scores, parts of a score, are divided by the
# same std (the mean comes off at the last token, in kl_penalized_rewards). scores (B,), token_scores (B, L)
def whiten_scores(scores, token_scores=None):
    scale = torch.rsqrt(scores.var(correction=0) + 1e-8)  # whiten's 1 / std
    return whiten(scores), None if token_scores is None else token_scores * scale


# what the run optimised: a --resume keeps it (nanotune/rollout.py adds the reward's flags, flags.py the model's)
# (--kl-coef: the checkpoint holds the coefficient, which --target-kl moves; a new one would be ignored)
PPO_OBJECTIVE = "--kl-coef --target-kl --kl-horizon --whiten-scores --dense-score --gamma --lam --clip --value-clip"
PPO_OBJECTIVE += " --vf-coef --ptx-coef"


def parse_args(argv=None):
    p = rl.make_parser(__doc__, batch_size=4)  # the shared flags and the reward's: nanotune/rollout.py
    add = p.add_argument
    add("--rollout-batch", type=integer(1), default=16, help="answers sampled per step per process (default 16)")
    add("--ppo-epochs", type=integer(1), default=4, help="passes over each rollout batch (default 4)")
    add("--kl-coef", type=real(0), default=0.05, help="weight of the per-token KL penalty (default 0.05)")
    add("--target-kl", type=real(0, low_open=True), help="adapt --kl-coef toward this KL per answer (Ziegler et al.)")
    add("--kl-horizon", type=real(0, low_open=True), default=10000, help="with --target-kl: its horizon (10000)")
    add("--whiten-scores", action="store_true", help="normalise each batch's scores to mean 0, std 1")
    add("--dense-score", action="store_true", help="letter:X: pay each token its part where sampled (clearer credit)")
    add("--gamma", type=real(0, 1), default=1.0, help="discount over answer tokens (default 1.0)")
    add("--lam", type=real(0, 1), default=0.95, help="GAE lambda (default 0.95)")
    add("--clip", type=real(0, low_open=True), default=0.2, help="policy ratio clip range (default 0.2)")
    add("--value-clip", type=real(0, low_open=True), default=0.2, help="value clip range (default 0.2)")
    add("--vf-coef", type=real(0), default=0.1, help="weight of the value loss (default 0.1)")
    add("--ptx-coef", type=real(0), default=0.0, help="PPO-ptx: weight of a next-token loss on training text (0: off)")
    return rl.parse_flags(p, argv, PPO_OBJECTIVE)


def main(argv=None):
    args = parse_args(argv)
    kind, _ = parse_reward(args.reward)
    if args.dense_score and kind != "letter":
        die(f"--dense-score needs --reward letter:X (a score that is a sum over tokens), got {args.reward!r}")
    if args.rollout_batch % args.batch_size:
        die(f"--rollout-batch ({args.rollout_batch}) must be a multiple of --batch-size ({args.batch_size})")
    with Run(args, __file__, outputs=rl.HeldOut.OUTPUTS, show=("score", "kl", "val_score", "val_kl")) as run:
        train(args, run)
    if run.exit_code:  # 2: the error line is printed; 130: interrupted, the resume command is printed
        sys.exit(run.exit_code)


@torch.no_grad()
def read_back(policy, reference, value_model, rollout: rl.Rollout, ctx):
    """What the update compares against, without gradients: log-probs of the policy that sampled the answers and
    of the reference, and the value model's estimates. -> old_logps, ref_logps, old_values (B, L)"""
    old_logps, ref_logps = rl.read_back_logprobs(policy, reference, rollout, ctx)
    values = rl.answer_values(value_model, rollout.input_ids, rollout.attention_mask, rollout.P, ctx)
    return old_logps, ref_logps, values * rollout.mask


@dataclass
class Learner:
    """What the PPO update trains, as it runs them (DDP-wrapped, compiled): the policy and the value model, under
    the run's autocast ctx."""

    policy: nn.Module
    value: nn.Module
    ctx: object


def minibatch_losses(args, learner: Learner, rollout: rl.Rollout, exp: rl.Experience, micro):
    """PPO's losses on the answers `micro` of the rollout. -> loss, metrics (each a tensor)"""
    m = rollout.mask[micro]
    inputs = (rollout.input_ids[micro], rollout.attention_mask[micro], rollout.P, learner.ctx)
    logps, entropy = rl.answer_logprobs(learner.policy, *inputs)
    values = rl.answer_values(learner.value, *inputs)
    old_logps = exp.old_logps[micro]
    policy_loss, clip_fraction = ppo_policy_loss(logps, old_logps, exp.advantages[micro], m, args.clip)
    value_loss, value_clip_fraction = ppo_value_loss(
        values, exp.old_values[micro], exp.returns[micro], m, args.value_clip
    )
    log_ratio = (logps - old_logps).detach()
    metrics = {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": masked_mean(entropy.detach(), m),
        "clip_fraction": clip_fraction,
        "value_clip_fraction": value_clip_fraction,
        "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, m),  # k3 estimator of KL(old || new), >= 0
    }
    return policy_loss + args.vf_coef * value_loss, metrics


def ppo_step(args, learner: Learner, rollout: rl.Rollout, exp: rl.Experience, minibatch, ptx_text=None):
    """Step 5's forward and backward on one minibatch of answers, as --grad-accum micro-batches (their gradients
    add up to the minibatch's). ptx_text(n) -> n examples of training text (PPO-ptx). -> the minibatch's losses
    and statistics (tensors)"""
    minibatch_tokens, sums = rollout.mask[minibatch].sum(), {}
    for micro, last in rl.micro_batches(minibatch, args.grad_accum):
        # both losses are means over answer tokens: a micro-batch weighs by its share of the tokens
        weight = rollout.mask[micro].sum() / minibatch_tokens
        # under DDP the gradients are all-reduced once, in the last micro-batch's backward
        with no_sync_unless_last(learner.policy, last), no_sync_unless_last(learner.value, last):
            loss, metrics = minibatch_losses(args, learner, rollout, exp, micro)
            loss, parts = weight * loss, {name: weight * value for name, value in metrics.items()}
            if ptx_text:  # PPO-ptx, equal-sized text batches: each micro-batch adds 1/grad_accum
                ptx = ptx_loss(learner.policy, *ptx_text(len(micro)), learner.ctx)
                loss = loss + args.ptx_coef * ptx / args.grad_accum
                parts["ptx_loss"] = ptx / args.grad_accum
            loss.backward()
        rl.add_detached(sums, {"loss": loss, **parts})  # tensors: read back when logged
    return sums


# PPO-ptx: the next-token loss on training text (InstructGPT). input_ids, labels (n, T) -> scalar
def ptx_loss(model, input_ids, labels, ctx):
    with ctx:
        logits = model(input_ids)  # (n, T, V)
    logps = token_logprobs(logits, labels)  # (n, T), 0 where labels are IGNORE
    return -logps.sum() / (labels != IGNORE).sum()


def train(args, run):
    device, enc = run.device, load_tokenizer()
    kind, target = parse_reward(args.reward)

    # ---- the models: the policy (trains), the reference (frozen), the reward, the value model (trains)
    def make_value_model(policy):
        """GPT-2 + a scalar head: the reward model (as InstructGPT) or the policy (--peft: sharing its base)"""
        shared = {id(p): p for p in policy.parameters()} if args.peft != "none" else {}
        return load_reward_model(target, device) if kind == "model" else RewardModel(copy.deepcopy(policy, shared))

    peft = PeftSpec.from_flags(args)
    models = rl.load_rl_models(
        run, enc, args.model, args.ref_model, args.reward, peft, args.missing_eos_penalty, make_value_model
    )
    policy, reference, value_model, model_name = models.policy, models.reference, models.value_model, models.name
    # ---- prompts: training prompts are sampled, held-out prompts are fixed; training text for PPO-ptx
    prompts = make_prompts(prompt_spec(args, args.eval_prompts), enc, models.context, with_text=args.ptx_coef > 0)
    heldout = rl.HeldOut(
        run, models, prompts.heldout, enc, args.max_new_tokens, args.seed, args.eval_every, args.steps, args.samples
    )

    def paid_scores(scores, rollout):
        """What the rewards pay: the scores (whitened with --whiten-scores), all on each answer's last token or,
        with --dense-score, each letter token's part of the share where it was sampled. -> scores, token_scores"""
        answer_ids, score = rollout.input_ids[:, rollout.P :], models.reward.score
        token_scores = score.token_scores(answer_ids, rollout.mask, rollout.ended) if args.dense_score else None
        return whiten_scores(scores, token_scores) if args.whiten_scores else (scores, token_scores)

    def next_kl_coef(kl_coef, kl):
        """--target-kl: Ziegler et al.'s controller moves the coefficient; without it, it stays."""
        if args.target_kl is None:
            return kl_coef
        return adaptive_kl_coef(kl_coef, kl, args.target_kl, args.rollout_batch * run.world, args.kl_horizon)

    kl_state = {"kl_coef": args.kl_coef}  # moves with --target-kl; part of every checkpoint
    run.summary.update(model=model_name, reward=args.reward, ref_model=args.ref_model, world_size=run.world)
    run.summary["prompts_skipped_too_long"] = prompts.skipped
    if run.master:
        skipped = f" ({prompts.skipped} prompts too long for the context skipped)" if prompts.skipped else ""
        print(
            f"policy {model_name} ({args.peft}: {describe_trainable(policy)}), value model from "
            f"{target if kind == 'model' else 'the policy'}, reward {args.reward}, on {device} ({run.dtype}); "
            f"{prompts.described}, {len(prompts.heldout)} held-out prompts{skipped}; "
            f"{args.rollout_batch * run.world} answers per step",
            flush=True,
        )
    heldout.before(kl_coef=kl_state["kl_coef"])

    # value model and policy train together: one optimizer, one gradient clip over both
    trained = nn.ModuleList([policy, value_model])
    optimizer = make_optimizer(trained, "adamw", args.lr, 0.0, device)
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws its own prompts
    # with --resume: the checkpoint's policy, value model, KL coefficient, optimizer and RNG states
    first_step = run.track(policy, optimizer, data_rng, extras={"value_model": value_model, "kl": kl_state})
    train_policy = wrap_model(policy, device, run.world, args.compile, args.activation_checkpointing)
    train_value = wrap_model(value_model, device, run.world, args.compile, args.activation_checkpointing)
    learner = Learner(train_policy, train_value, run.ctx)
    ptx_text = (lambda n: prompts.text_batch(n, data_rng, device)) if args.ptx_coef else None  # PPO-ptx
    trained.train()
    for step in range(first_step, args.steps + 1):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        kl_coef = kl_state["kl_coef"]
        t0 = time.time()
        # ---- 1. rollout: the current policy answers a batch of training prompts
        prompt_ids = prompts.sample(args.rollout_batch, data_rng)
        rollout = rl.sample_rollout(policy, prompt_ids, args.max_new_tokens, enc.eot_token, run.ctx, fast=run.sampling)
        mask = rollout.mask  # (B, L): 1 on each answer's tokens
        t1 = time.time()
        # ---- 2. score the answers, and read them back: old log-probs, reference log-probs, values (no gradients)
        scores = models.reward(prompt_ids, rollout.answers, rollout.ended).to(device)  # (B,)
        old_logps, ref_logps, old_values = read_back(policy, reference, value_model, rollout, run.ctx)  # (B, L)
        # ---- 3. per-token rewards: the score, less the KL penalty at every token
        paid, token_scores = paid_scores(scores, rollout)
        rewards, kl = kl_penalized_rewards(paid, old_logps, ref_logps, mask, kl_coef, token_scores)  # (B, L), (B,)
        # ---- 4. advantages by GAE from the value model's estimates, whitened over the batch's answer tokens
        advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
        advantages = whiten(advantages, mask)
        stats = {
            "score": scores.mean(),
            "kl": kl.mean(),
            "answer_len": mask.sum(-1).mean(),
            "eos_share": rollout.ended.float().mean(),
            "explained_variance": explained_variance(old_values, returns, mask),
        }
        stats["rlhf_reward"] = stats["score"] - kl_coef * stats["kl"]
        mean_kl = all_reduce_mean(stats["kl"].item(), device)  # what every rank checks and adapts to
        rl.check_kl(mean_kl, step)
        t2 = time.time()
        # ---- 5. the PPO update: --ppo-epochs passes over shuffled minibatches of --batch-size answers, one
        # optimizer step each
        exp, update = rl.Experience(old_logps, advantages, ref_logps, old_values, returns), rl.StepMeans()
        for minibatch in rl.minibatches(args.rollout_batch, args.batch_size, args.ppo_epochs, data_rng, device):
            sums = ppo_step(args, learner, rollout, exp, minibatch, ptx_text)  # forward and backward
            sums["grad_norm"] = clip_gradients(trained, args.grad_clip)  # the norm before clipping
            run.stop_if_diverged(step, sums["loss"], sums["grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update.add(sums)
        t3 = time.time()
        # ---- 6. adapt the KL coefficient; evaluate, log, checkpoint
        kl_state["kl_coef"] = next_kl_coef(kl_coef, mean_kl)
        if heldout.due(step):
            run.log(step, **heldout()[0], kl_coef=kl_coef)
        times = {"time_generate_s": t1 - t0, "time_score_s": t2 - t1, "time_update_s": t3 - t2}
        run.log.count(mask.sum())
        if run.log.due(step):
            run.log.step(step, **stats, **update.means(), kl_coef=kl_coef, lr=lr, **times)
        if run.checkpoint_due(step):
            run.save_checkpoint(step)
        if run.stop_requested:
            return

    run.summary.update(steps=args.steps, lr=args.lr, kl_coef=kl_state["kl_coef"])  # (the same on every rank)
    if not run.master:
        return
    run.save_model(policy, template=args.template, prompt_source=args.prompt_source)
    heldout.after(f"PPO, reward {args.reward}")
    s = {k: fmt(run.summary.get(k)) for k in ("score_before", "score_after", "kl_after", "kl_coef")}
    kl = f"KL to the reference {s['kl_after']} nats per answer (kl_coef {s['kl_coef']})"
    print(f"held-out score {s['score_before']} -> {s['score_after']}, {kl}; outputs in {run.out}", flush=True)


if __name__ == "__main__":
    main()
