"""On-policy preference data: k answers sampled from a model for each prompt, scored by a reward, and turned
into preference pairs for DPO and rankings for a reward model (the data of the DPO paper's reward-vs-KL
frontier, where DPO learns from the policy's own samples ranked by the reward PPO maximises).

    python -m nanotune.pairs --model gpt2 --reward letter:e --k 4 --prompts 512 --out out/pairs-e
    python -m nanotune.pairs --model out/sft --reward model:out/rm --k 4 --prompts 256 --pairs best-worst --out DIR

The prompts are the training prompts train_ppo.py and train_grpo.py answer for the same --reward
(nanotune/rewards.py): windows of books for sentiment and letter:X, instruction prompts in the SFT template for
model:DIR (unless --prompt-source says otherwise), drawn with --seed. Each is answered --k times at temperature 1
(no top-k or top-p: the answers are the policy's own distribution), with the KV cache, --batch-size sequences at
a time. The same flags give the
same files (the random draws depend on --batch-size too). Outputs in --out:

- pairs.jsonl: {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}: with --pairs all, every two
  answers to a prompt whose scores differ (by more than TIE), the better one chosen; with --pairs best-worst,
  only the best against the worst. A prompt whose k scores tie gives no pair.
- responses.jsonl: {"prompt", "responses", "scores"} for train_reward.py's ranked records: the answers of
  distinct scores, best first, one per score (the first sampled). train_reward.py reads every earlier answer as
  better than every later one, so two answers with equal scores would be a preference the reward never made.
  Prompts with fewer than two distinct scores are left out.
- summary.json: the counts, the mean score, the time taken and the flags.

The texts are the tokens decoded: "prompt" is the prompt exactly as the model read it and an answer has no
<|endoftext|>. Book prompts are raw text that the answer continues (--template raw of train_dpo.py and
train_reward.py reads them as they are). Instruction prompts are written the same way, the SFT template
already in "prompt" (the prompt source keeps only the templated tokens), so they too are read with --template
raw, not with alpaca or plain, which would wrap them a second time. A recipe re-tokenises the text, and
decoding then encoding BPE tokens does not always give the same tokens back (a token cut between two merges,
bytes of one character split between tokens): summary.json counts the answers and prompts for which it does
not (answers_not_round_trip, prompts_not_round_trip); they are written all the same, as the model produced them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .flags import Parser, integer
from .lifecycle.outdir import OutputFolder
from .metrics import fmt, progress
from .model.loader import load_model
from .rewards import add_reward_args, make_prompts, make_reward, prompt_spec, settle_reward_args
from .rollout import sample_rollout
from .tokenizer import load_tokenizer
from .utils import (
    NanotuneError,
    atomic_write,
    autocast,
    configure_device,
    default_dtype,
    die,
    pick_device,
    save_json,
)

# Scores closer than this are a tie, not a preference: a reward model's score of the same text moves in its last
# bits with the batch it is read in (padding, bfloat16), as evaluate.py's win rate also allows.
TIE = 1e-6
OUTPUTS = ("pairs.jsonl", "responses.jsonl", "summary.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__, prog="python -m nanotune.pairs")
    add = p.add_argument
    add("--model", default="auto", help="the policy that answers: auto, a preset, an output folder or a file")
    add("--k", type=integer(2), default=4, help="answers sampled for each prompt (default 4)")
    add("--prompts", type=integer(1), default=256, help="training prompts answered (default 256)")
    pairs = "all: every two answers whose scores differ (default); best-worst: the best against the worst"
    add("--pairs", default="all", choices=["all", "best-worst"], help=pairs)
    add("--out", required=True, help="output folder; refused if it holds pairs, unless --overwrite")
    add("--overwrite", action="store_true", help="replace the pairs already in --out")
    # --reward, where the prompts come from and the answer length, as train_ppo.py and train_grpo.py read them
    add_reward_args(p, reference=False)
    add("--seed", type=int, default=1337, help="random seed of the prompts and the sampling")
    add("--batch-size", type=integer(1), default=64, help="sequences sampled and scored together (default 64)")
    add("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    dtype = "sampling precision (default auto: bfloat16 on a GPU that has it, else float32)"
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help=dtype)
    return settle_reward_args(p.parse_args(argv))


@dataclass
class Group:
    """The k answers to one prompt, their scores, and the preference pairs among them."""

    prompt: list[int]
    answers: list[list[int]]  # k token lists, without <|endoftext|>
    scores: list[float]  # k
    pairs: list[tuple[int, int]]  # (chosen, rejected): indices into answers


def best_first(scores: list[float]) -> list[int]:
    """Indices of the answers from the highest score down; equal scores keep the order they were sampled in."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def pair_indices(scores: list[float], mode: str = "all") -> list[tuple[int, int]]:
    """(chosen, rejected) among one prompt's answers: with mode all every two whose scores differ by more than
    TIE, the higher chosen; with best-worst the best and the worst; nothing when the scores tie."""
    order = best_first(scores)
    if mode == "best-worst":
        order = [order[0], order[-1]]
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1 :] if scores[a] - scores[b] > TIE]


def strict_ranking(scores: list[float]) -> list[int]:
    """Indices of one answer per distinct score (the first sampled), best first: every earlier one is better."""
    kept = []
    for i in best_first(scores):
        if not kept or scores[kept[-1]] - scores[i] > TIE:
            kept.append(i)
    return kept


@torch.no_grad()
def sample_pairs(
    policy,
    prompt_ids: list[list[int]],
    reward,
    k: int,
    max_new_tokens: int,
    eos: int,
    ctx,
    mode: str = "all",
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    fast: dict | None = None,
    show: bool = True,
) -> list[Group]:
    """k answers to each prompt at temperature 1, scored by reward(prompt_ids, answers) -> (B,), and paired
    (pair_indices; mode all or best-worst). -> one Group per prompt, in order. ctx: the autocast to sample
    under; generator: the sampling's random draws; fast: generate's compile and dtype (see sample_rollout)."""
    repeated = [p for p in prompt_ids for _ in range(k)]  # each prompt k times in a row: N * k sequences
    answers, scores = [], []
    chunks = range(0, len(repeated), batch_size)  # a chunk may end inside a prompt's k: they are regrouped below
    for start in progress(chunks, f"sampling {k} answers to {len(prompt_ids)} prompts", show):
        chunk = repeated[start : start + batch_size]
        rollout = sample_rollout(policy, chunk, max_new_tokens, eos, ctx, generator, fast)
        chunk_scores = reward(chunk, rollout.answers)  # (b,)
        if not torch.isfinite(chunk_scores).all():
            raise NanotuneError("the reward gave NaN or infinite scores: check the reward model")
        answers += rollout.answers
        scores += chunk_scores.tolist()
    groups = []
    for i, prompt in enumerate(prompt_ids):
        own = slice(i * k, (i + 1) * k)
        groups.append(Group(prompt, answers[own], scores[own], pair_indices(scores[own], mode)))
    return groups


def round_trips(enc, ids: list[int]) -> bool:
    """Whether the decoded text encodes back to the same tokens (what a recipe reading the text will see)."""
    return enc.encode_ordinary(enc.decode(ids)) == ids


def records(groups: list[Group], enc) -> tuple[list[dict], list[dict]]:
    """Groups -> pairs.jsonl's preference records and responses.jsonl's ranked records, as text."""
    pair_rows, ranked_rows = [], []
    for g in groups:
        prompt, texts = enc.decode(g.prompt), [enc.decode(a) for a in g.answers]
        for c, r in g.pairs:
            pair_rows.append(
                {
                    "prompt": prompt,
                    "chosen": texts[c],
                    "rejected": texts[r],
                    "chosen_score": g.scores[c],
                    "rejected_score": g.scores[r],
                }
            )
        ranking = strict_ranking(g.scores)
        if len(ranking) >= 2:
            ranked_rows.append(
                {"prompt": prompt, "responses": [texts[i] for i in ranking], "scores": [g.scores[i] for i in ranking]}
            )
    return pair_rows, ranked_rows


def write_jsonl(path: Path, rows: list[dict]):
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


def prompt_source(args, enc, context: int):
    """nanotune.rewards.make_prompts for these flags. It also builds held-out prompts, which this tool does not
    use: one is asked for (the source still checks that the held-out book or test split has one)."""
    return make_prompts(prompt_spec(args, eval_prompts=1), enc, context)


def make_pairs(args, out: Path) -> dict:
    """Load the policy, the reward and the prompts, sample, write the outputs. -> the summary."""
    start = time.time()
    device = pick_device(args.device)
    configure_device(device)
    dtype = default_dtype(device) if args.dtype == "auto" else args.dtype
    ctx = autocast(device, dtype)
    enc = load_tokenizer()
    policy, model_name = load_model(args.model, device)
    reward = make_reward(args.reward, enc, device, ctx, dtype)  # (prompt_ids, answers) -> (B,)
    context = policy.config.n_positions - policy.n_virtual
    prompts = prompt_source(args, enc, min(context, reward.context or context))
    prompt_ids = prompts.sample(args.prompts, torch.Generator().manual_seed(args.seed))
    print(f"{model_name}: {args.prompts} prompts ({prompts.described}) x {args.k} answers, {args.reward}", flush=True)

    fast = {"dtype": torch.bfloat16 if dtype == "bfloat16" else None}  # a bf16 run samples with a bf16 head
    generator = torch.Generator(device).manual_seed(args.seed)
    sampling = dict(mode=args.pairs, batch_size=args.batch_size, generator=generator, fast=fast)
    groups = sample_pairs(policy, prompt_ids, reward, args.k, args.max_new_tokens, enc.eot_token, ctx, **sampling)
    pair_rows, ranked_rows = records(groups, enc)
    write_jsonl(out / "pairs.jsonl", pair_rows)
    write_jsonl(out / "responses.jsonl", ranked_rows)
    scores = [s for g in groups for s in g.scores]
    summary = {
        "status": "finished",  # as the recipes' summaries: the set is whole
        "model": model_name,
        "reward": args.reward,
        "k": args.k,
        "prompts": len(groups),
        "pairs": len(pair_rows),
        "prompts_without_pair": sum(not g.pairs for g in groups),
        "ranked_prompts": len(ranked_rows),
        "mean_score": sum(scores) / len(scores),
        "answers_not_round_trip": sum(not round_trips(enc, a) for g in groups for a in g.answers),
        "prompts_not_round_trip": sum(not round_trips(enc, g.prompt) for g in groups),
        "elapsed_s": round(time.time() - start, 1),
        "args": vars(args),
    }
    save_json(out / "summary.json", summary)  # last: a folder with a summary holds a whole set
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    folder = OutputFolder(out, OUTPUTS)
    try:
        if folder.present() and not args.overwrite:
            raise NanotuneError(
                f"--out {out} already holds pairs ({', '.join(folder.present())}); pass --overwrite to replace them"
            )
        folder.claim(args.overwrite, resume=False)
        s = make_pairs(args, out)
    except NanotuneError as e:
        die(str(e))
    except KeyboardInterrupt:  # (nothing is written before the end: an interrupted run leaves no partial files)
        print(f"interrupted: no pairs written to {out}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        folder.release()  # (a folder this run created and left empty goes too)
    print(
        f"{s['pairs']} pairs from {s['prompts']} prompts x {s['k']} answers ({s['prompts_without_pair']} prompts "
        f"with tied scores, mean score {fmt(s['mean_score'])}, {s['answers_not_round_trip']} answers whose text "
        f"does not encode back to their tokens) in {s['elapsed_s']}s; outputs in {out}",
        flush=True,
    )
    return s


if __name__ == "__main__":
    main()
