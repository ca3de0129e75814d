"""Reinforcement learning from a reward with PPO, KL-penalised toward the starting model, as in InstructGPT.

Recipe 6 of the research notes. The policy (--model, usually an SFT model) answers prompts; a reward scores the
answers; PPO (Schulman et al. 2017) makes answers that scored better than the value model expected more likely,
while a per-token KL penalty keeps the policy near a frozen reference (a copy of where it started), so that it
cannot drift into text only the reward likes. Rewards (--reward):

    python train_ppo.py --model out/sft --reward model:out/rm --out out/ppo   # a train_reward.py model
    python train_ppo.py --reward sentiment    # positive VADER sentiment of book continuations (Ziegler et al. 2019)
    python train_ppo.py --reward letter:X --dense-score   # answers full of X: train_xkl.py's goal, by RL instead

One step: sample --rollout-batch answers at temperature 1 with the KV cache -> score them -> per-token rewards
(-kl_coef * (log pi - log ref) on every answer token, plus the score on the last) -> advantages by GAE from the
value model's estimates -> --ppo-epochs passes of the clipped policy and value losses over shuffled minibatches
of --batch-size answers. The value model is a GPT-2 with a scalar head, started from the reward model when
there is one (as InstructGPT did), else from the policy.

Outputs in --out: metrics.jsonl, summary.json, samples_before.txt, samples_after.txt (held-out prompts, answers
and scores), kl_score.svg (held-out score against KL to the reference, Ziegler et al.'s figure), score.svg and
the policy's weights (model.safetensors + config.json, loadable by transformers).
"""

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanotune import generate, load_tokenizer
from nanotune.data import GULLIVER_URL, INSTRUCTIONS_URL, default_file, read_book, read_records
from nanotune.instruct import collate, encode_pair, format_prompt, normalize_examples, split_examples, token_logprobs
from nanotune.peft import apply_peft, describe_trainable
from nanotune.reward import PAD, RewardModel
from nanotune.run import Run, add_common_args, check_common_args, parse_run_args
from nanotune.tokenizer import letter_tokens
from nanotune.utils import (
    NanotuneError,
    all_reduce_mean,
    clip_gradients,
    die,
    load_model,
    lr_at,
    make_optimizer,
    no_sync_unless_last,
    plot_curves,
    wrap_model,
)

# the default training books for --reward sentiment / letter (Project Gutenberg; Gulliver is held out)
BOOKS = {"pride-and-prejudice": 1342, "frankenstein": 84, "alice": 11, "sherlock-holmes": 1661, "moby-dick": 2701}
KL_FLOOR = -1.0  # nats; see the check in the loop


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, lr=1e-5, steps=100, batch_size=4)
    p.add_argument(
        "--reward",
        default="sentiment",
        help="model:DIR (a train_reward.py output; prompts from --data), sentiment (VADER compound "
        "score of the continuation; needs the vaderSentiment package) or letter:X (share of answer "
        "tokens containing the letter); default sentiment",
    )
    p.add_argument("--ref-model", default=None, help="KL reference (default: a frozen copy of --model)")
    p.add_argument(
        "--data",
        default=None,
        help="with model:DIR: instruction JSON/JSONL (default: download the "
        "instruction set of 'LLMs from scratch'); prompts are its training split, as in SFT",
    )
    p.add_argument(
        "--books",
        nargs="+",
        default=None,
        metavar="FILE",
        help="with sentiment/letter: training books, plain text (default: download five Project "
        "Gutenberg novels into data/)",
    )
    p.add_argument(
        "--heldout-book",
        default=None,
        metavar="FILE",
        help="with sentiment/letter: the book the held-out prompts come from (default: Gulliver's Travels)",
    )
    p.add_argument("--template", default="alpaca", choices=["alpaca", "plain"], help="prompt layout (as in SFT)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N instruction records (quick runs)")
    p.add_argument("--prompt-len", type=int, default=64, help="book prompts: tokens per window (default 64)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length limit (default 24 for book continuations, 64 for model:DIR)",
    )
    p.add_argument("--rollout-batch", type=int, default=16, help="answers sampled per step per process (default 16)")
    p.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout batch (default 4)")
    p.add_argument("--kl-coef", type=float, default=0.05, help="weight of the per-token KL penalty (default 0.05)")
    p.add_argument(
        "--target-kl",
        type=float,
        default=None,
        help="adapt --kl-coef toward this KL per answer in nats (Ziegler et al.'s controller; default: fixed)",
    )
    p.add_argument("--kl-horizon", type=float, default=10000, help="with --target-kl: the controller's horizon")
    p.add_argument("--whiten-scores", action="store_true", help="normalise each batch's scores to mean 0, std 1")
    p.add_argument(
        "--dense-score",
        action="store_true",
        help="letter:X: pay each answer token its part of the share (1/length if it holds the "
        "letter) where it is sampled, not all on the last token: same return, clearer credit",
    )
    p.add_argument("--gamma", type=float, default=1.0, help="discount over answer tokens (default 1.0)")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda (default 0.95)")
    p.add_argument("--clip", type=float, default=0.2, help="policy ratio clip range (default 0.2)")
    p.add_argument("--value-clip", type=float, default=0.2, help="value clip range around the rollout's values")
    p.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss (default 0.1)")
    p.add_argument(
        "--ptx-coef",
        type=float,
        default=0.0,
        help="PPO-ptx: weight of a next-token loss on training text (SFT examples or book windows), "
        "which keeps the policy fluent (InstructGPT; default 0: off)",
    )
    p.add_argument(
        "--missing-eos-penalty",
        type=float,
        default=0.0,
        help="subtracted from the score of an answer that never ends (no <|endoftext|>); default 0",
    )
    p.add_argument("--eval-every", type=int, default=10, help="held-out score and KL every N steps")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts scored (default 64)")
    p.add_argument("--samples", type=int, default=4, help="held-out answers written before and after (default 4)")
    return parse_run_args(p, argv)


def main(argv=None):
    args = parse_args(argv)
    check_common_args(args)
    kind, _, target = args.reward.partition(":")
    if kind not in ("model", "sentiment", "letter") or (kind == "sentiment") == bool(target):
        die(f"--reward takes model:DIR, sentiment or letter:X, got {args.reward!r}")
    if args.dense_score and kind != "letter":
        die(f"--dense-score needs --reward letter:X (a score that is a sum over tokens), got {args.reward!r}")
    if kind == "letter" and len(target) != 1:
        die(f"--reward letter:X needs a single character, got {target!r}")
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if kind == "model" else 24
    if args.max_new_tokens < 1 or args.prompt_len < 1 or args.eval_prompts < 1 or args.samples < 0:
        die("--max-new-tokens, --prompt-len and --eval-prompts must be >= 1, --samples >= 0")
    if args.rollout_batch < 1 or args.rollout_batch % args.batch_size or args.ppo_epochs < 1:
        die(
            f"--rollout-batch ({args.rollout_batch}) must be a positive multiple of --batch-size "
            f"({args.batch_size}, the PPO minibatch) and --ppo-epochs >= 1"
        )
    if not (args.kl_coef >= 0 and args.clip > 0 and args.value_clip > 0 and args.vf_coef >= 0 and args.ptx_coef >= 0):
        die("--kl-coef, --vf-coef and --ptx-coef must be >= 0, --clip and --value-clip > 0")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1):
        die(f"--gamma and --lam must lie in [0, 1], got {args.gamma} and {args.lam}")
    if args.target_kl is not None and not (args.target_kl > 0 and args.kl_horizon > 0):
        die("--target-kl and --kl-horizon must be > 0")
    with Run(args, "ppo") as run:  # device, processes, --out, metrics, checkpoints, Ctrl-C: see nanotune/run.py
        train(args, run)


def train(args, run):
    device = run.device
    enc = load_tokenizer()
    kind, _, target = args.reward.partition(":")

    # ---- the models: policy (trains), reference (frozen), value model (trains), reward model (frozen)
    policy, model_name = load_model(args.model, device, quiet=not run.master)
    reference = (
        load_model(args.ref_model, device, "--ref-model", quiet=True)[0] if args.ref_model else copy.deepcopy(policy)
    )
    reward_model = None
    if kind == "model":
        try:
            reward_model = RewardModel.from_pretrained(target, device=device)
            value_model = RewardModel.from_pretrained(
                target, device=device
            )  # values start as the reward model's scores
        except (OSError, KeyError, ValueError) as e:
            raise NanotuneError(f"could not load the reward model {target}: {e}") from None
    else:
        value_model = RewardModel(copy.deepcopy(policy))  # the policy's body with a new scalar head
    for frozen in (reference, reward_model):
        if frozen is not None:
            frozen.eval().requires_grad_(False)
    apply_peft(policy, args, model_name)  # --peft: freeze the base, add what trains (nanotune/peft.py)
    apply_peft(value_model.body, args, model_name)  # (the value head stays trainable)
    context = min(m.config.n_positions - m.n_virtual for m in (policy, reference, value_model.body))
    if reward_model is not None:
        context = min(context, reward_model.config.n_positions)

    # ---- prompts: training prompts are sampled, held-out prompts are fixed; texts for PPO-ptx
    if kind == "model":
        path = args.data or default_file("instruction-data.json", INSTRUCTIONS_URL)
        examples = normalize_examples(read_records(path, args.limit), path)
        train_examples, _, test_examples = split_examples(examples, args.seed)  # the test split, as in SFT and DPO
        prompts = {
            name: [enc.encode_ordinary(format_prompt(ex, args.template)) for ex in split]
            for name, split in (("train", train_examples), ("heldout", test_examples))
        }
        ptx_pairs = []  # PPO-ptx texts: the SFT examples whose prompt fits, their response cut to the context
        for ex, prompt_ids in zip(train_examples if args.ptx_coef else [], prompts["train"]):
            if len(prompt_ids) < context - 1:
                ptx_pairs.append(encode_pair(enc, format_prompt(ex, args.template), ex["output"], context - 1, "")[:2])
    else:
        if args.prompt_len + args.max_new_tokens > context:
            raise NanotuneError(
                f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} exceed the "
                f"models' context of {context}"
            )
        books = args.books or [
            default_file(f"{name}.txt", f"https://www.gutenberg.org/cache/epub/{i}/pg{i}.txt", "--books")
            for name, i in BOOKS.items()
        ]
        book_tokens = torch.cat([torch.tensor(enc.encode_ordinary(read_book(book) + "\n\n")) for book in books])
        heldout_book = args.heldout_book or default_file("gulliver.txt", GULLIVER_URL, "--heldout-book")
        heldout_tokens = enc.encode_ordinary(read_book(heldout_book))
        if len(book_tokens) <= args.prompt_len + args.max_new_tokens or len(heldout_tokens) <= args.prompt_len:
            raise NanotuneError(
                f"the books hold {len(book_tokens)} and {len(heldout_tokens)} tokens: too few for "
                f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens}"
            )
        starts = torch.linspace(0, len(heldout_tokens) - args.prompt_len, args.eval_prompts).long().tolist()
        prompts = {"heldout": [heldout_tokens[s : s + args.prompt_len] for s in starts]}  # evenly spread, fixed
    dropped = 0
    for name in list(prompts):  # instruction prompts too long to leave room for a whole answer are skipped
        kept = [p for p in prompts[name] if len(p) + args.max_new_tokens <= context]
        dropped += len(prompts[name]) - len(kept)
        prompts[name] = kept[: args.eval_prompts] if name == "heldout" else kept
    if not prompts["heldout"] or ("train" in prompts and not prompts["train"]):
        raise NanotuneError(
            f"no prompt leaves room for --max-new-tokens {args.max_new_tokens} in the context of "
            f"{context}: lower --max-new-tokens"
        )

    # ---- the reward: a score (B,) for each (prompt, answer); answers are token lists without <|endoftext|>
    if kind == "model":

        @torch.no_grad()
        def score(prompt_ids, answers):
            rows = [p + a for p, a in zip(prompt_ids, answers)]
            idx = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
            for b, row in enumerate(rows):  # right padding: the reward is read at the last real token
                idx[b, : len(row)] = torch.tensor(row)
            with run.ctx:
                return reward_model(idx.to(device)).float().cpu()

    elif kind == "sentiment":
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise NanotuneError(
                "--reward sentiment needs the vaderSentiment package: pip install vaderSentiment "
                '(or pip install -e ".[ppo]")'
            ) from None
        analyzer = SentimentIntensityAnalyzer()

        def score(prompt_ids, answers):  # VADER's compound score in [-1, 1] of the continuation alone
            return torch.tensor([analyzer.polarity_scores(enc.decode(a))["compound"] for a in answers])

    else:
        is_letter = letter_tokens(enc, target)

        def score(prompt_ids, answers):  # share of the answer's tokens whose text contains the letter
            return torch.tensor([is_letter[a].float().mean().item() if a else 0.0 for a in answers])

    def reward(prompt_ids, answers, ended):
        """The score of each answer, less --missing-eos-penalty for answers that never ended. -> (B,) on CPU"""
        return score(prompt_ids, answers) - args.missing_eos_penalty * (~ended).float()

    def rollout_layout(prompt_ids, sequences):
        """Prompts left-padded to one width P, answers after them: every answer starts in column P, so that
        logits[:, P - 1 + t] predict answer token t. -> input_ids, attention_mask (B, P + L), answer mask (B, L),
        P, answers (token lists without <|endoftext|>), ended (B,) bool."""
        answers = [seq[len(p) :] for p, seq in zip(prompt_ids, sequences)]  # ends with <|endoftext|> if it ended
        P, L = max(map(len, prompt_ids)), max(map(len, answers))
        input_ids = torch.full((len(answers), P + L), enc.eot_token, dtype=torch.long)
        attention_mask = torch.zeros(len(answers), P + L, dtype=torch.long)
        mask = torch.zeros(len(answers), L)
        for b, (p, a) in enumerate(zip(prompt_ids, answers)):
            input_ids[b, P - len(p) : P + len(a)] = torch.tensor(p + a)
            attention_mask[b, P - len(p) :] = 1
            mask[b, : len(a)] = 1  # the <|endoftext|> that ends an answer is one of its actions
        ended = torch.tensor([bool(a) and a[-1] == enc.eot_token for a in answers])
        stripped = [a[:-1] if e else a for a, e in zip(answers, ended.tolist())]
        return input_ids.to(device), attention_mask.to(device), mask.to(device), P, stripped, ended

    def answer_logprobs(model, input_ids, attention_mask, P):
        """log pi of each answer token under the context before it, and the entropy of that distribution.
        -> logps, entropy (B, L)"""
        with run.ctx:
            # only the answer's positions go through the head: (B, L, V), not (B, P + L, V)
            logits = model(input_ids, attention_mask=attention_mask, positions=slice(P - 1, -1))  # (B, L, V)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        logps = log_probs.gather(-1, input_ids[:, P:, None]).squeeze(-1)  # (B, L)
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, L)
        return logps, entropy

    def answer_values(model, input_ids, attention_mask, P):
        """The value model's estimate before each answer token. -> (B, L)"""
        with run.ctx:
            return model(input_ids, attention_mask=attention_mask, all_positions=True)[:, P - 1 : -1].float()

    def sample(prompt_ids, generator=None):
        """Answers at temperature 1, no top-k or top-p: the log-probs PPO stores must be those of the
        distribution the tokens were drawn from."""
        policy.eval()
        sequences = generate(
            policy, prompt_ids, args.max_new_tokens, temperature=1.0, eos_token=enc.eot_token, generator=generator
        )
        policy.train()
        return sequences

    def ptx_loss(model, n):
        """PPO-ptx: next-token loss on n training texts (SFT examples, response tokens; or book windows)."""
        if kind == "model":
            pairs = [ptx_pairs[i] for i in torch.randint(len(ptx_pairs), (n,), generator=data_rng).tolist()]
            input_ids, labels = collate(pairs, enc.eot_token, device)
        else:
            T = args.prompt_len + args.max_new_tokens
            starts = torch.randint(0, len(book_tokens) - T - 1, (n,), generator=data_rng).tolist()
            windows = torch.stack([book_tokens[s : s + T + 1] for s in starts]).to(device)
            input_ids, labels = windows[:, :-1], windows[:, 1:]
        with run.ctx:
            logits = model(input_ids)  # (n, T, V)
        logps = token_logprobs(logits, labels)  # (n, T), 0 where labels are IGNORE
        return -logps.sum() / (labels != -100).sum()

    @torch.no_grad()
    def evaluate():
        """Held-out prompts, one sampled answer each (the same random draws every time): mean score and KL."""
        prompt_ids = prompts["heldout"]
        sequences = sample(prompt_ids, torch.Generator(device).manual_seed(args.seed))
        input_ids, attention_mask, mask, P, answers, ended = rollout_layout(prompt_ids, sequences)
        scores = reward(prompt_ids, answers, ended)
        logps = answer_logprobs(policy, input_ids, attention_mask, P)[0]
        ref_logps = answer_logprobs(reference, input_ids, attention_mask, P)[0]
        kl = ((logps - ref_logps) * mask).sum(-1)  # (B,)
        shown = [
            f"--- prompt {i} (score {s:.3f}, KL {k:.2f} nats{'' if e else ', no end'}) ---\n{enc.decode(p)}"
            f"\n>>> {enc.decode(a)}\n"
            for i, (p, a, s, k, e) in enumerate(zip(prompt_ids, answers, scores.tolist(), kl.tolist(), ended.tolist()))
        ][: args.samples]
        return {"val_score": scores.mean().item(), "val_kl": kl.mean().item()}, "\n".join(shown)

    # value model and policy train together: one optimizer, one gradient clip over both
    trained = nn.ModuleList([policy, value_model])
    kl_state = {"kl_coef": args.kl_coef}  # moves with --target-kl; part of every checkpoint
    run.summary.update(
        model=model_name,
        reward=args.reward,
        ref_model=args.ref_model,
        world_size=run.world,
        prompts_skipped_too_long=dropped,
    )
    if run.master:
        source = f"{len(prompts['train'])} training prompts" if kind == "model" else f"{len(book_tokens)} book tokens"
        skipped = f" ({dropped} prompts too long for the context skipped)" if dropped else ""
        print(
            f"policy {model_name} ({args.peft}: {describe_trainable(policy)}), value model from "
            f"{target if kind == 'model' else 'the policy'}, reward {args.reward}, on {device} ({run.dtype}); "
            f"{source}, {len(prompts['heldout'])} held-out prompts{skipped}; "
            f"{args.rollout_batch * run.world} answers per step",
            flush=True,
        )
    if run.master and not run.resumed:
        before, shown = evaluate()
        run.summary.update(score_before=before["val_score"], kl_before=before["val_kl"])
        run.log(step=0, **before, kl_coef=kl_state["kl_coef"])
        run.write_text("samples_before.txt", shown)

    optimizer = make_optimizer(trained, "adamw", args.lr, 0.0, device)
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws its own prompts
    # with --resume: the checkpoint's policy, value model, KL coefficient, optimizer and RNG states
    first_step = run.track(policy, optimizer, data_rng, extras={"value_model": value_model, "kl": kl_state})
    train_policy = wrap_model(policy, device, run.world, args.compile, args.activation_checkpointing)
    train_value = wrap_model(value_model, device, run.world, args.compile, args.activation_checkpointing)
    trained.train()
    for step in range(first_step, args.steps + 1):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        kl_coef = kl_state["kl_coef"]

        # ---- 1. rollouts: the current policy answers a batch of training prompts
        t0 = time.time()
        if kind == "model":
            prompt_ids = [
                prompts["train"][i]
                for i in torch.randint(len(prompts["train"]), (args.rollout_batch,), generator=data_rng).tolist()
            ]
        else:
            starts = torch.randint(0, len(book_tokens) - args.prompt_len, (args.rollout_batch,), generator=data_rng)
            prompt_ids = [book_tokens[s : s + args.prompt_len].tolist() for s in starts.tolist()]
        with torch.no_grad():
            sequences = sample(prompt_ids)
        t1 = time.time()

        # ---- 2. scores, and what the update compares against: log-probs of the policy that sampled and of the
        # reference, and the value model's estimates, all without gradients
        input_ids, attention_mask, mask, P, answers, ended = rollout_layout(prompt_ids, sequences)
        scores = reward(prompt_ids, answers, ended).to(device)  # (B,)
        with torch.no_grad():
            policy.eval()
            old_logps = answer_logprobs(policy, input_ids, attention_mask, P)[0]  # (B, L)
            ref_logps = answer_logprobs(reference, input_ids, attention_mask, P)[0]
            old_values = answer_values(value_model, input_ids, attention_mask, P) * mask  # (B, L)
            trained.train()
            paid, token_scores = scores, None  # what the rewards pay: the scores, whitened with --whiten-scores
            if args.dense_score:  # (B, L): 1 / length on the answer tokens that hold the letter (not on <|endoftext|>)
                lengths = (mask.sum(-1) - ended.to(device).float()).clamp(min=1)  # (B,) tokens the share is over
                token_scores = is_letter.to(device)[input_ids[:, P:]] * mask / lengths[:, None]
            if args.whiten_scores:  # token_scores scale with the scores; the mean comes off at the last token
                paid = whiten(scores)
                if token_scores is not None:
                    token_scores = token_scores * torch.rsqrt(scores.var(correction=0) + 1e-8)  # whiten's 1 / std
            rewards, kl = kl_penalized_rewards(paid, old_logps, ref_logps, mask, kl_coef, token_scores)
            advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
            advantages = whiten(advantages, mask)
        rollout = {
            "score": all_reduce_mean(scores.mean().item(), device),
            "kl": all_reduce_mean(kl.mean().item(), device),
            "answer_len": all_reduce_mean(mask.sum(-1).mean().item(), device),
            "eos_share": all_reduce_mean(ended.float().mean().item(), device),
            "explained_variance": all_reduce_mean(explained_variance(old_values, returns, mask).item(), device),
        }
        rollout["rlhf_reward"] = rollout["score"] - kl_coef * rollout["kl"]
        # log pi and log ref are computed the same way on the same tokens: their difference averages >= 0 (a KL).
        # A batch mean far below 0 means the two sides disagree about the tokens (misaligned positions, padding,
        # a wrong reference), and every update would chase that error
        if not torch.isfinite(kl).all() or rollout["kl"] < KL_FLOOR:
            run.summary["status"] = "diverged"
            raise NanotuneError(
                f"step {step}: the mean KL to the reference is {rollout['kl']:.4g} nats per answer "
                f"(below {KL_FLOOR} or not finite): the policy's and the reference's log-probs do not "
                "belong to the same tokens; check --ref-model and the model files"
            )
        t2 = time.time()

        # ---- 3. the PPO update: --ppo-epochs passes over shuffled minibatches of --batch-size answers
        sums, n_updates = {}, 0
        for _ in range(args.ppo_epochs):
            order = torch.randperm(args.rollout_batch, generator=data_rng).to(device)
            for start in range(0, args.rollout_batch, args.batch_size):
                minibatch = order[start : start + args.batch_size]
                minibatch_tokens = mask[minibatch].sum()
                losses = {}
                for k in range(args.grad_accum):
                    micro = minibatch[k :: args.grad_accum]
                    # both losses are means over answer tokens: a micro-batch weighs by its share of the tokens
                    weight = mask[micro].sum() / minibatch_tokens
                    last = k == args.grad_accum - 1
                    # under DDP the gradients are all-reduced once, in the last micro-batch's backward
                    with no_sync_unless_last(train_policy, last), no_sync_unless_last(train_value, last):
                        logps, entropy = answer_logprobs(train_policy, input_ids[micro], attention_mask[micro], P)
                        values = answer_values(train_value, input_ids[micro], attention_mask[micro], P)
                        m = mask[micro]
                        policy_loss, clip_fraction = ppo_policy_loss(
                            logps, old_logps[micro], advantages[micro], m, args.clip
                        )
                        value_loss, value_clip_fraction = ppo_value_loss(
                            values, old_values[micro], returns[micro], m, args.value_clip
                        )
                        loss = weight * (policy_loss + args.vf_coef * value_loss)
                        if args.ptx_coef:  # equal-sized text batches: each micro-batch adds 1/grad_accum
                            ptx = ptx_loss(train_policy, len(micro))
                            loss = loss + args.ptx_coef * ptx / args.grad_accum
                            losses["ptx_loss"] = losses.get("ptx_loss", 0.0) + ptx.item() / args.grad_accum
                        loss.backward()
                    log_ratio = (logps - old_logps[micro]).detach()
                    for key, value in (
                        ("loss", loss),
                        ("policy_loss", weight * policy_loss),
                        ("value_loss", weight * value_loss),
                        ("entropy", weight * masked_mean(entropy, m)),
                        ("clip_fraction", weight * clip_fraction),
                        ("value_clip_fraction", weight * value_clip_fraction),
                        # k3 estimator of KL(old || new): (ratio - 1) - log ratio >= 0
                        ("approx_kl", weight * masked_mean(log_ratio.exp() - 1 - log_ratio, m)),
                    ):
                        losses[key] = losses.get(key, 0.0) + value.item()
                grad_norm = clip_gradients(trained, args.grad_clip)  # the norm before clipping
                # NaN/inf or an exploding loss stops here, before the update
                run.check(step, all_reduce_mean(losses["loss"], device), grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + value
                n_updates += 1
        update = {k: all_reduce_mean(v / n_updates, device) for k, v in sums.items()}
        t3 = time.time()
        if args.target_kl is not None:
            kl_state["kl_coef"] = adaptive_kl_coef(
                kl_coef, rollout["kl"], args.target_kl, args.rollout_batch * run.world, args.kl_horizon
            )
        if run.master and (step % args.eval_every == 0 or step == args.steps):
            run.log(step=step, **evaluate()[0], kl_coef=kl_coef)
        run.end_step(
            step,
            int(mask.sum().item()) * run.world,
            **rollout,
            **update,
            kl_coef=kl_coef,
            lr=lr,
            grad_norm=grad_norm,
            time_generate_s=t1 - t0,
            time_score_s=t2 - t1,
            time_update_s=t3 - t2,
        )

    # ---- training is over: the weights and the summary so far are saved before anything that might fail
    if not run.master:
        return
    run.summary.update(steps=args.steps, lr=args.lr, kl_coef=kl_state["kl_coef"])
    run.save_model(policy)
    with run.optional("the held-out evaluation after training"):
        after, shown = evaluate()
        run.summary.update(score_after=after["val_score"], kl_after=after["val_kl"])
        run.write_text("samples_after.txt", shown)
    with run.optional("the plots"):
        evals = [m for m in run.history if "val_score" in m]
        plot_curves(
            run.out / "kl_score.svg",
            {"held-out score": [(m["val_kl"], m["val_score"]) for m in evals]},
            "held-out score against KL to the reference (nats per answer)",
            xlabel="KL",
        )
        plot_curves(
            run.out / "score.svg",
            {"training score": run.curve("score"), "held-out": run.curve("val_score")},
            f"PPO, reward {args.reward}",
        )
    s = run.summary
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(
        f"held-out score {fmt(s.get('score_before'))} -> {fmt(s.get('score_after'))}, KL to the reference "
        f"{fmt(s.get('kl_after'))} nats per answer, kl_coef {s['kl_coef']:.4g}; outputs in {run.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
