"""python -m nanotune.serve --docs: the prompt a chat's question reaches the engine with is retrieval's RAFT layout
for its top passages, token for token; the nanotune_passages extension lists them in BM25 order, only when asked
and only on a server with --docs (elsewhere refused as any unknown field); /openapi.json describes it there alone;
the real openai client reads it; bad flags are one-line errors."""

import json

import openai
import pytest
from helpers import run_main, serving

from nanotune.data.chat import render
from nanotune.model.gpt import GPT
from nanotune.retrieval import DOC_OPEN, Index, answer_reserve, fit_passages, rag_content, rag_prompt_ids
from nanotune.serve.documents import FIELD, Documents
from nanotune.serve.engine import Engine
from nanotune.serve.server import Limits, create_app
from nanotune.serve.server import main as serve_main
from nanotune.tokenizer import load_tokenizer

ENC = load_tokenizer()
ARGS = type("Args", (), {"max_tokens": 8, "max_batch": 4, "max_request_bytes": 100_000, "max_queue": 8})
TOWNS = ["Arvenholm", "Belzora", "Cadrimoor", "Dunvalis", "Essmark", "Forlatha"]
QUESTION = "Where does Person04 Surname04 live?"


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """12 people, one two-sentence document each (one passage), and one longer document (several passages)."""
    folder = tmp_path_factory.mktemp("docs")
    for i in range(12):
        person, town = f"Person{i:02d} Surname{i:02d}", TOWNS[i % len(TOWNS)]
        (folder / f"p{i:02d}.txt").write_text(f"{person} lives in {town}. {person} works as a baker.\n")
    (folder / "history.md").write_text(" ".join(f"In year {y} the river of {TOWNS[y % 6]} flooded." for y in range(9)))
    return folder


@pytest.fixture(scope="module")
def index(docs):
    return Index.build(ENC, docs, 40)


@pytest.fixture(scope="module")
def engine(tiny):
    engine = Engine(GPT.from_pretrained(tiny).eval(), ENC, max_batch=ARGS.max_batch, max_queue=ARGS.max_queue)
    engine.start()
    yield engine
    engine.stop()


def client(engine, documents=None, template="plain"):
    from fastapi.testclient import TestClient

    return TestClient(create_app(engine, ENC, "tiny", template, Limits(ARGS, 256), None, documents))


@pytest.fixture
def prompts(engine, monkeypatch):
    """The prompt of every request the engine is given, in order."""
    seen, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda r: (seen.append(r.prompt), submit(r))[1])
    return seen


def chat(http, messages, **body):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 2, **body})
    assert r.status_code == 200, r.text
    return r.json()


def ask(text):
    return [{"role": "user", "content": text}]


def test_a_chats_prompt_is_rafts_layout_for_its_question_and_top_passages(engine, index, prompts, capfd):
    http = client(engine, Documents(index, 3, "plain", 256, ARGS.max_tokens))
    answer = chat(http, ask(QUESTION), **{FIELD: True})
    top = index.top_k(QUESTION, 3)
    assert top[0][1] == "p04"  # (the question's own document first)
    expected, kept = rag_prompt_ids(ENC, QUESTION, [text for _, _, text, _ in top], "plain", 256, reserve=2)
    assert kept == 3 and prompts == [expected]
    # the same ids written out by hand: the three passages in <DOCUMENT> blocks, best first, then the question
    assert prompts[0] == render(ENC, ask(rag_content(QUESTION, [t for _, _, t, _ in top])), "plain", True)[0]
    assert ENC.decode(prompts[0]).startswith(f"Instruction: {DOC_OPEN}Person04 Surname04 lives in Essmark.")
    assert answer["usage"]["prompt_tokens"] == len(expected)
    # the extension lists exactly those passages, in BM25 order, with their texts and scores
    assert answer[FIELD] == [{"id": i, "text": t, "score": s} for _, i, t, s in top]
    assert [p["score"] for p in answer[FIELD]] == sorted((p["score"] for p in answer[FIELD]), reverse=True)
    # one line on stderr: the answer's id, each passage's id and score
    line = f"nanotune: {answer['id']} passages: " + ", ".join(f"{i} (BM25 {s:.2f})" for _, i, _, s in top)
    assert line + "\n" in capfd.readouterr().err


def test_an_earlier_conversation_stays_and_only_the_last_user_message_gets_passages(engine, index, prompts):
    http = client(engine, Documents(index, 2, "alpaca", 256, ARGS.max_tokens))
    before = [
        {"role": "system", "content": "Answer briefly."},
        *ask("Who bakes?"),
        {"role": "assistant", "content": "Many."},
    ]
    answer = chat(http, [*before, *ask(QUESTION)])
    texts = [text for _, _, text, _ in index.top_k(QUESTION, 2)]
    assert prompts == [fit_passages(ENC, before, QUESTION, texts, "alpaca", 256, 2)[1]]
    assert ENC.decode(prompts[0]).count(DOC_OPEN) == 2 and FIELD not in answer  # (not asked: not in the answer)
    # an answer begun after the question (rare, but kept, as without --docs): the passages still go before the question
    started = {"role": "assistant", "content": "In"}
    chat(http, [*ask(QUESTION), started])
    assert prompts[1] == render(ENC, [*ask(rag_content(QUESTION, texts)), started], "alpaca", True)[0]


def test_passages_give_way_whole_to_the_answers_max_tokens(engine, index, prompts, capfd):
    http = client(engine, Documents(index, 4, "plain", 256, ARGS.max_tokens))
    texts = [text for _, _, text, _ in index.top_k(QUESTION, 4)]
    one = render(ENC, ask(rag_content(QUESTION, texts[:1])), "plain", True)[0]
    max_tokens = 256 - len(one)  # room for the question and exactly one passage
    answer = chat(http, ask(QUESTION), max_tokens=max_tokens, temperature=0, **{FIELD: True})
    assert prompts == [one] and [p["text"] for p in answer[FIELD]] == texts[:1]
    assert "4 passages do not fit the context of 256" in capfd.readouterr().err
    # no max_tokens: the answer keeps --max-tokens, at most a quarter of the context (generate's answer_reserve)
    chat(http, ask(QUESTION), max_tokens=None)
    assert prompts[1] == rag_prompt_ids(ENC, QUESTION, texts, "plain", 256, answer_reserve(ARGS.max_tokens, 256))[0]
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": ask(QUESTION), "max_tokens": 250})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["message"].startswith("the question alone takes")


def test_a_stream_carries_the_passages_in_its_first_chunk_alone(engine, index):
    http = client(engine, Documents(index, 3, "plain", 256, ARGS.max_tokens))
    body = {"model": "tiny", "messages": ask(QUESTION), "max_tokens": 3, "stream": True, FIELD: True, "temperature": 0}
    r = http.post("/v1/chat/completions", json=body)
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert [p["id"] for p in chunks[0][FIELD]] == [i for _, i, _, _ in index.top_k(QUESTION, 3)]
    assert len(chunks) >= 2 and not any(FIELD in c for c in chunks[1:])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_the_field_is_refused_without_docs_as_any_unknown_field_and_by_completions_with_docs(engine, index, endpoint):
    body = {"model": "tiny", "max_tokens": 2, FIELD: True}
    body |= {"messages": ask(QUESTION)} if endpoint == "/v1/chat/completions" else {"prompt": QUESTION}
    r = client(engine).post(endpoint, json=body)
    error = {"message": f"{FIELD} is not supported by this server", "type": "invalid_request_error"}
    assert r.status_code == 400 and r.json()["error"] == error | {"param": FIELD, "code": None}
    if endpoint == "/v1/completions":  # with --docs too: a completion continues its prompt as it is
        r = client(engine, Documents(index, 3, "plain", 256, ARGS.max_tokens)).post(endpoint, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == FIELD
        assert r.json()["error"]["message"].startswith(f"{FIELD} is for /v1/chat/completions")


def test_openapi_describes_the_field_with_docs_and_only_then(engine, index):
    on = client(engine, Documents(index, 3, "plain", 256, ARGS.max_tokens)).get("/openapi.json").json()["components"]
    off = client(engine).get("/openapi.json").json()["components"]
    request, answer = on["schemas"]["ChatCompletionRequest"], on["schemas"]["ChatCompletion"]
    assert request["properties"][FIELD]["type"] == ["boolean", "null"] and FIELD not in request.get("required", [])
    item = answer["properties"][FIELD]["items"]
    assert item["required"] == ["id", "text", "score"] and FIELD not in answer["required"]
    assert FIELD not in on["schemas"]["CompletionRequest"]["properties"]
    assert FIELD not in json.dumps(off)
    # otherwise the same document
    for schemas in (on["schemas"], off["schemas"]):
        schemas["ChatCompletionRequest"]["properties"].pop(FIELD, None)
        schemas["ChatCompletion"]["properties"].pop(FIELD, None)
    assert on == off


def test_the_openai_client_reads_the_field_from_a_served_docs_run(tiny, docs, index, tmp_path):
    log = tmp_path / "server.log"
    with serving(tiny, log, "--name", "tiny", "--docs", str(docs), "--passages", "2", "--template", "plain") as url:
        ai = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        answer = ai.chat.completions.create(
            model="tiny", messages=ask(QUESTION), max_tokens=2, temperature=0, extra_body={FIELD: True}
        )
        plain = ai.chat.completions.create(model="tiny", messages=ask(QUESTION), max_tokens=2, temperature=0)
    top = index.top_k(QUESTION, 2)
    assert [p["id"] for p in answer.model_extra[FIELD]] == [i for _, i, _, _ in top]
    assert answer.choices[0].message.content == plain.choices[0].message.content and FIELD not in plain.model_extra
    assert answer.usage.prompt_tokens == len(rag_prompt_ids(ENC, QUESTION, [t for *_, t, _ in top], "plain", 256, 2)[0])
    text = log.read_text()
    assert f"chats get the top 2 of {len(index.passages)} passages" in text
    assert f"nanotune: {answer.id} passages: p04 (BM25 {top[0][3]:.2f})" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--passages", "2"], "error: --passages needs --docs"),
        (["--docs", "EMPTY"], "the collection is empty"),
        (["--docs", "MISSING"], "no such folder or file"),
    ],
)
def test_bad_docs_flags_are_one_line_errors(tiny, tmp_path, capsys, monkeypatch, argv, message):
    import nanotune.serve.server as server_module

    # refused before a model is loaded (a check that let it through would go on to serve, not end)
    monkeypatch.setattr(server_module, "load_model", lambda *args: pytest.fail("the bad flag was not refused"))
    (tmp_path / "EMPTY").mkdir()
    argv = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in argv]
    assert run_main(serve_main, ["--model", tiny, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error:") and "\n" not in err
