"""python -m nanotune.evaluate (head to head with a reward-model judge) and python -m nanotune.generate."""

import json
import math
import subprocess
import sys

import pytest
import torch

from nanotune import GPT, load_tokenizer
from nanotune.data.instruct import format_prompt, load_splits, prompt_ids
from nanotune.evaluate import bootstrap_interval, main, normalized_score, win_rate
from nanotune.model.reward_model import PAD, RewardModel

N, NEW = 6, 4  # prompts and answer tokens: seconds on the tiny model


@pytest.fixture(scope="module")
def judge(tiny, tmp_path_factory):
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("judge")
    RewardModel(GPT.from_pretrained(tiny)).save_pretrained(folder)  # a judge with arbitrary but fixed tastes
    return folder


def evaluate(argv, tmp_path):
    main(argv + ["--out", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "comparisons.jsonl").read_text().splitlines()]
    return summary, rows


def test_identical_models_tie_exactly(tiny, judge, shared, tmp_path):
    data = shared / "data" / "instruction-data-with-preference.json"
    s, rows = evaluate(
        [
            "--models",
            tiny,
            tiny,
            "--judge",
            str(judge),
            "--data",
            str(data),
            "--n",
            str(N),
            "--max-new-tokens",
            str(NEW),
        ],
        tmp_path,
    )
    assert s["n"] == N and s["win_rate"] == 0.5 and s["win_rate_ci"] == [0.5, 0.5]
    a, b = s["per_model"].values()
    assert a["mean_normalized_score"] == b["mean_normalized_score"]
    # the prompts are the shared split's test prompts, the reference is the preference data's chosen answer,
    # and each reward is the judge's own on prompt + answer
    enc, rm = load_tokenizer(), RewardModel.from_pretrained(judge)
    test = load_splits([data], "preference", None, 1337)[2][:N]
    assert [r["record"] for r in rows] == [ex["record"] for ex in test]
    for row, ex in zip(rows, test):
        assert row["reference"] == ex["chosen"]
        name = s["models"][0]
        ids = prompt_ids(enc, ex, "alpaca") + enc.encode_ordinary(row[name]["answers"][0])
        with torch.no_grad():
            expected = rm(torch.tensor([ids])).item()
        assert row[name]["rewards"][0] == pytest.approx(expected, abs=1e-5)
        ref_ids = prompt_ids(enc, ex, "alpaca") + enc.encode_ordinary(ex["chosen"])
        with torch.no_grad():
            assert row["reference_reward"] == pytest.approx(rm(torch.tensor([ref_ids])).item(), abs=1e-5)


def forced(tiny, token, folder):
    """A copy of the tiny model whose greedy answer is `token` over and over: the final LayerNorm's bias moved
    far along that token's embedding makes its logit the largest at every position."""
    model = GPT.from_pretrained(tiny)
    with torch.no_grad():
        model.ln_f.bias += 1000 * model.wte.weight[token]
    model.save_pretrained(folder)
    return str(folder)


def test_a_judge_pleasing_copy_wins(tiny, judge, shared, tmp_path):
    data = shared / "data" / "instruction-data.json"
    enc, rm = load_tokenizer(), RewardModel.from_pretrained(judge)
    test = load_splits([data], "sft", None, 1337)[2][:N]

    def judged(token):  # the judge's rewards for an answer of NEW copies of token, as evaluate will see it
        answer = enc.decode([token] * NEW).strip()
        seqs = [prompt_ids(enc, ex, "alpaca") + enc.encode_ordinary(answer) for ex in test]
        width = max(map(len, seqs))
        with torch.no_grad():
            return rm(torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])).tolist()

    candidates = [262, 290, 317, 464, 612, 1110, 2068, 3290, 13, 11]  # common words and punctuation
    means = {t: sum(judged(t)) / N for t in candidates}
    best, worst = max(means, key=means.get), min(means, key=means.get)
    pleasing, plain = forced(tiny, best, tmp_path / "pleasing"), forced(tiny, worst, tmp_path / "plain")
    s, rows = evaluate(
        [
            "--models",
            pleasing,
            plain,
            "--judge",
            str(judge),
            "--data",
            str(data),
            "--n",
            str(N),
            "--max-new-tokens",
            str(NEW),
        ],
        tmp_path,
    )
    assert all(r[pleasing]["answers"][0] == enc.decode([best] * NEW).strip() for r in rows)  # forced as planned
    expected = (
        sum(1.0 if a > b + 1e-6 else 0.5 if abs(a - b) <= 1e-6 else 0.0 for a, b in zip(judged(best), judged(worst)))
        / N
    )
    assert s["win_rate"] == pytest.approx(expected) and s["win_rate"] > 0.5
    assert s["per_model"][pleasing]["mean_normalized_score"] > s["per_model"][plain]["mean_normalized_score"]
    low, high = s["win_rate_ci"]
    assert 0 <= low <= s["win_rate"] <= high <= 1


def test_answers_from_a_file_are_scored(judge, tmp_path):
    rows = [
        {
            "instruction": f"Question {i}?",
            "reference": "An answer.",
            "answers": {"x": f"Reply {i}.", "y": f"Reply {i}."},
        }
        for i in range(5)
    ]
    (tmp_path / "answers.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s, _ = evaluate(["--answers", str(tmp_path / "answers.jsonl"), "--judge", str(judge)], tmp_path)
    assert s["models"] == ["x", "y"] and s["win_rate"] == 0.5 and s["n"] == 5


def test_the_maths():
    assert normalized_score(2.0, 2.0) == 0.5 and normalized_score(1e4, 0.0) == 1.0 and normalized_score(-1e4, 0) == 0.0
    assert normalized_score(1.0, 0.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0 + 1e-7, 4.0, 0.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    low, high = bootstrap_interval([[1.0]] * 30 + [[0.0]] * 10, 2000, 0)  # 75% wins over 40 prompts
    se = math.sqrt(0.75 * 0.25 / 40)  # the normal approximation: 0.75 +- 1.96 se = [0.616, 0.884]
    assert low == pytest.approx(0.75 - 1.96 * se, abs=0.03) and high == pytest.approx(0.75 + 1.96 * se, abs=0.03)


def test_bad_input(tiny, judge, tmp_path, capsys):
    for argv, message in [
        (["--models", tiny, tiny, "--judge", tiny], "is not a reward model"),
        (["--judge", str(judge)], "give either --models A B"),
        (["--models", tiny, tiny, "--judge", str(judge), "--samples-per-prompt", "3"], "needs --temperature > 0"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(tmp_path / "e")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "none.json").write_text("[]")  # the 85/5/10 split leaves >= 1 test prompt for any record
    with pytest.raises(SystemExit):
        main(
            [
                "--models",
                tiny,
                tiny,
                "--judge",
                str(judge),
                "--data",
                str(tmp_path / "none.json"),
                "--out",
                str(tmp_path / "e"),
            ]
        )
    assert "none.json holds no examples" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "a", "answers": {"x": "1"}}))
    with pytest.raises(SystemExit):
        main(["--answers", str(tmp_path / "bad.jsonl"), "--judge", str(judge), "--out", str(tmp_path / "e")])
    assert "bad.jsonl: record 0 needs 'answers'" in capsys.readouterr().err


def test_generate_command(tiny):
    cmd = [
        sys.executable,
        "-m",
        "nanotune.generate",
        "--model",
        tiny,
        "--instruction",
        "Name a river.",
        "--temperature",
        "0",
        "--max-new-tokens",
        "5",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(format_prompt({"instruction": "Name a river.", "input": ""}))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.stdout == r.stdout  # greedy: the same text
    assert "RuntimeWarning" not in r.stderr
    r = subprocess.run(
        cmd[:5] + ["--prompt", "x", "--max-new-tokens", "0"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "argument --max-new-tokens: must be >= 1, got 0" in r.stderr


@pytest.mark.parametrize("flag, dtype", [("auto", None), ("float32", None), ("bfloat16", torch.bfloat16)])
def test_dtype_reaches_the_sampler(flag, dtype, tiny, judge, shared, tmp_path, monkeypatch):
    import nanotune.evaluate as evaluate_module

    seen, real_generate = [], evaluate_module.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs["dtype"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate", recording_generate)
    data = shared / "data" / "instruction-data-with-preference.json"
    argv = ["--models", tiny, tiny, "--judge", str(judge), "--data", str(data), "--n", "2", "--max-new-tokens", "3"]
    s, _ = evaluate(argv + ["--dtype", flag], tmp_path)
    assert s["n"] == 2 and seen == [dtype, dtype]  # auto on a CPU: float32 (bfloat16 only on a GPU that has it)
