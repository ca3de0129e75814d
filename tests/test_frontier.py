"""experiments/sentiment_frontier.py: best-of-N's KL formula against the exact KL and a Monte-Carlo estimate, and
the --quick sweep end to end on a tiny model."""

import importlib.util
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("sentiment_frontier", ROOT / "experiments" / "sentiment_frontier.py")
frontier = importlib.util.module_from_spec(spec)
spec.loader.exec_module(frontier)


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_best_of_n_kl_is_the_exact_kl_of_a_fine_categorical_and_bounds_a_coarse_one(n):
    g = torch.Generator().manual_seed(n)
    fine = torch.rand(20000, generator=g, dtype=torch.float64) + 0.5  # many outcomes, none likely: ~continuous
    fine /= fine.sum()
    exact = frontier.best_of_n_kl_exact(fine, n)
    assert exact == pytest.approx(frontier.best_of_n_kl(n), abs=2e-3)
    coarse = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # three outcomes: ties in effect, KL smaller
    assert frontier.best_of_n_kl_exact(coarse, n) <= frontier.best_of_n_kl(n) + 1e-12


def test_the_exact_kl_agrees_with_a_monte_carlo_estimate():
    # draw best-of-4 from a 12-outcome categorical (outcome index = score rank), estimate KL(best || p) as the mean
    # of log q(x) / p(x) over the draws, with q the empirical frequencies
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(12, generator=g, dtype=torch.float64) + 0.2
    probs /= probs.sum()
    draws = torch.multinomial(probs, 200_000 * 4, replacement=True, generator=g).view(-1, 4).max(-1).values
    q = torch.bincount(draws, minlength=12).double() / len(draws)
    monte_carlo = float((q[draws] / probs[draws]).log().mean())
    assert monte_carlo == pytest.approx(frontier.best_of_n_kl_exact(probs, 4), abs=0.01)
    assert frontier.best_of_n_kl_exact(probs, 4) < frontier.best_of_n_kl(4)  # few outcomes: below the formula
    assert frontier.best_of_n_kl(1) == 0 and frontier.best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)


def test_the_quick_sweep_runs_end_to_end_on_a_tiny_model(tiny, shared, tmp_path, capsys):
    # every method of the sweep trains (1-2 steps) and is measured: a finite point for each, and a second call
    # finds every run finished and only measures again
    out = tmp_path / "frontier"
    books = [
        "--books",
        str(shared / "data" / "corpus" / "pg11.txt"),
        "--heldout-book",
        str(shared / "data" / "gulliver.txt"),
    ]
    small = ["--steps", "2", "--rl-steps", "1", "--pair-prompts", "32", "--rollout", "16", "--eval-prompts", "4"]
    small += ["--eval-samples", "2", "--max-n", "4", "--device", "cpu"]
    frontier.main(["--quick", "--model", tiny, "--out", str(out), *books, *small])
    points = json.loads((out / "frontier.json").read_text())
    methods = {p["method"] for p in points}
    assert methods == {
        "DPO",
        "DPO-ipo",
        "DPO-hinge",
        "DPO-robust",
        "DPO-simpo",
        "PPO-RM",
        "PPO-GT",
        "GRPO-GT",
        "best-of-N",
    }
    assert all(math.isfinite(p["kl"]) and math.isfinite(p["score"]) for p in points)
    assert [p["kl"] for p in points if p["method"] == "best-of-N"] == [frontier.best_of_n_kl(n) for n in (1, 2, 4)]
    trained = [p for p in points if p["method"] != "best-of-N"]
    # (a step or two barely moves a model: its KL, estimated from 8 answers, may sit a hair below 0)
    assert all(p["kl"] > -0.05 for p in trained) and all(p["steps"] in (1, 2) for p in trained)
    assert (out / "frontier.svg").is_file() and (out / "frontier.md").read_text().count("\n") == len(points) + 2
    capsys.readouterr()
    frontier.main(["--quick", "--model", tiny, "--out", str(out), *books, *small])  # again: nothing is retrained
    assert capsys.readouterr().out.count("(done already)") == 1 + 1 + 9  # the pairs, the reward model, 9 runs
    assert json.loads((out / "frontier.json").read_text()) == points  # measured with the same seed: the same


@pytest.mark.parametrize("m,n", [(4, 1), (4, 2), (6, 3), (5, 5)])
def test_best_of_n_weights_average_the_best_over_every_subset(m, n):
    scores = torch.tensor([0.3, -1.0, 2.5, 0.7, 1.1, -0.2], dtype=torch.float64)[:m].sort().values
    subsets = list(itertools.combinations(range(m), n))
    brute = sum(max(scores[list(s)]).item() for s in subsets) / len(subsets)
    assert float(scores @ frontier.best_of_n_weights(m, n)) == pytest.approx(brute, abs=1e-12)


def test_ctrl_c_waits_for_the_running_step_to_save_then_ends_with_one_line(tmp_path):
    # a real SIGINT to the sweep's process group, as Ctrl-C sends it: the step (here a stand-in that takes 1 s to
    # save after Ctrl-C) must finish saving before the sweep ends, with one line and exit 130
    step = tmp_path / "step.py"
    step.write_text(
        "import signal, sys, time, pathlib\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
        "def stop(*_):\n    time.sleep(1); (out / 'saved').write_text('whole'); sys.exit(130)\n"
        "signal.signal(signal.SIGINT, stop)\nout.mkdir(parents=True); (out / 'ready').write_text('')\ntime.sleep(60)\n"
    )
    driver = (
        "import sys; sys.path.insert(0, 'experiments'); import sentiment_frontier as f; from pathlib import Path\n"
        f"f.interruptible(lambda: f.run_step([{str(step)!r}], Path({str(tmp_path / 'run')!r}), "
        f"Path({str(tmp_path / 'log')!r})))\n"
    )
    sweep = subprocess.Popen(
        [sys.executable, "-c", driver], cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    for _ in range(600):
        if (tmp_path / "run" / "ready").exists():
            break
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGINT)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 130 and (tmp_path / "run" / "saved").read_text() == "whole"
    assert err.count("\n") == 1 and err.startswith("interrupted: python ") and "Traceback" not in err
