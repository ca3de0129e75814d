"""Parameter-efficient fine-tuning (nanotune/model/peft.py): each method starts as the base model, trains only its
own tensors, saves and loads (LoRA in the peft library's format, both ways), and refuses bad settings."""

import importlib
import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from helpers import run_main
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import train_sft
import train_xkl
from nanotune import GPT, generate
from nanotune.data.instruct import IGNORE
from nanotune.lifecycle.checkpoint import save_trained
from nanotune.lifecycle.run import Run
from nanotune.model.loader import load_model
from nanotune.model.peft import PEFT_PREFIX, PeftSpec, apply_peft, load_adapter_folder, merge

METHODS = ["lora", "adapter", "lora+adapter", "prompt"]


def peft_args(method, **kw):
    return PeftSpec(
        **(
            {
                "method": method,
                "lora_r": 4,
                "lora_alpha": 8.0,
                "lora_dropout": 0.0,
                "lora_targets": "all",
                "adapter_size": 8,
                "prompt_tokens": 5,
                "seed": 0,
            }
            | kw
        )
    )


def with_peft(tiny, method, **kw):
    return apply_peft(GPT.from_pretrained(tiny), peft_args(method, **kw), tiny)


def perturb_new_tensors(model, seed=0):
    """Random values in every tensor the method added (at init LoRA's B and the adapters' up are zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


IDX = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(3))


def load(path):
    """Any model folder, as --model reads it (a LoRA or adapter folder: its base model + the saved tensors)."""
    return load_model(str(path), torch.device("cpu"))[0]


@pytest.mark.parametrize("method", ["lora", "adapter", "lora+adapter"])
def test_lora_and_adapters_start_exactly_as_the_base_model(method, tiny):
    base = GPT.from_pretrained(tiny)
    model = with_peft(tiny, method)
    with torch.no_grad():
        assert torch.equal(model(IDX), base(IDX))


def test_prompt_tuning_logits_are_a_base_forward_over_virtual_embeddings_then_tokens(tiny):
    model = with_peft(tiny, "prompt")
    base = GPT.from_pretrained(tiny)
    with torch.no_grad():
        ours = model(IDX)  # (B, T, V): real tokens only
        # the same computation written out on the base model: [prompt, wte(tokens)] + positions 0..N+T-1
        x = torch.cat([model.prompt.expand(2, -1, -1), base.wte(IDX)], dim=1)
        x = x + base.wpe(torch.arange(x.shape[1]))[None]
        for block in base.h:
            x = block(x)
        expected = base.ln_f(x)[:, 5:] @ base.wte.weight.t()
    assert ours.shape == (2, 24, 50257)
    assert (ours - expected).abs().max() <= 1e-4
    assert (ours - base(IDX)).abs().max() > 1e-3  # the virtual tokens do change the logits
    # the embeddings start as copies of real vocabulary rows
    assert all(any(torch.equal(row, w) for w in base.wte.weight) for row in model.prompt[:2])


@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_only_the_new_tensors(method, tiny):
    model = with_peft(tiny, method).train()
    base = {k: v.clone() for k, v in GPT.from_pretrained(tiny).state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(IDX)[:, :-1].flatten(0, 1), IDX[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"{name} (frozen) has a gradient"
    optimizer.step()
    state = model.state_dict()
    for key, value in base.items():
        assert torch.equal(state[key], value), f"{key} (base) changed"
    new = [k for k in state if k not in base]
    assert new and any(not torch.equal(state[k], with_peft(tiny, method).state_dict()[k]) for k in new)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.2 * sum(p.numel() for p in model.parameters())


def test_merged_lora_equals_unmerged(tiny):
    model = perturb_new_tensors(with_peft(tiny, "lora")).eval()
    with torch.no_grad():
        unmerged = model(IDX)
        merged = merge(model)
        assert not any("lora" in k for k in merged.state_dict())  # a plain GPT-2 again
        assert (merged(IDX) - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(method, tiny, tmp_path):
    model = perturb_new_tensors(with_peft(tiny, method)).eval()
    save_trained(model, tmp_path)
    adapter = tmp_path / "lora" if method == "lora" else tmp_path
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter / config["base_model_name_or_path"]).resolve() == Path(tiny).resolve()  # relative to it
    with torch.no_grad():
        expected = model(IDX)
        reloaded = load(tmp_path)  # LoRA: the merged model.safetensors; others: base + additions
        assert (reloaded(IDX) - expected).abs().max() <= 1e-5
        assert (load(adapter)(IDX) - expected).abs().max() <= 1e-5  # base + the saved tensors
    if method == "lora":
        assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
        assert (tmp_path / "model.safetensors").is_file()
    else:
        assert config["peft_type"] == "NANOTUNE" and not (tmp_path / "model.safetensors").exists()
    sizes = (adapter / "adapter_model.safetensors").stat().st_size
    assert sizes < os.path.getsize(os.path.join(tiny, "model.safetensors")) / 5


def test_peft_library_loads_nanotunes_lora_with_the_same_logits(tiny, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = perturb_new_tensors(with_peft(tiny, "lora")).eval()
    save_trained(model, tmp_path)
    hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny), tmp_path / "lora").eval()
    with torch.no_grad():
        assert (hf(IDX).logits - model(IDX)).abs().max() <= 1e-4
        # and the merged full model loads in transformers alone
        assert (GPT2LMHeadModel.from_pretrained(tmp_path)(IDX).logits - model(IDX)).abs().max() <= 1e-4


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"]])
def test_nanotune_loads_a_lora_that_peft_saved(targets, tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, task_type="CAUSAL_LM")
    hf = get_peft_model(GPT2LMHeadModel.from_pretrained(tiny), config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft starts B at zero too: make the update visible
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path).eval()
    assert ours.peft["method"] == "lora" and sorted(ours.peft["targets"]) == sorted(targets)
    with torch.no_grad():
        assert (ours(IDX) - hf.eval()(IDX).logits).abs().max() <= 1e-4


def test_generation_with_prompt_tuning_matches_recomputation(tiny):
    model = perturb_new_tensors(with_peft(tiny, "prompt")).eval()
    prompt = IDX[:, :6]
    cached = generate(model, prompt, 10, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)
    batched = generate(model, [[5, 6, 7, 8], [9]], 6, temperature=0)  # left padding + virtual tokens
    assert batched[1] == generate(model, torch.tensor([9]), 6, temperature=0).tolist()
    with pytest.raises(ValueError, match="5 prompt-tuning embeddings"):
        generate(model, prompt, 256 - 6)


# ---------------------------------------------------------------- the recipes with --peft


@pytest.mark.parametrize("method", METHODS)
def test_sft_trains_with_each_method(method, tiny, shared, tmp_path, capsys):
    out = tmp_path / method
    train_sft.main(
        [
            "--model",
            tiny,
            "--data",
            str(shared / "data" / "instruction-data.json"),
            "--out",
            str(out),
            "--limit",
            "80",
            "--max-len",
            "64",
            "--steps",
            "6",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--responses",
            "1",
            "--max-new-tokens",
            "4",
            "--peft",
            method,
            "--adapter-size",
            "16",
            "--prompt-tokens",
            "4",
        ]
    )
    printed = capsys.readouterr().out
    assert f"({method}: trainable " in printed and "%)" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["val_loss_after"] < s["val_loss_before"]
    model = load(out)
    base = GPT.from_pretrained(tiny)
    if method == "lora":  # merged: a plain GPT-2 whose c_attn weights moved and whose other weights did not
        assert not torch.equal(model.h[0].attn.c_attn.weight, base.h[0].attn.c_attn.weight)
        assert torch.equal(model.h[0].mlp.c_fc.weight, base.h[0].mlp.c_fc.weight)
    else:
        assert model.peft["method"] == method


def test_peft_run_resumes_bit_identically(tiny, tmp_path, monkeypatch):
    base = [
        "--model",
        tiny,
        "--steps",
        "6",
        "--seq-len",
        "8",
        "--gen-tokens",
        "4",
        "--lr",
        "1e-2",
        "--peft",
        "lora+adapter",
        "--save-every",
        "0",
    ]
    train_xkl.main(base + ["--out", str(tmp_path / "whole")])
    check, sent = Run.stop_if_diverged, []

    def interrupt_at_3(self, step, *args, **kwargs):
        if step == 3 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return check(self, step, *args, **kwargs)

    monkeypatch.setattr(Run, "stop_if_diverged", interrupt_at_3)
    with pytest.raises(SystemExit) as e:
        train_xkl.main(base + ["--out", str(tmp_path / "cut")])
    assert e.value.code == 130
    ckpt = tmp_path / "cut" / "checkpoints" / "step-000003"  # lora+adapter: nanotune's format, no full model
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    monkeypatch.setattr(Run, "stop_if_diverged", check)
    train_xkl.main(["--resume", str(tmp_path / "cut")])
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_peft_settings_are_clear_errors(tiny, tmp_path, capsys):
    base = ["--model", tiny, "--out", str(tmp_path / "x"), "--steps", "1"]
    for extra, message in [
        (["--peft", "lora", "--lora-r", "0"], "argument --lora-r: must be >= 1, got 0"),
        (["--peft", "lora", "--lora-targets", "c_attn,q_proj"], "--lora-targets: unknown layer q_proj"),
        (
            ["--peft", "prompt", "--prompt-tokens", "200", "--seq-len", "64"],
            "--seq-len 64 exceeds the model's context of 56",
        ),
    ]:
        assert run_main(train_xkl.main, base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # an adapter folder whose base model has gone
    model = with_peft(tiny, "adapter")
    save_trained(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"its base model .*moved-away.* could not be loaded"):
        load_adapter_folder(tmp_path / "adapter")
    assert run_main(train_xkl.main, ["--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "y")]) == 2
    assert "could not load --model" in capsys.readouterr().err


# ---------------------------------------------------------------- SFT's auxiliary language-modelling loss


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(3, 10), st.floats(0.0, 2.0), st.integers(0, 2**31 - 1))
def test_sft_loss_is_response_nll_plus_weighted_prompt_nll(B, T, lm_weight, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, 13, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, 13, (B, T), generator=g)
    split = torch.randint(1, T, (B,), generator=g)  # positions < split predict prompt tokens
    labels, prompt_labels = tokens.clone(), tokens.clone()
    for b in range(B):
        labels[b, : split[b]] = IGNORE
        prompt_labels[b, split[b] :] = IGNORE
    expected = {"response": [], "prompt": []}
    for b in range(B):
        for t in range(T):
            nll = -(logits[b, t, tokens[b, t]] - torch.logsumexp(logits[b, t], 0)).item()
            expected["response" if t >= split[b] else "prompt"].append(nll)
    L2 = sum(expected["response"]) / len(expected["response"])
    L1 = sum(expected["prompt"]) / len(expected["prompt"])
    ours = train_sft.sft_loss(logits, labels, prompt_labels, lm_weight).item()
    # token_logprobs works in float32: its mean is good to about 1e-6 relative (hypothesis once found 1.4e-6),
    # while a wrong mask or weight is off by far more than 1e-5
    assert ours == pytest.approx(L2 + lm_weight * L1, rel=1e-5)
    assert train_sft.sft_loss(logits, labels).item() == pytest.approx(L2, rel=1e-5)
    assert math.isfinite(ours)


def test_lm_weight_trains_the_prompt_tokens_too(tiny, shared, tmp_path):
    # with --lm-weight the prompt's own next tokens enter the loss: its reported training loss is larger
    # (L2 + L * L1 with L1 > 0), and the weights move differently
    from safetensors.torch import load_file

    losses, weights = {}, {}
    for w in ("0", "0.5"):
        out = tmp_path / w
        train_sft.main(
            [
                "--model",
                tiny,
                "--data",
                str(shared / "data" / "instruction-data.json"),
                "--out",
                str(out),
                "--limit",
                "60",
                "--max-len",
                "64",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--responses",
                "0",
                "--lm-weight",
                w,
                "--log-every",
                "1",
            ]
        )
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
        losses[w], weights[w] = first["loss"], load_file(str(out / "model.safetensors"))
    assert losses["0.5"] > losses["0"] + 2.0  # + 0.5 x ~10.8 nats of prompt NLL on a random model
    assert not torch.equal(weights["0"]["h.0.attn.c_attn.weight"], weights["0.5"]["h.0.attn.c_attn.weight"])


@pytest.mark.parametrize("recipe", ["train_dpo", "train_ppo", "train_grpo"])
def test_recipes_that_compare_log_probs_offer_no_lora_dropout(recipe, capsys):
    # their log-ratios compare the policy with log-probs read without dropout: its noise would enter every ratio
    module = importlib.import_module(recipe)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--peft", "lora", "--lora-dropout", "0.1"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --lora-dropout" in capsys.readouterr().err
    assert importlib.import_module("train_sft").parse_args(["--lora-dropout", "0.1"]).lora_dropout == 0.1


def test_a_lora_folder_whose_tensor_holds_a_nan_is_refused_at_load_naming_it(tiny, tmp_path, capsys):
    # issue 34's probe: a LoRA folder with a NaN in one adapter tensor must not load silently
    save_trained(perturb_new_tensors(with_peft(tiny, "lora")), tmp_path / "run")
    adapter = tmp_path / "run" / "lora"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    key = name.removeprefix(PEFT_PREFIX).removesuffix(".weight")
    with pytest.raises(ValueError, match=rf"tensor {re.escape(key)} holds NaN/inf values"):
        load_adapter_folder(adapter)
    assert run_main(train_xkl.main, ["--model", str(adapter), "--out", str(tmp_path / "x")]) == 2
    assert f"tensor {key} holds NaN/inf values" in capsys.readouterr().err
