"""The reward model (nanotune/model/reward_model.py) and train_reward.py: the loss maths, rankings -> pairs,
rewards that padding cannot change, transformers parity of the saved files, learning a preference, and bad records."""

import argparse
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import train_reward
from nanotune import GPT
from nanotune.data.formats import examples as read_examples
from nanotune.model.reward_model import PAD, RewardModel, last_token_index
from train_reward import reward_loss

rewards = st.floats(-1e4, 1e4, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(rewards, rewards), min_size=1, max_size=8), st.none() | st.floats(-5, 5), st.floats(0, 2))
def test_reward_loss_equals_float64_reference(rows, margin, center_coef):
    chosen, rejected = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    loss = reward_loss(chosen, rejected, margin, center_coef)
    expected = 0.0
    for c, r in rows:
        d = c - r - (margin or 0.0)
        expected += (math.log1p(math.exp(-d)) if d > -30 else -d) / len(rows)  # -log sigmoid(d), stable
    expected += center_coef * sum((c + r) ** 2 for c, r in rows) / len(rows)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert torch.isfinite(loss)


def test_reward_loss_gradient_and_extremes():
    c = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    r = torch.zeros(3, requires_grad=True)
    reward_loss(c, r).backward()
    assert torch.isfinite(c.grad).all() and torch.all(c.grad <= 0) and torch.all(r.grad >= 0)
    assert reward_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def test_ranked_records_keep_their_order_and_preference_records_become_rankings_of_two():
    records = [
        {"instruction": "a", "responses": ["best", "good", "ok", "bad"]},
        {"prompt": "b", "chosen": "yes", "rejected": "no"},
    ]
    first, second = read_examples(records, "x", "ranked")
    assert first["responses"] == ["best", "good", "ok", "bad"] and first["record"] == 0
    assert second["responses"] == ["yes", "no"] and second["prompt"] == [{"role": "user", "content": "b"}]
    # K answers give K(K-1)/2 pairs (the count the end-to-end test below checks on a whole file)


def test_rewards_are_read_at_the_last_token_and_ignore_right_padding(tiny):
    torch.manual_seed(0)
    model = RewardModel(GPT.from_pretrained(tiny)).eval()
    a, b = torch.randint(0, 50000, (7,)), torch.randint(0, 50000, (4,))
    padded = torch.stack([a, torch.cat([b, torch.full((3,), PAD)])])
    assert last_token_index(padded).tolist() == [6, 3]
    with torch.no_grad():
        together = model(padded)
        assert torch.allclose(together[1], model(b[None])[0], atol=1e-6)
        assert torch.allclose(together[0], model(a[None])[0], atol=1e-6)
        more_padding = model(torch.cat([padded, torch.full((2, 5), PAD)], dim=1))
    assert torch.allclose(more_padding, together, atol=1e-6)


def test_saved_reward_model_loads_in_transformers_with_the_same_rewards(tiny, tmp_path):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(1)
    model = RewardModel(GPT.from_pretrained(tiny)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_labels"] == 1 and config["pad_token_id"] == PAD
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50000, (3, 12), generator=torch.Generator().manual_seed(0))
    idx[1, 8:], idx[2, 3:] = PAD, PAD  # right-padded rows
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits.squeeze(-1)
        assert (ours - theirs).abs().max() <= 1e-4
        assert torch.equal(RewardModel.from_pretrained(tmp_path)(idx), ours)


def test_a_folder_that_is_not_a_reward_model_is_refused(tiny):
    with pytest.raises(ValueError, match="is not a reward model"):
        RewardModel.from_pretrained(tiny)


def synthetic_rankings(n, seed=0):
    """Prompts whose answers, all the same length, are ranked by one word: learnable from the text alone."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        topic = rng.choice(["the weather", "a recipe", "the river", "a poem", "the market"])
        records.append(
            {
                "instruction": f"Tell me about {topic} ({i}).",
                "responses": [f"Excellent: {topic}.", f"Decent: {topic}.", f"Terrible: {topic}."],
            }
        )
    return records


def test_train_reward_learns_a_ranking_and_saves_a_transformers_reward_model(tiny, tmp_path):
    (tmp_path / "ranked.jsonl").write_text("\n".join(json.dumps(r) for r in synthetic_rankings(120)))
    out = tmp_path / "rm"
    train_reward.main(
        [
            "--model",
            tiny,
            "--data",
            str(tmp_path / "ranked.jsonl"),
            "--out",
            str(out),
            "--steps",
            "30",
            "--lr",
            "1e-3",
            "--batch-size",
            "4",
            "--eval-every",
            "15",
            "--max-len",
            "64",
        ]
    )
    s = json.loads((out / "summary.json").read_text())
    print(f"\nreward tiny: val accuracy {s['val_accuracy_before']:.3f} -> {s['val_accuracy_after']:.3f}")
    assert s["train_pairs"] == 102 * 3 and s["val_pairs"] == 6 * 3  # 120 prompts: 85% / 5% split, K=3 -> 3 pairs
    assert s["val_accuracy_after"] == 1.0 and s["val_margin_after"] > s["val_margin_before"] + 0.5
    model = RewardModel.from_pretrained(out)
    from nanotune import load_tokenizer
    from nanotune.data.instruct import format_prompt

    enc = load_tokenizer()
    prompt = enc.encode_ordinary(format_prompt({"instruction": "Tell me about the sea (999).", "input": ""}))
    good, bad = (torch.tensor([prompt + enc.encode_ordinary(t)]) for t in ("Excellent: the sea.", "Terrible: the sea."))
    with torch.no_grad():
        assert model(good).item() > model(bad).item()


def test_bad_ranked_records_are_named(tiny, tmp_path, capsys):
    for records, message in [
        ([{"instruction": "a", "responses": ["only one"]}], "record 0: 'responses' must list at least 2 answers"),
        (
            [{"instruction": "a", "chosen": "x", "rejected": "y"}, {"instruction": "b", "chosen": "x"}],
            "record 1 has neither 'responses' nor both 'chosen' and 'rejected'",
        ),
        ([{"responses": ["x", "y"]}], "record 0 has no 'instruction'"),
    ]:
        (tmp_path / "bad.json").write_text(json.dumps(records))
        with pytest.raises(SystemExit) as e:
            train_reward.main(["--model", tiny, "--data", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "bad.json: " + message in err, err
    assert not (tmp_path / "o").exists()


def test_lora_reward_model_trains_adapters_and_head_on_a_frozen_body_and_saves_it_merged(tiny, tmp_path):
    (tmp_path / "ranked.jsonl").write_text("\n".join(json.dumps(r) for r in synthetic_rankings(120)))
    out = tmp_path / "rm"
    argv = ["--model", tiny, "--data", str(tmp_path / "ranked.jsonl"), "--out", str(out), "--steps", "30"]
    argv += ["--lr", "1e-2", "--batch-size", "4", "--eval-every", "15", "--max-len", "64", "--peft", "lora"]
    train_reward.main(argv)
    s = json.loads((out / "summary.json").read_text())
    assert s["val_accuracy_after"] == 1.0 and s["val_margin_after"] > s["val_margin_before"] + 0.5
    # one file, the merged model: the adapted layer (c_attn) moved, every other body weight is the base's
    assert not (out / "lora").exists() and not (out / "score.safetensors").exists()
    model, base = RewardModel.from_pretrained(out), GPT.from_pretrained(tiny)
    assert not torch.equal(model.body.h[0].attn.c_attn.weight, base.h[0].attn.c_attn.weight)
    assert all(torch.equal(model.body.state_dict()[k], v) for k, v in base.state_dict().items() if "c_attn" not in k)
    from transformers import GPT2ForSequenceClassification

    hf = GPT2ForSequenceClassification.from_pretrained(out).eval()
    idx = torch.randint(0, 50000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits.squeeze(-1)).abs().max() <= 1e-4


def test_answers_fit_max_len_the_models_input(shared):
    # the whole prompt + answer is the reward model's input: at most --max-len tokens (at --max-len 1024 on gpt2,
    # one more would not fit the context)
    from nanotune import load_tokenizer
    from nanotune.data.sources import read_records

    enc, path = load_tokenizer(), shared / "data" / "instruction-data-with-preference.json"
    examples = read_examples(read_records(path, 200), path, "ranked")
    args = argparse.Namespace(max_len=96, template="alpaca")
    rankings, truncated = train_reward.encode_rankings(enc, examples, args)
    lengths = [len(answer) for answers, _ in rankings for answer in answers]
    assert max(lengths) == 96 and truncated > 0


def test_validation_loss_is_the_training_loss_center_term_included(tiny, tmp_path):
    (tmp_path / "ranked.jsonl").write_text("\n".join(json.dumps(r) for r in synthetic_rankings(40)))
    val_loss = {}
    for coef in ("0", "4"):
        out = tmp_path / f"rm-{coef}"
        argv = ["--model", tiny, "--data", str(tmp_path / "ranked.jsonl"), "--out", str(out), "--steps", "0"]
        train_reward.main(argv + ["--max-len", "64", "--center-coef", coef])
        (before,) = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["step"] == 0]
        val_loss[coef] = before["val_loss"]
    # the same untrained model: the difference is 4 x mean((r_chosen + r_rejected)^2) of its random rewards
    assert val_loss["4"] > val_loss["0"] + 1e-4, val_loss
