"""Head to head: two models answer the same held-out prompts and a reward model judges, as the research notes'
legal Q&A study compared base vs SFT and SFT vs DPO.

    python -m nanotune.evaluate --models out/sft out/dpo --judge out/rm
    python -m nanotune.evaluate --models gpt2 out/sft --judge out/rm --n 200 --temperature 0.7 --samples-per-prompt 4
    python -m nanotune.evaluate --answers answers.jsonl --judge out/rm     # answers produced elsewhere

Prompts: the held-out test split of --data (the same seeded split every recipe uses, so no model trained on
them), or every record with --all. Answers: greedy by default (batched KV-cache generation, ending at
<|endoftext|>), or --samples-per-prompt samples at --temperature. For each model the report gives

- mean normalized score and its std: a response's normalized score is sigmoid(r(response) - r(reference)), the
  judge's probability that it beats the dataset's own answer (output, or chosen for preference data), a
  number in (0, 1) comparable across runs;
- win rate of the first model over the second: the share of (prompt, sample) comparisons its reward is higher,
  a tie (|reward difference| < 1e-6) counting half, with a 95% bootstrap confidence interval over prompts.

Writes comparisons.jsonl (prompt, every answer and reward) and summary.json to --out.
--answers FILE: JSON lines {"instruction", "input"?, "reference"?, "answers": {"model name": "answer", ...}} ("prompt"
as text or messages in place of "instruction")
with exactly two models; the normalized score needs "reference".
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
from datetime import datetime
from pathlib import Path

import torch

from .data.formats import prompt_messages
from .data.instruct import check_answerable, load_examples, load_splits, prompt_ids
from .data.sources import INSTRUCTIONS_URL, default_file, read_records
from .flags import Parser, integer, real
from .generate import add_docs_args, generate
from .metrics import progress
from .model.loader import check_model, load_model, load_reward_model
from .model.reward_model import PAD, RewardModel
from .retrieval import answer_reserve, open_index, with_passages
from .tokenizer import load_tokenizer
from .utils import (
    ROOT,
    NanotuneError,
    atomic_write,
    autocast,
    check_writable,
    default_dtype,
    die,
    pick_device,
    save_json,
)

TIE = 1e-6


def parse_args(argv=None):
    p = Parser(__doc__, prog="python -m nanotune.evaluate")
    add = p.add_argument
    add("--models", nargs=2, metavar=("A", "B"), help="two models: presets, output folders or files")
    add("--answers", default=None, help="score answers from this JSONL instead of generating them")
    add("--judge", required=True, help="a reward model folder (train_reward.py output)")
    data = "instruction or preference data, one or more sources of any format in docs/data.md (default: the SFT "
    add("--data", nargs="+", action="extend", default=None, metavar="SOURCE", help=data + "recipe's default set)")
    add("--all", action="store_true", help="every record of --data, not only the held-out test split")
    add("--n", type=integer(1), default=None, help="at most this many prompts (default: all of them)")
    add("--samples-per-prompt", type=integer(1), default=1, help="answers per prompt and model (default 1)")
    add("--temperature", type=real(0), default=0.0, help="0 (default) is greedy")
    add("--top-k", type=integer(1), default=None, help="sample among the k most likely tokens")
    add("--top-p", type=real(0, 1, low_open=True), default=None, help="nucleus sampling: the smallest set reaching p")
    add("--max-new-tokens", type=integer(1), default=128, help="answer length limit (default 128)")
    add("--template", default="alpaca", choices=["alpaca", "plain"], help="prompt layout (as in SFT)")
    add("--batch-size", type=integer(1), default=8, help="prompts generated and scored together (default 8)")
    add(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="sampling precision (default auto: bfloat16 on a GPU that has it, else float32); bfloat16 on a CPU "
        "uses oneDNN's bfloat16 kernels for the large layers (docs/performance.md)",
    )
    add("--bootstrap", type=integer(1), default=2000, help="bootstrap resamples for the win-rate interval")
    add("--seed", type=int, default=1337, help="the split's seed (as in training), sampling, bootstrap")
    add("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    add("--out", default=None, help="output folder (default out/evaluate-<timestamp>)")
    add("--overwrite", action="store_true", help="replace an evaluation already in --out")
    add_docs_args(p)  # --docs: both models (and the judge) read each prompt with the same retrieved passages
    args = p.parse_args(argv)
    if args.passages is not None and args.docs is None:
        p.error("--passages needs --docs")
    if args.answers and args.docs:
        p.error("--docs puts passages into the prompts the models answer; --answers brings answers made elsewhere")
    return args


# normalized score = sigmoid(r(response) - r(reference)): the judge's probability that the response beats the
# reference answer (Bradley-Terry, the model the reward loss assumes).
def normalized_score(reward: float, reference_reward: float) -> float:
    return 1.0 / (1.0 + math.exp(-(reward - reference_reward))) if reward - reference_reward > -700 else 0.0


# win = 1 if r_A > r_B + TIE, 0.5 if |r_A - r_B| <= TIE, else 0; win rate = mean over comparisons.
def wins(rewards_a: list[float], rewards_b: list[float]) -> list[float]:
    return [1.0 if a - b > TIE else 0.5 if abs(a - b) <= TIE else 0.0 for a, b in zip(rewards_a, rewards_b)]


def win_rate(rewards_a: list[float], rewards_b: list[float]) -> float:
    return sum(wins(rewards_a, rewards_b)) / len(rewards_a)


def bootstrap_interval(per_prompt: list[list[float]], resamples: int, seed: int) -> tuple[float, float]:
    """95% interval of the win rate, resampling prompts (each with all its samples) with replacement."""
    rng = random.Random(seed)
    n = len(per_prompt)
    rates = []
    for _ in range(resamples):
        picked = [per_prompt[rng.randrange(n)] for _ in range(n)]
        rates.append(sum(sum(p) for p in picked) / sum(len(p) for p in picked))
    rates.sort()
    return rates[int(0.025 * (resamples - 1))], rates[int(math.ceil(0.975 * (resamples - 1)))]


def load_prompts(args, enc):
    """-> [{prompt, reference, record, source}] from --data (test split unless --all); the reference of preference
    data is its chosen answer."""
    sources = args.data or [default_file("instruction-data.json", INSTRUCTIONS_URL)]
    if args.all:
        examples = [ex for source in sources for ex in load_examples(source, "prompt")]
    else:
        examples = load_splits(sources, "prompt", None, args.seed)[2]
    examples = examples[: args.n]
    if not examples:
        raise NanotuneError(f"{' '.join(map(str, sources))}: the test split is empty; use --all or more data")
    for ex in examples:
        ex["reference"] = ex.pop("answer")
    return examples, " ".join(map(str, sources))


def add_passages(examples: list[dict], args, enc, context: int):
    """--docs: each prompt's last user message gets the top --passages passages for it (the RAG layout of
    nanotune/retrieval.py), whole passages left out where the context is short; the ids used go into
    comparisons.jsonl."""
    index, reserve = open_index(args.docs, enc, args.passage_tokens), answer_reserve(args.max_new_tokens, context)
    for ex in examples:
        ex["prompt"], _, hits = with_passages(
            enc, ex["prompt"], index, args.passages or 3, args.template, context, reserve
        )
        ex["passages"] = [h[1] for h in hits]


def generate_answers(model_name, examples, args, device, enc):
    """Every prompt's answers from one model: --samples-per-prompt each, batched, ending at <|endoftext|>."""
    model, _ = load_model(model_name, device, quiet=True)
    context = model.config.n_positions - model.n_virtual
    prompts = check_answerable(enc, examples, args.template, context)
    generator = torch.Generator(device).manual_seed(args.seed)
    answers = [[] for _ in examples]
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[default_dtype(device) if args.dtype == "auto" else args.dtype]
    for start in progress(range(0, len(prompts), args.batch_size), f"{model_name} answering"):
        group = prompts[start : start + args.batch_size]
        budget = min(args.max_new_tokens, context - max(map(len, group)))
        for _ in range(args.samples_per_prompt):
            sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
            outputs = generate(model, group, budget, eos_token=enc.eot_token, dtype=dtype, **sampling)
            for i, (prompt, seq) in enumerate(zip(group, outputs)):
                answers[start + i].append(enc.decode([t for t in seq[len(prompt) :] if t != enc.eot_token]).strip())
    del model
    return answers


@torch.no_grad()
def score(
    judge: RewardModel, enc, template: str, items: list[tuple[dict, str]], batch_size: int, device
) -> list[float]:
    """Rewards of (example, answer) pairs; each sequence = prompt + answer, cut to the judge's context."""
    context = judge.config.n_positions
    rewards = []
    for start in progress(range(0, len(items), batch_size), "judging"):
        seqs = [
            (prompt_ids(enc, ex, template) + enc.encode_ordinary(answer))[:context]
            for ex, answer in items[start : start + batch_size]
        ]
        width = max(map(len, seqs))
        idx = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs], device=device)
        with autocast(device, default_dtype(device)):
            rewards += judge(idx).tolist()  # float32 scores (reward.py)
    return rewards


def read_answers(path):
    """--answers FILE -> (examples, model names, answers per model [[str]])."""
    records = read_records(path)
    names = None
    examples, answers = [], {}
    for i, r in enumerate(records):
        if not isinstance(r.get("answers"), dict) or len(r["answers"]) != 2:
            raise NanotuneError(f"{path}: record {i} needs 'answers': an object with exactly two models' answers")
        if names is None:
            names = list(r["answers"])
        if list(r["answers"]) != names:
            raise NanotuneError(f"{path}: record {i} answers for {list(r['answers'])}, record 0 for {names}")
        if r.get("instruction", r.get("prompt")) is None:
            raise NanotuneError(f"{path}: record {i} has no 'instruction' (or 'prompt')")
        for name, text in [(f"answers.{n}", r["answers"][n]) for n in names] + [("reference", r.get("reference", ""))]:
            if not isinstance(text, str) and not (name == "reference" and text is None):
                raise NanotuneError(f"{path}: record {i} key {name!r} holds a {type(text).__name__}, expected text")
        prompt = prompt_messages(r, f"{path}: record {i}")  # text, or messages
        examples.append({"prompt": prompt, "reference": r.get("reference"), "record": i, "source": str(path)})
        for name in names:
            answers.setdefault(name, []).append([r["answers"][name]])
    return examples, names, [answers[n] for n in names]


def main(argv=None):
    args = parse_args(argv)
    if (args.models is None) == (args.answers is None):
        die("give either --models A B (generate answers) or --answers FILE (score given answers)")
    if args.samples_per_prompt > 1 and args.temperature == 0:
        die("--samples-per-prompt > 1 needs --temperature > 0 (greedy answers would all be the same)")
    out = Path(args.out) if args.out else ROOT / "out" / f"evaluate-{datetime.now():%Y%m%d-%H%M%S}"
    if (out / "summary.json").exists() and not args.overwrite:
        die(f"--out {out} already holds an evaluation; pass --overwrite to replace it")
    try:  # everything is checked before the first answer is generated: the folder, the judge, both models
        check_writable(out)
        device = pick_device(args.device)
        enc = load_tokenizer()
        judge = load_reward_model(args.judge, device)
        if judge.config.vocab_size != enc.n_vocab:
            raise NanotuneError(
                f"--judge {args.judge} has a vocabulary of {judge.config.vocab_size} tokens, not "
                f"GPT-2's {enc.n_vocab}: it cannot read the answers"
            )
        for name in args.models or ():
            check_model(name, "--models")
        if args.answers:
            examples, names, answers = read_answers(args.answers)
        else:
            examples, _ = load_prompts(args, enc)
            if args.docs is not None:  # fitted to the judge's context, which reads prompt and answer together
                add_passages(examples, args, enc, judge.config.n_positions)
            names = (
                list(args.models)
                if args.models[0] != args.models[1]
                else [f"{args.models[0]} (A)", f"{args.models[1]} (B)"]
            )
            print(
                f"{len(examples)} prompts, {args.samples_per_prompt} answer(s) each, "
                f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}",
                flush=True,
            )
            answers = [generate_answers(name, examples, args, device, enc) for name in args.models]
    except NanotuneError as e:
        die(str(e))

    # ---- judge every answer and every reference
    flat = [(ex, a) for m in range(2) for ex, per_prompt in zip(examples, answers[m]) for a in per_prompt]
    rewards = score(judge, enc, args.template, flat, args.batch_size, device)
    if not all(map(math.isfinite, rewards)):  # a broken judge: no comparison of its scores means anything
        bad = sum(not math.isfinite(r) for r in rewards)
        die(f"--judge {args.judge} gave {bad} of {len(rewards)} answers a NaN or infinite score: check its weights")
    for name, per_prompt in zip(names, answers):
        if all(not a.strip() for texts in per_prompt for a in texts):
            print(f"warning: every answer of {name} is empty: the comparison says nothing about it", file=sys.stderr)
    k = len(answers[0][0])
    per_model = [rewards[: len(rewards) // 2], rewards[len(rewards) // 2 :]]  # model A's, then model B's
    by_prompt = [[per_model[m][i * k : (i + 1) * k] for i in range(len(examples))] for m in range(2)]
    has_reference = all(ex.get("reference") is not None for ex in examples)
    reference_rewards = (
        score(judge, enc, args.template, [(ex, ex["reference"]) for ex in examples], args.batch_size, device)
        if has_reference
        else [None] * len(examples)
    )

    per_prompt_wins = [wins(ra, rb) for ra, rb in zip(by_prompt[0], by_prompt[1])]
    rate = win_rate(per_model[0], per_model[1])
    low, high = bootstrap_interval(per_prompt_wins, args.bootstrap, args.seed)
    summary = {
        "n": len(examples),
        "samples_per_prompt": k,
        "models": names,
        "judge": args.judge,
        "win_rate": rate,
        "win_rate_ci": [low, high],
        "per_model": {},
    }
    for m, name in enumerate(names):
        scores = (
            [normalized_score(r, ref) for rs, ref in zip(by_prompt[m], reference_rewards) for r in rs]
            if has_reference
            else []
        )
        summary["per_model"][name] = {
            "mean_reward": statistics.fmean(per_model[m]),
            "mean_normalized_score": statistics.fmean(scores) if scores else None,
            "std_normalized_score": statistics.pstdev(scores) if scores else None,
            "win_rate": rate if m == 0 else 1 - rate,
        }

    rows = []
    for i, ex in enumerate(examples):
        rows.append(
            {
                "record": ex["record"],
                "prompt": ex["prompt"],
                "reference": ex.get("reference"),
                "reference_reward": reference_rewards[i],
                **({"passages": ex["passages"]} if "passages" in ex else {}),
                **{name: {"answers": answers[m][i], "rewards": by_prompt[m][i]} for m, name in enumerate(names)},
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "comparisons.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    save_json(out / "summary.json", summary | {"args": vars(args)})

    width = max(len(n) for n in names + ["model"])
    print(f"\n{len(examples)} prompts x {k} answer(s), judged by {args.judge}:")
    print(f"| {'model':<{width}} | mean normalized score | std   | win rate |")
    print(f"|{'-' * (width + 2)}|-----------------------|-------|----------|")
    for name in names:
        s = summary["per_model"][name]
        mean = f"{s['mean_normalized_score']:.3f}" if s["mean_normalized_score"] is not None else "n/a"
        std = f"{s['std_normalized_score']:.3f}" if s["std_normalized_score"] is not None else "n/a"
        print(f"| {name:<{width}} | {mean:>21} | {std:>5} | {s['win_rate']:>7.1%} |")
    print(
        f"win rate of {names[0]} over {names[1]}: {rate:.1%} (95% bootstrap interval {low:.1%} to {high:.1%}); "
        f"outputs in {out}",
        flush=True,
    )
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
