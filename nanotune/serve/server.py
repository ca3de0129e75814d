"""python -m nanotune.serve: a model behind an OpenAI-compatible API, with a web chat page at /.

    python -m nanotune.serve --model out/sft             # then open http://127.0.0.1:8000
    python -m nanotune.serve --model out/dpo --api-key secret --port 8080
    python -m nanotune.serve --model out/raft --docs out/raft/index   # chats answered from documents

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true sends server-sent
events in OpenAI's chunk format), GET /health, GET /openapi.json (every field each endpoint accepts: the schemas
of nanotune/serve/api_schema.py, which every request is checked against), and the chat page at /. Point any OpenAI
client at it: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret" or anything). Requests are decoded together
(nanotune/serve/engine.py): one that arrives while others generate joins their batch. Every bad request gets OpenAI's
error JSON and a 4xx status, a request the model fails on a 500; the server goes on. With --docs, each chat's
question gets retrieved passages before it (nanotune/serve/documents.py). FastAPI and uvicorn come with the
`serve` extra.
"""

import asyncio
import hmac
import json
import signal
import threading
from pathlib import Path

import torch

from ..flags import Parser, integer
from ..generate import add_docs_args
from ..lifecycle.folder import read_template
from ..model.loader import load_model
from ..retrieval import open_index
from ..tokenizer import load_tokenizer
from ..utils import NanotuneError, die, pick_device
from .api_schema import request_schemas
from .documents import ANSWER_FIELD, FIELD, REQUEST_FIELD, Documents, log_passages
from .engine import Engine, Request
from .openai_api import (
    Answer,
    ApiError,
    Limits,
    chat_messages,
    chat_prompt,
    completion_prompts,
    max_tokens_key,
    parse_body,
    sampling_request,
)
from .openapi import openapi_document

PAGE = Path(__file__).with_name("chat.html")


def chat_template(model_dir: str, flag: str) -> str | None:
    """The template a chat is rendered with: --template, or with auto the one the model was trained with (its
    folder's chat_template.jinja; for a folder saved before nanotune wrote one, its summary.json); None (a plain
    transcript) for a base model, a model trained on raw text, or one whose folder says nothing."""
    if flag != "auto":
        return None if flag == "none" else flag
    template = read_template(model_dir) if Path(model_dir).is_dir() else None
    if template is not None:
        return None if template == "transcript" else template
    try:
        args = json.loads((Path(model_dir) / "summary.json").read_text()).get("args", {})
    except (OSError, ValueError):
        return None
    if args.get("prompt_source") == "books" or args.get("template") in (None, "raw"):
        return None
    return args["template"]


def answer_errors_as_openai(app):
    """Every error the app gives in OpenAI's JSON: ours (ApiError), FastAPI's own (unknown paths and methods, with
    the headers HTTP asks for: 405 names the methods there are in Allow), and a client that left mid-body."""
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    @app.exception_handler(ApiError)
    async def api_error(http, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ClientDisconnect)  # the client left while sending its body: nobody to answer, nothing
    async def client_left(http, e: ClientDisconnect):  # wrong here (and no traceback in the log)
        return Response(status_code=499)

    @app.exception_handler(HTTPException)
    async def http_error(http, e: HTTPException):
        body = ApiError(e.status_code, str(e.detail)).body()
        return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))


def authorize(http, api_key: str | None):
    """401 unless the request carries the key (Authorization: Bearer KEY), when the server has one."""
    given = http.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if api_key is not None and not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(
            401, "Incorrect API key provided (send it as Authorization: Bearer KEY)", None, "invalid_api_key"
        )


async def read_body(http, max_bytes: int) -> bytes:
    """The request's body, JSON only, read only up to max_bytes (--max-request-bytes)."""
    # JSON only, as FastAPI's own bodies: a web page cannot send that to this server without asking first (CORS)
    if http.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ApiError(415, "send the body as JSON, with the header Content-Type: application/json")
    data = b""
    async for chunk in http.stream():
        data += chunk
        if len(data) > max_bytes:
            raise ApiError(413, f"the request is larger than {max_bytes} bytes")
    return data


def create_app(
    engine: Engine,
    enc,
    model_id: str,
    template: str | None,
    limits: Limits,
    api_key: str | None = None,
    documents: Documents | None = None,
):
    """The FastAPI app around a started engine; with documents (--docs), chats are answered from them."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import HTMLResponse, StreamingResponse

    app = FastAPI(title="nanotune", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    page_html = PAGE.read_text()  # read once, not on every visit
    schemas = request_schemas(
        model_id, limits.context, limits.max_n, limits.max_tokens, limits.max_prompts, enc.n_vocab
    )
    if documents is not None:  # the extension field exists only here: elsewhere refused as any unknown field
        schemas["chat"]["properties"][FIELD] = REQUEST_FIELD
    answer_fields = {FIELD: ANSWER_FIELD} if documents is not None else {}
    document = openapi_document(model_id, schemas, api_key is not None, answer_fields)
    app.openapi = lambda: document  # what the server checks (api_schema), not what FastAPI infers from the routes

    answer_errors_as_openai(app)

    async def read_json(http: HttpRequest, schema: dict) -> dict:
        authorize(http, api_key)
        return parse_body(await read_body(http, limits.max_request_bytes), model_id, schema)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.error is None else "error", "model": model_id, **engine.stats()}

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        authorize(http, api_key)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "nanotune"}]}

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        body = await read_json(http, schemas["chat"])
        passages = None
        if documents is None:
            prompt = chat_prompt(body, template or "transcript", enc)
        else:
            prompt, passages = documents.chat_prompt(enc, chat_messages(body), body.get(max_tokens_key(body)))
        # a transcript's answer ends where the model starts to write the user's next line
        return await complete(http, body, [prompt], "chat", () if template else ("\nUser:",), passages)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        try:
            body = await read_json(http, schemas["completions"])
        except ApiError as e:
            if documents is not None and e.param == FIELD:  # (no passages here: nanotune/serve/documents.py)
                raise ApiError(
                    400,
                    f"{FIELD} is for /v1/chat/completions: /v1/completions continues its prompt "
                    "as it is, without passages",
                    FIELD,
                ) from None
            raise
        return await complete(http, body, completion_prompts(body, enc), "completions")

    async def complete(
        http: HttpRequest,
        body: dict,
        prompts: list[list[int]],
        endpoint: str,
        stop: tuple = (),
        passages: list[dict] | None = None,
    ):
        """Queue one engine request per prompt; answer with the whole completion or stream its chunks (with
        --docs: passages, those put into a chat's prompt, logged and, when asked, in the answer)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        requests = [sampling_request(body, prompt, limits, None, schemas[endpoint]) for prompt in prompts]
        for i, r in enumerate(requests):
            r.stop += stop
            base = i * r.n  # choice index = prompt index * n + the prompt's choice

            def emit(choice, text, end, n, logprobs=None, b=base):
                loop.call_soon_threadsafe(events.put_nowait, (b + choice, text, end, n, logprobs))

            r.emit = emit
        for r in requests:
            if not engine.submit(r):
                cancel(requests)
                raise ApiError(
                    429,
                    f"the server is busy ({engine.max_queue} requests waiting): try again later",
                    None,
                    "queue_full",
                )
        kind = "chat.completion" if endpoint == "chat" else "text_completion"
        first = requests[0]
        answer = Answer(kind, model_id, prompts, first.n, enc, first.score_prompt, first.logprobs)
        if passages is not None:
            log_passages(answer.id, passages)
            if body.get(FIELD):
                answer.extra[FIELD] = passages
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream(answer, events, requests, usage, engine), media_type="text/event-stream")
        return await whole(http, answer, events, requests, engine)

    return app


async def whole(http, answer: Answer, events: asyncio.Queue, requests: list[Request], engine: Engine):
    """The answer when every choice has ended (499, its rows freed, if the client left before; 500 on a fault)."""
    from fastapi.responses import JSONResponse

    loop = asyncio.get_running_loop()
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
        raise ApiError(500, failure(engine, requests))
    return answer.whole()


async def stream(answer: Answer, events: asyncio.Queue, requests: list[Request], usage: bool, engine: Engine):
    """The server-sent events of an answer, chunk by chunk as the engine's pieces arrive."""
    try:
        if answer.kind == "chat.completion":  # each choice opens with the assistant's role
            for index in range(len(answer.text)):
                yield answer.sse([answer.chunk(index, "", None, role=True)], usage)
        while not answer.done():
            index, text, finish, n, logprobs = await events.get()
            if finish == "error":  # as OpenAI's streams report an error: an error object, then the end
                yield f"data: {json.dumps(ApiError(500, failure(engine, requests)).body())}\n\n"
                return
            text, scores = answer.add(index, text, finish, n, logprobs)
            if text or finish or scores:
                yield answer.sse([answer.chunk(index, text, finish, scores)], usage)
        if usage:
            yield answer.sse([], usage, final=True)
        yield "data: [DONE]\n\n"
    finally:  # finished, or the client went away mid-stream: either way its rows leave the batch
        cancel(requests)


def failure(engine: Engine, requests: list[Request]) -> str:
    """Why the engine answered "error": the model failed on this request, or the engine stopped."""
    error = next((r.error for r in requests if r.error is not None), None)
    if error is not None:
        return f"the model failed on this request: {type(error).__name__}: {error}"
    if engine.error is None:
        return "the server is shutting down"
    return f"the model failed while decoding: {type(engine.error).__name__}: {engine.error}"


def cancel(requests: list[Request]):
    for r in requests:
        r.cancelled = True


def parse_args(argv=None):
    p = Parser(main.__doc__, prog="python -m nanotune.serve")
    p.add_argument("--model", default="auto", help="auto, a preset, an output folder (LoRA ones too) or a file")
    p.add_argument("--name", default=None, help="the model's id in the API (default: the --model folder's name)")
    template = "how chat messages become a prompt: auto (the template the model was trained with, from its folder's "
    template += "chat_template.jinja; a plain User:/Assistant: transcript for a base model), alpaca, plain, none "
    template += "(transcript)"
    p.add_argument("--template", default="auto", choices=["auto", "alpaca", "plain", "none"], help=template)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=integer(1), default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 (default: no key)")
    p.add_argument("--max-batch", type=integer(1), default=8, help="answers decoded together (default 8)")
    p.add_argument("--max-queue", type=integer(1), default=32, help="requests waiting beyond that, then 429")
    # a chat's answer, not the whole context (nano's 256 tokens take 20-35 s on 2 CPU cores for one request)
    max_tokens = "max_tokens of a request that gives none (default 128, or what the context leaves if less)"
    p.add_argument("--max-tokens", type=integer(1), default=128, help=max_tokens)
    p.add_argument("--max-request-bytes", type=integer(1), default=1_000_000, help="larger bodies get 413")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="decoding precision")
    add_docs_args(p)  # chats only: /v1/completions continues its prompt as it is (nanotune/serve/documents.py)
    args = p.parse_args(argv)
    if args.passages is not None and args.docs is None:
        p.error("--passages needs --docs")
    return args


def main(argv=None):
    """python -m nanotune.serve: serve a model to OpenAI clients and a web chat page.

    python -m nanotune.serve --model out/sft
    python -m nanotune.serve --model out/dpo --host 0.0.0.0 --api-key secret
    python -m nanotune.serve --model out/raft --docs out/raft/index --passages 3
    """
    args = parse_args(argv)
    if args.api_key is not None and not args.api_key.strip():
        die("--api-key is empty (an unset variable?): give a key, or leave the flag out to serve without one")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        die("python -m nanotune.serve needs FastAPI and uvicorn: pip install -e '.[serve]'")
    enc = load_tokenizer()
    try:  # (the index first: a bad --docs is told before a model is loaded)
        index = open_index(args.docs, enc, args.passage_tokens) if args.docs is not None else None
        device = pick_device(args.device)
        model, name = load_model(args.model, device)
        template = chat_template(name, args.template)
    except NanotuneError as e:
        die(str(e))
    model_id = args.name or (Path(name).name if Path(name).exists() else name)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    engine = Engine(model, enc, max_batch=args.max_batch, max_queue=args.max_queue, dtype=dtype)
    limits = Limits(args, model.config.n_positions - model.n_virtual)
    documents = None
    if index is not None:
        k = args.passages or 3
        documents = Documents(index, k, template or "transcript", limits.context, limits.max_tokens)
        print(f"nanotune: chats get the top {k} of {len(index.passages)} passages of {args.docs}", flush=True)
    app = create_app(engine, enc, model_id, template, limits, args.api_key, documents)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))

    def serve_http():
        try:
            server.run()
        finally:  # stopped, or could not start (say, the port is taken): the decoding ends too
            engine.stop()

    # HTTP in a thread, decoding in the main thread: there PyTorch's CPU kernels ran 1.4-2x faster than from
    # a second thread (python -m nanotune.bench.serve, nano on 2 cores)
    http = threading.Thread(target=serve_http, name="nanotune-http", daemon=True)
    http.start()
    layout = f"the {template} template" if template else "a plain User:/Assistant: transcript"
    print(
        f"nanotune: serving {model_id} (chat as {layout}) at http://{args.host}:{args.port}/ "
        f"(OpenAI API at /v1; Ctrl-C stops)",
        flush=True,
    )
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
