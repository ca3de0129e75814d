"""The OpenAI API's side of nanotune.serve: a request's fields checked and turned into an engine Request, the
answers and streamed chunks in OpenAI's JSON, and its error object. Nothing here runs a model or knows HTTP."""

import json
import time
import uuid

from .chat import render
from .engine import Request
from .formats import content as message_content
from .utils import NanotuneError


class ApiError(Exception):
    """A request the server turns down: answered as OpenAI's {"error": {...}} with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        error_type = kind.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


class Limits:
    """What one request may ask for (the flags of the same names)."""

    def __init__(self, args, context: int):
        self.context, self.max_tokens, self.max_n = context, args.max_tokens, args.max_batch
        self.max_request_bytes = args.max_request_bytes


def parse_body(data: bytes, model_id: str) -> dict:
    """A request's body -> its JSON object, with the fields every endpoint reads checked."""
    try:
        body = json.loads(data)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if body.get("model") != model_id:
        raise ApiError(404, f"The model {body.get('model')!r} does not exist: this server serves {model_id!r}",
                       "model", "model_not_found")  # fmt: skip
    if not isinstance(body.get("stream") or False, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise ApiError(400, 'stream_options must be an object, as {"include_usage": true}', "stream_options")
    return body


def _number(body: dict, key: str, default, low: float, high: float, kind=float):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{key} must be a {'integer' if kind is int else 'number'}, got {value!r}", key)
    if not low <= value <= high:
        raise ApiError(400, f"{key} must be between {low} and {high}, got {value}", key)
    return kind(value)


def sampling_request(body: dict, prompt: list[int], limits: Limits, emit) -> Request:
    """The sampling fields every endpoint shares, checked, as an engine Request."""
    for key, neutral in (("logprobs", (None, False)), ("echo", (None, False)), ("best_of", (None, 1))):
        if body.get(key) not in neutral:
            raise ApiError(400, f"{key} is not supported by this server", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise ApiError(400, f"{key} is not supported by this server (only 0)", key)
    room = limits.context - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens: no room left in the context of {limits.context}",
                       "messages" if "messages" in body else "prompt", "context_length_exceeded")  # fmt: skip
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, min(limits.max_tokens, room), 1, float("inf"), int)
    if max_tokens > room:
        raise ApiError(
            400,
            f"{key} {max_tokens} + the prompt's {len(prompt)} tokens exceed the model's context of "
            f"{limits.context} tokens: ask for at most {room}",
            key,
            "context_length_exceeded",
        )
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    top_p = _number(body, "top_p", None, 0, 1)
    return Request(
        prompt=prompt,
        max_tokens=max_tokens,
        emit=emit,
        n=_number(body, "n", 1, 1, limits.max_n, int),
        temperature=0.0 if top_p == 0 else _number(body, "temperature", 1.0, 0, 2),  # (top_p 0: the top token)
        top_p=top_p,
        stop=tuple(stop),
        seed=_number(body, "seed", None, -(2**62), 2**62, int),
    )


def chat_prompt(body: dict, template: str, enc) -> list[int]:
    """The messages, checked, as the token ids the model continues (nanotune/chat.py's renderer)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        try:  # text, or content parts of which only text ones are read: as in training data (nanotune/formats.py)
            checked.append({"role": m["role"], "content": message_content(m.get("content"), f"messages[{i}]")})
        except NanotuneError as e:
            raise ApiError(400, str(e), f"messages[{i}].content") from None
    return render(enc, checked, template, add_generation_prompt=True)[0]


def completion_prompts(body: dict, enc) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < enc.n_vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {enc.n_vocab})", "prompt")
        return [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise ApiError(400, "prompt must be a string, a list of strings or a list of token ids", "prompt")
    return [enc.encode_ordinary(p) or [enc.eot_token] for p in prompt]


class Answer:
    """The choices of one API call as the engine's pieces arrive, and the JSON OpenAI's clients expect."""

    def __init__(self, kind: str, model_id: str, choices: int, prompt_tokens: int):
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        self.kind, self.model, self.prompt_tokens = kind, model_id, prompt_tokens
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.text, self.finish, self.tokens = [""] * choices, [None] * choices, [0] * choices

    def add(self, index: int, text: str, finish: str | None, n_tokens: int):
        self.text[index] += text
        self.tokens[index] = n_tokens
        self.finish[index] = finish or self.finish[index]

    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def usage(self) -> dict:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    def choice(self, index: int, text: str, finish: str | None, key: str, role: bool = False) -> dict:
        if self.kind == "chat.completion":
            content = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
            return {"index": index, key: content, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def chunk(self, index: int, text: str, finish: str | None, role: bool = False) -> dict:
        """A streamed piece of one choice (chat: role=True for the first, which names the assistant)."""
        return self.choice(index, text, finish, "delta", role)

    def whole(self) -> dict:
        choices = [self.choice(i, t, f, "message", True) for i, (t, f) in enumerate(zip(self.text, self.finish))]
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}  # fmt: skip

    def sse(self, choices: list[dict], usage: bool = False, final: bool = False) -> str:
        """One server-sent chunk. With usage (stream_options.include_usage) every chunk has "usage": null, as
        OpenAI's do, but the final one, which has no choices and the whole call's counts."""
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage:
            chunk["usage"] = self.usage() if final else None
        return f"data: {json.dumps(chunk)}\n\n"
