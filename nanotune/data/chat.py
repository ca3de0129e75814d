"""Conversations as the model sees them: the chat templates, rendered to token ids with the mask of what trains,
and the same templates as Jinja, which every output folder carries for transformers, vLLM, TGI and llama.cpp.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": text}; a user message
may carry an Alpaca "input" (shown under the instruction), an assistant message a "weight" of 0 (not trained).

    alpaca      system "\\n\\n", then per exchange: the Alpaca instruction block, "### Response:\\n", the answer,
                <|endoftext|> (the single-turn layout SFT always used, repeated once per exchange)
    plain       "Instruction: ...\\n", "Response: ", the answer, <|endoftext|>
    transcript  "User: ...\\n", "Assistant: ...\\n", then "Assistant:" (a base model's chat: no training layout)
    raw         one prompt, verbatim, continued by its answer (book continuations; no end token, no chat)

System messages come first, in their order. Each answer is encoded on its own, after the prompt before it,
exactly as the model is asked to go on at "### Response:\\n" when it generates: `render` returns those ids,
with True on the tokens a model is trained to produce (every assistant answer and the <|endoftext|> that ends
it, unless its weight is 0). transformers' apply_chat_template on a saved folder gives the same ids (tested),
with one exception that the plain template's own layout causes: its prompt ends in a space, which
transformers, encoding the whole text at once, joins to an earlier answer's first word (" The"), while here it
stays apart (" ", "The") as it is when the model answers it.
"""

from __future__ import annotations

from ..utils import NanotuneError

EOT_TEXT = "<|endoftext|>"
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
CHAT_TEMPLATES = ("alpaca", "plain", "transcript")  # what a model folder's chat_template can be
TRAINED = ("alpaca", "plain")  # the layouts a model is fine-tuned on (raw: single-turn continuations)


def user_text(content: str, extra: str, template: str) -> str:
    """A user message's text before the answer's own prefix."""
    if template == "alpaca":
        return (
            f"{ALPACA_HEADER}\n\n### Instruction:\n{content}" + (f"\n\n### Input:\n{extra}" if extra else "") + "\n\n"
        )
    if template == "plain":
        return f"Instruction: {content}" + (f"\n{extra}" if extra else "") + "\n"
    if template == "transcript":
        return f"User: {content.lstrip()}\n"
    return content + (f"\n{extra}" if extra else "")  # raw


ANSWER_PREFIX = {"alpaca": "### Response:\n", "plain": "Response: ", "transcript": "Assistant:", "raw": ""}


def parts(messages: list[dict], template: str, add_generation_prompt: bool = False) -> list[tuple[str, str, bool]]:
    """The conversation as (kind, text, trained) parts: kind "prompt" (text the model reads), "answer" (an
    assistant's text) or "eot" (the <|endoftext|> that ends an answer)."""
    if template not in (*CHAT_TEMPLATES, "raw"):
        raise NanotuneError(f"unknown template {template!r}: expected one of {', '.join((*CHAT_TEMPLATES, 'raw'))}")
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if template == "raw" and (system or len(turns) > 2 or (turns and turns[0]["role"] != "user")):
        raise NanotuneError("--template raw takes a single prompt and its answer, not a conversation")
    out = [("prompt", m["content"] + "\n\n", False) for m in system]
    for m in turns:
        if m["role"] == "user":
            out.append(("prompt", user_text(m["content"], m.get("input") or "", template), False))
        elif template == "transcript":  # (an answer that came back with the space it began with: not doubled)
            out.append(("prompt", f"Assistant: {m['content'].lstrip()}\n", False))
        else:
            trained = m.get("weight", 1) != 0
            out.append(("prompt", ANSWER_PREFIX[template], False))
            out.append(("answer", m["content"], trained))
            if template != "raw":
                out.append(("eot", EOT_TEXT, trained))
    if add_generation_prompt:
        out.append(("prompt", ANSWER_PREFIX[template], False))
    return out


def render_text(messages: list[dict], template: str, add_generation_prompt: bool = False) -> str:
    """The conversation as one string, as the Jinja template writes it."""
    return "".join(text for _, text, _ in parts(messages, template, add_generation_prompt))


def render(enc, messages: list[dict], template: str, add_generation_prompt: bool = False):
    """-> (token ids, trained mask): adjacent prompt text encoded together, each answer on its own, each end of an
    answer the <|endoftext|> token (text in a message is always text: "<|endoftext|>" typed by a user stays
    ordinary characters)."""
    ids, mask, pending = [], [], ""
    for kind, text, trained in [*parts(messages, template, add_generation_prompt), ("end", "", False)]:
        if kind == "prompt":
            pending += text
            continue
        if pending:
            new = enc.encode_ordinary(pending)
            ids += new
            mask += [False] * len(new)
            pending = ""
        new = [enc.eot_token] if kind == "eot" else enc.encode_ordinary(text)
        ids += new
        mask += [trained] * len(new)
    return ids, mask


# The templates above as Jinja, for the folder's chat_template.jinja and tokenizer_config.json. Plain Jinja (no
# {% generation %}, which transformers alone knows), so llama.cpp's and vLLM's renderers read it as well.
_SYSTEM = "{%- for m in messages if m['role'] == 'system' -%}{{ m['content'] + '\\n\\n' }}{%- endfor -%}"
_INPUT = "{%- if m['input'] is defined and m['input'] -%}{{ SEP + m['input'] }}{%- endif -%}"
_JINJA = {
    "alpaca": (
        "{%- for m in messages if m['role'] != 'system' -%}{%- if m['role'] == 'user' -%}"
        "{{ '"
        + ALPACA_HEADER
        + "\\n\\n### Instruction:\\n' + m['content'] }}"
        + _INPUT.replace("SEP", "'\\n\\n### Input:\\n'")
        + "{{ '\\n\\n' }}{%- else -%}{{ '### Response:\\n' + m['content'] + '<|endoftext|>' }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
    ),
    "plain": (
        "{%- for m in messages if m['role'] != 'system' -%}{%- if m['role'] == 'user' -%}"
        "{{ 'Instruction: ' + m['content'] }}"
        + _INPUT.replace("SEP", "'\\n'")
        + "{{ '\\n' }}{%- else -%}{{ 'Response: ' + m['content'] + '<|endoftext|>' }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'Response: ' }}{%- endif -%}"
    ),
    "transcript": (
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}{{ 'User: ' + m['content'].lstrip() }}{%- else -%}"
        "{{ 'Assistant: ' + m['content'].lstrip() }}{%- endif -%}{{ '\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
    ),
}


def jinja_template(template: str) -> str:
    """The chat template as Jinja source."""
    return _SYSTEM + _JINJA[template]


def folder_template(template: str | None) -> str:
    """The chat template a model folder carries: the one it was trained with, else (a base model, a model
    trained on raw text) the plain transcript nanotune.serve uses for base models."""
    return template if template in TRAINED else "transcript"
