"""python -m nanotune.serve: a model behind an OpenAI-compatible API, with a web chat page at /.

    python -m nanotune.serve --model out/sft             # then open http://127.0.0.1:8000
    python -m nanotune.serve --model out/dpo --api-key secret --port 8080

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true sends server-sent
events in OpenAI's chunk format), GET /health, and the chat page at /. Point any OpenAI client at it:
OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret" or anything). Requests are decoded together
(nanotune/engine.py): one that arrives while others generate joins their batch. Every bad request gets OpenAI's
error JSON and a 4xx status; the server goes on. FastAPI and uvicorn come with the `serve` extra.
"""

import asyncio
import hmac
import json
import signal
import threading
import time
import uuid
from pathlib import Path

import torch

from .engine import Engine, Request
from .flags import Parser, integer
from .instruct import format_chat
from .loader import load_model
from .tokenizer import load_tokenizer
from .utils import NanotuneError, die, pick_device

PAGE = Path(__file__).with_name("chat.html")


class ApiError(Exception):
    """A request the server turns down: answered as OpenAI's {"error": {...}} with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        error_type = kind.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


def chat_template(model_dir: str, flag: str) -> str | None:
    """The instruction template a chat is rendered with: --template, or with auto the one the model was trained
    with (its folder's summary.json: SFT, DPO, PPO and GRPO record it); None (a plain transcript) for a base
    model, a model trained on raw text, or one whose folder says nothing."""
    if flag != "auto":
        return None if flag == "none" else flag
    summary = Path(model_dir) / "summary.json"
    try:
        args = json.loads(summary.read_text()).get("args", {})
    except (OSError, ValueError):
        return None
    if args.get("prompt_source") == "books" or args.get("template") in (None, "raw"):
        return None
    return args["template"]


class Limits:
    """What one request may ask for (the flags of the same names)."""

    def __init__(self, args, context: int):
        self.context, self.max_tokens, self.max_n = context, args.max_tokens, args.max_batch
        self.max_request_bytes = args.max_request_bytes


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


def chat_prompt(body: dict, template: str | None) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}]: only text content is supported", f"messages[{i}].content")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text", f"messages[{i}].content")
        checked.append({"role": m["role"], "content": content})
    return format_chat(checked, template)


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


def create_app(engine: Engine, enc, model_id: str, template: str | None, limits: Limits, api_key: str | None = None):
    """The FastAPI app around a started engine."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="nanotune", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(http, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)  # unknown paths and methods answer in OpenAI's format too
    async def http_error(http, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def authorize(http: HttpRequest):
        given = http.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if api_key is not None and not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided (send it as Authorization: Bearer KEY)", None,
                           "invalid_api_key")  # fmt: skip

    async def read_json(http: HttpRequest) -> dict:
        """The request's JSON object, read only up to --max-request-bytes."""
        authorize(http)
        # JSON only, as FastAPI's own bodies: a web page cannot send that to this server without asking first (CORS)
        if http.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ApiError(415, "send the body as JSON, with the header Content-Type: application/json")
        data = b""
        async for chunk in http.stream():
            data += chunk
            if len(data) > limits.max_request_bytes:
                raise ApiError(413, f"the request is larger than {limits.max_request_bytes} bytes")
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

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text()

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.error is None else "error", "model": model_id, **engine.stats()}

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        authorize(http)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "nanotune"}]}

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        body = await read_json(http)
        prompt = enc.encode_ordinary(chat_prompt(body, template))
        # a transcript's answer ends where the model starts to write the user's next line
        return await complete(http, body, [prompt], "chat.completion", () if template else ("\nUser:",))

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await read_json(http)
        return await complete(http, body, completion_prompts(body, enc), "text_completion")

    async def complete(http: HttpRequest, body: dict, prompts: list[list[int]], kind: str, stop: tuple = ()):
        """Queue one engine request per prompt; answer with the whole completion or stream its chunks."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        requests = [sampling_request(body, prompt, limits, None) for prompt in prompts]  # all checked first
        for i, r in enumerate(requests):
            r.stop += stop
            base = i * r.n  # choice index = prompt index * n + the prompt's choice
            r.emit = lambda c, text, end, n, b=base: loop.call_soon_threadsafe(events.put_nowait, (b + c, text, end, n))
        if len(requests) > engine.max_queue:
            raise ApiError(400, f"at most {engine.max_queue} prompts in one request", "prompt")
        for r in requests:
            if not engine.submit(r):
                cancel(requests)
                raise ApiError(429, f"the server is busy ({engine.max_queue} requests waiting): try again later",
                               None, "queue_full")  # fmt: skip
        answer = Answer(kind, model_id, len(requests) * requests[0].n, sum(map(len, prompts)))
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream(answer, events, requests, usage), media_type="text/event-stream")
        check_at = loop.time() + 0.1
        while not answer.done():
            try:
                answer.add(*await asyncio.wait_for(events.get(), timeout=0.1))
            except asyncio.TimeoutError:
                pass
            if loop.time() >= check_at:  # ten times a second: is anybody still waiting? If not, free its rows
                check_at = loop.time() + 0.1
                if await http.is_disconnected():
                    cancel(requests)
                    return JSONResponse({}, status_code=499)
        if "error" in answer.finish:
            raise ApiError(500, engine_failure())
        return answer.whole()

    def engine_failure() -> str:
        if engine.error is None:
            return "the server is shutting down"
        return f"the model failed while decoding: {type(engine.error).__name__}: {engine.error}"

    async def stream(answer: Answer, events: asyncio.Queue, requests: list[Request], usage: bool):
        try:
            if answer.kind == "chat.completion":  # each choice opens with the assistant's role
                yield answer.sse([answer.chunk(i, "", None, role=True) for i in range(len(answer.text))])
            while not answer.done():
                index, text, finish, n = await events.get()
                if finish == "error":  # as OpenAI's streams report an error: an error object, then the end
                    yield f"data: {json.dumps(ApiError(500, engine_failure()).body())}\n\n"
                    return
                answer.add(index, text, finish, n)
                if text or finish:
                    yield answer.sse([answer.chunk(index, text, finish)])
            if usage:
                yield answer.sse([], usage=answer.usage())
            yield "data: [DONE]\n\n"
        finally:  # finished, or the client went away mid-stream: either way its rows leave the batch
            cancel(requests)

    return app


def cancel(requests: list[Request]):
    for r in requests:
        r.cancelled = True


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

    def sse(self, choices: list[dict], usage: dict | None = None) -> str:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"


def main(argv=None):
    """python -m nanotune.serve: serve a model to OpenAI clients and a web chat page.

    python -m nanotune.serve --model out/sft
    python -m nanotune.serve --model out/dpo --host 0.0.0.0 --api-key secret
    """
    p = Parser(main.__doc__, prog="python -m nanotune.serve")
    p.add_argument("--model", default="auto", help="auto, a preset, an output folder (LoRA ones too) or a file")
    p.add_argument("--name", default=None, help="the model's id in the API (default: the --model folder's name)")
    template = "how chat messages become a prompt: auto (the template the model was trained with, from its folder's "
    template += "summary.json; a plain User:/Assistant: transcript for a base model), alpaca, plain, none (transcript)"
    p.add_argument("--template", default="auto", choices=["auto", "alpaca", "plain", "none"], help=template)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=integer(1), default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 (default: no key)")
    p.add_argument("--max-batch", type=integer(1), default=8, help="answers decoded together (default 8)")
    p.add_argument("--max-queue", type=integer(1), default=32, help="requests waiting beyond that, then 429")
    p.add_argument("--max-tokens", type=integer(1), default=256, help="max_tokens of a request that gives none")
    p.add_argument("--max-request-bytes", type=integer(1), default=1_000_000, help="larger bodies get 413")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="decoding precision")
    args = p.parse_args(argv)
    if args.api_key is not None and not args.api_key.strip():
        die("--api-key is empty (an unset variable?): give a key, or leave the flag out to serve without one")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        die("python -m nanotune.serve needs FastAPI and uvicorn: pip install -e '.[serve]'")
    try:
        device = pick_device(args.device)
        model, name = load_model(args.model, device)
    except NanotuneError as e:
        die(str(e))
    model_id = args.name or (Path(name).name if Path(name).exists() else name)
    template = chat_template(name, args.template)
    enc = load_tokenizer()
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    engine = Engine(model, enc, max_batch=args.max_batch, max_queue=args.max_queue, dtype=dtype)
    limits = Limits(args, model.config.n_positions - model.n_virtual)
    app = create_app(engine, enc, model_id, template, limits, args.api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))

    def serve_http():
        try:
            server.run()
        finally:  # stopped, or could not start (say, the port is taken): the decoding ends too
            engine.stop()

    # HTTP in a thread, decoding in the main thread: there PyTorch's CPU kernels ran 1.4-2x faster than from
    # a second thread (python -m nanotune.bench_serve, nano on 2 cores)
    http = threading.Thread(target=serve_http, name="nanotune-http", daemon=True)
    http.start()
    layout = f"the {template} template" if template else "a plain User:/Assistant: transcript"
    print(f"nanotune: serving {model_id} (chat as {layout}) at http://{args.host}:{args.port}/ "
          f"(OpenAI API at /v1; Ctrl-C stops)", flush=True)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: engine.stop_soon())  # (Ctrl-C: KeyboardInterrupt) both end it cleanly
    try:
        engine.run()  # until SIGTERM, Ctrl-C, the HTTP server's end, or the model failing
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True  # (requests in flight are answered first: 500 if the model failed)
        http.join(timeout=10)
    if not server.started:
        die(f"could not serve on {args.host}:{args.port} (see above)")
    if engine.error is not None:  # a non-zero exit, for whatever supervises the server to restart it
        die(f"the model failed while decoding (traceback above): {type(engine.error).__name__}: {engine.error}")


if __name__ == "__main__":
    main()
