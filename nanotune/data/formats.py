"""Records in the shapes people hold their data in -> nanotune's examples. Each record's shape is detected on its
own (a file may mix them); one that fits none stops everything with a line naming the file, the record and the
shapes accepted. docs/data.md shows one record of each.

An example is a dict:
    prompt        the messages before the answer (chat.py's conversation form; a text record's is empty)
    conversation  SFT: every message, answers included (what trains: each assistant turn of weight 1)
    text          SFT: a plain-text record (language modelling: every token trains), else None
    answer        the reference answer (SFT: the last trained one), shown beside a model's own after training
    chosen, rejected / responses    preference data: the better and the worse answer / answers best first
    record, source                  where it came from (errors and outputs name it, whatever a shuffle did)
    text_prompt   whether the prompt was one text (nanotune.pairs' book windows), which --template raw continues
"""

from __future__ import annotations

from ..utils import NanotuneError

SFT_FORMATS = (
    "messages (OpenAI, TRL), conversations (ShareGPT), prompt/completion, instruction/input/output (Alpaca), "
    "prompt/response, text"
)
PREFERENCE_FORMATS = (
    "prompt/chosen/rejected (text or messages), instruction/input/chosen/rejected, chosen/rejected alone "
    "(their shared beginning is the prompt)"
)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
}


def present(record: dict, key: str) -> bool:
    """Whether a record holds a key (Parquet and Hub datasets fill the keys other rows have with None)."""
    return record.get(key) is not None


def keys(record: dict) -> str:
    """The keys a record holds, for an error that says what it has."""
    return ", ".join(sorted(k for k in record if present(record, k))) or "none"


def text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise NanotuneError(f"{where} key {key!r} holds a {type(value).__name__}, expected text")
    return value


def content(value, where: str) -> str:
    """A message's content: text, or OpenAI's list of content parts, of which only text ones are read."""
    if isinstance(value, list):
        kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in value]
        other = [k for k in kinds if k != "text"]
        if other:
            raise NanotuneError(f"{where}: content parts of type {other[0]!r}: only text parts are supported")
        value = "".join(text(p.get("text"), where, "text") for p in value)
    return text(value, where, "content")


def messages(value, where: str, sharegpt: bool = False) -> list[dict]:
    """OpenAI/TRL messages ({role, content, weight?}) or ShareGPT turns ({from, value}) -> chat.py's messages."""
    role_key, content_key, names = ("from", "value", SHAREGPT_ROLES) if sharegpt else ("role", "content", ROLES)
    if not isinstance(value, list) or not value:
        raise NanotuneError(f"{where}: the messages must be a non-empty list, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        here = f"{where}, message {j}"
        if not isinstance(m, dict):
            raise NanotuneError(
                f"{here} is a {type(m).__name__}, expected an object with {role_key!r} and {content_key!r}"
            )
        role = names.get(str(m.get(role_key)).lower())
        if role is None:
            raise NanotuneError(
                f"{here} has {role_key} {m.get(role_key)!r}: nanotune reads {', '.join(sorted(set(names)))} messages"
            )
        message = {"role": role, "content": content(m.get(content_key), here)}
        weight = m.get("weight")
        if weight is not None:
            if role != "assistant" or weight not in (0, 1) or isinstance(weight, bool):
                raise NanotuneError(f"{here}: weight {weight!r}: only assistant messages take a weight, 0 or 1")
            message["weight"] = int(weight)
        out.append(message)
    return out


def prompt_messages(record: dict, where: str) -> list[dict]:
    """The prompt of a record that names one: 'instruction' or 'prompt' (text or messages), with an 'input'."""
    if not present(record, "instruction") and isinstance(record["prompt"], list):
        return messages(record["prompt"], where)
    key = "instruction" if present(record, "instruction") else "prompt"
    user = {"role": "user", "content": text(record[key], where, key)}
    if present(record, "input") and text(record["input"], where, "input"):  # (Alpaca's empty input: none)
        user["input"] = record["input"]
    return [user]


def sft_example(record: dict, where: str) -> dict:
    """One SFT record of any shape -> {conversation, prompt, answer, text}."""
    if present(record, "messages") or present(record, "conversations"):
        sharegpt = not present(record, "messages")
        conversation = messages(record["conversations" if sharegpt else "messages"], where, sharegpt)
    elif present(record, "prompt") and present(record, "completion"):  # TRL's prompt-completion, text or messages
        completion = record["completion"]
        if isinstance(completion, list):
            completion = messages(completion, where)
        else:
            completion = [{"role": "assistant", "content": text(completion, where, "completion")}]
        conversation = prompt_messages(record, where) + completion
    elif present(record, "instruction") or present(record, "prompt"):  # Alpaca; prompt/response pairs
        key = "output" if present(record, "instruction") or not present(record, "response") else "response"
        if not present(record, key):
            raise NanotuneError(f"{where} has no {key!r} key (it has {keys(record)})")
        conversation = prompt_messages(record, where) + [
            {"role": "assistant", "content": text(record[key], where, key)}
        ]
    elif present(record, "text"):
        return {"prompt": [], "conversation": [], "answer": None, "text": text(record["text"], where, "text")}
    else:
        raise NanotuneError(f"{where} fits no SFT format (its keys: {keys(record)}); expected {SFT_FORMATS}")
    trained = [i for i, m in enumerate(conversation) if m["role"] == "assistant" and m.get("weight", 1)]
    if not trained:
        raise NanotuneError(f"{where}: no assistant message to train on (every answer missing or of weight 0)")
    last = trained[-1]
    return {
        "prompt": conversation[:last],
        "conversation": conversation,
        "answer": conversation[last]["content"],
        "text": None,
    }


def answer(value, where: str, key: str) -> str:
    """A chosen or rejected answer: text, or TRL's [{"role": "assistant", "content": ...}]."""
    if isinstance(value, list):
        turns = messages(value, f"{where} key {key!r}")
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise NanotuneError(f"{where} key {key!r}: expected one assistant message, got {len(turns)} messages")
        return turns[0]["content"]
    return text(value, where, key)


def shared_prompt(chosen, rejected, where: str):
    """TRL's implicit prompt: chosen and rejected are whole texts or conversations that begin the same way; that
    beginning is the prompt (for text, as TRL's extract_prompt: cut before the space ahead of the first
    difference). -> prompt messages, chosen answer, rejected answer."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
        if cut is None:  # one is the beginning of the other: TRL's loop ends one short of the shorter
            cut = min(len(chosen), len(rejected)) - 1
        elif cut and chosen[cut - 1] == " ":
            cut -= 1
        if not cut:
            raise NanotuneError(f"{where}: chosen and rejected share no beginning, so there is no prompt")
        return [{"role": "user", "content": chosen[:cut]}], chosen[cut:], rejected[cut:]
    chosen, rejected = messages(chosen, f"{where} key 'chosen'"), messages(rejected, f"{where} key 'rejected'")
    cut = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if not cut or len(chosen) - cut != 1 or len(rejected) - cut != 1:
        raise NanotuneError(
            f"{where}: chosen and rejected must be the same conversation up to one final assistant message each"
        )
    answers = chosen[cut], rejected[cut]
    if any(m["role"] != "assistant" for m in answers):
        raise NanotuneError(f"{where}: the messages where chosen and rejected differ must be the assistant's")
    return chosen[:cut], answers[0]["content"], answers[1]["content"]


def preference_example(record: dict, where: str) -> dict:
    """One preference record of any shape -> {prompt, chosen, rejected}."""
    named = present(record, "prompt") or present(record, "instruction")
    both = present(record, "chosen") and present(record, "rejected")
    # whole conversations beside a text prompt (UltraFeedback's layout) are read as TRL reads them: implicitly
    whole = all(isinstance(record.get(k), list) and len(record[k]) > 1 for k in ("chosen", "rejected"))
    if (whole and not isinstance(record.get("prompt"), list)) or (both and not named):
        prompt, chosen, rejected = shared_prompt(record["chosen"], record["rejected"], where)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if not named:
        raise NanotuneError(
            f"{where} fits no preference format (its keys: {keys(record)}); expected {PREFERENCE_FORMATS}"
        )
    for key in ("chosen", "rejected"):
        if not present(record, key):
            raise NanotuneError(f"{where} has no {key!r} key (it has {keys(record)})")
    prompt = prompt_messages(record, where)
    return {
        "prompt": prompt,
        "chosen": answer(record["chosen"], where, "chosen"),
        "rejected": answer(record["rejected"], where, "rejected"),
    }


def ranked_example(record: dict, where: str) -> dict:
    """A ranked record (a prompt and 'responses', best first; nanotune.pairs writes them) or a preference record
    -> {prompt, responses}."""
    if not present(record, "responses"):
        if not (present(record, "chosen") and present(record, "rejected")):
            raise NanotuneError(
                f"{where} has neither 'responses' nor both 'chosen' and 'rejected' (it has {keys(record)})"
            )
        example = preference_example(record, where)
        return {"prompt": example["prompt"], "responses": [example["chosen"], example["rejected"]]}
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        got = len(responses) if isinstance(responses, list) else type(responses).__name__
        raise NanotuneError(f"{where}: 'responses' must list at least 2 answers (best first), got {got}")
    if not present(record, "prompt") and not present(record, "instruction"):
        raise NanotuneError(f"{where} has no 'instruction' (or 'prompt') key")
    return {"prompt": prompt_messages(record, where), "responses": [answer(r, where, "responses") for r in responses]}


def examples(records: list[dict], source, kind: str = "sft") -> list[dict]:
    """Records -> examples of a kind: "sft", "preference", "ranked" (answers best first, or a preference pair),
    or "prompt" (anything with a prompt and an answer: SFT records, or preference records whose chosen answer is
    the reference), each with its record and source."""
    out = []
    for i, record in enumerate(records):
        where = f"{source}: record {i}"
        if kind == "preference":
            example = preference_example(record, where)
        elif kind == "ranked":
            example = ranked_example(record, where)
        elif kind == "prompt" and present(record, "chosen"):
            example = preference_example(record, where)
            example = {"prompt": example["prompt"], "answer": example["chosen"]}
        else:
            example = sft_example(record, where)
            if kind == "prompt" and example["text"] is not None:
                raise NanotuneError(f"{where} is plain text: it has no prompt to answer")
        # a prompt that is one text, not an instruction or messages: what --template raw continues verbatim
        text_prompt = not present(record, "instruction") and not isinstance(record.get("prompt"), list)
        text_prompt = text_prompt and all(isinstance(record.get(k), str) for k in ("chosen", "rejected"))
        text_prompt = text_prompt or (isinstance(record.get("prompt"), str) and present(record, "responses"))
        out.append({**example, "record": i, "source": str(source), "text_prompt": text_prompt})
    return out


def prompt_key(example: dict) -> tuple:
    """What makes two examples the same prompt (the split keeps such examples together)."""
    if example.get("text") is not None:
        return ("text", example["text"])
    if not example["prompt"]:  # a conversation that opens with its answer: nothing shared to keep together
        return ("answer", example.get("answer"), example["record"], example.get("source"))
    return tuple((m["role"], m["content"], m.get("input") or "") for m in example["prompt"])


def last_user(example: dict) -> str:
    """The prompt's last user message, with its input: what a person reads as "the question" in outputs."""
    user = next((m for m in reversed(example["prompt"]) if m["role"] == "user"), None)
    return "" if user is None else user["content"] + (f"\n{user['input']}" if user.get("input") else "")
