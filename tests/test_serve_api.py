"""nanotune.serve's API in detail, in process (FastAPI's TestClient and a started engine): log-probabilities as
evaluation harnesses read them, equal to nanotune's own teacher-forced ones; the request schema that the server
checks and /openapi.json publishes; refused fields; and a fault in one request failing that request alone."""

import json
import math
import threading

import pytest
import torch

import nanotune.serve.engine as engine_module
from nanotune.data.instruct import format_prompt, token_logprobs
from nanotune.generate import generate
from nanotune.model.gpt import GPT
from nanotune.serve.api_schema import ApiError, request_schemas
from nanotune.serve.engine import Engine, Request
from nanotune.serve.openai_api import parse_body
from nanotune.serve.server import Limits, create_app
from nanotune.tokenizer import load_tokenizer

ARGS = type("Args", (), {"max_tokens": 8, "max_batch": 4, "max_request_bytes": 100_000, "max_queue": 8})


@pytest.fixture(scope="module")
def local(tiny):
    return GPT.from_pretrained(tiny).eval(), load_tokenizer()


@pytest.fixture(scope="module")
def http(local):
    """The app around a started engine (the alpaca template for chats), in this process."""
    from fastapi.testclient import TestClient

    model, enc = local
    engine = Engine(model, enc, max_batch=ARGS.max_batch, max_queue=ARGS.max_queue)
    engine.start()
    try:
        yield TestClient(create_app(engine, enc, "tiny", "alpaca", Limits(ARGS, 256)))
    finally:
        engine.stop()


def teacher_forced(model, ids: list[int]) -> list[float]:
    """nanotune's own log p(ids[i] | ids[:i]) for i >= 1: one forward, as training scores tokens."""
    x = torch.tensor([ids])
    with torch.no_grad():
        return token_logprobs(model(x)[:, :-1], x[:, 1:])[0].tolist()


def completion(http, **body) -> dict:
    r = http.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---- log-probabilities


def test_echo_logprobs_as_lm_eval_asks_equal_teacher_forced_logprobs(http, local):
    model, enc = local
    prompts = [enc.encode_ordinary("The king of Lilliput said"), enc.encode_ordinary("a \U0001f30a river")]
    # lm-eval's loglikelihood request, word for word (a batch of token-id lists)
    body = {"prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    answer = completion(http, **body)
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, answer["choices"]):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(prompt) + 1  # the prompt, then one new token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # (nothing before the first)
        expected = teacher_forced(model, prompt + [int(generate(model, [prompt], 1, temperature=0)[0][-1])])
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], expected)) < 1e-4
        assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
        # greedy: the new token is the top one, its log-prob the top's exactly (lm-eval's is_greedy compares them)
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
        assert choice["text"].startswith(enc.decode(prompt)) and len(choice["text"]) > len(enc.decode(prompt))
        text = choice["text"]  # each token's text where its offset says
        whole = [(o, t) for o, t in zip(lp["text_offset"], lp["tokens"]) if not t.startswith("bytes:")]
        assert len(whole) >= 3 and all(text[o : o + len(t)] == t for o, t in whole)
        assert lp["text_offset"][0] == 0 and lp["text_offset"][-1] == len(enc.decode(prompt))
    # (a character split across tokens is written as OpenAI writes it)
    assert any(t.startswith("bytes:\\x") for t in answer["choices"][1]["logprobs"]["tokens"])


def test_max_tokens_0_with_echo_scores_the_prompt_alone_even_one_that_fills_the_context(http, local):
    model, enc = local
    prompt = (enc.encode_ordinary("It was a dark and stormy night. ") * 40)[:256]  # the whole context
    answer = completion(http, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    lp = answer["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 256 and answer["usage"]["completion_tokens"] == 0
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], teacher_forced(model, prompt))) < 1e-4
    assert lp["top_logprobs"][1:] == [{}] * 255  # logprobs 0: no alternatives
    assert answer["choices"][0]["text"] == enc.decode(prompt) and answer["choices"][0]["finish_reason"] == "length"
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "echo": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("max_tokens must be at least 1, or 0 with")


def test_logprobs_of_generated_tokens_streamed_or_not_and_their_alternatives(http, local):
    model, enc = local
    prompt = enc.encode_ordinary("Once upon a time")
    whole = completion(http, prompt=prompt, max_tokens=6, logprobs=3, temperature=0)["choices"][0]
    lp = whole["logprobs"]
    new = generate(model, [prompt], 6, temperature=0)[0][len(prompt) :]
    assert lp["tokens"] == [enc.decode([t]) for t in new] and whole["text"] == enc.decode(new)
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"], teacher_forced(model, prompt + new)[-6:])) < 1e-4
    assert all(len(top) == 3 and max(top.values()) == x for top, x in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"][0] == len("Once upon a time")  # offsets into the prompt + completion, as OpenAI's
    r = http.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 6, "logprobs": 3, "temperature": 0, "stream": True},
    )
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    streamed = [t for c in chunks for t in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]


def test_chat_logprobs_in_openais_chat_shape(http, local):
    model, enc = local
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Name a river."}], "temperature": 0}
    r = http.post("/v1/chat/completions", json={**body, "max_tokens": 5, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    prompt = enc.encode_ordinary(format_prompt({"instruction": "Name a river."}, "alpaca"))
    new = generate(model, [prompt], 5, temperature=0)[0][len(prompt) :]
    assert [c["token"] for c in content] == [enc.decode([t]) for t in new]
    assert [bytes(c["bytes"]) for c in content] == [enc.decode_single_token_bytes(t) for t in new]
    expected = teacher_forced(model, prompt + new)[-5:]
    assert max(abs(c["logprob"] - e) for c, e in zip(content, expected)) < 1e-4
    assert all(len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] == c["logprob"] for c in content)
    plain = http.post("/v1/chat/completions", json={**body, "max_tokens": 5}).json()
    assert plain["choices"][0]["logprobs"] is None  # not asked: null, as OpenAI's
    r = http.post("/v1/chat/completions", json={**body, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


# ---- what a request may hold: one schema, checked and published


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "field, value",
    [
        ("logit_bias", {}),
        ("tools", []),
        ("user", "me"),
        ("suffix", ""),
        ("response_format", {"type": "text"}),
        ("logit_bias", None),
        ("top_k", 5),
        ("stream_options.continuous_usage_stats", True),
    ],
)
def test_a_field_the_server_does_not_support_is_refused_whatever_its_value(http, endpoint, field, value):
    body = {"model": "tiny", "max_tokens": 2}
    body |= {"prompt": "Hi"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    if "." in field:
        body["stream_options"] = {field.split(".")[1]: value}
    else:
        body[field] = value
    r = http.post(endpoint, json=body)
    assert r.status_code == 400
    error = {"message": f"{field} is not supported by this server", "type": "invalid_request_error", "param": field}
    assert r.json()["error"] == error | {"code": None}


@pytest.mark.parametrize(
    "body, param, message",
    [
        (
            {"max_tokens": 0},
            "max_tokens",
            "max_tokens must be at least 1, or 0 with echo: true (to score the prompt alone)",
        ),
        ({"seed": 1.5}, "seed", "seed must be an integer, got 1.5"),
        (
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0},
            "max_tokens",
            "max_tokens must be at least 1, got 0",
        ),
        ({"temperature": 2.5}, "temperature", "temperature must be at most 2, got 2.5"),
        ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty must be 0, got 0.5"),
        ({"n": True}, "n", "n must be an integer, got True"),
        ({"stop": ["a", ""]}, "stop[1]", "stop[1] must not be empty"),
        ({"prompt": [1, 50257]}, "prompt[1]", "prompt[1] must be at most 50256, got 50257"),
        (
            {"prompt": []},
            "prompt",
            "prompt must be a string, a list of 1 to 8 strings, a non-empty list of token ids "
            "or a list of 1 to 8 token-id lists",
        ),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages[0].role",
            "messages[0].role must be 'system' or 'user' or 'assistant', got 'tool'",
        ),
    ],
)
def test_bad_values_are_refused_in_plain_words(http, body, param, message):
    endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    body = {"model": "tiny", **({} if "messages" in body else {"prompt": "Hi"}), **body}
    r = http.post(endpoint, json=body)
    assert r.status_code == 400 and (r.json()["error"]["param"], r.json()["error"]["message"]) == (param, message)


def test_every_bound_the_schema_states_is_the_one_the_server_enforces():
    """For every numeric field: its minimum and maximum pass parse_body, one step beyond is refused."""
    schemas = request_schemas("tiny", 256, 4, 8, 8, 50257)
    for name, schema in schemas.items():
        chat = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True}  # (top_logprobs needs it)
        base = {
            "model": "tiny",
            **({"prompt": "Hi", "echo": True} if name == "completions" else chat),
        }  # (echo: max_tokens 0)
        bounded = {k: f for k, f in schema["properties"].items() if "minimum" in f}
        assert set(bounded) >= {"max_tokens", "temperature", "top_p", "n", "seed"}
        for key, field in bounded.items():
            step = 1 if "integer" in field["type"] else 0.01
            for value in (field["minimum"], field["maximum"]):
                parse_body(json.dumps({**base, key: value}).encode(), "tiny", schema)
            for value in (field["minimum"] - step, field["maximum"] + step):
                with pytest.raises(ApiError) as e:
                    parse_body(json.dumps({**base, key: value}).encode(), "tiny", schema)
                assert (e.value.status, e.value.param) == (400, key)
    assert schemas["completions"]["properties"]["n"]["maximum"] == 4 and "NaN" not in json.dumps(schemas)
    with pytest.raises(ApiError, match="not valid JSON"):  # (Python reads NaN; JSON has no such number)
        parse_body(b'{"model": "tiny", "prompt": "Hi", "temperature": NaN}', "tiny", schemas["completions"])
    assert not math.isnan(schemas["chat"]["properties"]["temperature"]["maximum"])


def test_openapi_json_publishes_the_schemas_the_server_checks(http):
    document = http.get("/openapi.json").json()
    schemas = request_schemas("tiny", 256, ARGS.max_batch, ARGS.max_tokens, ARGS.max_queue, 50257)
    assert document["components"]["schemas"]["CompletionRequest"] == schemas["completions"]
    assert document["components"]["schemas"]["ChatCompletionRequest"] == schemas["chat"]
    assert set(document["paths"]) == {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/"}
    errors = document["paths"]["/v1/completions"]["post"]["responses"]
    assert {"400", "404", "405", "413", "415", "429", "500"} <= set(errors)


def test_a_schema_keyword_the_checker_does_not_enforce_is_refused():
    from nanotune.serve.api_schema import _check_keywords

    with pytest.raises(ValueError, match="pattern"):
        _check_keywords({"type": "object", "properties": {"stop": {"type": "string", "pattern": "^a"}}})


# ---- a fault in one request fails that request alone


def test_a_fault_in_one_requests_decode_fails_it_alone_and_the_server_goes_on(local, monkeypatch):
    from fastapi.testclient import TestClient

    model, enc = local
    pick = engine_module.pick_tokens

    def faulty_pick(logits, temperature, *args):  # sampling at 0.5 fails (bad numbers, say), the rest works
        if temperature == 0.5:
            raise FloatingPointError("the sampling's numbers went bad (simulated)")
        return pick(logits, temperature, *args)

    monkeypatch.setattr(engine_module, "pick_tokens", faulty_pick)
    forward = model.forward

    def faulty_forward(idx, *args, **kwargs):  # a prompt that starts with token 999 fails in its prefill
        if idx.shape[1] > 1 and int(idx[0, 0]) == 999:
            raise MemoryError("the prompt did not fit (simulated)")
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", faulty_forward)
    engine = Engine(model, enc, max_batch=4)
    http = TestClient(create_app(engine, enc, "tiny", None, Limits(ARGS, 256)))
    prompt, texts, done = enc.encode_ordinary("A long greedy answer:"), [], threading.Event()
    engine.start()
    try:  # a greedy request decoding all along, in the same batch as the faulty ones
        engine.submit(Request(prompt, 60, lambda c, t, f, n: (texts.append(t), f and done.set()), temperature=0))
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "temperature": 0.5, "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["message"] == (
            "the model failed on this request: FloatingPointError: the sampling's numbers went bad (simulated)"
        )
        ended = threading.Event()  # (straight to the engine: a request lost by a dying engine would hang HTTP)
        lost = Request([999, 1, 2], 4, lambda c, t, f, n: f == "error" and ended.set())
        engine.submit(lost)
        assert ended.wait(30) and isinstance(lost.error, MemoryError)
        assert done.wait(60)
        assert "".join(texts) == enc.decode(generate(model, [prompt], 60, temperature=0)[0][len(prompt) :])
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "temperature": 1.0, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert http.get("/health").json()["status"] == "ok" and engine.faults == 2
    finally:
        engine.stop()
