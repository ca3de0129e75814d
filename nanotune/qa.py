"""Questions answered from documents: question records, RAFT's training examples (Zhang et al. 2024), exact match
and token F1, and python -m nanotune.qa, which measures a model on questions whose answers are known.

A question record (JSON or JSONL): {"question": text, "answer": text, "gold": id or [ids]}; "gold" names the
passage(s) or document(s) of the collection that hold the answer (docs/raft.md). An answer may carry RAFT's
quoted reasoning, `##begin_quote## ... ##end_quote## ... <ANSWER>: final answer`: it trains whole, and exact
match and F1 compare only the final answer (the text after the last `<ANSWER>:`).

    python -m nanotune.qa --model out/raft --data test.jsonl --docs out/raft/index --passages 3 --template plain
    python -m nanotune.qa --model out/sft --data test.jsonl --template plain        # closed book: no passages
"""

from __future__ import annotations

import collections
import json
import random
import re
import string

import torch

from .data.instruct import encode_example
from .data.sources import read_records
from .flags import Parser, integer
from .generate import generate
from .metrics import progress
from .model.loader import load_model
from .retrieval import DEFAULT_PASSAGE_TOKENS, Index, open_index, rag_content, rag_prompt_ids, recall_at_k
from .tokenizer import load_tokenizer
from .utils import NanotuneError, atomic_write, die, pick_device

ANSWER_MARK = "<ANSWER>:"  # RAFT's marker of the final answer after quoted reasoning


def read_questions(path, index: Index | None = None, limit: int | None = None, need_gold: bool = False) -> list:
    """Question records -> [{question, answer, gold (passage numbers), record, source, prompt, text}]; with an index,
    every gold id is checked to be in its collection (need_gold: every record must name one, as RAFT needs)."""
    questions = []
    for i, r in enumerate(read_records(path, limit)):
        where = f"{path}: record {i}"
        if not isinstance(r.get("question"), str) or not r["question"].strip():
            raise NanotuneError(f"{where} needs 'question' (text); it has {', '.join(sorted(r)) or 'no keys'}")
        if not isinstance(r.get("answer"), str):
            raise NanotuneError(f"{where} needs 'answer' (text)")
        gold_ids = r.get("gold") if isinstance(r.get("gold"), list) else [r["gold"]] if r.get("gold") else []
        if need_gold and not gold_ids:
            raise NanotuneError(f"{where} names no gold passage ('gold': an id or a list of ids of --docs)")
        gold = index.resolve(gold_ids, where) if index is not None and gold_ids else []
        user = [{"role": "user", "content": r["question"]}]  # (as an example: instruct.split_examples reads it)
        questions.append(
            {"question": r["question"], "answer": r["answer"], "gold": gold, "record": i, "source": str(path)}
            | {"prompt": user, "text": None}
        )
    if not questions:
        raise NanotuneError(f"{path}: no question records")
    return questions


# ---------------------------------------------------------------- scoring (SQuAD's normalisation)


def final_answer(text: str) -> str:
    """The answer after RAFT's reasoning: the text after the last <ANSWER>: (all of it when there is none)."""
    return text.rsplit(ANSWER_MARK, 1)[-1].strip()


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's evaluation script)."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(final_answer(prediction)) == normalize(final_answer(reference)))


# token F1 = 2 P R / (P + R), P = shared tokens / predicted tokens, R = shared tokens / reference tokens (shared
# counted with multiplicity), on the normalised final answers
def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(final_answer(prediction)).split(), normalize(final_answer(reference)).split()
    shared = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- RAFT's training examples


def raft_passages(question: dict, index: Index, p: float, distractors: int, source: str, rng: random.Random):
    """RAFT's passages for one question: its gold passage(s) with probability p, and `distractors` other passages
    (random, as the official implementation draws them, or BM25's best-scoring non-gold ones: the hardest); a
    question whose gold is left out gets as many more distractors, so the count never tells. Shuffled; no passage
    twice. -> (passage numbers, whether the gold is among them)"""
    gold = question["gold"]
    keep = rng.random() < p
    wanted = distractors + (0 if keep else len(gold))
    if source == "random":  # a sample of all passages, less the gold: never a gold one, none twice
        drawn = rng.sample(range(len(index.passages)), min(wanted + len(gold), len(index.passages)))
        others = [n for n in drawn if n not in gold][:wanted]
    else:
        hits = index.top_k(question["question"], wanted + len(gold))
        others = [n for n, *_ in hits if n not in gold][:wanted]
    chosen = (list(gold) if keep else []) + others
    rng.shuffle(chosen)
    return chosen, keep


def raft_example(enc, question: dict, index: Index, spec, template: str, max_len: int, rng: random.Random):
    """One training example: the question with raft_passages in the RAG layout, the answer the one thing trained
    (instruct.encode_example: the prompt and its passages masked). Distractors that would not fit max_len + 1
    tokens are left out, never the gold. spec: p, distractors, distractor_source.
    -> (ids, trained mask, passage numbers, gold kept?)"""
    chosen, keep = raft_passages(question, index, spec.p, spec.distractors, spec.distractor_source, rng)
    where = f"{question['source']}: record {question['record']}"
    while True:
        content = rag_content(question["question"], [index.passages[n]["text"] for n in chosen])
        conversation = [{"role": "user", "content": content}, {"role": "assistant", "content": question["answer"]}]
        example = {"text": None, "conversation": conversation}
        try:
            ids, mask, cut = encode_example(enc, example, template, max_len, where)
        except NanotuneError:  # the prompt alone leaves no room for the answer
            ids, mask, cut = None, None, True
        if not cut:
            return ids, mask, chosen, keep
        dropped = next((n for n in reversed(chosen) if n not in question["gold"]), None)
        if dropped is None:
            raise NanotuneError(f"{where}: the question, its gold passage(s) and answer do not fit --max-len {max_len}")
        chosen.remove(dropped)


# ---------------------------------------------------------------- answering with retrieved passages


def prompt_passages(index: Index, question: dict, k: int, force_gold: bool) -> list[int]:
    """The top k passages for a question; force_gold: its gold ones replace the lowest-ranked, when missing."""
    found = [n for n, *_ in index.top_k(question["question"], k)]
    if force_gold:
        missing = [g for g in question["gold"] if g not in found][: len(found)]
        found = found[: len(found) - len(missing)] + missing
    return found


@torch.no_grad()
def answer_questions(model, enc, questions, index, k, force_gold, template, max_new_tokens, batch_size=16):
    """Greedy answers, each question asked with its passages (index None: closed book). -> rows {question,
    reference, model, passages, gold_in, em, f1}, and how many passages the context could not hold."""
    context = model.config.n_positions - model.n_virtual
    prompts, chosen, cut = [], [], 0
    for q in questions:
        numbers = prompt_passages(index, q, k, force_gold) if index is not None else []
        texts = [index.passages[n]["text"] for n in numbers]
        ids, kept = rag_prompt_ids(enc, q["question"], texts, template, context, max_new_tokens, warn=False)
        prompts.append(ids)
        chosen.append(numbers[:kept])
        cut += len(numbers) - kept
    rows = []
    model.eval()
    for start in progress(range(0, len(prompts), batch_size), "answering"):
        group = prompts[start : start + batch_size]
        outputs = generate(model, group, max_new_tokens, temperature=0, eos_token=enc.eot_token)
        for i, (prompt, seq) in enumerate(zip(group, outputs), start):
            answer = enc.decode([t for t in seq[len(prompt) :] if t != enc.eot_token]).strip()
            q = questions[i]
            rows.append(
                {"question": q["question"], "reference": q["answer"], "model": answer}
                | {"passages": [index.passages[n]["id"] for n in chosen[i]] if index is not None else []}
                | {"gold_in": any(g in chosen[i] for g in q["gold"]), "em": exact_match(answer, q["answer"])}
                | {"f1": token_f1(answer, q["answer"])}
            )
    return rows, cut


def scores(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "n": n,
        "exact_match": sum(r["em"] for r in rows) / n,
        "f1": sum(r["f1"] for r in rows) / n,
        "gold_in_prompt": sum(r["gold_in"] for r in rows) / n,
    }


def parse_args(argv=None):
    p = Parser(__doc__, prog="python -m nanotune.qa")
    add = p.add_argument
    add("--model", default="auto", help="auto, a preset, an output folder or a .safetensors file")
    add("--data", required=True, help="question records: JSON/JSONL {question, answer, gold?}")
    docs = "a collection (folder of .txt/.md, JSONL of {id, text}) or a saved index (a RAFT run's index/); "
    add("--docs", default=None, help=docs + "without it the model answers closed book")
    add("--passages", type=integer(1), default=None, help="with --docs: passages retrieved per question (default 3)")
    tokens = f"with a --docs collection: longest passage in tokens (default {DEFAULT_PASSAGE_TOKENS})"
    add("--passage-tokens", type=integer(1), default=DEFAULT_PASSAGE_TOKENS, help=tokens)
    add("--gold", action="store_true", help="with --docs: the gold passage forced in (it replaces the lowest-ranked)")
    add("--template", default="plain", choices=["alpaca", "plain"], help="prompt layout (as in training; plain)")
    add("--max-new-tokens", type=integer(1), default=32, help="answer length limit (default 32)")
    add("--n", type=integer(1), default=None, help="the first N questions only")
    add("--batch-size", type=integer(1), default=16, help="questions answered together (default 16)")
    add("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    add("--out", default=None, help="write the scores and every answer to this JSON file")
    args = p.parse_args(argv)
    if args.docs is None and (args.passages is not None or args.gold):
        p.error("--passages and --gold need --docs")
    args.passages = args.passages or 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        enc = load_tokenizer()
        index = open_index(args.docs, enc, args.passage_tokens) if args.docs else None
        questions = read_questions(args.data, index, args.n, need_gold=args.gold)
        model, _ = load_model(args.model, pick_device(args.device), quiet=True)
        k = args.passages if index is not None else 0
        rows, cut = answer_questions(
            model, enc, questions, index, k, args.gold, args.template, args.max_new_tokens, args.batch_size
        )
    except NanotuneError as e:
        die(str(e))
    result = scores(rows) | {"passages": k, "passages_cut": cut}
    if index is not None and all(q["gold"] for q in questions):  # the retriever alone: its top k, nothing forced
        result["recall_at_k"] = recall_at_k(
            index, [q["question"] for q in questions], [q["gold"] for q in questions], k
        )
    line = f"{result['n']} questions: exact match {result['exact_match']:.1%}, token F1 {result['f1']:.3f}"
    if "recall_at_k" in result:
        line += f", BM25 recall@{k} {result['recall_at_k']:.1%}"
    if index is not None:
        line += f", gold passage in the prompt {result['gold_in_prompt']:.1%} ({k} passages"
        line += f"{', gold forced in' if args.gold else ''}; {cut} cut to fit the context)"
    print(line, flush=True)
    if args.out:
        atomic_write(args.out, json.dumps(result | {"args": vars(args), "answers": rows}, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
