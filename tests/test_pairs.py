"""python -m nanotune.pairs on a tiny random model and a letter:e reward: pairs that the reward really orders,
the right number of them, the same files from the same seed, and one-line errors for bad input."""

import contextlib
import json

import pytest
import torch
from helpers import run_main

from nanotune.model.loader import load_model
from nanotune.pairs import main, round_trips, sample_pairs
from nanotune.rewards import LetterShare
from nanotune.tokenizer import load_tokenizer

BOOK = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. "
) * 20


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer()


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    path = tmp_path_factory.mktemp("books") / "book.txt"
    path.write_text(BOOK)
    return str(path)


def argv(tiny, book, out, *extra):
    # short answers (4 tokens: shares of 0, 1/4, ... 1) make tied scores common, so the tie rule is exercised
    flags = ["--model", tiny, "--reward", "letter:e", "--k", "4", "--prompts", "8", "--prompt-len", "8"]
    flags += ["--max-new-tokens", "4", "--batch-size", "6", "--books", book, "--heldout-book", book]
    return flags + ["--device", "cpu", "--out", str(out), *extra]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tiny, book, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    assert run_main(main, argv(tiny, book, out)) == 0
    return out


def test_every_pair_is_ordered_by_the_reward(first_run, enc):
    pairs, summary = read_jsonl(first_run / "pairs.jsonl"), json.loads((first_run / "summary.json").read_text())
    assert pairs and summary["pairs"] == len(pairs)
    letter_share = LetterShare(enc, "e")
    changed = set()  # answer texts whose tokens, encoded again, score differently: they did not round-trip
    for record in pairs:
        assert record["chosen_score"] > record["rejected_score"]
        texts = (record["chosen"], record["rejected"])
        recorded = (record["chosen_score"], record["rejected_score"])
        # what DPO will read: the text tokenised again
        rescored = letter_share([[], []], [enc.encode_ordinary(t) for t in texts]).tolist()
        for text, old, new in zip(texts, recorded, rescored):
            if abs(old - new) > 1e-6:
                changed.add((record["prompt"], text))
        if not changed & {(record["prompt"], t) for t in texts}:
            assert rescored[0] > rescored[1]
    assert len(changed) <= summary["answers_not_round_trip"] < summary["prompts"] * summary["k"] // 2
    ranked = read_jsonl(first_run / "responses.jsonl")
    assert summary["ranked_prompts"] == len(ranked) == summary["prompts"] - summary["prompts_without_pair"]


def test_pair_counts_per_prompt(tiny, enc):
    policy, _ = load_model(tiny, torch.device("cpu"), quiet=True)
    prompts = [enc.encode_ordinary(text) for text in BOOK.split(". ")[:6]]  # prompts of different lengths
    k, letter_share = 4, LetterShare(enc, "e")

    def sample(mode):
        generator = torch.Generator().manual_seed(0)  # the same answers for both modes
        common = dict(eos=enc.eot_token, ctx=contextlib.nullcontext(), batch_size=5, generator=generator, show=False)
        return sample_pairs(policy, prompts, letter_share, k, 4, mode=mode, **common)

    everything, extremes = sample("all"), sample("best-worst")
    assert any(len(set(g.scores)) < k for g in everything), "no tied scores: the test does not test the tie rule"
    for g, h in zip(everything, extremes):
        assert g.answers == h.answers and len(g.answers) == k
        assert g.scores == letter_share([g.prompt] * k, g.answers).tolist()
        distinct = [(i, j) for i in range(k) for j in range(i + 1, k) if g.scores[i] != g.scores[j]]
        assert len(g.pairs) == len(distinct)
        assert all(g.scores[c] > g.scores[r] for c, r in g.pairs + h.pairs)
        assert len(h.pairs) == (max(g.scores) != min(g.scores))
        if h.pairs:
            assert [g.scores[i] for i in h.pairs[0]] == [max(g.scores), min(g.scores)]


def test_round_trips_tells_tokens_that_encode_back_differently(enc):
    merged = enc.encode_ordinary(" there")
    assert len(merged) == 1 and round_trips(enc, merged)
    split = enc.encode_ordinary(" the") + enc.encode_ordinary("re")  # decodes to " there": one token again
    assert not round_trips(enc, split)


def test_the_same_seed_gives_the_same_files_and_rankings_best_first(first_run, tiny, book, tmp_path):
    assert run_main(main, argv(tiny, book, tmp_path)) == 0
    for name in ("pairs.jsonl", "responses.jsonl"):
        assert (tmp_path / name).read_bytes() == (first_run / name).read_bytes(), name
    for record in read_jsonl(tmp_path / "responses.jsonl"):
        assert len(record["responses"]) == len(record["scores"]) >= 2
        assert all(a > b for a, b in zip(record["scores"], record["scores"][1:]))  # best first, no ties


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--k", "1"], "error: argument --k: must be >= 2, got 1"),
        (["--reward", "model:/no/such/reward-model"], "error: could not load the reward model /no/such"),
    ],
)
def test_bad_input_stops_with_one_line(tiny, book, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert run_main(main, argv(tiny, book, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()  # a run that wrote nothing leaves no folder


def test_an_existing_set_is_kept_without_overwrite(first_run, tiny, book, capsys):
    before = (first_run / "pairs.jsonl").read_bytes()
    assert run_main(main, argv(tiny, book, first_run)) == 2
    err = capsys.readouterr().err
    assert "already holds pairs" in err and err.count("\n") == 1, err
    assert (first_run / "pairs.jsonl").read_bytes() == before


def test_ctrl_c_while_sampling_is_one_line_and_exit_130(tiny, book, tmp_path, capsys, monkeypatch):
    import nanotune.pairs as pairs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pairs, "make_pairs", interrupted)
    out = tmp_path / "pairs"
    assert run_main(main, argv(tiny, book, out)) == 130
    err = capsys.readouterr().err
    assert err == f"interrupted: no pairs written to {out}\n" and not out.exists()  # the folder it made goes too
