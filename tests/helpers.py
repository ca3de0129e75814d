"""Build random transformers GPT-2 models and write them the way the official checkpoints are written."""

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
# For a server that many short requests go through: OpenMP's threads spin for a while after each of the model's
# parallel regions, and on 2 cores that starves the server's HTTP thread (a one-token request took 67 ms, 12 ms
# with PASSIVE). Tests that send hundreds of requests ask for it; the others run as users would.
QUICK_REQUESTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def hf_model(n_layer=2, n_embd=64, n_head=4, n_positions=1024, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def write_official(hf, directory, dtype=torch.float32, config=True):
    """openai-community/gpt2's layout: no prefix, Conv1D (in, out) weights, attn.bias masks, no lm_head."""
    directory.mkdir(parents=True, exist_ok=True)
    n_pos = hf.config.n_positions
    tensors = {k: v.to(dtype).contiguous() for k, v in hf.transformer.state_dict().items()}
    for i in range(hf.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=dtype)).view(1, 1, n_pos, n_pos)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if config:
        (directory / "config.json").write_text(json.dumps(hf.config.to_dict()))
    return directory


def write_prefixed(hf, directory):
    """A fine-tune saved by transformers: 'transformer.' prefix, masked_bias buffers, lm_head == wte."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    tensors["lm_head.weight"] = hf.transformer.wte.weight.detach().clone()
    for i in range(hf.config.n_layer):
        tensors[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf.config.to_dict()))
    return directory


def run_main(main, argv):
    """-> the exit code of a script's main(argv) (0 when it returns)."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_dir, log, *flags, env: dict | None = None):
    """python -m nanotune.serve --model model_dir on a free localhost port, its output written to log (a file,
    not a pipe nobody reads, which would stall the server once full), with these environment variables added;
    yields its base URL."""
    import pytest

    port = free_port()
    cmd = [sys.executable, "-m", "nanotune.serve", "--model", str(model_dir), "--port", str(port), *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=os.environ | (env or {})
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"the server exited: {Path(log).read_text()}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not answer /health within 60 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
