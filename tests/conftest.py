"""Shared fixtures. Tests never touch the network: weights are random transformers models written in the
official file layout, and data comes from ../shared (or $NANOTUNE_SHARED)."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NANOTUNE_SHARED", ROOT.parent / "shared")).resolve()
os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reaches for the network is a bug
# the suite runs on the CPU everywhere (its float32 results are exact there), unless asked to run on the GPU
# (NANOTUNE_TEST_DEVICE=cuda, as .ci/gpu does for the tests that are written for it)
if os.environ.get("NANOTUNE_TEST_DEVICE", "cpu") != "cuda":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(ROOT))

if not (SHARED / "data" / "gulliver.txt").is_file():
    raise pytest.UsageError(f"shared test data not found at {SHARED}: set NANOTUNE_SHARED to the shared/ folder")

# tiktoken's reference encoding (tests/test_tokenizer.py) reads its BPE files from TIKTOKEN_CACHE_DIR, and any
# code that uses tiktoken's file loaders writes cache copies there: give it a private copy of shared/'s cache,
# so that nothing a test runs (subprocesses included) can write into shared/
_TIKTOKEN_CACHE = Path(tempfile.mkdtemp(prefix="nanotune-tiktoken-"))
shutil.copytree(SHARED / "tiktoken-cache", _TIKTOKEN_CACHE, dirs_exist_ok=True)
os.environ["TIKTOKEN_CACHE_DIR"] = str(_TIKTOKEN_CACHE)


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


_SHARED_BEFORE = _listing(SHARED)


def pytest_sessionfinish(session, exitstatus):
    """shared/ is read-only input: a run that added, removed or changed anything there fails."""
    shutil.rmtree(_TIKTOKEN_CACHE, ignore_errors=True)
    after = _listing(SHARED)
    changed = sorted(
        set(after) ^ set(_SHARED_BEFORE) | {k for k in after if _SHARED_BEFORE.get(k, after[k]) != after[k]}
    )
    if changed:
        print(f"\nerror: the tests changed {SHARED}: {', '.join(changed[:10])}", file=sys.stderr)
        session.exitstatus = 1


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
