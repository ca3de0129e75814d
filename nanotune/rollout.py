"""Sampling answers and reading their log-probabilities back: the part of an RL step that is the same whatever
the algorithm (train_ppo.py, and any recipe that samples answers to prompts and scores them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .generate import generate
from .instruct import token_logprobs
from .plot import plot_curves
from .utils import DivergedError

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
