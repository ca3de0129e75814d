"""train_dpo.py's --loss family (IPO, SLiC-HF hinge, robust DPO, SimPO) against float64 reference maths, its
squeezing diagnostic (logps.svg), and raw-text continuation pairs (--template raw) in train_dpo.py and
train_reward.py, end to end on the tiny random-init GPT-2."""

import argparse
import contextlib
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import train_dpo
import train_reward
from nanotune import GPT, load_tokenizer
from nanotune.data import formats
from nanotune.data.instruct import answers_end, collate, encode_pair, format_prompt, pair_logprobs, sequence_logprobs
from train_dpo import dpo_loss, hinge_loss, ipo_loss, make_loss, robust_dpo_loss, simpo_loss

logps = st.floats(-500, 0, allow_nan=False)
rows_of_logps = st.lists(st.tuples(logps, logps, logps, logps), min_size=1, max_size=8)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def columns(rows):
    return [torch.tensor(c, dtype=torch.float64) for c in zip(*rows)]


def assert_reference_rewards(rows, beta, chosen_rewards, rejected_rewards):
    for (a, b, c, d), chosen, rejected in zip(rows, chosen_rewards.tolist(), rejected_rewards.tolist()):
        assert chosen == pytest.approx(beta * (a - c), rel=1e-9, abs=1e-9)
        assert rejected == pytest.approx(beta * (b - d), rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------- each loss against an explicit float64 loop


@settings(max_examples=200, deadline=None)
@given(rows_of_logps, st.floats(0.01, 2.0))
def test_ipo_loss_equals_float64_loop(rows, beta):
    loss, chosen_rewards, rejected_rewards = ipo_loss(*columns(rows), beta)
    expected = sum(((a - c) - (b - d) - 1 / (2 * beta)) ** 2 for a, b, c, d in rows) / len(rows)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert_reference_rewards(rows, beta, chosen_rewards, rejected_rewards)


@settings(max_examples=200, deadline=None)
@given(rows_of_logps, st.floats(0.01, 2.0))
def test_hinge_loss_equals_float64_loop(rows, beta):
    loss, chosen_rewards, rejected_rewards = hinge_loss(*columns(rows), beta)
    expected = sum(max(0.0, 1 - beta * ((a - c) - (b - d))) for a, b, c, d in rows) / len(rows)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert_reference_rewards(rows, beta, chosen_rewards, rejected_rewards)


@settings(max_examples=200, deadline=None)
@given(rows_of_logps, st.floats(0.01, 2.0), st.floats(0.0, 0.49))
def test_robust_dpo_loss_equals_float64_loop(rows, beta, eps):
    loss, chosen_rewards, rejected_rewards = robust_dpo_loss(*columns(rows), beta, eps)
    expected = 0.0
    for a, b, c, d in rows:
        z = beta * ((a - c) - (b - d))
        expected += ((1 - eps) * -log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
    assert loss.item() == pytest.approx(expected / len(rows), rel=1e-9, abs=1e-8)
    assert_reference_rewards(rows, beta, chosen_rewards, rejected_rewards)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(logps, logps, st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=8),
    st.floats(0.1, 10.0),
    st.floats(0.0, 5.0),
)
def test_simpo_loss_equals_float64_loop(rows, beta, gamma):
    pc, pr = (torch.tensor(c, dtype=torch.float64) for c in list(zip(*rows))[:2])
    lc, lr = (torch.tensor(c) for c in list(zip(*rows))[2:])  # token counts: integers, as pair_logprobs gives them
    loss, chosen_rewards, rejected_rewards = simpo_loss(pc, pr, lc, lr, beta, gamma)
    expected = 0.0
    for (a, b, n_c, n_r), chosen, rejected in zip(rows, chosen_rewards.tolist(), rejected_rewards.tolist()):
        assert chosen == pytest.approx(beta * a / n_c, rel=1e-12) and rejected == pytest.approx(
            beta * b / n_r, rel=1e-12
        )
        expected += -log_sigmoid(beta * a / n_c - beta * b / n_r - gamma)
    assert loss.item() == pytest.approx(expected / len(rows), rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------- properties


@settings(max_examples=100, deadline=None)
@given(rows_of_logps, st.floats(0.01, 2.0), st.floats(0.0, 0.49))
def test_sigmoid_through_make_loss_is_dpo_loss_bit_for_bit(rows, beta, eps):
    pc, pr, rc, rr = columns(rows)
    lengths = (torch.ones(len(rows)), torch.ones(len(rows)))
    args = argparse.Namespace(loss="sigmoid", beta=beta, label_smoothing=eps, simpo_gamma=None)
    for ours, theirs in zip(make_loss(args)((pc, pr), (rc, rr), lengths), dpo_loss(pc, pr, rc, rr, beta, eps)):
        assert torch.equal(ours, theirs)
    # eps = 0 is plain DPO: mean -log sigmoid(beta h)
    plain = dpo_loss(pc, pr, rc, rr, beta)[0]
    assert torch.equal(plain, -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean())


@settings(max_examples=100, deadline=None)
@given(rows_of_logps, st.floats(0.01, 2.0))
def test_robust_with_no_noise_is_dpo(rows, beta):
    for ours, theirs in zip(robust_dpo_loss(*columns(rows), beta, 0.0), dpo_loss(*columns(rows), beta, 0.0)):
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_ipo_is_smallest_where_h_is_one_over_two_beta(beta):
    ref_c, ref_r = torch.tensor([-40.0, -7.0], dtype=torch.float64), torch.tensor([-30.0, -9.0], dtype=torch.float64)
    pol_r, target = torch.full((2,), -12.0, dtype=torch.float64), 1 / (2 * beta)
    for offset, expect_zero in [(0.0, True), (-0.3, False), (0.3, False)]:
        # h = (pi_c - ref_c) - (pi_r - ref_r) = target + offset
        pol_c = (ref_c + target + offset + (pol_r - ref_r)).requires_grad_(True)
        loss, _, _ = ipo_loss(pol_c, pol_r, ref_c, ref_r, beta)
        loss.backward()
        if expect_zero:
            assert loss.item() == pytest.approx(0.0, abs=1e-18) and pol_c.grad.abs().max().item() < 1e-9
        else:
            assert loss.item() == pytest.approx(offset**2, rel=1e-9)
            # descent moves h back toward the target: up when below it, down when above
            assert torch.all(torch.sign(-pol_c.grad) == -math.copysign(1, offset))


def test_simpo_ignores_the_reference_and_the_others_do_not():
    torch.manual_seed(0)
    pc, pr = -torch.rand(5) * 50, -torch.rand(5) * 50
    lengths = (torch.randint(1, 30, (5,)), torch.randint(1, 30, (5,)))
    other = (-torch.rand(5) * 50, -torch.rand(5) * 50)
    for name in train_dpo.LOSSES:
        args = argparse.Namespace(loss=name, beta=2.0, label_smoothing=0.0, simpo_gamma=0.5)
        loss_fn = make_loss(args)
        if name == "simpo":  # reference-free: whatever the reference, or none at all (what the recipe passes)
            results = [loss_fn((pc, pr), ref, lengths) for ref in [(), (pc, pr), other]]
            for result in results[1:]:
                assert all(torch.equal(a, b) for a, b in zip(result, results[0]))
            assert torch.equal(results[0][1], 2.0 * pc / lengths[0])
        else:
            with_self = loss_fn((pc, pr), (pc, pr), lengths)[0]
            assert not torch.equal(with_self, loss_fn((pc, pr), other, lengths)[0])


@settings(max_examples=50, deadline=None)
@given(rows_of_logps, st.floats(0.01, 2.0), st.floats(0.0, 0.49), st.floats(0.0, 3.0))
def test_make_loss_hands_each_loss_its_flags(rows, beta, eps, gamma):
    pc, pr, rc, rr = columns(rows)
    lengths = (torch.arange(1, len(rows) + 1), torch.arange(len(rows), 0, -1))
    direct = {
        "sigmoid": dpo_loss(pc, pr, rc, rr, beta, eps),
        "ipo": ipo_loss(pc, pr, rc, rr, beta),
        "hinge": hinge_loss(pc, pr, rc, rr, beta),
        "robust": robust_dpo_loss(pc, pr, rc, rr, beta, eps),
        "simpo": simpo_loss(pc, pr, *lengths, beta, gamma),
    }
    for name, expected in direct.items():
        smoothing = eps if name in ("sigmoid", "robust") else 0.0
        args = argparse.Namespace(loss=name, beta=beta, label_smoothing=smoothing, simpo_gamma=gamma)
        reference = () if name == "simpo" else (rc, rr)
        assert all(torch.equal(a, b) for a, b in zip(make_loss(args)((pc, pr), reference, lengths), expected)), name


def test_every_loss_is_finite_with_a_finite_gradient_at_extreme_margins():
    big, zero = torch.tensor([1e4, -1e4, 0.0]), torch.zeros(3)
    lengths = (torch.tensor([1, 7, 300]), torch.tensor([1, 7, 300]))
    for name in train_dpo.LOSSES:
        args = argparse.Namespace(
            loss=name, beta=1.0, label_smoothing=0.2 if name == "robust" else 0.0, simpo_gamma=0.5
        )
        pc = big.clone().requires_grad_(True)
        loss, _, _ = make_loss(args)((pc, zero), (zero, zero), lengths)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pc.grad).all(), name


def test_pair_logprobs_counts_the_answer_tokens(tiny):
    model = GPT.from_pretrained(tiny).eval()
    pairs = [(([1, 2, 3], [4, 5, 50256]), ([1, 2, 3], [6, 50256])), (([7], [8, 50256]), ([7], [9, 10, 11, 50256]))]
    with torch.no_grad():
        logps, lengths = pair_logprobs(model, pairs, 50256, "cpu", contextlib.nullcontext())
    assert logps.shape == lengths.shape == (2, 2)
    assert lengths.tolist() == [[3, 2], [2, 4]]  # row 0 chosen, row 1 rejected; <|endoftext|> counts
    # the head ran on the answer positions only (from the shortest prompt's last token): the same log-probs as
    # the full logits give
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    input_ids, labels = collate(rows, 50256, "cpu")
    with torch.no_grad():
        full = sequence_logprobs(model(input_ids), labels)  # (4,)
    assert torch.allclose(logps.flatten(), full, atol=1e-5, rtol=0), (logps, full)


# ---------------------------------------------------------------- flags


def refused(argv, capsys, message):
    with pytest.raises(SystemExit) as e:
        train_dpo.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_flags_that_do_not_fit_the_loss_are_refused(capsys):
    refused(["--loss", "ipo", "--label-smoothing", "0.1"], capsys, "--label-smoothing is for --loss sigmoid or robust")
    refused(["--loss", "simpo", "--ref-model", "x"], capsys, "--loss simpo is reference-free")
    refused(["--simpo-gamma", "1"], capsys, "--simpo-gamma is for --loss simpo, not --loss sigmoid")
    refused(["--loss", "kto"], capsys, "argument --loss: invalid choice: 'kto'")
    refused(["--loss", "robust", "--label-smoothing", "0.5"], capsys, "must lie in [0, 0.5), got 0.5")
    simpo = train_dpo.parse_args(["--loss", "simpo"])  # per-token rewards: a larger beta, gamma = beta / 2
    assert (simpo.beta, simpo.simpo_gamma) == (2.0, 1.0) and train_dpo.parse_args([]).beta == 0.1
    assert train_dpo.parse_args(["--loss", "robust", "--label-smoothing", "0.2"]).label_smoothing == 0.2


# ---------------------------------------------------------------- end to end


def run_dpo(tiny, data, out, *extra):
    argv = ["--model", tiny, "--data", str(data), "--out", str(out), "--lr", "1e-3", "--max-len", "64"]
    argv += ["--responses", "0", "--log-every", "1", "--save-every", "0", *extra]
    train_dpo.main(argv)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), metrics


SQUEEZING = ("val_chosen_logp_token", "val_rejected_logp_token", "val_greedy_logp_token")


def test_simpo_runs_without_a_reference(tiny, tmp_path, shared, monkeypatch):
    shown = []
    real = train_dpo.all_pair_logprobs

    def spy(*args, **kwargs):
        shown.append(args[-1] if len(args) == 7 else kwargs.get("shown"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_dpo, "all_pair_logprobs", spy)
    data = shared / "data" / "instruction-data-with-preference.json"
    out = tmp_path / "simpo"
    s, metrics = run_dpo(tiny, data, out, "--loss", "simpo", "--beta", "1", "--steps", "3", "--limit", "60")
    assert shown and not any(name and "reference" in name for name in shown)  # only the policy's evaluations ran
    assert s["loss"] == "simpo" and s["ref_model"] is None and s["simpo_gamma"] == 0.5 and s["beta"] == 1.0
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert (out / "model.safetensors").is_file() and (out / "logps.svg").is_file()


def test_ipo_run_and_the_squeezing_diagnostic(tiny, tmp_path, shared, capsys):
    data = shared / "data" / "instruction-data-with-preference.json"
    out = tmp_path / "ipo"
    argv = ["--loss", "ipo", "--steps", "4", "--eval-every", "2", "--limit", "60", "--save-every", "4"]
    s, metrics = run_dpo(tiny, data, out, *argv, "--keep-checkpoint")
    assert s["loss"] == "ipo" and s["beta"] == 0.1 and s["label_smoothing"] == 0.0 and s["simpo_gamma"] is None
    # before training the policy is its reference: h = 0 on every pair, so the loss is (0 - 1/(2 beta))^2 exactly
    assert s["val_loss_before"] == pytest.approx(25.0, rel=1e-6) and s["val_loss_after"] < s["val_loss_before"]
    evaluations = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evaluations] == [0, 2, 4]
    for m in evaluations:
        assert all(math.isfinite(m[k]) and m[k] < 0 for k in SQUEEZING), m
    # the greedy answer takes the most likely token at each step: its tokens are likelier than the data's
    assert evaluations[0]["val_greedy_logp_token"] > evaluations[0]["val_chosen_logp_token"]
    svg = (out / "logps.svg").read_text()
    assert svg.startswith("<svg") and all(name in svg for name in ("chosen", "rejected", "greedy"))
    # a resumed run keeps the loss it trained with
    with pytest.raises(SystemExit) as e:
        train_dpo.parse_args(["--resume", str(out), "--loss", "sigmoid"])
    assert e.value.code == 2 and "the run was trained with --loss ipo" in capsys.readouterr().err


def test_squeezing_diagnostic_is_the_log_prob_per_token_of_all_answers(tiny, tmp_path, shared):
    # at step 0 the logged figures must equal a per-token mean (summed log-probs over summed token counts) that a
    # plain loop computes with the same model
    from nanotune.data.instruct import load_splits, prompt_ids

    data = shared / "data" / "instruction-data-with-preference.json"
    _, metrics = run_dpo(tiny, data, tmp_path / "steps0", "--steps", "0", "--limit", "40")
    enc, model = load_tokenizer(), GPT.from_pretrained(tiny).eval()
    _, val, _ = load_splits([data], "preference", 40, 1337)
    for key in ("chosen", "rejected"):
        total, tokens = 0.0, 0
        for ex in val:
            prompt, answer, _ = encode_pair(enc, prompt_ids(enc, ex, "alpaca"), ex[key], 64, "")
            ids = prompt + answer
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
            total += sum(logprobs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))
            tokens += len(answer)
        assert metrics[0][f"val_{key}_logp_token"] == pytest.approx(total / tokens, rel=1e-5)
    # the greedy answers, decoded one argmax at a time: up to min(--max-new-tokens 128, 32) tokens, or <|endoftext|>
    total, tokens = 0.0, 0
    for ex in val:
        ids = prompt_ids(enc, ex, "alpaca")
        for _ in range(32):
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), -1)
            ids.append(int(logprobs.argmax()))
            total, tokens = total + logprobs.max().item(), tokens + 1
            if ids[-1] == enc.eot_token:
                break
    assert metrics[0]["val_greedy_logp_token"] == pytest.approx(total / tokens, rel=1e-5)


# ---------------------------------------------------------------- raw-text continuations (--template raw)


def raw_pairs(shared, n=40):
    """Records as python -m nanotune.pairs writes them: a window of a book, then two continuations (the real one
    preferred to a shuffled one), each starting with a space and ending wherever the token budget ran out."""
    words = (shared / "data" / "gulliver.txt").read_text().split()[2000:]
    records = []
    for i in range(n):
        window = words[i * 30 : i * 30 + 30]
        prompt, following = " ".join(window[:20]), window[20:]
        records.append(
            {"prompt": prompt, "chosen": " " + " ".join(following), "rejected": " " + " ".join(following[::-1])}
        )
    return records


def test_raw_prompts_are_verbatim_and_raw_answers_have_no_endoftext():
    enc = load_tokenizer()
    ex = {"instruction": "It was a dark and stormy", "input": ""}
    assert format_prompt(ex, "raw") == "It was a dark and stormy"
    assert format_prompt(ex | {"input": "night."}, "raw") == "It was a dark and stormy\nnight."
    raw = enc.encode_ordinary(format_prompt(ex, "raw"))
    prompt, answer, cut = encode_pair(enc, raw, " night; the rain", 64, "", answers_end("raw"))
    assert prompt + answer == enc.encode_ordinary("It was a dark and stormy") + enc.encode_ordinary(" night; the rain")
    assert enc.eot_token not in answer and not cut
    # alpaca and plain answers still end with <|endoftext|>
    for template in ("alpaca", "plain"):
        prompt = enc.encode_ordinary(format_prompt(ex, template))
        _, answer, _ = encode_pair(enc, prompt, " night", 64, "", answers_end(template))
        assert answer == enc.encode_ordinary(" night") + [enc.eot_token]


def test_train_dpo_on_raw_continuations(tiny, tmp_path, shared):
    records = raw_pairs(shared)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    enc = load_tokenizer()
    args = train_dpo.parse_args(["--data", str(data), "--template", "raw", "--max-len", "96"])
    pairs, _, truncated = train_dpo.load_pairs(enc, args, master=True)
    by_prompt = {r["prompt"]: r for r in records}
    assert truncated == 0 and len(pairs["train"]) + len(pairs["val"]) >= 35
    for (prompt, chosen), (same_prompt, rejected) in pairs["train"] + pairs["val"]:
        record = by_prompt[enc.decode(prompt)]
        assert prompt == same_prompt == enc.encode_ordinary(record["prompt"])
        assert chosen == enc.encode_ordinary(record["chosen"]) and rejected == enc.encode_ordinary(record["rejected"])
    out = tmp_path / "dpo-raw"
    s, metrics = run_dpo(
        tiny,
        data,
        out,
        "--template",
        "raw",
        "--steps",
        "3",
        "--max-len",
        "96",
        "--responses",
        "2",
        "--max-new-tokens",
        "8",
    )
    assert s["status"] == "finished" and all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert len((out / "responses.jsonl").read_text().splitlines()) == 2


def test_train_reward_on_raw_continuations(tiny, tmp_path, shared):
    records = raw_pairs(shared)
    records[0] = {
        "prompt": records[0]["prompt"],
        "responses": [records[0]["chosen"], " and so", records[0]["rejected"]],
    }
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    enc = load_tokenizer()
    args = train_reward.parse_args(["--data", str(data), "--template", "raw", "--max-len", "96"])
    examples = formats.examples(records, data, "ranked")
    rankings, truncated = train_reward.encode_rankings(enc, examples, args)
    assert truncated == 0
    for ex, (answers, pairs) in zip(examples, rankings):
        prompt = ex["prompt"][0]["content"]
        expected = [enc.encode_ordinary(prompt) + enc.encode_ordinary(r) for r in ex["responses"]]
        assert answers == expected and len(pairs) == len(answers) * (len(answers) - 1) // 2
    out = tmp_path / "rm-raw"
    argv = ["--model", tiny, "--data", str(data), "--out", str(out), "--template", "raw", "--max-len", "96"]
    train_reward.main(argv + ["--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--save-every", "0"])
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "finished" and s["truncated_answers"] == 0 and math.isfinite(s["val_loss_after"])
