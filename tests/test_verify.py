"""python -m nanotune.verify: passes on correct weights in every form a user has them, fails when nanotune is
wrong, and says what is missing on bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import hf_model, write_official

from nanotune import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def report(argv, tmp_path):
    code = verify.main(argv + ["--json", str(tmp_path / "report.json")])
    return code, json.loads((tmp_path / "report.json").read_text())


@pytest.mark.parametrize("form", ["official folder", "bare safetensors file", "recipe output"])
def test_verify_passes_on_matching_weights(form, tmp_path, tiny):
    if form == "recipe output":
        model = tiny  # written by nanotune's save_pretrained, as every recipe writes its result
    else:
        folder = write_official(
            hf_model(n_layer=2, n_embd=768, n_head=12, seed=4), tmp_path / "ckpt", config=form == "official folder"
        )
        model = str(folder if form == "official folder" else folder / "model.safetensors")
    code, r = report(["--model", model, "--windows", "1", "--window-len", "200", "--tokens", "12"], tmp_path)
    assert code == 0 and r["pass"]
    assert r["max_abs_diff"] < 1e-4 and r["top1_agreement"] == 1.0 and r["positions"] == 200
    assert r["greedy"]["identical"] and len(r["greedy"]["nanotune"]) == 12


def test_verify_fails_when_nanotune_is_wrong(tmp_path, tiny, monkeypatch, capsys):
    real = verify.GPT.from_pretrained

    def off_by_a_little(*args, **kwargs):  # a loader bug: the final LayerNorm's bias shifted
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.ln_f.bias += 0.05
        return model

    monkeypatch.setattr(verify.GPT, "from_pretrained", off_by_a_little)
    code, r = report(["--model", tiny, "--windows", "1", "--window-len", "64", "--tokens", "4"], tmp_path)
    assert code == 1 and not r["pass"] and r["max_abs_diff"] > 1e-3
    assert "FAIL: logits differ by" in capsys.readouterr().out


def test_verify_bad_input(tmp_path, tiny, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        verify.main(["--model", str(tmp_path / "nope")])
    assert e.value.code == 2 and "could not load --model" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit) as e:
        verify.main(["--model", tiny, "--text", str(tmp_path / "empty.txt")])
    assert e.value.code == 2 and "holds no text" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(SystemExit) as e:
        verify.main(["--model", tiny])
    assert e.value.code == 2 and 'pip install -e ".[verify]"' in capsys.readouterr().err


def test_verify_command_on_the_bundled_model():
    r = subprocess.run(
        [sys.executable, "-m", "nanotune.verify", "--model", "weights/nano", "--windows", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PASS: nanotune matches transformers" in r.stdout and "greedy 32 tokens         identical" in r.stdout


def test_verify_checks_reward_models_and_lora_folders(tiny, tmp_path):

    from nanotune import GPT
    from nanotune.lifecycle.checkpoint import save_trained
    from nanotune.model.peft import PeftSpec, apply_peft
    from nanotune.model.reward_model import RewardModel

    torch.manual_seed(0)
    RewardModel(GPT.from_pretrained(tiny)).save_pretrained(tmp_path / "rm")
    code, r = report(["--model", str(tmp_path / "rm"), "--windows", "1", "--window-len", "64"], tmp_path)
    assert code == 0 and r["kind"] == "reward" and r["max_abs_diff"] < 1e-5 and r["greedy"] is None
    lora = apply_peft(
        GPT.from_pretrained(tiny),
        PeftSpec(
            method="lora",
            lora_r=4,
            lora_alpha=8.0,
            lora_dropout=0.0,
            lora_targets="all",
            adapter_size=8,
            prompt_tokens=5,
            seed=0,
        ),
        tiny,
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_trained(lora, tmp_path / "sft")
    code, r = report(
        ["--model", str(tmp_path / "sft" / "lora"), "--windows", "1", "--window-len", "64", "--tokens", "8"], tmp_path
    )
    assert code == 0 and r["kind"] == "lora" and r["max_abs_diff"] < 1e-4 and r["greedy"]["identical"]
