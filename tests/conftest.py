"""Shared fixtures. Tests never touch the network: weights are random transformers models written in the
official file layout, and data comes from ../shared (or $NANOTUNE_SHARED)."""

import os
import sys
from pathlib import Path

import pytest

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
