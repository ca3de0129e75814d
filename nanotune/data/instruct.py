"""Instruction data shared by the SFT, DPO, reward and PPO recipes: examples read from any source, the seeded
train/validation/test split (so a held-out prompt is held out in every recipe), tokenisation, collation with
response-only labels, and per-token log-probabilities."""

from __future__ import annotations

import argparse
import bisect
import math
import random
import re

import numpy as np
import torch

from .chat import render, render_text
from .sources import read_records
from .formats import examples, prompt_key
from ..metrics import progress
from ..utils import NanotuneError

IGNORE = -100  # label value of positions the loss skips


# alpaca and plain wrap an instruction; raw is a continuation task (nanotune.pairs: a book window, then sampled
# continuations): the prompt is the model's input verbatim and the answer goes on from its last character
TEMPLATES = ("alpaca", "plain", "raw")


def format_prompt(example: dict, template: str = "alpaca") -> str:
    """The text the model sees before its answer to one instruction ({instruction, input?})."""
    user = {"role": "user", "content": example["instruction"], "input": example.get("input") or ""}
    return render_text([user], template, add_generation_prompt=True)


def load_examples(path, kind: str = "sft", limit: int | None = None) -> list[dict]:
    """A data source (nanotune/data/sources.py reads files, folders and Hub names) -> examples of a kind
    (nanotune/data/formats.py: every record shape detected on its own)."""
    return examples(read_records(path, limit), path, kind)


def load_splits(sources: list, kind: str, limit: int | None, seed: int) -> tuple[list, list, list]:
    """Several sources, each read and split on its own (a source's split does not depend on what is passed
    beside it) -> train, validation, test, the sources' examples in their order."""
    splits = ([], [], [])
    for source in sources:
        for whole, part in zip(splits, split_examples(load_examples(source, kind, limit), seed)):
            whole += part
    return splits


def split_examples(examples: list, seed: int, fractions=(0.85, 0.05)):
    """Seeded shuffle of the distinct prompts (every message before the answer), then train / validation / test =
    85% / 5% / 10% of them, each prompt's examples together: a held-out prompt is never trained on, not even with
    another answer (the bundled instruction data repeats 25 of its 1,100 prompts; preference pairs made by
    nanotune.pairs hold several pairs per prompt). With one example per prompt this is a shuffle of the examples.
    The same seed and file give the same split in every recipe, so DPO, the reward model and PPO never train on
    SFT's held-out prompts."""
    by_prompt = {}  # prompt -> its examples, in the file's order
    for example in examples:
        by_prompt.setdefault(prompt_key(example), []).append(example)
    prompts = list(by_prompt)
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_train, n_val = int(len(order) * fractions[0]), int(len(order) * fractions[1])
    pick = lambda ids: [example for i in ids for example in by_prompt[prompts[i]]]  # noqa: E731
    return pick(order[:n_train]), pick(order[n_train : n_train + n_val]), pick(order[n_train + n_val :])


def answers_end(template: str) -> bool:
    """Whether an answer in this template is followed by <|endoftext|>. A raw continuation was cut at a token
    budget, not ended by its writer: teaching the end token after it would teach the model to stop mid-text."""
    return template != "raw"


def prompt_ids(enc, example: dict, template: str) -> list[int]:
    """An example's prompt as the model reads it before answering (nanotune/data/chat.py); a prompt the template cannot
    lay out (a conversation under --template raw) is an error naming its source and record."""
    where = f"{example.get('source', 'the data')}: record {example.get('record')}"
    if template == "raw" and not example.get("text_prompt", True):
        raise NanotuneError(
            f"{where} is an instruction, and --template raw would glue its answer onto it with no separator and no "
            "end token; raw continues a text prompt (as nanotune.pairs writes them): use --template alpaca or plain"
        )
    try:
        return render(enc, example["prompt"], template, add_generation_prompt=True)[0]
    except NanotuneError as e:
        raise NanotuneError(f"{where}: {e}") from None


def encode_pair(enc, prompt: list[int], response: str, max_len: int, where: str, append_eot: bool = True):
    """-> (prompt ids, response ids (+ <|endoftext|> if append_eot), truncated?) fitting in max_len + 1 tokens."""
    response_ids = enc.encode_ordinary(response) + ([enc.eot_token] if append_eot else [])
    if not prompt:  # (a raw prompt can be empty; the first label is predicted from the prompt's last token)
        raise NanotuneError(f"{where}: the prompt is empty: the model needs at least one token to continue")
    if len(prompt) >= max_len:
        raise NanotuneError(
            f"{where}: the prompt has {len(prompt)} tokens, leaving no room for a response "
            f"within --max-len {max_len}; raise --max-len or shorten the prompt"
        )
    room = max_len + 1 - len(prompt)  # the input is one shorter than prompt + response (see collate)
    return prompt, response_ids[:room], len(response_ids) > room


def encode_example(enc, example: dict, template: str, max_len: int, where: str):
    """An SFT example -> (token ids, trained mask, truncated?), at most max_len + 1 tokens (the input is one
    shorter). A conversation: every assistant answer of weight 1 and its <|endoftext|> train; plain text: every
    token, then <|endoftext|>. The ids are uint16 and the mask bool arrays: a large dataset is held once,
    tokenised, and Python lists of ints would take about 16 times the memory (GPT-2's 50,257 ids fit 16 bits)."""
    if example["text"] is not None:
        ids = enc.encode_ordinary(example["text"]) + [enc.eot_token]
        mask = [True] * len(ids)
        mask[0] = False  # nothing comes before the first token to predict it from
    else:
        try:
            ids, mask = render(enc, example["conversation"], template)
        except NanotuneError as e:
            raise NanotuneError(f"{where}: {e}") from None
    first = mask.index(True) if True in mask else len(mask)
    if first == 0 or len(ids) < 2:
        raise NanotuneError(f"{where}: nothing before the first trained token: the model needs one to go on from")
    if first >= max_len:
        raise NanotuneError(
            f"{where}: the prompt has {first} tokens, leaving no room for a response "
            f"within --max-len {max_len}; raise --max-len or shorten the prompt"
        )
    compact = np.array(ids[: max_len + 1], dtype=np.uint16), np.array(mask[: max_len + 1], dtype=bool)
    return *compact, len(ids) > max_len + 1


def check_answerable(enc, examples: list[dict], template: str, context: int) -> list[list[int]]:
    """Token ids of the prompts a recipe will answer after training, each checked to leave room for at least
    one generated token, so a long held-out prompt stops the run before training rather than after it."""
    prompts = []
    for ex in examples:
        ids = prompt_ids(enc, ex, template)
        if len(ids) >= context:
            raise NanotuneError(
                f"{ex['source']}: record {ex['record']} (a held-out prompt answered after training) has "
                f"{len(ids)} tokens, leaving no room for an answer in the model's context of "
                f"{context}; lower --responses or remove the record"
            )
        prompts.append(ids)
    return prompts


def collate(pairs, pad_id: int, device, prompt_labels: bool = False):
    """[(prompt ids, response ids)] -> input_ids, labels (B, T): collate_masked with the response trained."""
    rows = [(p + r, [False] * len(p) + [True] * len(r)) for p, r in pairs]
    return collate_masked(rows, pad_id, device, prompt_labels)


def collate_masked(rows, pad_id: int, device, prompt_labels: bool = False):
    """[(token ids, trained mask)] -> input_ids, labels, both (B, T) right-padded to the longest row.

    labels[b, t] is the token that logits[b, t] must predict, i.e. input_ids shifted left by one, with IGNORE
    wherever that token is not trained (a prompt, a user turn) or is padding. Right padding needs no attention
    mask: causal attention never lets a real token see the padding after it. With prompt_labels, also the
    opposite: the untrained tokens as next tokens (for SFT's auxiliary language-modelling loss).
    """
    T = max(len(ids) for ids, _ in rows) - 1
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    prompt_next = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):  # (lists, or encode_example's uint16 and bool arrays)
        row, trained = torch.tensor(np.asarray(ids, dtype=np.int64)), torch.tensor(np.asarray(mask, dtype=bool))
        input_ids[b, : len(ids) - 1] = row[:-1]
        labels[b, : len(ids) - 1] = torch.where(trained[1:], row[1:], IGNORE)  # targets = the trained tokens
        prompt_next[b, : len(ids) - 1] = torch.where(trained[1:], IGNORE, row[1:])  # targets = the others
    if prompt_labels:
        return input_ids.to(device), labels.to(device), prompt_next.to(device)
    return input_ids.to(device), labels.to(device)


# log p(label) = logits[label] - logsumexp(logits) at every position; IGNORE positions give 0. Written so rather
# than with log_softmax because backward then keeps no (B, T, V) tensor but the logits themselves (log_softmax
# keeps its whole output, a second one). lse: logsumexp(logits, -1) when the caller has it already.
# logits (B, T, V), labels (B, T) -> (B, T), float32.
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse  # (B, T)
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked - lse) * (labels != IGNORE)


# L3 = L2 + lm_weight * L1, GPT-1's auxiliary objective (Radford et al. 2018): L2 = mean NLL of the response
# tokens (labels), L1 = mean NLL of the prompt's own next tokens (prompt_labels), i.e. plain language modelling
# of the instruction. n_response / n_prompt are the token counts the two means divide by: the whole batch's when
# it is split into micro-batches (so the micro-batch losses add up to the batch's L3), else this call's own.
def sft_loss(logits, labels, prompt_labels=None, lm_weight: float = 0.0, n_response=None, n_prompt=None):
    lse = torch.logsumexp(logits.float(), dim=-1)  # (B, T): log softmax's normaliser, shared by both terms
    n_response = (labels != IGNORE).sum() if n_response is None else n_response
    loss = -token_logprobs(logits, labels, lse).sum() / n_response  # L2
    if lm_weight:
        n_prompt = (prompt_labels != IGNORE).sum() if n_prompt is None else n_prompt
        loss = loss + lm_weight * -token_logprobs(logits, prompt_labels, lse).sum() / max(n_prompt, 1)  # + L * L1
    return loss


# Sum of log p over the response tokens of each row (prompt and padding are IGNORE in labels).
# logits (B, T, V), labels (B, T) -> (B,)
def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_logprobs(logits, labels).sum(dim=-1)


def response_logprobs(model, rows, pad_id: int, device, ctx):
    """[(prompt ids, answer ids)] in one forward (under ctx, e.g. autocast) -> log p(answer | prompt) (N,) and the
    answers' token counts (N,)."""
    input_ids, labels = collate(rows, pad_id, device)
    # the head runs only from the first position that predicts an answer token: for 24-token answers to 64-token
    # prompts a quarter of the work of the (N, T, V) logits (positions as a tensor: no recompile per width)
    first = min(len(prompt) for prompt, _ in rows) - 1
    positions = torch.arange(first, input_ids.shape[1], device=device)
    with ctx:
        logits = model(input_ids, positions=positions)  # (N, T - first, V)
    return sequence_logprobs(logits, labels[:, first:]), (labels != IGNORE).sum(dim=-1)  # (N,), (N,)


def pair_logprobs(model, pairs, pad_id: int, device, ctx):
    """One forward over the chosen and the rejected rows together -> log-probs (2, B) and answer lengths (2, B),
    row 0 the chosen answers', row 1 the rejected ones'."""
    logps, lengths = response_logprobs(model, [c for c, _ in pairs] + [r for _, r in pairs], pad_id, device, ctx)
    return logps.view(2, len(pairs)), lengths.view(2, len(pairs))


@torch.no_grad()
def all_pair_logprobs(model, pairs, batch_size: int, pad_id: int, device, ctx, shown: str | None = None):
    """pair_logprobs over every pair, --batch-size pairs at a time (with a progress bar named `shown`).
    -> log-probs (2, N), answer lengths (2, N): row 0 chosen, row 1 rejected"""
    starts = progress(range(0, len(pairs), batch_size), shown or "", enabled=shown is not None)
    chunks = [pair_logprobs(model, pairs[i : i + batch_size], pad_id, device, ctx) for i in starts]
    empty = torch.zeros(2, 0, device=device)  # (a process whose share of the pairs is empty)
    logps = torch.cat([empty] + [logps for logps, _ in chunks], dim=1)
    return logps, torch.cat([empty.long()] + [lengths for _, lengths in chunks], dim=1)


# ---------------------------------------------------------------- several sources at once


def parse_mix(text: str) -> list[float]:
    """--mix 3,1,1 -> [3.0, 1.0, 1.0] (each > 0)."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 3,1,1; got {text!r}") from None
    if not all(w > 0 and math.isfinite(w) for w in weights):
        raise argparse.ArgumentTypeError(f"every weight must be a positive number; got {text!r}")
    return weights


def source_names(sources: list | None) -> list[str]:
    """Short names for metrics (val_ppl/<name>): a file's stem, a folder's or a Hub dataset's last part; a name
    given twice gets its position appended."""
    names = [re.sub(r"\.(jsonl?|parquet|csv)$", "", str(s).rstrip("/").split("/")[-1]) for s in sources or ["data"]]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


class Mixture:
    """Where each example of a batch comes from: source s with probability weights[s] / sum(weights), then an
    example of it uniformly; a small source repeats rather than running out. Weights default to the sources'
    sizes: every example then as likely as any other, drawn exactly as from one list (one source: as before)."""

    def __init__(self, sizes: list[int], weights: list[float] | None = None):
        self.sizes = sizes
        self.weights = [float(w) for w in (sizes if weights is None else weights)]
        self.proportional = weights is None
        self.starts = [sum(sizes[:s]) for s in range(len(sizes))]  # each source's place, laid end to end

    def sample(self, n: int, rng: torch.Generator) -> list[tuple[int, int]]:
        """n draws -> [(source, index in it)]."""
        if self.proportional:  # one index into the sources laid end to end
            flat = torch.randint(sum(self.sizes), (n,), generator=rng).tolist()
            return [(s, i - self.starts[s]) for i in flat for s in [bisect.bisect_right(self.starts, i) - 1]]
        sources = torch.multinomial(torch.tensor(self.weights), n, replacement=True, generator=rng).tolist()
        fractions = torch.rand(n, generator=rng).tolist()
        return [(s, min(int(f * self.sizes[s]), self.sizes[s] - 1)) for s, f in zip(sources, fractions)]

    def describe(self, names: list[str]) -> str:
        total = sum(self.weights)
        return ", ".join(
            f"{name} ({n} train, {w / total:.0%} of draws)" for name, n, w in zip(names, self.sizes, self.weights)
        )
