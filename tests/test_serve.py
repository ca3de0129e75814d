"""python -m nanotune.serve, driven as its users drive it: the real openai client against a server process on a
free localhost port, raw HTTP for what a client library would not send, and a headless Chromium on the chat page."""

import json
import os
import shutil
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from helpers import serving
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nanotune.data.chat import render_text
from nanotune.data.instruct import format_prompt
from nanotune.decoding import KVCache, onednn_bf16
from nanotune.generate import generate
from nanotune.lifecycle.folder import write_model_files
from nanotune.model.gpt import GPT
from nanotune.model.peft import PeftSpec, apply_peft
from nanotune.serve.engine import Engine, Request, TextStream
from nanotune.serve.server import Limits, chat_template, create_app
from nanotune.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    """The tiny model as an SFT run leaves it: its summary.json names the alpaca template."""
    path = tmp_path_factory.mktemp("sft")
    for f in Path(tiny).iterdir():
        shutil.copy(f, path / f.name)
    (path / "summary.json").write_text(json.dumps({"script": "train_sft.py", "args": {"template": "alpaca"}}))
    return path


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(model_dir, server_log):
    """A server process; yields its base URL. Its output goes to server_log (shown if it fails to come up)."""
    flags = ["--name", "tiny", "--api-key", KEY, "--max-tokens", "16", "--max-request-bytes", "100000"]
    with serving(model_dir, server_log, *flags) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model in this process: what the answers must equal."""
    return GPT.from_pretrained(model_dir).eval(), load_tokenizer()


def greedy(local, text: str, max_tokens: int) -> tuple[str, int]:
    """nanotune's own greedy continuation of text -> (its text, tokens generated)."""
    model, enc = local
    ids = enc.encode_ordinary(text)
    new = generate(model, [ids], max_tokens, temperature=0, eos_token=enc.eot_token)[0][len(ids) :]
    return enc.decode([t for t in new if t != enc.eot_token]), len(new)


def health(server) -> dict:
    return json.load(urllib.request.urlopen(server + "/health"))


def post(server, path, body: bytes, key=KEY, headers=(("Content-Type", "application/json"),)):
    """Raw HTTP: -> (status, parsed JSON)."""
    request = urllib.request.Request(server + path, body, {"Authorization": f"Bearer {key}", **dict(headers)})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


# ---- the OpenAI API, through the openai client


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_at_temperature_0_is_nanotunes_greedy_answer_in_the_sft_template(client, local):
    messages = [{"role": "user", "content": "Name three rivers."}]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    prompt = format_prompt({"instruction": "Name three rivers."}, "alpaca")
    text, n = greedy(local, prompt, 12)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")
    assert r.usage.prompt_tokens == len(local[1].encode_ordinary(prompt))
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (n, r.usage.prompt_tokens + n)


def test_completion_at_temperature_0_and_its_stream(client, local):
    text, n = greedy(local, "It was a dark and stormy night", 10)
    r = client.completions.create(model="tiny", prompt="It was a dark and stormy night", temperature=0, max_tokens=10)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (text, "length", n)
    chunks = list(
        client.completions.create(
            model="tiny", prompt="It was a dark and stormy night", temperature=0, max_tokens=10, stream=True
        )
    )
    assert len(chunks) > 2  # streamed piece by piece, not in one go
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streamed_chat_chunks_add_up_to_the_whole_answer(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=14)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == 14 and not chunks[-1].choices
    # as OpenAI's: every other chunk says "usage": null
    assert all("usage" in c.model_fields_set and c.usage is None for c in chunks[:-1])
    # with n 2, as OpenAI's: one choice per chunk, each choice opening with its own role chunk
    chunks = list(client.chat.completions.create(**kwargs, n=2, stream=True))
    assert all(len(c.choices) == 1 for c in chunks)
    assert [c.choices[0].index for c in chunks if c.choices[0].delta.role] == [0, 1]


def test_n_choices_and_seed(client):
    kwargs = dict(model="tiny", prompt="The king said", max_tokens=8, n=2, temperature=1.0, seed=7)
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # the seed makes it reproducible
    assert first.choices[0].text != first.choices[1].text  # each choice samples on its own
    assert first.usage.completion_tokens == 16
    greedy_two = client.completions.create(**{**kwargs, "temperature": 0})
    assert greedy_two.choices[0].text == greedy_two.choices[1].text


def test_stop_string_ends_the_answer_before_it(client, local):
    text, _ = greedy(local, "Once upon a time", 16)
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a piece from the middle of the greedy answer
    r = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=16, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="Once upon a time", temperature=0, max_tokens=16, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_default_max_tokens_is_the_servers(client):
    r = client.completions.create(model="tiny", prompt="A", temperature=0)
    assert r.usage.completion_tokens == 16  # --max-tokens 16


def test_eight_concurrent_clients_are_answered_correctly_and_decoded_together(client, local, server):
    prompts = [f"Chapter {i}. It was" for i in range(8)]
    answers, errors = {}, []

    def ask(i):
        try:
            r = client.completions.create(model="tiny", prompt=prompts[i], temperature=0, max_tokens=40)
            answers[i] = r.choices[0].text
        except Exception as e:  # (reported below; a thread's exception would vanish)
            errors.append(e)

    steps = health(server)["steps"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert answers == {i: greedy(local, p, 40)[0] for i, p in enumerate(prompts)}
    # 8 x 40 tokens: one at a time that is ~8 x 39 decode steps; joined into one batch, far fewer
    assert health(server)["steps"] - steps < 8 * 39 * 0.6


# ---- bad requests: OpenAI's error JSON and a 4xx status, and the server goes on


def test_bad_requests_get_openai_errors_and_the_server_goes_on(client, server):
    status, body = post(server, "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="Hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=300)  # the context is 256
    assert (e.value.body["code"], e.value.body["param"]) == ("context_length_exceeded", "max_tokens")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.body["code"] == "invalid_api_key"
    status, body = post(server, "/v1/completions", b'{"model": "tiny", "prompt": "' + b"a" * 200_000 + b'"}')
    assert status == 413 and "error" in body
    status, body = post(server, "/v1/completions", b'{"model": "tiny", "prompt": 3}')
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = post(server, "/v1/completions", b'{"model": "tiny", "prompt": "Hi"}', headers={})  # a form post
    assert status == 415 and "application/json" in body["error"]["message"]
    status, body = post(server, "/v1/completions", b'{"model": "tiny", "prompt": "Hi", "stream_options": 1}')
    assert status == 400 and body["error"]["param"] == "stream_options"
    r = client.completions.create(model="tiny", prompt="Still there?", temperature=0, max_tokens=3)
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_row(server, stream):
    body = json.dumps({"model": "tiny", "prompt": "Go on", "max_tokens": 250, "stream": stream, "temperature": 0})
    steps = health(server)["steps"]
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as s:
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        if stream:
            received = b""
            while b"data: " not in received:  # the headers, then the stream's first chunk
                received += s.recv(4096)
        else:
            while health(server)["running"] == 0:  # it is being decoded
                time.sleep(0.005)
    for _ in range(200):
        if health(server)["running"] == 0:
            break
        time.sleep(0.02)
    assert health(server)["running"] == 0
    assert health(server)["steps"] - steps < 200  # stopped well before its 250 tokens


def test_clients_that_leave_leave_no_traceback_in_the_log(server, server_log):
    """Leaving is ordinary: mid-body, mid-stream, mid-answer, abruptly (a TCP reset): the log says nothing of it
    but its access line, and the server goes on."""
    port = int(server.rsplit(":", 1)[1])
    body = json.dumps({"model": "tiny", "prompt": "Go on", "max_tokens": 200, "stream": True, "temperature": 0})
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n"
    for request, wait_for in ((head.format(500) + '{"model"', None), (head.format(len(body)) + body, b"data: ")):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
            s.sendall(request.encode())
            received = b""
            while wait_for and wait_for not in received:
                received += s.recv(4096)
            time.sleep(0.2)
    for _ in range(100):
        if health(server)["running"] == 0:
            break
        time.sleep(0.02)
    assert health(server)["running"] == 0
    assert post(server, "/v1/completions", b'{"model": "tiny", "prompt": "Hi", "max_tokens": 2}')[0] == 200
    log = server_log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


# ---- in process: the queue bound, the template, the text stream


def test_a_full_queue_answers_429(tiny):
    from fastapi.testclient import TestClient

    model, enc = GPT.from_pretrained(tiny), load_tokenizer()
    engine = Engine(model, enc, max_batch=1, max_queue=1)  # not started: requests wait
    args = type("Args", (), {"max_tokens": 4, "max_batch": 1, "max_request_bytes": 10_000, "max_queue": 1})
    http = TestClient(create_app(engine, enc, "tiny", None, Limits(args, 256)))
    engine.submit(Request([1], 4, emit=lambda *a: None))  # the one place in the queue
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"


def test_a_model_that_fails_mid_decode_fails_those_requests_with_a_500_and_the_server_goes_on(tiny):
    from fastapi.testclient import TestClient

    model, enc = GPT.from_pretrained(tiny), load_tokenizer()
    decode_step = model.decode_step

    def broken(*args):
        raise RuntimeError("out of memory (simulated)")

    model.decode_step = broken  # the prompt's forward works; the first decode step fails
    engine = Engine(model, enc)
    args = type("Args", (), {"max_tokens": 4, "max_batch": 8, "max_request_bytes": 10_000, "max_queue": 32})
    http = TestClient(create_app(engine, enc, "tiny", None, Limits(args, 256)))
    engine.start()
    try:
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "temperature": 0})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert (
            r.json()["error"]["message"] == "the model failed on this request: RuntimeError: out of memory (simulated)"
        )
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "stream": True})
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert "out of memory (simulated)" in json.loads(events[-1])["error"]["message"]  # as OpenAI streams errors
        assert "[DONE]" not in events
        assert http.get("/health").json() | {"steps": 0} == {
            "status": "ok",
            "model": "tiny",
            "running": 0,
            "waiting": 0,
            "steps": 0,
            "faults": 2,
        }
        model.decode_step = decode_step  # the fault passes: the same engine answers again
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "temperature": 0, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        engine.stop()


def test_chat_template_comes_from_the_model_folder(model_dir, tiny, tmp_path):
    assert chat_template(str(model_dir), "auto") == "alpaca"
    assert chat_template(tiny, "auto") is None  # no summary.json: a base model
    assert chat_template(str(model_dir), "none") is None and chat_template(tiny, "plain") == "plain"
    (tmp_path / "summary.json").write_text(json.dumps({"args": {"template": "alpaca", "prompt_source": "books"}}))
    assert chat_template(str(tmp_path), "auto") is None  # trained on book text, not instructions
    write_model_files(tmp_path, 256, "plain")  # a folder's chat_template.jinja wins over its summary.json
    assert chat_template(str(tmp_path), "auto") == "plain"
    write_model_files(tmp_path, 256, None)
    assert chat_template(str(tmp_path), "auto") is None  # a base model's: the transcript
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    transcript = render_text(messages, "transcript", add_generation_prompt=True)
    assert transcript == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    # an instruction template: each exchange as SFT trains it, each earlier answer ended by <|endoftext|>
    alpaca = render_text(messages, "alpaca", add_generation_prompt=True)
    hi, bye = (format_prompt({"instruction": text}) for text in ("Hi", "Bye"))
    assert alpaca == "Be brief.\n\n" + hi + "Hello.<|endoftext|>" + bye


@settings(max_examples=60, deadline=None)
@example(text=" hello there", stop=["lo", "he"])  # two stops in one token: the earlier in the text wins
@example(text="caf\u00e9 ol\u00e9", stop=["\u00e9 o"])  # (a character of two bytes)
@given(text=st.text(min_size=1, max_size=40), stop=st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_text_stream_sends_the_text_up_to_the_first_stop_and_never_part_of_a_stop(text, stop):
    enc = load_tokenizer()
    stream, sent, stopped = TextStream(enc, tuple(stop)), "", False
    for token in enc.encode_ordinary(text):
        piece, stopped = stream.feed(token)
        sent += piece
        if stopped:
            break
    if not stopped:
        sent += stream.finish()
    first = min((text.find(s) for s in stop if s in text), default=len(text))
    assert sent == text[:first]


def test_engine_rows_of_different_lengths_match_generate_alone(tiny):
    """The engine's core without HTTP: requests that join a running batch at different steps, each its own length,
    past the cache's 64-slot steps, one of them with two choices (rows copied from one prefill)."""
    model, enc = GPT.from_pretrained(tiny).eval(), load_tokenizer()
    engine = Engine(model, enc, max_batch=5)
    prompts = [enc.encode_ordinary(t) for t in ("A", "The quick brown fox jumps over", "Hello there, how", "x y")]
    budgets = [70, 50, 90, 30]
    done, texts, finished = threading.Event(), {}, set()

    def emit_for(i):
        def emit(choice, text, finish, n):
            texts[i, choice] = texts.get((i, choice), "") + text
            if finish:
                finished.add((i, choice))
                if len(finished) == len(prompts) + 1:
                    done.set()

        return emit

    engine.start()
    try:
        for i, p in enumerate(prompts):
            steps = engine.steps
            engine.submit(Request(p, budgets[i], emit_for(i), n=2 if i == 1 else 1, temperature=0))
            while engine.steps < steps + 3 and not done.is_set():  # the next one joins a few steps later
                time.sleep(0.001)
        assert done.wait(60)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        new = generate(model, [p], budgets[i], temperature=0, eos_token=enc.eot_token)[0][len(p) :]
        expected = enc.decode([t for t in new if t != enc.eot_token])
        assert texts[i, 0] == expected
    assert texts[1, 1] == texts[1, 0]


@pytest.mark.parametrize("prompt_tokens", [0, 5])
def test_requests_waiting_together_join_in_one_prefill_and_match_generate_alone(tiny, prompt_tokens):
    """Requests that wait while the engine is busy join the batch together: one forward over their prompts,
    left-padded to the longest (four lengths here, one request with two choices), so the last of them waits for
    one prefill instead of one per request before it; a request that scores its prompt joins alone. With prompt
    tuning the virtual tokens sit before each row's padding, as generate() places them. A short prompt keeps its
    own room in the context: beside a 200-token prompt, "A" still gets its 100 tokens of tiny's 256."""
    model, enc = GPT.from_pretrained(tiny).eval(), load_tokenizer()
    if prompt_tokens:
        model = apply_peft(model, PeftSpec(method="prompt", prompt_tokens=prompt_tokens), tiny).eval()
        with torch.no_grad():
            model.prompt.add_(torch.randn(model.prompt.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    prompts = [enc.encode_ordinary(t) for t in ("A", "The quick brown fox jumps over", "Hello there, how", "x y")]
    prompts.append(enc.encode_ordinary(" ".join(f"word{i}" for i in range(100)))[:200])
    budgets = [100, 20, 20, 20, 20]
    texts, ends, scored_prompt, finished = {}, {}, [], threading.Semaphore(0)
    prefills = []
    forward = model.forward
    model.forward = lambda idx, *a, **k: prefills.append(tuple(idx.shape)) or forward(idx, *a, **k)

    def emit_for(i):
        def emit(choice, text, finish, n, logprobs=None):
            texts[i, choice] = texts.get((i, choice), "") + text
            if logprobs and not n:
                scored_prompt.append(len(logprobs))
            if finish:
                ends[i, choice] = finish, n
                finished.release()

        return emit

    engine = Engine(model, enc, max_batch=6)
    for i, p in enumerate(prompts):  # queued before the engine runs: they wait together
        engine.submit(Request(p, budgets[i], emit_for(i), n=2 if i == 1 else 1, temperature=0, score_prompt=i == 3))
    engine.start()
    try:
        for _ in range(len(prompts) + 1):
            assert finished.acquire(timeout=60)
    finally:
        engine.stop()
    assert prefills == [(1, 2), (4, 200)]  # the scoring request alone, then the other four at once
    assert scored_prompt == [2]
    for i, p in enumerate(prompts):
        new = generate(model, [p], budgets[i], temperature=0, eos_token=enc.eot_token)[0][len(p) :]
        assert texts[i, 0] == enc.decode([t for t in new if t != enc.eot_token]), i
    assert texts[1, 1] == texts[1, 0]
    assert ends[0, 0] == ("length", 100)


def test_a_prompt_that_fails_its_prefill_fails_alone_when_it_arrived_with_others(tiny):
    """Requests prefilled together share a forward; when it fails, each tries again alone, so only the request
    whose own prompt fails (here: any forward that holds token 999) ends with an error."""
    model, enc = GPT.from_pretrained(tiny).eval(), load_tokenizer()
    forward = model.forward

    def fails_on_999(idx, *args, **kwargs):
        if (idx == 999).any():
            raise RuntimeError("out of memory (simulated)")
        return forward(idx, *args, **kwargs)

    model.forward = fails_on_999
    ends, finished = {}, threading.Semaphore(0)

    def emit_for(i):
        def emit(choice, text, finish, n):
            if finish:
                ends[i] = finish
                finished.release()

        return emit

    engine = Engine(model, enc, max_batch=4)
    prompts = [[464, 3290], [999, 318, 257], [40, 588, 11]]
    requests = [Request(p, 5, emit_for(i), temperature=0) for i, p in enumerate(prompts)]
    for request in requests:  # queued before the engine runs: they would join together
        engine.submit(request)
    engine.start()
    try:
        for _ in prompts:
            assert finished.acquire(timeout=60)
    finally:
        engine.stop()
    assert ends == {0: "length", 1: "error", 2: "length"}
    assert "out of memory (simulated)" in str(requests[1].error) and engine.faults == 1


def test_rows_added_from_left_padded_prompts_hold_their_real_keys_first_in_order(tiny):
    """KVCache.add_rows: each new row's real keys at its first slots, in order, the padding behind them masked;
    copies[i] rows for prompt row i."""
    model = GPT.from_pretrained(tiny).eval()
    prompts = KVCache(model, 2, 5, copy_head=False)
    prompts.k.normal_(generator=torch.Generator().manual_seed(0))
    prompts.v.normal_(generator=torch.Generator().manual_seed(1))
    prompts.valid[:] = torch.tensor([[False, False, True, True, True], [True] * 5])  # (3 and 5 real tokens)
    batch = KVCache(model, 0, 8, copy_head=False)
    assert batch.add_rows(prompts, 5, [2, 1]).tolist() == [0, 0, 1]
    assert batch.valid.tolist() == [[True] * 3 + [False] * 5] * 2 + [[True] * 5 + [False] * 3]
    for row, (prompt_row, real) in enumerate([(0, slice(2, 5)), (0, slice(2, 5)), (1, slice(0, 5))]):
        n = real.stop - real.start
        assert torch.equal(batch.k[:, row, :, :n], prompts.k[:, prompt_row, :, real])
        assert torch.equal(batch.v[:, row, :, :n], prompts.v[:, prompt_row, :, real])


@torch.no_grad()
def test_a_prompts_first_token_reads_the_batchs_copy_of_the_head(tiny, monkeypatch):
    """The prefill's cache shares the batch's copies of the tied head (made once for the server's life): on a CPU
    with oneDNN the first token's logits come from its packed copy, as every later step's do."""
    import nanotune.decoding as decoding
    from nanotune.serve.engine import Batch, Request

    model, reads = GPT.from_pretrained(tiny).eval(), []
    linear_packed = decoding.linear_packed
    monkeypatch.setattr(decoding, "linear_packed", lambda *a: reads.append(a[1]) or linear_packed(*a))
    batch = Batch(model, load_tokenizer(), packed=False, fail=lambda request, error: None)
    batch.join([Request([464, 3290, 318], 4, lambda *a, **k: None, temperature=0.0)])
    if decoding.onednn("cpu"):
        assert len(reads) == 1 and reads[0] is batch.cache.packed_head
    else:  # (elsewhere the (C, V) copy, for one row)
        assert reads == [] and batch.cache.head is not None
    expected = generate(model, [[464, 3290, 318]], 1, temperature=0)[0][-1]
    assert int(batch.logits.argmax(-1)) == expected


def test_engine_in_bfloat16_matches_generate_in_bfloat16(tiny):
    """--dtype bfloat16: the engine decodes as generate(dtype=bfloat16) does (packed bfloat16 weights on a CPU
    with the kernels), so its greedy answers are generate's."""
    model, enc = GPT.from_pretrained(tiny).eval(), load_tokenizer()
    engine = Engine(model, enc, dtype=torch.bfloat16)
    # prompts whose greedy answer from tiny differs between float32 and bfloat16 on a CPU with the kernels
    prompts = [enc.encode_ordinary(t) for t in ("in king and sea a", "once river the was upon")]
    texts, finished = {}, threading.Semaphore(0)

    def emit_for(i):
        def emit(choice, text, finish, n):
            texts[i] = texts.get(i, "") + text
            if finish:
                finished.release()

        return emit

    engine.start()
    try:
        for i, p in enumerate(prompts):
            engine.submit(Request(p, 24, emit_for(i), temperature=0))
        for _ in prompts:
            assert finished.acquire(timeout=60)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        new = generate(model, [p], 24, temperature=0, dtype=torch.bfloat16)[0][len(p) :]
        assert texts[i] == enc.decode(new)
        if onednn_bf16("cpu"):  # (elsewhere bfloat16 decoding on a CPU is float32's: nothing to tell apart)
            assert new != generate(model, [p], 24, temperature=0)[0][len(p) :]


def test_an_empty_api_key_is_refused(capsys):
    from nanotune.serve.server import main

    with pytest.raises(SystemExit) as e:
        main(["--api-key", " "])
    assert e.value.code == 2 and "--api-key is empty" in capsys.readouterr().err


# ---- the chat page in a real browser


def browser():
    """Headless Chromium through Selenium, or a skip that says why (never under CI=true: there it must run)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but chromium/chromedriver are missing (.ci/run installs Debian's packages)")
        pytest.skip("no chromium + chromedriver here (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_chat_page_streams_an_answer(server, client):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = browser()
    try:
        page.get(server + "/")
        page.find_element(By.ID, "key-label")  # the server wants a key: the page asks for it
        WebDriverWait(page, 20).until(lambda p: p.find_element(By.ID, "key-label").is_displayed())
        page.find_element(By.ID, "key").send_keys(KEY)
        page.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        WebDriverWait(page, 20).until(lambda p: p.find_element(By.ID, "model").text == "tiny")
        page.execute_script("document.getElementById('temperature').value = '0'")
        # count the answer's updates: streamed, it grows over several
        page.execute_script(
            "window.updates = 0; new MutationObserver(() => window.updates++)"
            ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})"
        )
        page.find_element(By.ID, "input").send_keys("Name three rivers.\n")

        def answered(n):  # the page shows n answers and can send again
            return lambda p: (
                p.find_element(By.ID, "send").is_enabled() and len(p.find_elements(By.CSS_SELECTOR, ".assistant")) == n
            )

        WebDriverWait(page, 60).until(answered(1))
        shown = page.execute_script("return document.querySelector('.assistant').textContent")
        expected = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Name three rivers."}], temperature=0
        )
        assert shown == expected.choices[0].message.content  # (tiny's greedy answer: 16 newlines)
        assert page.execute_script("return window.updates") > 3  # it grew piece by piece
        # a second turn, sampled: visible text, and the conversation holds both exchanges
        page.execute_script("document.getElementById('temperature').value = '1.5'")
        page.find_element(By.ID, "input").send_keys("And three mountains?\n")
        WebDriverWait(page, 60).until(answered(2))
        assert page.find_elements(By.CSS_SELECTOR, ".assistant")[1].text.strip()
        assert len(page.find_elements(By.CSS_SELECTOR, ".msg")) == 4
        assert not page.find_elements(By.CSS_SELECTOR, ".error")
        page.find_element(By.ID, "clear").click()
        assert page.find_elements(By.CSS_SELECTOR, ".msg") == []
    finally:
        page.quit()


def test_a_method_a_route_does_not_take_is_405_with_allow(server):
    for path, allowed in (("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST")):
        request = urllib.request.Request(server + path, method="TRACE")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request)
        assert e.value.code == 405 and e.value.headers["Allow"] == allowed
        assert json.load(e.value)["error"]["type"] == "invalid_request_error"


def test_a_request_without_max_tokens_gets_a_chats_length_or_what_the_context_leaves():
    from nanotune.serve.api_schema import request_schemas
    from nanotune.serve.openai_api import sampling_request
    from nanotune.serve.server import parse_args

    limits = Limits(parse_args([]), 256)  # the server's defaults, nano's context
    schema = request_schemas("tiny", 256, limits.max_n, limits.max_tokens, limits.max_prompts, 50257)["completions"]
    assert sampling_request({}, [1] * 10, limits, None, schema).max_tokens == 128
    assert sampling_request({}, [1] * 200, limits, None, schema).max_tokens == 56  # the context's room, if less
    assert sampling_request({"max_tokens": 200}, [1] * 10, limits, None, schema).max_tokens == 200  # honoured


def test_chat_content_parts_read_as_training_data_reads_them():
    from nanotune.serve.openai_api import ApiError, chat_prompt

    enc = load_tokenizer()
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "river."}]
    as_parts = chat_prompt({"messages": [{"role": "user", "content": parts}]}, "alpaca", enc)
    assert as_parts == chat_prompt({"messages": [{"role": "user", "content": "Name a river."}]}, "alpaca", enc)
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    for content, message in ((image, "content parts of type 'image_url'"), (7, "holds a int, expected text")):
        with pytest.raises(ApiError) as e:
            chat_prompt({"messages": [{"role": "user", "content": content}]}, "alpaca", enc)
        assert (e.value.status, e.value.param) == (400, "messages[0].content") and message in e.value.message
