"""The bundled weights/nano model: it loads, matches transformers, still predicts the corpus as recorded, and is
what --model auto falls back to offline (while --model gpt2 fails clearly)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nanotune import GPT
from nanotune.pretrain import fixed_slice_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANO = os.path.join(ROOT, "weights", "nano")


def offline_env(tmp_path):
    """No network, an empty Hugging Face cache and an empty weights folder: no official GPT-2 anywhere."""
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        NANOTUNE_WEIGHTS_DIR=str(tmp_path / "weights"),
        OMP_NUM_THREADS="2",
    )


def test_nano_is_small_and_loads_like_transformers():
    from transformers import GPT2LMHeadModel

    assert os.path.getsize(os.path.join(NANO, "model.safetensors")) <= 25_000_000
    ours = GPT.from_pretrained(NANO)
    theirs = GPT2LMHeadModel.from_pretrained(NANO, dtype=torch.float32).eval()
    idx = torch.randint(0, 50257, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4


def test_nano_heldout_loss_is_as_recorded(shared):
    recorded = json.loads(open(os.path.join(NANO, "eval.json")).read())
    loss = fixed_slice_loss(GPT.from_pretrained(NANO), shared / "data" / "corpus", **recorded["slice"])
    assert loss <= recorded["fixed_slice_loss"] + 0.05
    assert loss <= recorded["unigram_baseline"] - 1.0  # the quality bar of the model card


def test_auto_falls_back_to_nano_offline_and_explicit_gpt2_fails(tiny, tmp_path):
    env = offline_env(tmp_path)
    base = [sys.executable, "train_xkl.py", "--steps", "2", "--gen-tokens", "5", "--no-save", "--out"]
    r = subprocess.run(base + [str(tmp_path / "auto")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("using the bundled weights/nano model") == 1
    assert "hf download openai-community/gpt2" in r.stdout
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["model"].endswith(
        os.path.join("weights", "nano")
    )

    r = subprocess.run(
        base + [str(tmp_path / "explicit"), "--model", "gpt2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert "could not load --model gpt2: no weights for 'gpt2'" in r.stderr
    assert "A local path also works" in r.stderr and "bundled" not in r.stdout


def test_readme_quickstart_runs_from_a_fresh_clone(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Quickstart", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    assert command.startswith("python train_xkl.py")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True, timeout=120)
    if not (clone / "weights" / "nano" / "model.safetensors").is_file():
        pytest.fail("weights/nano is not committed: a fresh clone cannot run the quickstart")
    r = subprocess.run(
        command, shell=True, cwd=clone, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "using the bundled weights/nano model" in r.stdout and "x_share" in r.stdout
