"""The OpenAI API's side of nanotune.serve: a request's fields checked and turned into an engine Request, the
answers and streamed chunks in OpenAI's JSON, and its error object. Nothing here runs a model or knows HTTP."""

import codecs
import json
import time
import uuid

from ..data.chat import render
from ..data.formats import content as message_content
from ..utils import NanotuneError
from .api_schema import ApiError, check, field
from .engine import Request

__all__ = [
    "ApiError",
    "Answer",
    "Limits",
    "chat_messages",
    "chat_prompt",
    "completion_prompts",
    "parse_body",
    "sampling_request",
]


class Limits:
    """What one request may ask for (the flags of the same names)."""

    def __init__(self, args, context: int):
        self.context, self.max_tokens, self.max_n = context, args.max_tokens, args.max_batch
        self.max_request_bytes, self.max_prompts = args.max_request_bytes, args.max_queue


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_body(data: bytes, model_id: str, schema: dict) -> dict:
    """A request's body -> its JSON object, checked against its endpoint's schema (nanotune/serve/api_schema.py)."""
    try:
        body = json.loads(data, parse_constant=_refuse_constant)  # (Python's json would read NaN and Infinity)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if body.get("model") != model_id:
        raise ApiError(
            404,
            f"The model {body.get('model')!r} does not exist: this server serves {model_id!r}",
            "model",
            "model_not_found",
        )
    try:
        body = check(body, schema, "")
    except ApiError as e:  # more tokens than the whole context: OpenAI's code for it, which clients look for
        if e.param in ("max_tokens", "max_completion_tokens") and e.message.startswith(f"{e.param} must be at most"):
            e.code = "context_length_exceeded"
        raise
    return body


def max_tokens_key(body: dict) -> str:
    """The field that limits the answer: max_completion_tokens (the chat API's newer name) when given, else
    max_tokens."""
    return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"


def sampling_request(body: dict, prompt: list[int], limits: Limits, emit, schema: dict) -> Request:
    """The sampling fields every endpoint shares, checked (body has passed parse_body), as an engine Request:
    what the schema cannot say, the fields' sums and combinations, is checked here."""
    echo = bool(body.get("echo"))
    key = max_tokens_key(body)
    room = limits.context - len(prompt)
    max_tokens = body.get(key)
    if room < 1 and not (echo and max_tokens == 0):
        raise ApiError(
            400,
            f"the prompt has {len(prompt)} tokens: no room left in the context of {limits.context}",
            "messages" if "messages" in body else "prompt",
            "context_length_exceeded",
        )
    max_tokens = min(limits.max_tokens, room) if max_tokens is None else max_tokens
    if max_tokens > room:
        raise ApiError(
            400,
            f"{key} {max_tokens} + the prompt's {len(prompt)} tokens exceed the model's context of "
            f"{limits.context} tokens: ask for at most {room}",
            key,
            "context_length_exceeded",
        )
    if "messages" in body:  # chat: logprobs true, top_logprobs alternatives (only with logprobs: the schema's rule)
        alternatives = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
    else:  # completions: logprobs is the number of alternatives
        alternatives = body.get("logprobs")
    stop = field(body, schema, "stop") or []
    top_p = field(body, schema, "top_p")
    return Request(
        prompt=prompt,
        max_tokens=max_tokens,
        emit=emit,
        n=field(body, schema, "n"),
        temperature=0.0 if top_p == 0 else float(field(body, schema, "temperature")),  # (top_p 0: the top token)
        top_p=None if top_p >= 1 else float(top_p),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        seed=body.get("seed"),
        logprobs=alternatives,
        score_prompt=echo,  # (the prompt's log-probabilities: sent when logprobs asks for them)
    )


def chat_prompt(body: dict, template: str, enc) -> list[int]:
    """The messages, checked, as the token ids the model continues (nanotune/data/chat.py's renderer)."""
    return render(enc, chat_messages(body), template, add_generation_prompt=True)[0]


def chat_messages(body: dict) -> list[dict]:
    """The messages, checked, as nanotune's conversations: [{role, content}] with the content's text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        try:  # text, or content parts of which only text ones are read: as in training data (nanotune/data/formats.py)
            checked.append({"role": m["role"], "content": message_content(m.get("content"), f"messages[{i}]")})
        except NanotuneError as e:
            raise ApiError(400, str(e), f"messages[{i}].content") from None
    return checked


def completion_prompts(body: dict, enc) -> list[list[int]]:
    """The prompt (checked by parse_body: text, texts, token ids or lists of them) as token-id lists."""
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompt = [prompt]
    if all(isinstance(t, int) for t in prompt):
        return [prompt]
    return [p if isinstance(p, list) else enc.encode_ordinary(p) or [enc.eot_token] for p in prompt]


def token_text(data: bytes) -> str:
    """A token's text; a piece of a character (one of its UTF-8 bytes) as OpenAI writes it, "bytes:\\xe2"."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class Answer:
    """The choices of one API call as the engine's pieces arrive, and the JSON OpenAI's clients expect.
    prompts: each prompt's token ids, answered with n choices each; echo: the prompt's text leads each choice;
    logprobs: the alternatives per token that the request asked for (None: no log-probabilities); extra: top-level
    fields of nanotune's own (the answer's, or a stream's first chunk's), such as --docs's nanotune_passages."""

    def __init__(self, kind: str, model_id: str, prompts: list[list[int]], n: int, enc, echo=False, logprobs=None):
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        self.kind, self.model, self.prompt_tokens = kind, model_id, sum(map(len, prompts))
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        choices = len(prompts) * n
        self.text, self.finish, self.tokens = [""] * choices, [None] * choices, [0] * choices
        self.enc, self.logprobs, self.extra = enc, logprobs, {}
        prompt_texts = [enc.decode(prompts[i // n]) for i in range(choices)] if kind == "text_completion" else []
        self.echo = prompt_texts if echo else None
        # log-probabilities: each choice's tokens so far, and where each starts in the prompt + completion text
        self.scores = [[] for _ in range(choices)]
        self.offset = [0 if echo else len(t) for t in prompt_texts] or [0] * choices
        self.decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in range(choices)]

    def add(self, index: int, text: str, finish: str | None, n_tokens: int, logprobs=None) -> tuple[str, list]:
        """One piece from the engine -> (the text to send, the scored tokens to send with it)."""
        if self.echo is not None and self.echo[index] is not None:  # the first piece: after the prompt's text
            text, self.echo[index] = self.echo[index] + text, None
        self.text[index] += text
        self.tokens[index] = n_tokens
        self.finish[index] = finish or self.finish[index]
        scores = [self._score(index, *entry) for entry in logprobs or []] if self.logprobs is not None else []
        self.scores[index] += scores
        return text, scores

    def _score(self, index: int, token: int, logprob: float | None, alternatives: list) -> dict:
        data = self.enc.decode_single_token_bytes(token)
        offset = self.offset[index]
        if token != self.enc.eot_token:  # (the end token is no part of the text)
            self.offset[index] += len(self.decoders[index].decode(data))
        top = [(self.enc.decode_single_token_bytes(t), lp) for t, lp in alternatives]
        return {"token": token_text(data), "bytes": list(data), "logprob": logprob, "top": top, "offset": offset}

    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def usage(self) -> dict:
        completion = sum(self.tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def _logprobs(self, scores: list[dict]) -> dict | None:
        """Scored tokens in the endpoint's shape: chat's {"content": [...]}, or the legacy completions' lists
        (the first token of an echoed prompt has no log-probability: null, as OpenAI's)."""
        if self.logprobs is None:
            return None
        if self.kind == "chat.completion":
            alternative = lambda b, lp: {"token": token_text(b), "logprob": lp, "bytes": list(b)}  # noqa: E731
            return {
                "content": [
                    {
                        "token": s["token"],
                        "logprob": s["logprob"],
                        "bytes": s["bytes"],
                        "top_logprobs": [alternative(*a) for a in s["top"]],
                    }
                    for s in scores
                ]
            }
        return {
            "tokens": [s["token"] for s in scores],
            "token_logprobs": [s["logprob"] for s in scores],
            "top_logprobs": [
                None if s["logprob"] is None else {token_text(b): lp for b, lp in s["top"]} for s in scores
            ],
            "text_offset": [s["offset"] for s in scores],
        }

    def choice(self, index: int, text: str, finish: str | None, key: str, scores: list, role: bool = False) -> dict:
        logprobs = self._logprobs(scores)
        if self.kind == "chat.completion":
            content = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
            return {"index": index, key: content, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chunk(self, index: int, text: str, finish: str | None, scores=(), role: bool = False) -> dict:
        """A streamed piece of one choice (chat: role=True for the first, which names the assistant)."""
        return self.choice(index, text, finish, "delta", list(scores), role)

    def whole(self) -> dict:
        choices = [
            self.choice(i, t, f, "message", self.scores[i], True)
            for i, (t, f) in enumerate(zip(self.text, self.finish))
        ]
        return {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
            **self.extra,
        }

    def sse(self, choices: list[dict], usage: bool = False, final: bool = False) -> str:
        """One server-sent chunk. With usage (stream_options.include_usage) every chunk has "usage": null, as
        OpenAI's do, but the final one, which has no choices and the whole call's counts."""
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage:
            chunk["usage"] = self.usage() if final else None
        chunk |= self.extra  # (the first chunk only: said once, before the text it concerns)
        self.extra = {}
        return f"data: {json.dumps(chunk)}\n\n"
