"""nanotune.serve's OpenAPI document (GET /openapi.json): its routes, the request bodies as the server checks
them (the very schemas of nanotune/serve/api_schema.py), the answers, and every error it can give in OpenAI's shape."""

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERRORS = {
    "400": "a field outside what the schema allows, a prompt longer than the context leaves, a body that is not JSON",
    "401": "a missing or wrong API key (Authorization: Bearer KEY)",
    "404": "a model this server does not serve",
    "405": "a method the route does not take (Allow names those it does)",
    "413": "a body larger than --max-request-bytes",
    "415": "a body not sent as Content-Type: application/json",
    "429": "more than --max-queue requests already waiting",
    "500": "the model failed on this request (the message says how); the server goes on",
}
# one server-sent event: data holds a chunk's JSON (or the error object, or [DONE])
EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
USAGE = {"type": "object", "required": list(COUNTS), "properties": {k: {"type": "integer"} for k in COUNTS}}


def _answer(choice_key: str, obj: str, extra: dict | None = None) -> dict:
    choice = {
        "type": "object",
        "required": ["index", choice_key, "logprobs", "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            choice_key: {"type": "string"} if choice_key == "text" else {"type": "object"},
            "logprobs": {"type": ["object", "null"]},
            "finish_reason": {"enum": ["stop", "length"]},
        },
    }
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"enum": [obj]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": USAGE,
            **(extra or {}),
        },
    }


def _errors(*statuses: str) -> dict:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {s: {"description": ERRORS[s], **error} for s in statuses}


def _generation(summary: str, schema: str, answer: str, secured: list[str]) -> dict:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
            },
            "responses": {
                "200": {
                    "description": "the answer; with stream: true, server-sent events in OpenAI's chunk format",
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{answer}"}},
                        "text/event-stream": {"schema": EVENT},
                    },
                },
                **_errors("400", *secured, "404", "405", "413", "415", "429", "500"),
            },
        }
    }


def openapi_document(model_id: str, schemas: dict, api_key: bool, chat_answer_fields: dict | None = None) -> dict:
    """The OpenAPI 3.1 document of a server of this model, with these request schemas (request_schemas()),
    with an API key or without, and with nanotune's own top-level fields of a chat's answer (--docs's)."""
    secured = ["401"] if api_key else []
    security = {"security": [{"bearer": []}]} if api_key else {}
    models = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"enum": ["list"]}, "data": {"type": "array", "minItems": 1, "maxItems": 1}},
    }
    paths = {
        "/v1/completions": _generation("continue a prompt", "CompletionRequest", "Completion", secured),
        "/v1/chat/completions": _generation(
            "answer a conversation", "ChatCompletionRequest", "ChatCompletion", secured
        ),
        "/v1/models": {
            "get": {
                "summary": f"the one model served, {model_id}",
                "responses": {
                    "200": {"description": "the model list", "content": {"application/json": {"schema": models}}},
                    **_errors(*secured, "405"),
                },
            }
        },
        "/health": {
            "get": {
                "summary": "whether the server is up, and its batch (no API key needed)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "status, model, running, waiting, steps, faults",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors("405"),
                },
            }
        },
        "/": {
            "get": {
                "summary": "the chat page",
                "security": [],
                "responses": {
                    "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
                    **_errors("405"),
                },
            }
        },
    }
    for route in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
        for operation in paths[route].values():
            operation.update(security)
    components = {
        "schemas": {
            "CompletionRequest": schemas["completions"],
            "ChatCompletionRequest": schemas["chat"],
            "Completion": _answer("text", "text_completion"),
            "ChatCompletion": _answer("message", "chat.completion", chat_answer_fields),
            "Error": ERROR,
        }
    }
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    info = {"title": "nanotune", "version": "1", "description": "an OpenAI-compatible API (python -m nanotune.serve)"}
    return {"openapi": "3.1.0", "info": info, "paths": paths, "components": components}
