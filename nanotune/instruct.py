"""Instruction data shared by the SFT, DPO, reward and PPO recipes: the prompt template, the seeded
train/validation/test split (so a held-out prompt is held out in every recipe), tokenisation, collation with
response-only labels, and per-token log-probabilities."""

from __future__ import annotations

import random

import torch

from .utils import NanotuneError

IGNORE = -100  # label value of positions the loss skips


# alpaca and plain wrap an instruction; raw is a continuation task (nanotune.pairs: a book window, then sampled
# continuations): the prompt is the model's input verbatim and the answer goes on from its last character
TEMPLATES = ("alpaca", "plain", "raw")


def format_prompt(example: dict, template: str = "alpaca") -> str:
    """The text the model sees before its answer."""
    text = example["instruction"] + (f"\n{example['input']}" if example.get("input") else "")
    if template == "raw":
        return text
    if template == "plain":
        return f"Instruction: {text}\nResponse: "
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{example['instruction']}"
    )
    if example.get("input"):
        prompt += f"\n\n### Input:\n{example['input']}"
    return prompt + "\n\n### Response:\n"


def format_chat(messages: list[dict], template: str | None) -> str:
    """OpenAI-style chat messages ({role, content}, the last one the user's) -> the text the model continues
    (nanotune.serve). With an instruction template each exchange is laid out as SFT trained it (each answer
    then goes on to the next instruction); without one (a base model) a plain transcript, "User: ...",
    "Assistant: ...". A system message comes first, as it is."""
    system = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if template is None:
        names = {"user": "User", "assistant": "Assistant"}
        # (an answer came back with the space after "Assistant:" that the model wrote: not doubled here)
        return system + "".join(f"{names[m['role']]}: {m['content'].lstrip()}\n" for m in turns) + "Assistant:"
    text = system
    for m in turns:
        if m["role"] == "user":
            text += format_prompt({"instruction": m["content"]}, template)
        else:
            text += m["content"] + "\n\n"
    return text


def normalize_examples(records: list[dict], path, response_keys=("output",)) -> list[dict]:
    """Alpaca records (instruction, input?, output...) or prompt/response pairs -> {instruction, input, <keys>,
    record}, where record is the example's index in the file (errors name it, whatever the shuffle did)."""
    examples = []
    for i, r in enumerate(records):
        if "prompt" in r and "instruction" not in r:  # prompt/response pairs (e.g. a scraped Q&A set)
            r = {"instruction": r["prompt"], "input": "", **{k: r[k] for k in r if k != "prompt"}}
            if "response" in r:
                r.setdefault("output", r["response"])
        for key in ("instruction", *response_keys):
            if key not in r:
                raise NanotuneError(f"{path}: record {i} has no {key!r} key (it has {', '.join(sorted(r)) or 'none'})")
            if not isinstance(r[key], str):
                raise NanotuneError(f"{path}: record {i} key {key!r} is a {type(r[key]).__name__}, expected text")
        if r.get("input") is not None and not isinstance(r["input"], str):
            raise NanotuneError(f"{path}: record {i} key 'input' is a {type(r['input']).__name__}, expected text")
        examples.append(
            {
                "instruction": r["instruction"],
                "input": r.get("input") or "",
                **{k: r[k] for k in response_keys},
                "record": i,
            }
        )
    return examples


def split_examples(examples: list, seed: int, fractions=(0.85, 0.05)):
    """Seeded shuffle of the distinct prompts (instruction and input), then train / validation / test = 85% / 5% /
    10% of them, each prompt's examples together: a held-out prompt is never trained on, not even with another
    answer (the bundled instruction data repeats 25 of its 1,100 prompts; preference pairs made by
    nanotune.pairs hold several pairs per prompt). With one example per prompt this is a shuffle of the examples.
    The same seed and file give the same split in every recipe, so DPO, the reward model and PPO never train on
    SFT's held-out prompts."""
    by_prompt = {}  # prompt -> its examples, in the file's order
    for example in examples:
        by_prompt.setdefault((example["instruction"], example.get("input") or ""), []).append(example)
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


def encode_pair(enc, prompt: str, response: str, max_len: int, where: str, append_eot: bool = True):
    """-> (prompt ids, response ids (+ <|endoftext|> if append_eot), truncated?) fitting in max_len + 1 tokens."""
    prompt_ids = enc.encode_ordinary(prompt)
    response_ids = enc.encode_ordinary(response) + ([enc.eot_token] if append_eot else [])
    if not prompt_ids:  # (a raw prompt can be empty; the first label is predicted from the prompt's last token)
        raise NanotuneError(f"{where}: the prompt is empty: the model needs at least one token to continue")
    if len(prompt_ids) >= max_len:
        raise NanotuneError(
            f"{where}: the prompt has {len(prompt_ids)} tokens, leaving no room for a response "
            f"within --max-len {max_len}; raise --max-len or shorten the prompt"
        )
    room = max_len + 1 - len(prompt_ids)  # the input is one shorter than prompt + response (see collate)
    return prompt_ids, response_ids[:room], len(response_ids) > room


def check_answerable(enc, examples: list[dict], template: str, context: int, path) -> list[list[int]]:
    """Token ids of the prompts a recipe will answer after training, each checked to leave room for at least
    one generated token, so a long held-out prompt stops the run before training rather than after it."""
    prompts = []
    for ex in examples:
        ids = enc.encode_ordinary(format_prompt(ex, template))
        if len(ids) >= context:
            raise NanotuneError(
                f"{path}: record {ex['record']} (a held-out prompt answered after training) has "
                f"{len(ids)} tokens, leaving no room for an answer in the model's context of "
                f"{context}; lower --responses or remove the record"
            )
        prompts.append(ids)
    return prompts


def collate(pairs, pad_id: int, device, prompt_labels: bool = False):
    """[(prompt ids, response ids)] -> input_ids, labels, both (B, T) right-padded to the longest row.

    labels[b, t] is the token that logits[b, t] must predict, i.e. input_ids shifted left by one, with IGNORE
    wherever that token belongs to the prompt or is padding. Right padding needs no attention mask: causal
    attention never lets a real token see the padding after it. With prompt_labels, also the opposite mask:
    the prompt's own next tokens (for SFT's auxiliary language-modelling loss).
    """
    rows = [p + r for p, r in pairs]
    T = max(len(row) for row in rows) - 1
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    prompt_next = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, ((prompt, response), row) in enumerate(zip(pairs, rows)):
        input_ids[b, : len(row) - 1] = torch.tensor(row[:-1])
        labels[b, len(prompt) - 1 : len(row) - 1] = torch.tensor(response)  # targets = the response tokens
        prompt_next[b, : len(prompt) - 1] = torch.tensor(prompt[1:])  # targets = the prompt's next tokens
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
