"""train_grpo.py: its maths against float64 Python loops (hypothesis), one update that raises the probability of
a group's better answers, the first ratio exactly 1, dynamic sampling, and bad input stopping with one line."""

import argparse
import contextlib
import json
import math

import numpy as np
import pytest
import torch
from helpers import run_main
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import nanotune.rollout
import train_grpo
from nanotune import GPT, GPTConfig
from nanotune.lifecycle.step import clip_gradients
from nanotune.rollout import Experience, StepMeans, answer_logprobs, layout, minibatches
from train_grpo import aggregate, clipped_objective, group_advantages, k3_kl

finite = st.floats(-5, 5, allow_nan=False, width=32)


@st.composite
def groups(draw):
    """Scores (P, G) with some groups all equal, as integer multiples of 0.5 (ties happen, as with rewards)."""
    P, G = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    scores = np.array([[draw(st.integers(-4, 4)) * 0.5 for _ in range(G)] for _ in range(P)], dtype=np.float32)
    if draw(st.booleans()):
        scores[0] = scores[0, 0]  # a uniform group
    return scores


@settings(max_examples=150, deadline=None)
@given(groups())
def test_advantages_equal_float64_loops(scores):
    for kind in ("grpo", "mean", "rloo"):
        ours = group_advantages(torch.tensor(scores), kind).double().numpy()
        for p, row in enumerate(scores.astype(np.float64)):
            G, mean = len(row), sum(row) / len(row)
            std = math.sqrt(sum((r - mean) ** 2 for r in row) / (G - 1))
            for i, r in enumerate(row):
                others = (sum(row) - r) / (G - 1)
                expected = {"grpo": (r - mean) / (std + 1e-4), "mean": r - mean, "rloo": r - others}[kind]
                assert ours[p, i] == pytest.approx(expected, rel=1e-5, abs=1e-5), (kind, row)
            if len(set(row.tolist())) == 1:
                assert (ours[p] == 0).all()  # a uniform group carries no signal


@settings(max_examples=150, deadline=None)
@given(
    arrays(np.float32, (3, 5), elements=finite),
    arrays(np.float32, (3, 5), elements=st.floats(-0.5, 0.5, width=32)),
    arrays(np.float32, (3,), elements=finite),
    st.floats(0.05, 0.5),
    st.floats(0.05, 0.5),
)
def test_clipped_objective_equals_a_float64_loop(logps, shift, advantages, clip_low, clip_high):
    old = logps - shift
    loss, low, high = clipped_objective(
        torch.tensor(logps), torch.tensor(old), torch.tensor(advantages), clip_low, clip_high
    )
    for b in range(3):
        for t in range(5):
            ratio = math.exp(float(logps[b, t]) - float(old[b, t]))
            a = float(advantages[b])
            expected = -min(ratio * a, min(max(ratio, 1 - clip_low), 1 + clip_high) * a)
            assert loss[b, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
            assert bool(low[b, t]) == (ratio < 1 - clip_low and a < 0)
            assert bool(high[b, t]) == (ratio > 1 + clip_high and a > 0)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, (2, 6), elements=finite), arrays(np.float32, (2, 6), elements=finite))
# exp(d) - d - 1 gave -1.1e-16 here (a CI run found it): d near 0 must still give KL >= 0
@example(np.zeros((2, 6), np.float32), np.full((2, 6), 4.2400158e-10, np.float32))
def test_k3_is_the_closed_form_and_never_negative(logps, ref_logps):
    ours = k3_kl(torch.tensor(logps, dtype=torch.float64), torch.tensor(ref_logps, dtype=torch.float64))
    for b in range(2):
        for t in range(6):
            d = float(ref_logps[b, t]) - float(logps[b, t])
            assert ours[b, t].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-9, abs=1e-12)
    assert (ours >= 0).all()


@settings(max_examples=150, deadline=None)
@given(arrays(np.float32, (4, 7), elements=finite), st.lists(st.integers(1, 7), min_size=4, max_size=4))
def test_loss_aggregations_equal_float64_loops(x, lengths):
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(7)] for n in lengths])
    padded = torch.tensor(x).masked_fill(mask == 0, 1e6)  # padding must never count
    rows = [[float(x[b, t]) for t in range(n)] for b, n in enumerate(lengths)]
    expected = {
        "sequence": sum(sum(r) / len(r) for r in rows) / len(rows),
        "token": sum(map(sum, rows)) / sum(lengths),
        "constant": sum(map(sum, rows)) / (len(rows) * 10),
    }
    for kind, value in expected.items():
        assert aggregate(padded, mask, kind, max_new_tokens=10).item() == pytest.approx(value, rel=1e-5, abs=1e-5)


def grpo_update(args, policy, optimizer, rollout, exp, rng):
    """train_grpo.train()'s step 4 (without DDP, compile or the divergence check) -> its logged statistics"""
    update = StepMeans()
    for minibatch in minibatches(rollout.mask.shape[0], args.batch_size, args.epochs, rng, "cpu"):
        sums = train_grpo.grpo_step(args, policy, rollout, exp, minibatch, contextlib.nullcontext())
        sums["grad_norm"] = clip_gradients(policy, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update.add(sums)
    return {"first_ratio": update.first["ratio"], **update.means()}


def test_one_update_raises_the_better_answers_of_a_group(tiny):
    # four answers to one prompt, two scored 1 and two 0: one GRPO step makes the first two more likely
    torch.manual_seed(0)
    policy = GPT.from_pretrained(tiny).train()
    prompt, answers = [464, 3290, 318], [[11, 12, 13], [14, 15], [16, 17, 18], [19, 20]]
    rollout = layout([prompt] * 4, [prompt + a for a in answers], 50256, torch.device("cpu"))
    scores = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    inputs = (rollout.input_ids, rollout.attention_mask, rollout.P, contextlib.nullcontext())
    with torch.no_grad():
        before = answer_logprobs(policy, *inputs)[0]
    args = argparse.Namespace(
        epochs=1,
        batch_size=4,
        grad_accum=1,
        clip_low=0.2,
        clip_high=0.2,
        beta=0.0,
        loss_agg="sequence",
        max_new_tokens=3,
        grad_clip=0.0,
    )
    exp = Experience(old_logps=before, ref_logps=None, advantages=group_advantages(scores, "grpo").flatten())
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    update = grpo_update(args, policy, optimizer, rollout, exp, torch.Generator().manual_seed(0))
    assert update["first_ratio"].item() == 1.0  # the first update is on-policy: the ratio is exactly 1
    with torch.no_grad():
        after = answer_logprobs(policy, *inputs)[0]
    gain = ((after - before) * rollout.mask).sum(-1)  # (4,) change of each answer's log-probability
    assert gain[:2].min() > 0 > gain[2:].max(), gain


@pytest.mark.parametrize("loss_agg", ["sequence", "token", "constant"])
def test_grad_accum_changes_memory_not_the_update(loss_agg, tiny):
    # answers of 1, 2, 3 and 5 tokens, so that any two micro-batches of two hold different numbers of tokens: one
    # minibatch of 4 in one piece or as 2 micro-batches must give the same step and the same statistics
    prompt, answers = [464, 3290, 318], [[11], [14, 15], [16, 17, 18], [19, 20, 21, 22, 23]]
    rollout = layout([prompt] * 4, [prompt + a for a in answers], 50256, torch.device("cpu"))
    inputs = (rollout.input_ids, rollout.attention_mask, rollout.P, contextlib.nullcontext())
    results = []
    for grad_accum in (1, 2):
        policy = GPT.from_pretrained(tiny).train()
        start = torch.cat([p.detach().flatten() for p in policy.parameters()])
        with torch.no_grad():
            old = answer_logprobs(policy, *inputs)[0] - 0.05  # off-policy a little, so the ratio matters
        exp = Experience(old_logps=old, ref_logps=old - 0.1, advantages=torch.tensor([1.0, -0.5, 0.8, -1.2]))
        args = argparse.Namespace(
            epochs=1,
            batch_size=4,
            grad_accum=grad_accum,
            clip_low=0.2,
            clip_high=0.2,
            beta=0.1,
            loss_agg=loss_agg,
            max_new_tokens=5,
            grad_clip=0.0,
        )
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        rng = torch.Generator().manual_seed(0)
        stats = grpo_update(args, policy, optimizer, rollout, exp, rng)
        results.append((stats, torch.cat([p.detach().flatten() for p in policy.parameters()]) - start))
    (whole, update), (pieces, update_accum) = results
    for key in ("loss", "kl_k3", "entropy", "ratio", "clip_low", "clip_high"):
        assert pieces[key].item() == pytest.approx(whole[key].item(), rel=1e-5, abs=1e-7), key
    assert (update_accum - update).norm() < 1e-4 * update.norm()  # the same step, up to float rounding


def book_args(shared, **overrides):
    data = shared / "data"
    flags = {
        "--books": str(data / "corpus" / "pg11.txt"),
        "--heldout-book": str(data / "gulliver.txt"),
        "--prompt-len": "8",
        "--max-new-tokens": "6",
        "--prompts-per-step": "4",
        "--group-size": "4",
        "--batch-size": "8",
        "--eval-prompts": "8",
        "--samples": "2",
        "--log-every": "1",
    } | overrides
    return [x for kv in flags.items() for x in kv]


def test_grpo_run_logs_its_statistics_and_reports_kl_with_beta_0(tiny, shared, tmp_path):
    out = tmp_path / "grpo"
    argv = ["--model", tiny, "--out", str(out), "--reward", "letter:e", "--steps", "2", "--eval-every", "1"]
    assert run_main(train_grpo.main, argv + book_args(shared)) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "loss" in m]
    assert len(steps) == 2 and all(m["first_ratio"] == 1.0 for m in steps)
    for key in ("score", "uniform_share", "clip_low", "clip_high", "entropy", "answer_len", "time_update_s"):
        assert all(key in m for m in steps), key
    assert "kl" not in steps[0]  # --beta 0: no reference is run in the update...
    evals = [m for m in logged if "val_kl" in m]
    assert len(evals) == 3 and evals[-1]["val_kl"] > 0  # ...but the KL to the start is measured at evaluations
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and "kl_after" in summary and (out / "kl_score.svg").is_file()


def test_a_reward_model_can_score_book_prompts(tiny, shared, tmp_path):
    # --prompt-source books: a reward model trained on book continuations (the sentiment frontier's) scores book windows
    from nanotune.model.reward_model import RewardModel

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    RewardModel(GPT.from_pretrained(tiny)).save_pretrained(rm_dir)
    out = tmp_path / "grpo-rm"
    argv = [
        "--model",
        tiny,
        "--out",
        str(out),
        "--reward",
        f"model:{rm_dir}",
        "--prompt-source",
        "books",
        "--steps",
        "1",
    ]
    assert run_main(train_grpo.main, argv + book_args(shared)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["prompt_source"] == "books" and summary["args"]["max_new_tokens"] == 6
    assert "GULLIVER" in (out / "samples_before.txt").read_text()  # the first held-out window opens the book


def test_uniform_groups_are_drawn_again_with_skip_uniform_groups(tiny, shared, tmp_path, monkeypatch):
    # of every draw of 4 groups of 4, the first two score 1 for every answer (uniform: no signal), the last two
    # 0, 1, 0, 1 (mean 0.5). Half the groups drawn are uniform either way; --skip-uniform-groups draws again
    # until the step holds four informative groups, so its answers' mean score is 0.5 instead of 0.75
    def half_uniform(spec, enc, device, ctx, dtype):
        def score(prompt_ids, answers):
            if len(answers) != 16:  # the held-out evaluation
                return torch.zeros(len(answers))
            return torch.cat([torch.ones(8), (torch.arange(8) % 2).float()])

        score.context = None
        return score

    monkeypatch.setattr(nanotune.rollout, "make_reward", half_uniform)
    for flag, mean_score in (([], 0.75), (["--skip-uniform-groups"], 0.5)):
        out = tmp_path / f"g{len(flag)}"
        argv = ["--model", tiny, "--out", str(out), "--reward", "letter:e", "--steps", "1"] + flag
        assert run_main(train_grpo.main, argv + book_args(shared)) == 0
        step = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][0]
        assert step["uniform_share"] == 0.5 and step["score"] == pytest.approx(mean_score), (flag, step)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--group-size", "1"], "argument --group-size: must be >= 2, got 1"),
        (["--clip-low", "1"], "argument --clip-low: must lie in (0, 1), got 1"),
        (["--prompts-per-step", "3"], "12 answers: not a multiple of --batch-size 8"),
        (["--advantage", "ppo"], "argument --advantage: invalid choice"),
    ],
)
def test_bad_input_is_one_line_error(flags, message, tiny, shared, tmp_path, capsys):
    argv = ["--model", tiny, "--out", str(tmp_path / "bad"), "--reward", "letter:x", "--steps", "1"]
    assert run_main(train_grpo.main, argv + book_args(shared) + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err, err


def test_nan_rewards_stop_with_one_line(tiny, shared, tmp_path, monkeypatch, capsys):
    def nan_reward(spec, enc, device, ctx, dtype):
        def score(prompt_ids, answers):
            return torch.full((len(answers),), float("nan"))

        score.context = None
        return score

    monkeypatch.setattr(nanotune.rollout, "make_reward", nan_reward)
    argv = ["--model", tiny, "--out", str(tmp_path / "nan"), "--reward", "letter:x", "--steps", "1"]
    assert run_main(train_grpo.main, argv + book_args(shared)) == 2
    assert "gave NaN or infinite scores" in capsys.readouterr().err


def test_a_tiny_model_with_peaky_embeddings_learns_the_letter(tmp_path, shared):
    # the PPO test's peaky model: GRPO with the same letter reward raises the held-out share of "e" tokens
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=256))
    with torch.no_grad():
        model.wte.weight.mul_(15)
    model.save_pretrained(tmp_path / "peaky")
    out = tmp_path / "run"
    argv = ["--model", str(tmp_path / "peaky"), "--out", str(out), "--reward", "letter:e", "--steps", "6"]
    argv += ["--lr", "1e-2", "--eval-every", "6", "--advantage", "rloo"]
    assert run_main(train_grpo.main, argv + book_args(shared, **{"--eval-prompts": "16"})) == 0
    summary = json.loads((out / "summary.json").read_text())
    print(f"\ngrpo tiny letter:e {summary['score_before']:.3f} -> {summary['score_after']:.3f}")
    assert summary["score_after"] > summary["score_before"] + 0.2
