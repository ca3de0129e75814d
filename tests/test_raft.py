"""Retrieval, RAG prompts, RAFT's examples and recipe, nanotune.qa's scores, --docs in generate and evaluate, and
experiments/raft.py --quick end to end, all on small collections and the tiny random model."""

import importlib.util
import json
import math
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import run_main
from hypothesis import given, settings
from hypothesis import strategies as st

import train_raft
from nanotune import GPT, load_tokenizer
from nanotune.data.chat import render
from nanotune.data.instruct import IGNORE, collate_masked, sft_loss
from nanotune.model.reward_model import RewardModel
from nanotune.qa import exact_match, final_answer, raft_example, read_questions, token_f1
from nanotune.retrieval import DOC_CLOSE, DOC_OPEN, Index, open_index, rag_content, rag_prompt_ids, recall_at_k

ROOT = Path(__file__).resolve().parent.parent
ENC = load_tokenizer()
CITIES = ["Arvenholm", "Belzora", "Cadrimoor", "Dunvalis", "Essmark", "Forlatha", "Gellwick", "Hosterun"]
JOBS = ["baker", "weaver", "tanner", "brewer", "mason", "potter", "miller", "cooper"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """24 people, one document each (two sentences: one passage), and a question about each one's town."""
    folder = tmp_path_factory.mktemp("world")
    (folder / "docs").mkdir()
    rng, questions = random.Random(0), []
    for i in range(24):
        person, city, job = f"Person{i:02d} Surname{i:02d}", rng.choice(CITIES), rng.choice(JOBS)
        (folder / "docs" / f"p{i:02d}.txt").write_text(f"{person} lives in {city}. {person} works as a {job}.\n")
        questions.append({"question": f"Where does {person} live?", "answer": city, "gold": f"p{i:02d}"})
    (folder / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return folder


# ---------------------------------------------------------------- the retriever


def test_a_known_query_returns_its_passage_and_the_saved_index_reloads_to_the_same_results(world, tmp_path):
    index = Index.build(ENC, world / "docs", 40)
    assert len(index.passages) == 24 and [p["id"] for p in index.passages][:2] == ["p00", "p01"]
    top = index.top_k("Where does Person07 Surname07 live?", 3)
    assert top[0][1] == "p07" and top[0][3] > top[1][3] >= 0  # its own passage first, ahead of the rest
    index.save(tmp_path / "index")
    again = open_index(tmp_path / "index", ENC)  # (a saved index: no collection is read)
    queries = [f"What does Person{i:02d} Surname{i:02d} do?" for i in range(24)] + ["weaver in Belzora"]
    assert [again.top_k(q, 5) for q in queries] == [index.top_k(q, 5) for q in queries]
    questions = read_questions(world / "q.jsonl", index)
    golds = [q["gold"] for q in questions]
    assert recall_at_k(index, [q["question"] for q in questions], golds, 1) == 1.0


def test_passages_hold_at_most_n_tokens_and_lose_no_word(tmp_path):
    text = " ".join(f"Sentence {i} tells of the river Vask and its {i * 7} mills." for i in range(30))
    text += " " + "x" * 400 + "."  # one sentence longer than a passage: cut by tokens
    (tmp_path / "book.md").write_text(text)
    index = Index.build(ENC, tmp_path, 24)
    assert max(len(ENC.encode_ordinary(p["text"])) for p in index.passages) <= 24
    assert [p["id"] for p in index.passages[:2]] == ["book#0", "book#1"]
    assert "".join("".join(p["text"].split()) for p in index.passages) == "".join(text.split())
    assert index.resolve(["book"], "q")[:3] == [0, 1, 2]  # a document's id names all its passages


def test_a_jsonl_collection_and_its_errors(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": 1, "text": "The Nile is long."}\n{"id": "b", "text": "Paris is in France."}\n')
    index = open_index(docs, ENC)
    assert index.top_k("where is Paris", 1)[0][1] == "b"
    (tmp_path / "empty").mkdir()
    for bad, message in [
        (tmp_path / "empty", "the collection is empty"),
        (tmp_path / "missing", "no such folder or file"),
    ]:
        with pytest.raises(Exception, match=message):
            open_index(bad, ENC)
    with pytest.raises(Exception, match="must be >= 1"):
        index.top_k("Paris", 0)


# ---------------------------------------------------------------- RAFT's examples


def spec(p, distractors, source):
    return types.SimpleNamespace(p=p, distractors=distractors, distractor_source=source)


@settings(max_examples=12, deadline=None)
@given(
    p=st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]),
    distractors=st.integers(0, 5),
    source=st.sampled_from(["random", "bm25"]),
    seed=st.integers(0, 2**16),
)
def test_raft_examples_keep_the_gold_with_frequency_p_and_train_only_the_answer(world, p, distractors, source, seed):
    index = Index.build(ENC, world / "docs", 40)
    questions = read_questions(world / "q.jsonl", index, need_gold=True)
    rng, n, kept = random.Random(seed), 300, 0
    for i in range(n):
        q = questions[i % len(questions)]
        ids, mask, chosen, keep = raft_example(ENC, q, index, spec(p, distractors, source), "plain", 256, rng)
        gold = set(q["gold"])
        assert len(chosen) == len(set(chosen)) == distractors + len(gold)  # never twice; the count never tells
        assert (gold <= set(chosen)) == keep and (keep or not gold & set(chosen))  # distractors are never gold
        kept += keep
        # the labels (what the loss reads) are the answer and <|endoftext|>, nothing of the prompt and passages
        _, labels = collate_masked([(ids, mask)], ENC.eot_token, "cpu")
        assert labels[labels != IGNORE].tolist() == ENC.encode_ordinary(q["answer"]) + [ENC.eot_token]
        prompt = ENC.decode(ids[: int(mask.argmax())].tolist())
        assert prompt.startswith("Instruction: ") and q["question"] in prompt
        assert prompt.count(DOC_OPEN) == len(chosen)
    # binomial bounds: 5 standard deviations either side of n p (a false alarm about once in 3 million)
    sd = math.sqrt(n * p * (1 - p))
    assert n * p - 5 * sd - 1e-9 <= kept <= n * p + 5 * sd + 1e-9, (kept, n * p)


def test_the_loss_on_answer_positions_alone_is_sfts_loss_on_every_position(tiny, world):
    index = Index.build(ENC, world / "docs", 40)
    questions, rng = read_questions(world / "q.jsonl", index), random.Random(1)
    rows = [raft_example(ENC, q, index, spec(0.8, 3, "random"), "plain", 256, rng)[:2] for q in questions[:6]]
    input_ids, labels = collate_masked(rows, ENC.eot_token, "cpu")
    model = GPT.from_pretrained(tiny)
    positions = train_raft.answer_positions(labels)
    assert len(positions) < labels.shape[1] // 2  # the head skips most of the passages
    full = sft_loss(model(input_ids), labels)
    assert sft_loss(model(input_ids, positions=positions), labels[:, positions]).item() == pytest.approx(full.item())


def test_bm25_distractors_are_the_hardest_non_gold_passages(world):
    index = Index.build(ENC, world / "docs", 40)
    q = read_questions(world / "q.jsonl", index)[3]
    chosen = raft_example(ENC, q, index, spec(1.0, 3, "bm25"), "plain", 256, random.Random(0))[2]
    hardest = [n for n, *_ in index.top_k(q["question"], 4) if n not in q["gold"]][:3]
    assert sorted(chosen) == sorted(q["gold"] + hardest)


# ---------------------------------------------------------------- prompts that fit


def test_a_too_long_set_of_passages_is_cut_by_whole_passages_with_a_warning(capsys):
    passages = [f"Passage {i}: " + " ".join(["lengthy words"] * 20) for i in range(8)]
    question, reserve = "Which passage is it?", 10
    layout = lambda k: render(ENC, [{"role": "user", "content": rag_content(question, passages[:k])}], "plain", True)[0]  # noqa: E731
    context = len(layout(3)) + reserve // 2  # three passages fit, but not with the answer's room
    ids, kept = rag_prompt_ids(ENC, question, passages, "plain", context, reserve)
    assert kept == 2 and len(ids) + reserve <= context  # the answer keeps its room
    # exactly the first `kept` passages, whole: the ids are the layout's own, not a cut of a longer prompt
    assert ids == layout(kept)
    assert ENC.decode(ids).count(DOC_CLOSE) == kept
    assert f"8 passages do not fit the context of {context}" in capsys.readouterr().err
    ids, kept = rag_prompt_ids(ENC, question, passages[:1], "plain", context, reserve)  # it fits: no warning
    assert kept == 1 and capsys.readouterr().err == ""
    with pytest.raises(Exception, match="the question alone takes"):
        rag_prompt_ids(ENC, question, passages, "alpaca", 30, reserve)


def test_exact_match_and_f1_read_the_final_answer():
    quoted = "##begin_quote## Ana lives in Belzora. ##end_quote## so she lives there. <ANSWER>: Belzora"
    assert final_answer(quoted) == "Belzora" and exact_match(quoted, "belzora.") == 1.0
    assert exact_match("The Quillon Guild", "Quillon guild") == 1.0 and exact_match("Belzora", "Essmark") == 0.0
    assert token_f1("Quillon Guild of Essmark", "the Quillon Guild") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("nothing", "Belzora") == 0.0


# ---------------------------------------------------------------- the recipe and the tools, on the tiny model


def test_train_raft_learns_saves_its_index_and_answers(tiny, world, tmp_path):
    out = tmp_path / "raft"
    argv = ["--model", tiny, "--data", str(world / "q.jsonl"), "--docs", str(world / "docs"), "--out", str(out)]
    argv += ["--steps", "12", "--lr", "3e-3", "--batch-size", "8", "--eval-every", "12", "--p", "0.5"]
    argv += ["--responses", "5", "--max-new-tokens", "4", "--save-every", "0"]
    train_raft.main(argv)
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "finished" and s["val_loss_after"] < s["val_loss_before"] - 1.0
    assert 0.3 <= s["gold_kept_share"] <= 0.7  # 96 draws at p = 0.5
    assert s["heldout"]["n"] == len((out / "responses.jsonl").read_text().splitlines())
    saved, built = Index.load(out / "index"), Index.build(ENC, world / "docs", 40)
    assert saved.top_k("Person05 Surname05", 3) == built.top_k("Person05 Surname05", 3)
    GPT.from_pretrained(out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--p", "1.5"], "argument --p: must lie in [0, 1], got 1.5"),
        (["--passages", "0"], "argument --passages: must be >= 1, got 0"),
        (["--docs", "EMPTY"], "the collection is empty"),
        (["--data", "BADGOLD"], "record 1: its gold passage 'p99' is not in the collection"),
    ],
)
def test_bad_raft_input_is_one_line(tiny, world, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"question": "a?", "answer": "b", "gold": "p01"}\n{"question": "c?", "answer": "d", "gold": "p99"}\n'
    )
    argv = [{"EMPTY": str(tmp_path / "empty"), "BADGOLD": str(bad)}.get(a, a) for a in argv]
    base = ["--model", tiny, "--data", str(world / "q.jsonl"), "--docs", str(world / "docs")]
    code = run_main(train_raft.main, base + ["--out", str(tmp_path / "out"), "--steps", "1"] + argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_generate_and_evaluate_put_the_retrieved_passages_into_the_prompt(tiny, world, tmp_path, shared):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanotune.generate",
            "--model",
            tiny,
            "--instruction",
            "Where does Person03 Surname03 live?",
        ]
        + ["--docs", str(world / "docs"), "--passages", "2", "--template", "plain", "--max-new-tokens", "3"]
        + ["--temperature", "0", "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    document = (world / "docs" / "p03.txt").read_text().strip()
    assert r.stdout.startswith(f"Instruction: {DOC_OPEN}{document}{DOC_CLOSE}\n{DOC_OPEN}")
    assert "passage p03 (BM25 score" in r.stderr
    from nanotune.evaluate import main as evaluate

    torch.manual_seed(7)
    RewardModel(GPT.from_pretrained(tiny)).save_pretrained(tmp_path / "judge")
    pairs = [{"prompt": q["question"], "response": q["answer"]} for q in map(json.loads, open(world / "q.jsonl"))]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    argv = ["--models", tiny, tiny, "--judge", str(tmp_path / "judge"), "--data", str(tmp_path / "pairs.jsonl")]
    argv += ["--all", "--n", "3", "--max-new-tokens", "2", "--docs", str(world / "docs"), "--passages", "2"]
    evaluate(argv + ["--template", "plain", "--out", str(tmp_path / "eval")])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "comparisons.jsonl").read_text().splitlines()]
    assert [row["passages"][0] for row in rows] == ["p00", "p01", "p02"]
    assert rows[0]["prompt"][-1]["content"].startswith(DOC_OPEN + (world / "docs" / "p00.txt").read_text().strip())


# ---------------------------------------------------------------- the experiment, end to end


def load_experiment():
    spec_ = importlib.util.spec_from_file_location("raft_experiment", ROOT / "experiments" / "raft.py")
    experiment = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(experiment)
    return experiment


@pytest.mark.parametrize("passage_tokens", [16, 24, 40])
def test_the_generated_worlds_gold_passage_states_the_answer_and_held_out_entities_are_never_trained(
    tmp_path, passage_tokens
):
    experiment = load_experiment()
    args = experiment.parse_args(["--out", str(tmp_path), "--entities", "40", "--passage-tokens", str(passage_tokens)])
    experiment.write_world(args, tmp_path, ENC)
    index = Index.build(ENC, tmp_path / "docs", passage_tokens)  # as every run and measurement indexes it
    train, test = (read_questions(tmp_path / f"{name}.jsonl", index) for name in ("train", "test"))
    for q in train + test:
        (gold,) = q["gold"]
        assert q["answer"] in index.passages[gold]["text"], (q, index.passages[gold])
    documents = lambda qs: {index.passages[q["gold"][0]]["doc"] for q in qs}  # noqa: E731
    assert not documents(train) & documents(test) and len(documents(test)) >= 8


def test_the_experiment_quick_runs_end_to_end_and_every_point_is_its_command(tiny, tmp_path, shared):
    experiment = load_experiment()
    out = tmp_path / "exp"
    argv = ["--quick", "--model", tiny, "--out", str(out), "--steps", "2", "--entities", "16", "--test-questions", "6"]
    argv += [
        "--mix-steps",
        "2",
        "--instruction-limit",
        "40",
        "--windows",
        "4",
        "--corpus",
        str(shared / "data" / "corpus"),
    ]
    argv += ["--instruction-data", str(shared / "data" / "instruction-data.json")]
    experiment.main(argv)
    results = json.loads((out / "raft.json").read_text())
    points, table = results["points"], (out / "raft.md").read_text()
    models = {p["model"] for p in points}
    assert models == {"nano + RAG", "SFT closed book", "SFT closed book + RAG", "RAFT p=1 + RAG", "RAFT p=0.5 + RAG"}
    assert len(points) == 1 + 4 * 3 and (out / "raft.svg").is_file()
    gold = [p for p in points if p["setting"] == "top-3 + gold"]
    assert all(p["gold_in_prompt"] == 1.0 for p in gold)  # forced in, every time
    assert {p["gold_in_prompt"] for p in points if p["setting"] == "no passages"} == {0.0}
    for p in points:  # every cell of the table is its point's number, beside its command
        assert f"{p['exact_match']:.1%} | {p['f1']:.3f} | {p['gold_in_prompt']:.1%} | `{p['command']}`" in table
    # and the command, run on its own, gives that number
    point = gold[-1]
    words = point["command"].split()[3:]  # (python -m nanotune.qa ...)
    r = subprocess.run([sys.executable, "-m", "nanotune.qa", *words, "--out", str(tmp_path / "q.json")], cwd=ROOT)
    assert r.returncode == 0
    again = json.loads((tmp_path / "q.json").read_text())
    assert (again["exact_match"], again["f1"]) == (point["exact_match"], point["f1"])
    tasks = {row["model"]: row for row in results["tasks"]}
    assert set(tasks["mixture"]) == {"model", "entities", "attribution", "instructions"}
    assert math.isfinite(tasks["instructions alone"]["instructions"]["val_ppl"])
