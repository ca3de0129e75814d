"""The four recipes end to end on a tiny random-init GPT-2 (official vocabulary, 2 layers, width 64), and
their refusals of bad input. Each run is called in-process through the script's main(argv)."""

import json
import math
import os
import random

import pytest
import torch

import train_dpo
import train_gulliver
import train_ppo
import train_sft
import train_xkl
from nanotune import GPT


def summary(out):
    return json.loads((out / "summary.json").read_text())


def assert_outputs(out, *files):
    for name in ("metrics.jsonl", "summary.json", "model.safetensors", "config.json", *files):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("step" in m for m in lines)
    GPT.from_pretrained(out)  # the saved weights load


# ---------------------------------------------------------------- runs


def test_xkl_makes_the_model_like_x(tiny, tmp_path):
    out = tmp_path / "xkl"
    train_xkl.main(
        [
            "--model",
            tiny,
            "--out",
            str(out),
            "--lr",
            "3e-3",
            "--steps",
            "25",
            "--seq-len",
            "16",
            "--positions",
            "all",
            "--log-every",
            "5",
        ]
    )
    s = summary(out)
    print(
        f"\nxkl tiny: x_share {s['x_share_before']:.3f} -> {s['x_share_after']:.3f}, "
        f"loss {s['loss_first']:.3f} -> {s['loss_last']:.4f}"
    )
    assert s["x_share_before"] < 0.1 and s["x_share_after"] >= 0.9
    assert s["loss_last"] < s["loss_first"]
    assert {"x_share_before", "x_share_after", "loss_first", "loss_last", "steps", "lr"} <= set(s)
    assert_outputs(out, "samples_before.txt", "samples_after.txt", "loss.svg")


def test_gulliver_lowers_heldout_loss_and_raises_top100_share(tiny, tmp_path, shared):
    out = tmp_path / "gulliver"
    train_gulliver.main(
        [
            "--model",
            tiny,
            "--data",
            str(shared / "data" / "gulliver.txt"),
            "--out",
            str(out),
            "--lr",
            "3e-3",
            "--steps",
            "30",
            "--batch-size",
            "8",
            "--seq-len",
            "64",
            "--eval-every",
            "10",
            "--eval-batches",
            "2",
            "--log-every",
            "10",
        ]
    )
    s = summary(out)
    print(
        f"\ngulliver tiny: top100_share {s['top100_share_before']:.3f} -> {s['top100_share_after']:.3f}, "
        f"held-out loss {s['val_loss_first']:.3f} -> {s['val_loss_last']:.3f}"
    )
    assert s["val_loss_last"] < s["val_loss_first"] - 1.0
    assert s["top100_share_after"] > s["top100_share_before"] + 0.2
    assert {
        "top100_share_before",
        "top100_share_after",
        "train_loss_last",
        "val_loss_first",
        "val_loss_best",
        "val_loss_last",
    } <= set(s)
    assert_outputs(out, "samples_before.txt", "samples_after.txt", "loss.svg")


@pytest.fixture(scope="module")
def sft_out(tiny, tmp_path_factory, shared):
    out = tmp_path_factory.mktemp("sft")
    train_sft.main(
        [
            "--model",
            tiny,
            "--data",
            str(shared / "data" / "instruction-data.json"),
            "--out",
            str(out),
            "--lr",
            "2e-3",
            "--steps",
            "25",
            "--limit",
            "300",
            "--max-len",
            "80",
            "--eval-every",
            "25",
            "--responses",
            "3",
            "--max-new-tokens",
            "16",
            "--log-every",
            "5",
        ]
    )
    return out


def transformers_val_loss(model_dir, data, limit, max_len, seed=1337):
    """SFT's validation loss computed independently: transformers' own labels= loss (mean NLL of the unmasked
    next tokens) on each validation example, with the prompt masked by -100, token-weighted over the split."""
    from transformers import GPT2LMHeadModel

    from nanotune import load_tokenizer
    from nanotune.data.instruct import format_prompt, load_splits

    enc = load_tokenizer()
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    _, val, _ = load_splits([data], "sft", limit, seed)
    total, count = 0.0, 0
    for ex in val:
        (user,) = ex["prompt"]  # one instruction and its input: the Alpaca layout written out here
        prompt = enc.encode_ordinary(format_prompt({"instruction": user["content"], "input": user.get("input")}))
        ids = (prompt + enc.encode_ordinary(ex["answer"]) + [enc.eot_token])[: max_len + 1]
        labels = torch.tensor([-100] * len(prompt) + ids[len(prompt) :])  # transformers shifts labels itself
        with torch.no_grad():
            loss = hf(torch.tensor([ids]), labels=labels[None]).loss.item()
        n = len(ids) - len(prompt)
        total, count = total + loss * n, count + n
    return total / count


@pytest.mark.parametrize("seed", [1337, 0, 7])
def test_the_split_never_trains_on_a_held_out_prompt(seed, shared):
    from nanotune.data.formats import prompt_key
    from nanotune.data.instruct import load_examples, split_examples

    data = shared / "data" / "instruction-data.json"  # 1,100 records, 1,075 distinct prompts
    examples = load_examples(data)
    train, val, test = split_examples(examples, seed)
    prompts = [{prompt_key(e) for e in part} for part in (train, val, test)]
    assert not prompts[0] & (prompts[1] | prompts[2]) and not prompts[1] & prompts[2]
    assert sorted(map(id, train + val + test)) == sorted(map(id, examples))  # every example once
    assert abs(len(val) - 55) <= 10 and abs(len(test) - 110) <= 15  # ~5% and ~10%, give or take the repeats
    # preference pairs as nanotune.pairs writes them, 6 to a prompt: 5% of 40 prompts is 2 held out, with their pairs
    pairs = [{"prompt": [{"role": "user", "content": f"prompt {i}"}]} for i in range(40) for _ in range(6)]
    assert [len(part) for part in split_examples(pairs, seed)] == [34 * 6, 2 * 6, 4 * 6]


def test_the_split_of_distinct_prompts_is_a_seeded_shuffle():  # (as before prompts were grouped: same results)
    from nanotune.data.instruct import split_examples

    examples = [{"prompt": [{"role": "user", "content": f"prompt {i}"}]} for i in range(200)]
    order = list(range(200))
    random.Random(1337).shuffle(order)
    train, val, test = split_examples(examples, 1337)
    assert train + val + test == [examples[i] for i in order] and (len(train), len(val)) == (170, 10)


def test_sft_lowers_validation_perplexity(sft_out, shared):
    s = summary(sft_out)
    print(
        f"\nsft tiny: val ppl {s['val_ppl_before']:.1f} -> {s['val_ppl_after']:.1f}, "
        f"{s['truncated_examples']} truncated"
    )
    assert s["val_loss_after"] < s["val_loss_before"] - 1.0
    # the reported loss is the one transformers computes on the saved weights, and perplexity is its exp
    expected = transformers_val_loss(sft_out, shared / "data" / "instruction-data.json", limit=300, max_len=80)
    assert s["val_loss_after"] == pytest.approx(expected, abs=1e-4)
    assert s["val_ppl_after"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert s["train_examples"] == 255 and s["truncated_examples"] > 0  # 300 * 0.85; --max-len 80 cuts a few
    responses = [json.loads(line) for line in (sft_out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 3 and {"source", "record", "prompt", "reference", "model"} <= set(responses[0])
    assert_outputs(sft_out, "responses.jsonl", "loss.svg")


def test_dpo_from_sft_raises_heldout_reward_accuracy(sft_out, tmp_path, shared):
    out = tmp_path / "dpo"
    train_dpo.main(
        [
            "--model",
            str(sft_out),
            "--data",
            str(shared / "data" / "instruction-data-with-preference.json"),
            "--out",
            str(out),
            "--lr",
            "1e-3",
            "--steps",
            "20",
            "--limit",
            "300",
            "--max-len",
            "128",
            "--eval-every",
            "10",
            "--responses",
            "2",
            "--max-new-tokens",
            "8",
            "--log-every",
            "5",
        ]
    )
    s = summary(out)
    print(
        f"\ndpo tiny: val reward accuracy {s['val_reward_accuracy_before']:.3f} -> "
        f"{s['val_reward_accuracy_after']:.3f}, margin {s['val_margin_after']:.3f}"
    )
    assert s["val_reward_accuracy_after"] > 0.5 and s["val_margin_after"] > 0
    assert s["val_loss_after"] < s["val_loss_before"]
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"before", "after", "chosen", "rejected"} <= set(rows[0])
    assert_outputs(out, "responses.jsonl", "loss.svg")


def test_dpo_metrics_before_training_equal_an_independent_computation(sft_out, tiny, tmp_path, shared):
    # policy (the SFT output) and reference (the random tiny model) differ, so nothing is zero by construction:
    # the held-out loss and reward accuracy before training must equal DPO's formula in float64 on log-probs
    # that transformers computes for both models
    from transformers import GPT2LMHeadModel

    from nanotune import load_tokenizer
    from nanotune.data.instruct import format_prompt, load_splits

    data = shared / "data" / "instruction-data-with-preference.json"
    out = tmp_path / "dpo"
    train_dpo.main(
        [
            "--model",
            str(sft_out),
            "--ref-model",
            tiny,
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "0",
            "--limit",
            "120",
            "--max-len",
            "96",
            "--responses",
            "0",
            "--beta",
            "0.5",
        ]
    )
    s = summary(out)
    enc = load_tokenizer()
    policy, reference = (GPT2LMHeadModel.from_pretrained(m).eval() for m in (sft_out, tiny))
    _, val, _ = load_splits([data], "preference", 120, 1337)

    def logp(model, prompt, response):
        ids = (prompt + enc.encode_ordinary(response) + [enc.eot_token])[:97]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        return sum(logprobs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))

    losses, wins = [], []
    for ex in val:
        (user,) = ex["prompt"]
        prompt = enc.encode_ordinary(format_prompt({"instruction": user["content"], "input": user.get("input")}))
        chosen = logp(policy, prompt, ex["chosen"]) - logp(reference, prompt, ex["chosen"])
        rejected = logp(policy, prompt, ex["rejected"]) - logp(reference, prompt, ex["rejected"])
        z = 0.5 * (chosen - rejected)
        losses.append(math.log1p(math.exp(-z)) if z > -30 else -z)
        wins.append(chosen > rejected)
    assert s["val_loss_before"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert s["val_reward_accuracy_before"] == pytest.approx(sum(wins) / len(wins))
    assert 0 < s["val_reward_accuracy_before"] < 1 and abs(s["val_loss_before"] - math.log(2)) > 0.05


# ---------------------------------------------------------------- bad input: refused before training


def refused(main, argv, capsys, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_xkl_bad_input(tiny, tmp_path, capsys):
    base = ["--model", tiny, "--out", str(tmp_path / "x")]
    refused(
        train_xkl.main,
        base + ["--target", "smoothed", "--alpha", "1.0"],
        capsys,
        "argument --alpha: must lie in (0, 1), got 1.0",
    )
    refused(
        train_xkl.main, base + ["--target", "smoothed", "--alpha", "0"], capsys, "--alpha: must lie in (0, 1), got 0"
    )
    refused(train_xkl.main, base + ["--alpha", "0.5"], capsys, "--target uniform has none")  # (not ignored)
    refused(train_xkl.main, base + ["--letter", "\u263a"], capsys, "no token of the vocabulary contains")
    refused(train_xkl.main, base + ["--input", "text", str(tmp_path / "missing.txt")], capsys, "does not exist")
    (tmp_path / "empty.txt").write_text("")
    refused(train_xkl.main, base + ["--input", "text", str(tmp_path / "empty.txt")], capsys, "is empty")
    (tmp_path / "short.txt").write_text("Too short.")
    refused(train_xkl.main, base + ["--input", "text", str(tmp_path / "short.txt")], capsys, "fewer than one window")
    refused(train_xkl.main, base + ["--input", "text"], capsys, "--input takes 'random' or 'text FILE'")
    assert not (tmp_path / "x").exists()  # nothing was started


def test_gulliver_bad_input(tiny, tmp_path, capsys):
    base = ["--model", tiny, "--out", str(tmp_path / "g")]
    refused(train_gulliver.main, base + ["--data", str(tmp_path / "missing.txt")], capsys, "does not exist")
    (tmp_path / "empty.txt").write_text("*** START OF THE BOOK ***\n\n*** END OF THE BOOK ***\n")
    refused(train_gulliver.main, base + ["--data", str(tmp_path / "empty.txt")], capsys, "is empty")
    (tmp_path / "short.txt").write_text("A very short book. " * 20)
    refused(train_gulliver.main, base + ["--data", str(tmp_path / "short.txt")], capsys, "too short for windows")
    assert not (tmp_path / "g").exists()


def test_sft_and_dpo_bad_input(tiny, tmp_path, capsys):
    base = ["--model", tiny, "--out", str(tmp_path / "s")]
    (tmp_path / "empty.json").write_text("")
    refused(train_sft.main, base + ["--data", str(tmp_path / "empty.json")], capsys, "is empty")
    (tmp_path / "nothing.json").write_text("[]")
    refused(train_sft.main, base + ["--data", str(tmp_path / "nothing.json")], capsys, "holds no examples")
    good = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    (tmp_path / "missing.json").write_text(json.dumps([good, good, {"instruction": "No answer"}]))
    refused(train_sft.main, base + ["--data", str(tmp_path / "missing.json")], capsys, "record 2 has no 'output' key")
    long_prompts = [{"instruction": "word " * 400, "input": str(i), "output": "ok"} for i in range(40)]
    (tmp_path / "long.json").write_text(json.dumps(long_prompts))
    refused(
        train_sft.main,
        base + ["--data", str(tmp_path / "long.json"), "--max-len", "64"],
        capsys,
        "leaving no room for a response within --max-len 64",
    )
    pairs = [{"instruction": f"Say hi ({i}).", "chosen": "Hi.", "rejected": "Go away."} for i in range(40)]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    refused(
        train_dpo.main,
        base + ["--data", str(tmp_path / "pairs.json"), "--beta", "0"],
        capsys,
        "argument --beta: must be > 0, got 0",
    )
    (tmp_path / "no_rejected.json").write_text(json.dumps([{"instruction": "a", "chosen": "b"}]))
    refused(
        train_dpo.main, base + ["--data", str(tmp_path / "no_rejected.json")], capsys, "record 0 has no 'rejected' key"
    )
    assert not (tmp_path / "s").exists()


def test_prompt_response_pairs_are_accepted(tiny, tmp_path):
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(60)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "qa"
    train_sft.main(
        [
            "--model",
            tiny,
            "--data",
            str(tmp_path / "qa.jsonl"),
            "--out",
            str(out),
            "--template",
            "plain",
            "--steps",
            "2",
            "--responses",
            "1",
            "--max-new-tokens",
            "4",
            "--no-save",
        ]
    )
    s = summary(out)
    assert s["train_examples"] == 51 and not (out / "model.safetensors").exists()


ACCUM_ARGS = {
    "xkl": ["--seq-len", "8", "--gen-tokens", "2"],
    "gulliver": [
        "--data",
        "{data}/gulliver.txt",
        "--seq-len",
        "32",
        "--eval-batches",
        "1",
        "--samples",
        "1",
        "--sample-tokens",
        "2",
    ],
    "sft": ["--data", "{data}/instruction-data.json", "--limit", "60", "--max-len", "64", "--responses", "0"],
    "dpo": [
        "--data",
        "{data}/instruction-data-with-preference.json",
        "--limit",
        "60",
        "--max-len",
        "64",
        "--responses",
        "0",
    ],
    # one rollout of 4 answers, one epoch: one optimizer step over the minibatch of 4
    "ppo": [
        "--reward",
        "letter:x",
        "--books",
        "{data}/corpus/pg11.txt",
        "--heldout-book",
        "{data}/gulliver.txt",
        "--prompt-len",
        "8",
        "--max-new-tokens",
        "6",
        "--rollout-batch",
        "4",
        "--ppo-epochs",
        "1",
        "--eval-prompts",
        "2",
        "--samples",
        "0",
    ],
}


@pytest.mark.parametrize("name", list(ACCUM_ARGS))
def test_grad_accum_gives_the_same_update(name, tiny, tmp_path, shared):
    # one optimizer step over 4 sequences at once, or as 4 micro-batches of 1: the same weights afterwards.
    # One step of Adam from zero state moves each weight by about lr * sign(gradient), so a micro-batch
    # weighted wrongly flips signs and shows up at the size of lr (1e-3) in many weights; summation order shows up
    # below 1e-6, except in the odd weight whose gradient is near Adam's eps (1e-8), where the step is
    # lr * g / (|g| + eps) and rounding moves it by up to ~1e-4 (PPO: one c_fc weight, 8.9e-05).
    from safetensors.torch import load_file

    main = {"xkl": train_xkl, "gulliver": train_gulliver, "sft": train_sft, "dpo": train_dpo, "ppo": train_ppo}[
        name
    ].main
    extra = [a.format(data=shared / "data") for a in ACCUM_ARGS[name]]
    weights = {}
    for accum in (1, 4):
        out = tmp_path / f"accum{accum}"
        main(
            [
                "--model",
                tiny,
                "--out",
                str(out),
                "--lr",
                "1e-3",
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--grad-accum",
                str(accum),
                "--grad-clip",
                "0",
                "--save-every",
                "0",
            ]
            + extra
        )
        weights[accum] = load_file(str(out / "model.safetensors"))
    start = load_file(os.path.join(tiny, "model.safetensors"))
    assert (weights[1]["h.0.attn.c_attn.weight"] - start["h.0.attn.c_attn.weight"]).abs().max() > 1e-4  # it moved
    worst = max((weights[1][k] - weights[4][k]).abs().max().item() for k in weights[1])
    above = sum(int(((weights[1][k] - weights[4][k]).abs() > 1e-5).sum()) for k in weights[1])
    print(f"\n{name}: max |weight difference| accum 1 vs 4 = {worst:.2e}, {above} weights differ by > 1e-5")
    assert worst < 2.5e-4 and above <= 5


def test_activation_checkpointing_flag_reaches_the_model(tiny, tmp_path, monkeypatch, capsys):
    # --activation-checkpointing routes every block (or the first N) through torch.utils.checkpoint and changes
    # no weight
    import torch.utils.checkpoint
    from safetensors.torch import load_file

    checkpoint, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    weights = {}
    for flag, expected_calls in (
        ([], 0),
        (["--activation-checkpointing"], 4),
        (["--activation-checkpointing", "1"], 2),
    ):
        calls.clear()
        out = tmp_path / f"run{len(flag)}"
        train_xkl.main(
            [
                "--model",
                tiny,
                "--out",
                str(out),
                "--lr",
                "1e-3",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--save-every",
                "0",
            ]
            + ACCUM_ARGS["xkl"]
            + flag
        )
        weights[len(flag)] = load_file(str(out / "model.safetensors"))
        assert len(calls) == expected_calls  # 2 steps x 2 blocks, or x the first block
    for n in (1, 2):
        assert max((weights[0][k] - weights[n][k]).abs().max().item() for k in weights[0]) < 1e-5
    refused(
        train_xkl.main,
        ["--model", tiny, "--out", str(tmp_path / "bad"), "--activation-checkpointing", "3"],
        capsys,
        "--activation-checkpointing 3: the model has 2 blocks",
    )
