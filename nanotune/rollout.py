"""What an RL step is whatever the algorithm (train_ppo.py, train_grpo.py, and any recipe that samples answers to
prompts and scores them): the models (load_rl_models: the policy, its KL reference, the reward), sampling
answers (Rollout) and scoring them (Reward), reading their log-probabilities back (Experience: what an update
compares against), the minibatches of an update, and the held-out evaluation (HeldOut)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .data.instruct import token_logprobs
from .flags import Parser, add_common_args, integer, parse_run_args, real
from .generate import generate
from .model.loader import load_model
from .model.peft import PeftSpec, apply_peft, base_model
from .plot import plot_curves
from .rewards import REWARD_FLAGS, add_reward_args, make_reward, settle_reward_args
from .utils import DivergedError, NanotuneError

KL_FLOOR = -1.0  # nats; see check_kl


@dataclass
class Rollout:
    """Answers to prompts, laid out for one forward pass: prompts left-padded to one width P, answers after them,
    so that every answer starts in column P and logits[:, P - 1 + t] predict answer token t."""

    input_ids: torch.Tensor  # (B, P + L)
    attention_mask: torch.Tensor  # (B, P + L), 0 on the padding
    mask: torch.Tensor  # (B, L) float, 1 on the answer's tokens (the <|endoftext|> that ends one is an action too)
    P: int
    answers: list[list[int]]  # token lists without <|endoftext|>
    ended: torch.Tensor  # (B,) bool, on the CPU: the answer ended with <|endoftext|>


@dataclass
class Experience:
    """What an update compares the policy against, one row per answer of a Rollout, read without gradients."""

    old_logps: torch.Tensor  # (B, L) log-probs of the policy that sampled the answers
    advantages: torch.Tensor  # (B, L) per token (PPO's GAE) or (B,) per answer (GRPO's group baseline)
    ref_logps: torch.Tensor | None = None  # (B, L) the KL reference's log-probs (GRPO: only with --beta)
    old_values: torch.Tensor | None = None  # (B, L) the value model's estimates (PPO)
    returns: torch.Tensor | None = None  # (B, L) the value model's regression targets (PPO)


class Reward:
    """--reward's score of each answer, less --missing-eos-penalty for an answer that never ended, checked: one
    finite score per answer, or a one-line error. reward(prompt_ids, answers, ended) -> (B,) on the CPU."""

    def __init__(self, spec: str, score, missing_eos_penalty: float):
        self.spec, self.score, self.missing_eos_penalty = spec, score, missing_eos_penalty
        self.context = score.context  # prompt + answer must fit (None: no limit)

    def __call__(self, prompt_ids, answers, ended: torch.Tensor) -> torch.Tensor:
        scores = self.score(prompt_ids, answers)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (len(answers),):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            n = len(answers)
            raise NanotuneError(
                f"--reward {self.spec} gave scores of shape {shape} for {n} answers: one score each expected"
            )
        scores = scores - self.missing_eos_penalty * (~ended).float()
        if not torch.isfinite(scores).all():
            raise NanotuneError(f"--reward {self.spec} gave NaN or infinite scores: check the reward model")
        return scores


@dataclass
class RLModels:
    """What an RL recipe samples, scores and compares with (see load_rl_models)."""

    policy: torch.nn.Module
    reference: torch.nn.Module
    reward: Reward
    name: str  # the policy's name, for saving it
    context: int  # the longest prompt + answer every model (and the reward) reads
    value_model: torch.nn.Module | None = None


def load_rl_models(
    run,
    enc,
    model: str,
    ref_model: str | None,
    reward: str,
    peft: PeftSpec,
    missing_eos_penalty: float,
    value_model: Callable | None = None,
) -> RLModels:
    """The policy (--model, trained: --peft applied), the frozen KL reference (--ref-model, or where the policy
    starts: with --peft the policy, its additions switched off), --reward's scorer (an unended answer costs
    missing_eos_penalty), and the context they all read. value_model(policy) -> a value model, built from the
    policy before --peft changes it (PPO)."""
    policy, name = load_model(model, run.device, quiet=not run.master)
    reference = load_model(ref_model, run.device, "--ref-model", quiet=True)[0] if ref_model else None
    reference = base_model(policy, peft.method) if reference is None else reference.eval().requires_grad_(False)
    score = make_reward(reward, enc, run.device, run.ctx, run.dtype)  # (prompt_ids, answers) -> (B,)
    value = value_model(policy) if value_model else None
    apply_peft(policy, peft, name)
    bodies = [policy, reference]
    if value is not None:
        apply_peft(value.body, peft, name)  # (the value head stays trainable)
        bodies.append(value.body)
    context = min(m.config.n_positions - m.n_virtual for m in bodies)
    reward = Reward(reward, score, missing_eos_penalty)
    return RLModels(policy, reference, reward, name, min(context, reward.context or context), value)


@torch.no_grad()
def sample_rollout(policy, prompt_ids, max_new_tokens: int, eos: int, ctx, generator=None, fast=None) -> Rollout:
    """The policy's answers at temperature 1, no top-k or top-p (the log-probs an update stores must be those of
    the distribution the tokens were drawn from), with the KV cache, under the run's autocast. fast: generate's
    compile and dtype (a run with --compile compiles the decode step once, for every rollout; a bfloat16 run
    samples with a bfloat16 head and cache: the log-probs the update uses are computed again in float32)."""
    was_training = policy.training
    policy.eval()
    with ctx:
        sampling = dict(temperature=1.0, eos_token=eos, generator=generator) | (fast or {})
        sequences = generate(policy, prompt_ids, max_new_tokens, **sampling)
    policy.train(was_training)
    return layout(prompt_ids, sequences, eos, policy.wte.weight.device)


def layout(prompt_ids: list[list[int]], sequences: list[list[int]], eos: int, device) -> Rollout:
    """Prompts + their continuations (as generate returns them) -> a Rollout (see its docstring)."""
    answers = [seq[len(p) :] for p, seq in zip(prompt_ids, sequences)]  # ends with <|endoftext|> if it ended
    P, L = max(map(len, prompt_ids)), max(map(len, answers))
    input_ids = torch.full((len(answers), P + L), eos, dtype=torch.long)
    attention_mask = torch.zeros(len(answers), P + L, dtype=torch.long)
    mask = torch.zeros(len(answers), L)
    for b, (p, a) in enumerate(zip(prompt_ids, answers)):
        input_ids[b, P - len(p) : P + len(a)] = torch.tensor(p + a)
        attention_mask[b, P - len(p) :] = 1
        mask[b, : len(a)] = 1
    ended = torch.tensor([bool(a) and a[-1] == eos for a in answers])
    stripped = [a[:-1] if e else a for a, e in zip(answers, ended.tolist())]
    return Rollout(input_ids.to(device), attention_mask.to(device), mask.to(device), P, stripped, ended)


def answer_logprobs(model, input_ids, attention_mask, P: int, ctx):
    """log pi of each answer token under the context before it, and the entropy of that distribution, in
    float32. input_ids, attention_mask (B, P + L) -> logps, entropy (B, L)"""
    # only the answer's positions go through the head: (B, L, V), not (B, P + L, V); as a tensor of indices, so
    # that a compiled model does not recompile for every prompt width P
    positions = torch.arange(P - 1, input_ids.shape[1] - 1, device=input_ids.device)
    with ctx:
        logits = model(input_ids, attention_mask=attention_mask, positions=positions)  # (B, L, V)
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (B, L)
    logps = token_logprobs(logits, input_ids[:, P:], lse)  # (B, L)
    with torch.no_grad():  # a statistic, not a loss: no (B, L, V) tensors kept for backward
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # H = -sum p log p = lse - sum p z
    return logps, entropy


@torch.no_grad()
def read_back_logprobs(policy, reference, rollout: Rollout, ctx, with_reference: bool = True):
    """The log-probs of the sampled answers under the policy that sampled them (in eval mode, as it sampled) and,
    with_reference, under the reference. -> old_logps, ref_logps or None (B, L)"""
    inputs = (rollout.input_ids, rollout.attention_mask, rollout.P, ctx)
    policy.eval()
    old_logps = answer_logprobs(policy, *inputs)[0]
    policy.train()
    return old_logps, answer_logprobs(reference, *inputs)[0] if with_reference else None


def minibatches(n: int, size: int, epochs: int, rng: torch.Generator, device):
    """An update's passes over n answers: each epoch a new shuffle (drawn from rng when it begins), cut into
    minibatches of `size`, one optimizer step each. -> index tensors (size,) on the device"""
    for _ in range(epochs):
        order = torch.randperm(n, generator=rng).to(device)
        for start in range(0, n, size):
            yield order[start : start + size]


def micro_batches(minibatch: torch.Tensor, grad_accum: int):
    """A minibatch as --grad-accum micro-batches (every grad_accum-th answer). -> (indices, is it the last?)"""
    for k in range(grad_accum):
        yield minibatch[k::grad_accum], k == grad_accum - 1


class StepMeans:
    """The mean over an update's optimizer steps of each loss and statistic (tensors, read back when logged);
    first: the first step's."""

    def __init__(self):
        self.sums, self.first, self.n = {}, None, 0

    def add(self, step_sums: dict):
        self.first = step_sums if self.first is None else self.first
        for key, value in step_sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.n += 1

    def means(self) -> dict:
        return {key: value / self.n for key, value in self.sums.items()}


def add_detached(sums: dict, parts: dict):
    """sums[key] += parts[key], detached (a micro-batch's share of a minibatch's statistics)."""
    for key, value in parts.items():
        sums[key] = sums.get(key, 0.0) + value.detach()


def answer_values(model, input_ids, attention_mask, P: int, ctx):
    """The value model's estimate before each answer token. input_ids (B, P + L) -> (B, L)"""
    with ctx:
        return model(input_ids, attention_mask=attention_mask, all_positions=True)[:, P - 1 : -1].float()


def check_kl(mean_kl: float, step: int):
    """Stop when the mean KL to the reference (over every process's answers, so that all ranks stop together)
    cannot be one. log pi and log ref are computed the same way on the same tokens: their difference averages
    >= 0. A mean far below 0 means the two disagree about the tokens (misaligned positions, padding, a wrong
    reference), and every update would chase that error."""
    if not math.isfinite(mean_kl) or mean_kl < KL_FLOOR:
        raise DivergedError(
            f"step {step}: the mean KL to the reference is {mean_kl:.4g} nats per answer (below {KL_FLOOR} or not "
            "finite): the policy's and the reference's log-probs do not belong to the same tokens; check "
            "--ref-model and the model files"
        )


@torch.no_grad()
def evaluate_policy(policy, reference, prompt_ids, reward, enc, max_new_tokens: int, ctx, seed: int, shown: int):
    """Held-out prompts, one sampled answer each (the same random draws every time): the mean score and the mean
    KL to the reference (the sum of log pi - log ref over an answer's tokens), and the first `shown` prompts with
    their answers as text. reward(prompt_ids, answers, ended) -> (B,). -> {"val_score", "val_kl"}, text"""
    device = policy.wte.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    rollout = sample_rollout(policy, prompt_ids, max_new_tokens, enc.eot_token, ctx, generator)
    scores = reward(prompt_ids, rollout.answers, rollout.ended)
    was_training = policy.training
    policy.eval()
    logps = answer_logprobs(policy, rollout.input_ids, rollout.attention_mask, rollout.P, ctx)[0]
    policy.train(was_training)
    ref_logps = answer_logprobs(reference, rollout.input_ids, rollout.attention_mask, rollout.P, ctx)[0]
    kl = ((logps - ref_logps) * rollout.mask).sum(-1).cpu()  # (B,)
    text = []
    for i, (p, a, s, k, e) in enumerate(zip(prompt_ids[:shown], rollout.answers, scores, kl, rollout.ended)):
        end = "" if e else ", no end"
        text.append(f"--- prompt {i} (score {s:.3f}, KL {k:.2f} nats{end}) ---\n{enc.decode(p)}\n>>> {enc.decode(a)}\n")
    return {"val_score": scores.mean().item(), "val_kl": kl.mean().item()}, "\n".join(text)


def make_parser(doc: str, batch_size: int) -> Parser:
    """An RL recipe's parser, its own flags still to add: the flags every train_*.py shares (flags.py; no LoRA
    dropout: its noise would enter every ratio against the sampling policy) and the reward's (rewards.py)."""
    parser = Parser(doc)
    add_common_args(parser, lr=1e-5, steps=100, batch_size=batch_size, lora_dropout=False)
    add_reward_args(parser)  # --reward, --ref-model, the prompts' source and the answer length
    return parser


def parse_flags(parser, argv, objective: str):
    """Adds what every RL recipe has last: what an unended answer costs (Reward) and the held-out evaluation
    (HeldOut); parses, and fills in the defaults that depend on --reward. objective: the recipe's flags that a
    --resume keeps (beside the reward's, the held-out prompts and the penalty)."""
    add = parser.add_argument
    eos = "subtracted from the score of an answer that never ends"
    add("--missing-eos-penalty", type=real(), default=0.0, help=eos)
    add("--eval-every", type=integer(1), default=10, help="held-out score and KL every N steps (default 10)")
    add("--eval-prompts", type=integer(1), default=64, help="held-out prompts scored (default 64)")
    add("--samples", type=integer(0), default=4, help="held-out answers written before and after (default 4)")
    fixed = f"{REWARD_FLAGS} --eval-prompts --missing-eos-penalty {objective}"
    return settle_reward_args(parse_run_args(parser, argv, fixed_on_resume=fixed))


@dataclass
class HeldOut:
    """An RL run's held-out evaluation (see evaluate_policy): before training, every `every` steps and at the last
    step, on the master process; samples_before.txt, samples_after.txt and the plots (plot_heldout). prompts: the
    held-out prompts' token ids; samples: how many answers the text files show."""

    OUTPUTS: ClassVar = ("samples_before.txt", "samples_after.txt", "kl_score.svg", "score.svg")  # written in --out

    run: object
    models: RLModels
    prompts: list[list[int]]
    enc: object
    max_new_tokens: int
    seed: int
    every: int
    steps: int
    samples: int

    def __call__(self):
        """-> {"val_score", "val_kl"}, the first `samples` answers as text"""
        m = self.models
        return evaluate_policy(
            m.policy,
            m.reference,
            self.prompts,
            m.reward,
            self.enc,
            self.max_new_tokens,
            self.run.ctx,
            self.seed,
            self.samples,
        )

    def due(self, step: int) -> bool:
        return self.run.master and (step % self.every == 0 or step == self.steps)

    def before(self, **extra):
        """Step 0 of a run that does not resume: logged (with extra), written to samples_before.txt."""
        run = self.run
        if run.master and not run.resumed:
            before, shown = self()
            run.summary.update(score_before=before["val_score"], kl_before=before["val_kl"])
            run.log(0, **before, **extra)
            run.write_text("samples_before.txt", shown)

    def after(self, title: str):
        """After training, the weights saved: samples_after.txt and the plots, each allowed to fail alone."""
        run = self.run
        with run.optional("the held-out evaluation after training"):
            after, shown = self()
            run.summary.update(score_after=after["val_score"], kl_after=after["val_kl"])
            run.write_text("samples_after.txt", shown)
        with run.optional("the plots"):
            plot_heldout(run.out, run.log.history, title)


def plot_heldout(out, history: list[dict], title: str):
    """kl_score.svg, the held-out score against KL to the reference at every evaluation (Ziegler et al.'s
    figure), and score.svg, the training and held-out scores by step."""
    evals = [m for m in history if "val_score" in m]
    kl_score = {"held-out score": [(m["val_kl"], m["val_score"]) for m in evals]}
    kl_title = "held-out score against KL to the reference"
    plot_curves(out / "kl_score.svg", kl_score, kl_title, "KL (nats per answer)", "held-out score")
    steps = {"training score": [(m["step"], m["score"]) for m in history if "score" in m]}
    steps["held-out"] = [(m["step"], m["val_score"]) for m in evals]
    plot_curves(out / "score.svg", steps, title, ylabel="score")
