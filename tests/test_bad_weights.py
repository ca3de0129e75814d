"""Every kind of broken checkpoint or input stops with a message that says what and where."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import hf_model, write_official
from safetensors.torch import load_file, save_file

from nanotune import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def official(tmp_path):
    return write_official(hf_model(), tmp_path / "ckpt")


def rewrite(directory, edit):
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_missing_keys_are_listed(official):
    rewrite(official, lambda t: (t.pop("h.1.mlp.c_fc.bias"), t.pop("ln_f.weight")))
    with pytest.raises(KeyError, match=r"missing keys: h\.1\.mlp\.c_fc\.bias, ln_f\.weight"):
        GPT.from_pretrained(official)


def test_unexpected_keys_are_listed(official):
    rewrite(official, lambda t: t.update({"h.0.attn.rotary": torch.zeros(3)}))
    with pytest.raises(KeyError, match=r"unexpected keys: h\.0\.attn\.rotary"):
        GPT.from_pretrained(official)


def test_shape_mismatch_names_key_and_both_shapes(official):
    rewrite(official, lambda t: t.update({"h.1.attn.c_proj.weight": torch.zeros(64, 65)}))
    with pytest.raises(ValueError, match=r"h\.1\.attn\.c_proj\.weight has shape \(64, 65\), expected \(64, 64\)"):
        GPT.from_pretrained(official)


def test_transposed_conv1d_weight_is_a_shape_error(official):
    rewrite(official, lambda t: t.update({"h.0.mlp.c_fc.weight": t["h.0.mlp.c_fc.weight"].t().contiguous()}))
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.weight has shape \(256, 64\), expected \(64, 256\)"):
        GPT.from_pretrained(official)


def test_truncated_file(official):
    f = official / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        GPT.from_pretrained(official)


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "model.safetensors").write_text("this is a pickle, honest")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        GPT.from_pretrained(tmp_path)


def test_config_that_disagrees_with_tensors(official):
    config = json.loads((official / "config.json").read_text())
    config["n_layer"], config["n_embd"] = 3, 128
    (official / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"config\.json disagrees with .*n_layer=3 in config\.json but 2 in the tensors"
    ):
        GPT.from_pretrained(official)


def test_untied_head_is_refused(official):
    rewrite(official, lambda t: t.update({"lm_head.weight": torch.randn_like(t["wte.weight"])}))
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPT.from_pretrained(official)


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a GPT-2 preset"):
        GPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        GPT.from_pretrained(tmp_path)


def test_sequence_longer_than_context_and_token_outside_vocab():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16))
    with pytest.raises(ValueError, match="17 tokens is longer than the context of 16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 50257 is outside the vocabulary \[0, 50257\)"):
        m(torch.tensor([[1, 50257]]))
    with pytest.raises(ValueError, match="token id -1"):
        m(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=r"idx must have shape \(B, T\)"):
        m(torch.zeros(5, dtype=torch.long))


def test_no_weights_offline_says_where_it_looked_and_what_to_do(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), NANOTUNE_WEIGHTS_DIR=str(tmp_path / "w"))
    code = "from nanotune import GPT; GPT.from_pretrained('gpt2-medium')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    msg = r.stderr
    assert "WeightsNotFoundError" in msg and "no weights for 'gpt2-medium'" in msg
    assert str(tmp_path / "w" / "gpt2-medium") in msg  # where it looked
    assert str(tmp_path / "hf") in msg  # the Hugging Face cache it looked in
    assert "hf download openai-community/gpt2-medium" in msg and "A local path also works" in msg
