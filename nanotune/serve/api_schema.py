"""What nanotune.serve accepts, written once as JSON Schema: the request bodies of /v1/completions and
/v1/chat/completions (every field, its type, range and default), which the server checks each request against
(check() below reads these schemas and nothing else) and which /openapi.json publishes (nanotune/serve/openapi.py).
So the document and the checks cannot drift apart. A field that is not here is refused with 400, whatever its
value: a request that asked for logit_bias or tools gets told, not an answer that silently ignored them.

Only the JSON Schema keywords check() knows are used here (KEYWORDS); a schema with any other is an error, so
that no keyword is published that the server does not enforce."""

import json
import math

KEYWORDS = {
    "type",
    "enum",
    "const",
    "minimum",
    "maximum",
    "minLength",
    "items",
    "minItems",
    "maxItems",
    "properties",
    "required",
    "additionalProperties",
    "anyOf",
    "if",
    "then",
    "default",
    "description",
    "title",
}
TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (vLLM's default limit)


class ApiError(Exception):
    """A request the server turns down: answered as OpenAI's {"error": {...}} with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        error_type = kind.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


def _optional(kind: str, description: str, **limits) -> dict:
    """A field that may be left out or null (null means the default, as OpenAI's clients send it)."""
    return {"type": [kind, "null"], "description": description, **limits}


def request_schemas(model_id: str, context: int, max_n: int, max_tokens: int, max_prompts: int, n_vocab: int):
    """-> {"completions": schema, "chat": schema} for a server of this model, context and these limits."""
    token = {"type": "integer", "minimum": 0, "maximum": n_vocab - 1}
    ids = {"type": "array", "items": token, "minItems": 1}
    common = _sampling_fields(model_id, context, max_n, max_tokens)
    completions = {
        "type": "object",
        "required": ["model", "prompt"],
        "additionalProperties": False,
        "properties": {
            **common,
            "prompt": {
                "anyOf": [
                    {"type": "string", "title": "a string"},
                    {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": 1,
                        "maxItems": max_prompts,
                        "title": f"a list of 1 to {max_prompts} strings",
                    },
                    {**ids, "title": "a non-empty list of token ids"},
                    {
                        "type": "array",
                        "items": ids,
                        "minItems": 1,
                        "maxItems": max_prompts,
                        "title": f"a list of 1 to {max_prompts} token-id lists",
                    },
                ],
                "description": "one prompt or a batch of them; each is answered with n choices",
            },
            "echo": _optional("boolean", "the prompt's text before each completion", default=False),
            "logprobs": _optional(
                "integer",
                "log-probabilities of the tokens (the prompt's too with echo) and of "
                "this many most likely alternatives",
                minimum=0,
                maximum=TOP_LOGPROBS,
            ),
            "best_of": _optional("integer", "only 1 is supported", minimum=1, maximum=1, default=1),
        },
    }
    part = {
        "type": "object",
        "required": ["type", "text"],
        "additionalProperties": False,
        "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "additionalProperties": False,
        "properties": {
            "role": {"enum": ["system", "user", "assistant"]},
            "content": {
                "anyOf": [
                    {"type": "string", "title": "text"},
                    {"type": "array", "items": part, "title": "a list of text parts"},
                ]
            },
        },
    }
    chat = {
        "type": "object",
        "required": ["model", "messages"],
        "additionalProperties": False,
        "properties": {
            **common,
            "messages": {"type": "array", "items": message, "minItems": 1, "description": "the conversation so far"},
            "max_completion_tokens": _optional(
                "integer", "the same as max_tokens (which it overrides)", minimum=1, maximum=context
            ),
            "logprobs": _optional("boolean", "the log-probability of every token of the answer", default=False),
            "top_logprobs": _optional(
                "integer", "and of this many most likely alternatives (needs logprobs)", minimum=0, maximum=TOP_LOGPROBS
            ),
        },
    }
    completions["if"] = {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]}
    completions["then"] = {
        "properties": {"echo": {"const": True}},
        "required": ["echo"],
        "description": "max_tokens must be at least 1, or 0 with echo: true (to score the prompt alone)",
    }
    chat["properties"]["max_tokens"] = {**common["max_tokens"], "minimum": 1}  # (no echo in a chat)
    chat["if"] = {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]}
    chat["then"] = {
        "properties": {"logprobs": {"const": True}},
        "required": ["logprobs"],
        "description": "top_logprobs needs logprobs: true",
    }  # (OpenAI's rule)
    for schema in (completions, chat):
        _check_keywords(schema)
    return {"completions": completions, "chat": chat}


def _sampling_fields(model_id: str, context: int, max_n: int, max_tokens: int) -> dict:
    """The fields both endpoints take: the model, how many tokens, how to sample, when to stop, streaming."""
    text = {"type": "string", "minLength": 1}
    return {
        "model": {"type": "string", "enum": [model_id], "description": "the served model's id (GET /v1/models)"},
        "max_tokens": _optional(
            "integer",
            f"tokens to generate; 0 only with echo (the prompt scored alone); default "
            f"{max_tokens}, or what the context leaves; prompt + max_tokens <= {context}",
            minimum=0,
            maximum=context,
            default=max_tokens,
        ),
        "temperature": _optional("number", "0 is greedy", minimum=0, maximum=2, default=1),
        "top_p": _optional("number", "nucleus sampling; 0 is greedy", minimum=0, maximum=1, default=1),
        "n": _optional("integer", "choices per prompt", minimum=1, maximum=max_n, default=1),
        "stop": {
            "anyOf": [
                {**text, "title": "a non-empty string"},
                {"type": "array", "items": text, "maxItems": 4, "title": "a list of up to 4 non-empty strings"},
                {"type": "null", "title": "null"},
            ],
            "description": "the answer ends before the earliest of these",
        },
        "seed": _optional(
            "integer",
            "each choice samples with its own generator, seeded seed + its index",
            minimum=-(2**62),
            maximum=2**62,
        ),
        "stream": _optional("boolean", "server-sent events in OpenAI's chunk format", default=False),
        "stream_options": {
            "type": ["object", "null"],
            "properties": {"include_usage": _optional("boolean", "a last chunk with the token counts", default=False)},
            "additionalProperties": False,
        },
        "presence_penalty": _optional("number", "only 0 (no penalty) is supported", minimum=0, maximum=0, default=0),
        "frequency_penalty": _optional("number", "only 0 (no penalty) is supported", minimum=0, maximum=0, default=0),
    }


def _check_keywords(schema):
    """Every keyword used is one check() enforces (recursively)."""
    if isinstance(schema, dict):
        unknown = set(schema) - KEYWORDS
        if unknown:
            raise ValueError(f"schema keywords {sorted(unknown)} are not enforced by api_schema.check")
        for key in ("items", "additionalProperties", "if", "then"):
            _check_keywords(schema.get(key))
        for sub in [*schema.get("properties", {}).values(), *schema.get("anyOf", [])]:
            _check_keywords(sub)


def field(body: dict, schema: dict, key: str):
    """A checked body's value of key, or the schema's default when it is absent or null."""
    value = body.get(key)
    return schema["properties"][key].get("default") if value is None else value


_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "an object",
    "null": "null",
}


def _is(value, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    if kind == "integer" and isinstance(value, float):  # JSON Schema's integer is a number's value: 3.0 is one
        return value.is_integer()
    return isinstance(
        value,
        {
            "string": str,
            "integer": int,
            "number": int | float,
            "boolean": bool,
            "array": list,
            "object": dict,
            "null": type(None),
        }[kind],
    )


def check(value, schema: dict, path: str):
    """-> value, if it satisfies schema (an integer written 3.0 as the int 3); otherwise raise ApiError(400,
    param=path) with a plain sentence."""
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                return check(value, option, path)
            except ApiError as e:
                errors.append(e)
        deepest = max(errors, key=lambda e: (e.param.count("[") + e.param.count("."), e.param))
        if deepest.param != path:  # one option got further into the value: its complaint is the useful one
            raise deepest
        options = [o["title"] for o in schema["anyOf"] if o.get("type") != "null"]
        raise ApiError(400, f"{path} must be {', '.join(options[:-1])} or {options[-1]}", path)
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds or []
    if kinds and not any(_is(value, k) for k in kinds):
        named = [_NAMES[k] for k in kinds if k != "null"]  # (null, the same as leaving it out, goes unsaid)
        raise ApiError(400, f"{path} must be {' or '.join(named)}, got {_short(value)}", path)
    if isinstance(value, float) and "integer" in kinds and "number" not in kinds:
        value = int(value)
    if "enum" in schema and value not in schema["enum"]:
        raise ApiError(400, f"{path} must be {' or '.join(map(repr, schema['enum']))}, got {_short(value)}", path)
    if "const" in schema and value != schema["const"]:
        raise ApiError(400, f"{path} must be {json.dumps(schema['const'])}, got {_short(value)}", path)
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
        if not low <= value <= high:
            limit = f"{low}" if low == high else f"at least {low}" if value < low else f"at most {high}"
            raise ApiError(400, f"{path} must be {limit}, got {value}", path)
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        raise ApiError(400, f"{path} must not be empty", path)
    if isinstance(value, list):
        value = _check_list(value, schema, path)
    if isinstance(value, dict):
        value = _check_object(value, schema, path)
    return value


def _check_list(value: list, schema: dict, path: str) -> list:
    if len(value) < schema.get("minItems", 0):
        raise ApiError(400, f"{path} must have at least {schema['minItems']} item(s), got {len(value)}", path)
    if len(value) > schema.get("maxItems", math.inf):
        raise ApiError(400, f"{path} may have at most {schema['maxItems']} items, got {len(value)}", path)
    return [check(item, schema.get("items", {}), f"{path}[{i}]") for i, item in enumerate(value)]


def _check_object(value: dict, schema: dict, path: str) -> dict:
    properties = schema.get("properties", {})
    where = f"{path}." if path else ""
    for key in value:
        if key not in properties and schema.get("additionalProperties", True) is False:
            raise ApiError(400, f"{where}{key} is not supported by this server", f"{where}{key}")
    for key in schema.get("required", []):
        if key not in value:
            raise ApiError(400, f"{where}{key} is required", f"{where}{key}")
    value = {key: check(v, properties[key], f"{where}{key}") if key in properties else v for key, v in value.items()}
    if "if" in schema:  # a rule between fields: when the value satisfies "if", it must satisfy "then" as well
        try:
            check(value, schema["if"], path)
        except ApiError:
            return value
        try:
            check(value, schema["then"], path)
        except ApiError:  # (named by the field that asks for the other)
            raise ApiError(400, schema["then"]["description"], f"{where}{schema['if']['required'][0]}") from None
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
