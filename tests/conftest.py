"""Shared fixtures. Tests never touch the network: weights are random transformers models written in the
official file layout, and data comes from ../shared (or $NANOTUNE_SHARED)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NANOTUNE_SHARED", ROOT.parent / "shared")).resolve()
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reaches for the network is a bug
sys.path.insert(0, str(ROOT))

if not (SHARED / "data" / "gulliver.txt").is_file():
    raise pytest.UsageError(f"shared test data not found at {SHARED}: set NANOTUNE_SHARED to the shared/ folder")


@pytest.fixture(scope="session")
def shared():
    return SHARED


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A random-init GPT-2 with the official vocabulary, 2 layers, width 64, saved in the official layout."""
    from nanotune import GPT, GPTConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=256)).save_pretrained(path)
    return str(path)
