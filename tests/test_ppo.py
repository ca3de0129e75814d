"""train_ppo.py: its maths against float64 Python loops (hypothesis), then the recipe end to end on the tiny
model: the score rises on a programmatic reward, every reward kind runs, and bad input stops with one line."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_main
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import nanotune.rollout
import train_ppo
from nanotune import GPT, GPTConfig
from nanotune.model.reward_model import RewardModel
from train_ppo import (
    adaptive_kl_coef,
    explained_variance,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)

finite = st.floats(-5, 5, allow_nan=False, width=32)


@st.composite
def rollouts(draw, fields=2):
    """float32 arrays (B, L) and a mask with each answer on a prefix of its row (lengths 1..L)."""
    B, L = draw(st.integers(1, 5)), draw(st.integers(1, 9))
    lengths = draw(st.lists(st.integers(1, L), min_size=B, max_size=B))
    mask = np.array([[1.0 if t < n else 0.0 for t in range(L)] for n in lengths], dtype=np.float32)
    tensors = [draw(arrays(np.float32, (B, L), elements=finite)) for _ in range(fields)]
    return lengths, mask, tensors


def t(x):
    return torch.tensor(x)


# ---------------------------------------------------------------- GAE


@settings(max_examples=200, deadline=None)
@given(rollouts(fields=2), st.floats(0, 1), st.floats(0, 1))
def test_gae_equals_a_python_loop_over_each_answer(data, gamma, lam):
    lengths, mask, (rewards, values) = data
    advantages, returns = gae(t(rewards), t(values), t(mask), gamma, lam)
    for b, n in enumerate(lengths):
        r, v = [float(x) for x in rewards[b, :n]], [float(x) for x in values[b, :n]]
        expected, running = [0.0] * n, 0.0
        for i in reversed(range(n)):
            next_value = v[i + 1] if i + 1 < n else 0.0  # the episode ends after the last answer token
            running = r[i] + gamma * next_value - v[i] + gamma * lam * running
            expected[i] = running
        assert advantages[b, :n].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert returns[b, :n].tolist() == pytest.approx([a + x for a, x in zip(expected, v)], rel=1e-4, abs=1e-4)
        assert not advantages[b, n:].any() and not returns[b, n:].any()  # nothing past the answer


def test_gae_with_lambda_one_and_no_values_is_the_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 9 is past the answer and must not count
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[6.0, 5.0, 3.0, 0.0]]


# ---------------------------------------------------------------- rewards and KL


@settings(max_examples=200, deadline=None)
@given(rollouts(fields=2), st.floats(0, 1))
def test_kl_penalized_rewards_put_the_score_on_the_last_answer_token(data, kl_coef):
    lengths, mask, (logps, ref_logps) = data
    scores = np.linspace(-1, 1, len(lengths)).astype(np.float32)
    rewards, kl = kl_penalized_rewards(t(scores), t(logps), t(ref_logps), t(mask), kl_coef)
    for b, n in enumerate(lengths):
        per_token = [float(logps[b, i]) - float(ref_logps[b, i]) for i in range(n)]
        expected = [-kl_coef * k for k in per_token]
        expected[-1] += float(scores[b])
        assert rewards[b, :n].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert not rewards[b, n:].any()
        assert kl[b].item() == pytest.approx(math.fsum(per_token), rel=1e-4, abs=1e-4)


@settings(max_examples=200, deadline=None)
@given(rollouts(fields=3), st.floats(0, 1))
def test_dense_token_scores_are_paid_where_earned_and_keep_each_return(data, kl_coef):
    # --dense-score: token_scores_t added at t, the rest of the score (score - their sum) at the last token
    lengths, mask, (logps, ref_logps, token_scores) = data
    scores = np.linspace(-1, 1, len(lengths)).astype(np.float32)
    rewards, _ = kl_penalized_rewards(t(scores), t(logps), t(ref_logps), t(mask), kl_coef, t(token_scores))
    sparse, _ = kl_penalized_rewards(t(scores), t(logps), t(ref_logps), t(mask), kl_coef)
    for b, n in enumerate(lengths):
        expected = [
            -kl_coef * (float(logps[b, i]) - float(ref_logps[b, i])) + float(token_scores[b, i]) for i in range(n)
        ]
        expected[-1] += float(scores[b]) - math.fsum(float(x) for x in token_scores[b, :n])
        assert rewards[b, :n].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert not rewards[b, n:].any()
        # gamma = 1: each answer's return is the same as with the whole score on its last token
        assert rewards[b].sum().item() == pytest.approx(sparse[b].sum().item(), rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------- the clipped losses


def assert_share_of_positive(share, gaps):
    """share == the fraction of gaps > 0, where a gap within float32 rounding of 0 may count either way."""
    sure, maybe = sum(g > 1e-4 for g in gaps), sum(g > -1e-4 for g in gaps)
    assert sure / len(gaps) - 1e-6 <= share <= maybe / len(gaps) + 1e-6


@settings(max_examples=200, deadline=None)
@given(rollouts(fields=3), st.floats(0.05, 0.5))
def test_clipped_policy_loss_equals_the_elementwise_definition(data, clip):
    lengths, mask, (logps, old_logps, advantages) = data
    logps = np.clip(logps, -3, 3) / 3 + old_logps  # ratios within e^-1..e^1 of 1, some inside the clip range
    loss, clip_fraction = ppo_policy_loss(t(logps), t(old_logps), t(advantages), t(mask), clip)
    terms, clipped = [], []
    for b, n in enumerate(lengths):
        for i in range(n):
            ratio = math.exp(float(logps[b, i]) - float(old_logps[b, i]))
            a = float(advantages[b, i])
            bounded = min(max(ratio, 1 - clip), 1 + clip)
            terms.append(max(-a * ratio, -a * bounded))
            clipped.append(-a * bounded - -a * ratio)
    assert loss.item() == pytest.approx(math.fsum(terms) / len(terms), rel=1e-4, abs=1e-4)
    assert_share_of_positive(clip_fraction.item(), clipped)


def test_clipped_policy_loss_stops_pushing_outside_the_clip_range():
    # a positive advantage and a ratio already above 1 + clip: no gradient; below 1 + clip: gradient -A * ratio
    old = torch.zeros(1, 2)
    logps = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, clip_fraction = ppo_policy_loss(logps, old, torch.ones(1, 2), torch.ones(1, 2), clip=0.2)
    loss.backward()
    assert logps.grad[0, 0].item() == 0.0
    assert logps.grad[0, 1].item() == pytest.approx(-1.1 / 2, rel=1e-6)
    assert clip_fraction.item() == 0.5


@settings(max_examples=200, deadline=None)
@given(rollouts(fields=3), st.floats(0.05, 1.0))
def test_clipped_value_loss_equals_the_elementwise_definition(data, clip):
    lengths, mask, (values, old_values, returns) = data
    loss, clip_fraction = ppo_value_loss(t(values), t(old_values), t(returns), t(mask), clip)
    terms, clipped = [], []
    for b, n in enumerate(lengths):
        for i in range(n):
            v, old, r = float(values[b, i]), float(old_values[b, i]), float(returns[b, i])
            v_clipped = old + min(max(v - old, -clip), clip)
            terms.append(0.5 * max((v - r) ** 2, (v_clipped - r) ** 2))
            clipped.append((v_clipped - r) ** 2 - (v - r) ** 2)
    assert loss.item() == pytest.approx(math.fsum(terms) / len(terms), rel=1e-4, abs=1e-4)
    assert_share_of_positive(clip_fraction.item(), clipped)


# ---------------------------------------------------------------- whitening, explained variance, KL control


@settings(max_examples=200, deadline=None)
@given(rollouts(fields=1), st.booleans())
def test_whiten_uses_the_masked_positions_only(data, shift_mean):
    lengths, mask, (x,) = data
    x[mask == 0] = 1e4  # values past the answers must not move the statistics
    white = whiten(t(x), t(mask), shift_mean)
    real = [float(x[b, i]) for b, n in enumerate(lengths) for i in range(n)]
    mean = math.fsum(real) / len(real)
    var = math.fsum((v - mean) ** 2 for v in real) / len(real)
    assume(var > 1e-2)  # near-constant input: float32's rounding of the mean, divided by ~1e-4, is all there is
    for b, n in enumerate(lengths):
        expected = [(float(x[b, i]) - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean) for i in range(n)]
        assert white[b, :n].tolist() == pytest.approx(expected, rel=1e-3, abs=1e-3)
        assert not white[b, n:].any()


def test_whitened_values_have_mean_zero_and_unit_variance():
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)) * 7 + 3
    mask = (torch.arange(10) < torch.tensor([[10], [3], [7], [1], [9], [5]])).float()
    white = whiten(x, mask)
    n = mask.sum()
    assert (white.sum() / n).item() == pytest.approx(0.0, abs=1e-5)
    assert ((white**2).sum() / n).item() == pytest.approx(1.0, abs=1e-5)


def test_explained_variance_is_one_for_exact_values_and_zero_for_the_mean():
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 3.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.001, 1), st.floats(0, 50), st.floats(0.1, 20), st.integers(1, 512), st.floats(100, 1e5))
def test_adaptive_kl_coefficient_follows_the_proportional_rule(kl_coef, kl, target, n, horizon):
    error = min(max((kl - target) / target, -0.2), 0.2)
    new = adaptive_kl_coef(kl_coef, kl, target, n, horizon)
    assert new == pytest.approx(kl_coef * (1 + error * n / horizon), rel=1e-12)
    assert (new > kl_coef) == (kl > target) or new == kl_coef  # more KL than wanted: a stronger penalty


# ---------------------------------------------------------------- the recipe end to end


def book_args(shared, **overrides):
    data = shared / "data"
    flags = {
        "--books": str(data / "corpus" / "pg11.txt"),
        "--heldout-book": str(data / "gulliver.txt"),
        "--prompt-len": "8",
        "--max-new-tokens": "6",
        "--rollout-batch": "16",
        "--batch-size": "8",
        "--ppo-epochs": "2",
        "--eval-prompts": "16",
        "--samples": "2",
        "--log-every": "1",
    } | overrides
    return [x for kv in flags.items() for x in kv]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
    """The tiny model with its embeddings scaled up 15x: each context then has a few likely next tokens, as a
    trained model does, instead of a near-uniform spread over 50257 (where no sampled token ever comes back
    and a reward has nothing to reinforce)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=256))
    with torch.no_grad():
        model.wte.weight.mul_(15)
    path = tmp_path_factory.mktemp("peaky")
    model.save_pretrained(path)
    return str(path)


def test_ppo_raises_the_share_of_letter_tokens(peaky, shared, tmp_path):
    # rewarded for tokens containing "e", PPO must raise their share on held-out Gulliver prompts, starting at
    # KL 0 (the policy is its reference) and paying for the rise in KL
    out = tmp_path / "ppo"
    train_ppo.main(
        [
            "--model",
            peaky,
            "--out",
            str(out),
            "--reward",
            "letter:e",
            "--lr",
            "1e-2",
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--kl-coef",
            "0.01",
        ]
        + book_args(shared)
    )
    summary = json.loads((out / "summary.json").read_text())
    print(f"\ne share {summary['score_before']:.3f} -> {summary['score_after']:.3f}, KL {summary['kl_after']:.2f}")
    assert summary["score_after"] > summary["score_before"] + 0.3
    assert summary["kl_after"] > 1.0
    lines = metrics(out)
    first = next(m for m in lines if m["step"] == 1 and "score" in m)
    assert abs(first["kl"]) < 1e-4  # the first rollout: policy == reference
    assert first["clip_fraction"] < 0.5
    for key in (
        "score",
        "kl",
        "rlhf_reward",
        "entropy",
        "clip_fraction",
        "approx_kl",
        "value_loss",
        "explained_variance",
        "answer_len",
        "eos_share",
        "kl_coef",
        "time_generate_s",
        "time_score_s",
        "time_update_s",
    ):
        assert key in first, key
    assert first["rlhf_reward"] == pytest.approx(first["score"] - 0.01 * first["kl"], abs=1e-6)
    for name in ("samples_before.txt", "samples_after.txt", "kl_score.svg", "score.svg"):
        assert (out / name).is_file(), name
    assert {"score_before", "score_after", "kl_after", "steps", "kl_coef"} <= set(summary)
    GPT.from_pretrained(out)


@pytest.mark.parametrize("whiten_scores", [False, True])
def test_dense_score_pays_each_letter_token_its_part_of_the_share(whiten_scores, peaky, shared, tmp_path, monkeypatch):
    # --dense-score: 1/length on each answer token holding the letter, none elsewhere; per answer they add up to
    # its share, the score of --reward letter:e. --whiten-scores divides both by the batch's std of the shares
    calls, real = [], train_ppo.kl_penalized_rewards
    monkeypatch.setattr(train_ppo, "kl_penalized_rewards", lambda *a: calls.append(a) or real(*a))
    train_ppo.main(
        ["--model", peaky, "--out", str(tmp_path / "dense"), "--reward", "letter:e", "--dense-score", "--steps", "2"]
        + ["--whiten-scores"] * whiten_scores
        + book_args(shared)
    )
    assert len(calls) == 2
    for scores, _, _, mask, _, token_scores in calls:
        assert (mask.sum(-1) == 6).all()  # no answer ended (peaky never samples <|endoftext|>): 6 tokens each
        has_letter = (token_scores != 0).float()  # (B, L)
        shares = has_letter.sum(-1) / 6  # (B,)
        assert 0.1 < shares.mean() < 0.9 and shares.std() > 0.05  # a mix, so that the checks below have teeth
        scale = 1 / shares.std(correction=0) if whiten_scores else 1.0
        assert torch.allclose(token_scores, has_letter / 6 * scale, atol=1e-5)
        expected = (shares - shares.mean()) * scale if whiten_scores else shares
        assert torch.allclose(scores, expected, atol=1e-5)


def test_sentiment_reward_runs_and_scores_in_vader_range(shared, tmp_path):
    # the bundled nano model writes English words, so VADER gives some answers a non-zero score (a random tiny
    # model's gibberish scores 0 everywhere, and a broken scorer returning 0 would pass unseen)
    out = tmp_path / "sentiment"
    nano = str(Path(__file__).resolve().parent.parent / "weights" / "nano")
    train_ppo.main(
        ["--model", nano, "--out", str(out), "--reward", "sentiment", "--steps", "1"]
        + book_args(
            shared,
            **{
                "--prompt-len": "16",
                "--max-new-tokens": "24",
                "--rollout-batch": "8",
                "--ppo-epochs": "1",
                "--samples": "16",
            },
        )
    )
    step = next(m for m in metrics(out) if "score" in m)
    assert -1 <= step["score"] <= 1
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    # the samples file shows each answer's score: recompute every one with VADER itself
    analyzer = SentimentIntensityAnalyzer()
    blocks = (out / "samples_after.txt").read_text().split("--- prompt ")[1:]
    assert len(blocks) == 16
    shown_scores = []
    for block in blocks:
        shown = float(block.split("(score ", 1)[1].split(",", 1)[0])
        answer = block.split("\n>>> ", 1)[1].rstrip("\n")
        assert shown == pytest.approx(analyzer.polarity_scores(answer)["compound"], abs=1e-3)
        shown_scores.append(shown)
    assert any(abs(x) > 0.05 for x in shown_scores)


def test_reward_model_run_with_ptx_and_adaptive_kl(tiny, shared, tmp_path):
    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    RewardModel(GPT.from_pretrained(tiny)).save_pretrained(rm_dir)
    out = tmp_path / "ppo-rm"
    train_ppo.main(
        [
            "--model",
            tiny,
            "--out",
            str(out),
            "--reward",
            f"model:{rm_dir}",
            "--steps",
            "2",
            "--data",
            str(shared / "data" / "instruction-data.json"),
            "--limit",
            "60",
            "--max-new-tokens",
            "6",
            "--rollout-batch",
            "8",
            "--batch-size",
            "4",
            "--ppo-epochs",
            "1",
            "--eval-prompts",
            "4",
            "--ptx-coef",
            "0.5",
            "--target-kl",
            "0.01",
            "--kl-horizon",
            "100",
            "--missing-eos-penalty",
            "1.0",
            "--log-every",
            "1",
        ]
    )
    lines = [m for m in metrics(out) if "ptx_loss" in m]
    assert len(lines) == 2 and all(m["ptx_loss"] > 5 for m in lines)  # a random model: ~ln(50257) nats
    summary = json.loads((out / "summary.json").read_text())
    # the controller moved the coefficient after each step by the KL that step measured (8 answers)
    expected = 0.05
    for m in lines:
        assert m["kl_coef"] == pytest.approx(expected, rel=1e-9)  # each step's rewards used the current value
        expected = adaptive_kl_coef(expected, m["kl"], 0.01, 8, 100)
    assert summary["kl_coef"] == pytest.approx(expected, rel=1e-9) and expected != 0.05
    # answers of 6 tokens from a random model never end: every score carries the missing-<|endoftext|> penalty
    # (the random score head alone gives scores within about +-0.3)
    assert lines[0]["eos_share"] == 0.0
    assert -1.4 < lines[0]["score"] < -0.6


def test_ppo_stops_when_the_kl_goes_strongly_negative(tiny, shared, tmp_path, monkeypatch, capsys):
    # misaligned log-probs (simulated: every KL shifted by -5 nats) must stop the run, not train on them
    real = train_ppo.kl_penalized_rewards
    monkeypatch.setattr(train_ppo, "kl_penalized_rewards", lambda *a: (real(*a)[0], real(*a)[1] - 5.0))
    code = run_main(
        train_ppo.main,
        ["--model", tiny, "--out", str(tmp_path / "neg"), "--reward", "letter:x", "--steps", "2"] + book_args(shared),
    )
    assert code == 2
    assert "mean KL to the reference is -5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "scores, message",
    [
        (lambda n: torch.full((n,), float("nan")), "--reward letter:x gave NaN or infinite scores: check the reward"),
        (lambda n: torch.full((n,), float("inf")), "--reward letter:x gave NaN or infinite scores: check the reward"),
        (lambda n: torch.zeros(n, 2), "--reward letter:x gave scores of shape (8, 2) for 8 answers"),
    ],
    ids=["nan", "inf", "two-per-answer"],
)
def test_a_reward_that_is_not_one_finite_score_per_answer_stops_with_one_line(
    scores, message, tiny, shared, tmp_path, monkeypatch, capsys
):
    # the same scoring as GRPO's (nanotune.rollout.Reward): a NaN would train on NaN advantages
    def bad_reward(spec, enc, device, ctx, dtype):
        def score(prompt_ids, answers):
            return scores(len(answers))

        score.context = None
        return score

    monkeypatch.setattr(nanotune.rollout, "make_reward", bad_reward)
    argv = ["--model", tiny, "--out", str(tmp_path / "nan"), "--reward", "letter:x", "--steps", "1"]
    assert run_main(train_ppo.main, argv + book_args(shared, **{"--eval-prompts": "8"})) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward", "bogus"], "argument --reward: expected model:DIR, sentiment or letter:X, got 'bogus'"),
        (["--reward", "letter:xy"], "single character"),
        (["--reward", "sentiment:x"], "argument --reward: expected model:DIR"),
        (["--rollout-batch", "6"], "--rollout-batch (6) must be a multiple of --batch-size (8)"),
        (["--gamma", "1.5"], "argument --gamma: must lie in [0, 1], got 1.5"),
        (["--target-kl", "0"], "argument --target-kl: must be > 0, got 0"),
        (["--reward", "model:/nope"], "could not load the reward model /nope"),
        (["--prompt-len", "251"], "exceed the models' context of 256"),
        (["--reward", "sentiment", "--dense-score"], "--dense-score needs --reward letter:X"),
    ],
)
def test_bad_input_is_one_line_error(flags, message, tiny, shared, tmp_path, capsys):
    args = ["--model", tiny, "--out", str(tmp_path / "bad"), "--reward", "letter:x", "--steps", "1"]
    assert run_main(train_ppo.main, args + book_args(shared) + flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:"), err
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_a_language_model_folder_is_not_a_reward_model(tiny, shared, tmp_path, capsys):
    code = run_main(
        train_ppo.main,
        [
            "--model",
            tiny,
            "--out",
            str(tmp_path / "x"),
            "--reward",
            f"model:{tiny}",
            "--data",
            str(shared / "data" / "instruction-data.json"),
            "--limit",
            "20",
        ],
    )
    assert code == 2
    assert "is not a reward model" in capsys.readouterr().err


def test_peft_lora_trains_adapters_on_the_policy_and_the_value_model(peaky, shared, tmp_path, capsys):
    out = tmp_path / "lora"
    train_ppo.main(
        ["--model", peaky, "--out", str(out), "--reward", "letter:e", "--steps", "2", "--peft", "lora", "--lr", "1e-2"]
        + ["--keep-checkpoint"]
        + book_args(shared, **{"--rollout-batch": "8", "--batch-size": "4"})
    )
    assert "(lora: trainable" in capsys.readouterr().out
    from safetensors.torch import load_file

    lora = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())  # B started at 0
    base = GPT.from_pretrained(peaky)
    assert not torch.equal(GPT.from_pretrained(out).h[0].attn.c_attn.weight, base.h[0].attn.c_attn.weight)  # merged
    trainer = torch.load(out / "checkpoints" / "step-000002" / "trainer.pt", weights_only=True)
    value = trainer["extras"]["value_model"]
    assert value["body.h.0.attn.c_attn.lora_B"].abs().max() > 0  # the value model's LoRA trained too...
    assert torch.equal(value["body.h.0.attn.c_attn.weight"], base.h[0].attn.c_attn.weight)  # ...on a frozen body
    assert value["score.weight"].shape == (1, 64)


def test_offline_without_books_names_the_flag_to_use(tiny, tmp_path, monkeypatch, capsys):
    # the default books are downloads: with no network the error says which flag points at local copies
    import urllib.request

    from nanotune.data import sources

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(sources, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    code = run_main(train_ppo.main, ["--model", tiny, "--out", str(tmp_path / "x"), "--reward", "letter:x"])
    assert code == 2
    assert "pass --books PATH to a local copy" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
