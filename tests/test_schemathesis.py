"""schemathesis against a live nanotune.serve: requests generated from the server's own /openapi.json, valid and
invalid, checked by every one of its checks (one swapped for a stricter-where-it-can twin, below)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import QUICK_REQUESTS, serving

from nanotune import GPT, GPTConfig

try:
    import schemathesis  # noqa: F401
except ImportError:  # (the test extra installs it: under CI=true its absence is a failure, not a skip)
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("schemathesis is not installed: pip install -e '.[test]'", allow_module_level=True)

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
KEY = "test-key"


def test_schemathesis_finds_nothing_wrong(tmp_path):
    # a one-layer model with a 32-token context: a request may ask for at most 32 tokens, so the run is quick
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32)).save_pretrained(tmp_path / "small")
    flags = ["--name", "small", "--api-key", KEY, "--max-batch", "2", "--max-queue", "4", "--max-tokens", "4"]
    with serving(tmp_path / "small", tmp_path / "server.log", *flags, env=QUICK_REQUESTS) as url:
        start = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            # positive_data_acceptance would refuse the server's one rule no schema can state (a prompt's tokens
            # + max_tokens <= the context): schemathesis_hooks.py's twin of it allows exactly that, nothing else
            "--exclude-checks",
            "positive_data_acceptance",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--max-examples",
            "10",
            "--seed",
            "0",
            "--workers",
            "1",
            "--output-sanitize",
            "false",
        ]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "NO_COLOR": "1"}
        run = subprocess.run(
            cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150
        )  # (its cache there)
        seconds = time.monotonic() - start
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", out).groups())
    print(f"schemathesis: {generated} requests, {passed} passed every check, in {seconds:.0f} s")
    assert generated == passed and generated >= 200  # (the five routes, valid and invalid bodies, other methods)
    assert "Custom check" not in out and "positive_data_accepted_within_the_context" in HOOKS.read_text()
    assert seconds < 100
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "failed" not in log  # nothing it sent made the server fault
