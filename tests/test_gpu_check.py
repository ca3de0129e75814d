""".ci/gpu runs only where a GPU is, so here its plumbing is checked with a stand-in python3 that records each
command instead of running it: every recipe is there (with and without --compile), each command's flags parse
as its script's own parser reads them, and the summary counts what ran, what failed and what TIME_LIMIT cut."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_dpo
import train_grpo
import train_gulliver
import train_ppo
import train_raft
import train_reward
import train_sft
import train_xkl
from nanotune import verify
from nanotune.bench import sampling as bench_sampling
from nanotune.bench import vs_transformers

ROOT = Path(__file__).resolve().parent.parent
PARSERS = {
    "train_xkl.py": train_xkl.parse_args,
    "train_gulliver.py": train_gulliver.parse_args,
    "train_sft.py": train_sft.parse_args,
    "train_dpo.py": train_dpo.parse_args,
    "train_reward.py": train_reward.parse_args,
    "train_ppo.py": train_ppo.parse_args,
    "train_grpo.py": train_grpo.parse_args,
    "train_raft.py": train_raft.parse_args,
    "experiments/raft.py": importlib.import_module("experiments.raft").parse_args,
    "nanotune.verify": verify.parse_args,
    "nanotune.bench": vs_transformers.parse_args,
    "nanotune.bench.sampling": bench_sampling.parse_args,
}


def run_gpu_check(tmp_path, shared, fail="", fail_code=1, **env):
    """bash .ci/gpu with python3 standing in: the script's own Python (a heredoc, "-") runs; any other command is
    recorded, and exits with fail_code when its text contains `fail` (124: as `timeout` does when it stops one).
    -> (exit code, output, [argv of each command])."""
    bin_dir, log = tmp_path / "bin", tmp_path / "commands.jsonl"
    bin_dir.mkdir()
    record = f"import json, sys; open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')"
    record += f"; sys.exit({fail_code} if {fail!r} and {fail!r} in ' '.join(sys.argv) else 0)"
    stand_in = bin_dir / "python3"
    stand_in.write_text(
        f'#!/bin/sh\n[ "$1" = - ] && exec {sys.executable} "$@"\nexec {sys.executable} -c "{record}" "$@"\n'
    )
    stand_in.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DEVICE": "cpu", "INSTALL": "0"} | env
    env |= {"OUT": str(tmp_path / "out"), "DATA": str(shared / "data")}
    r = subprocess.run(["bash", ".ci/gpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    commands = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return r.returncode, r.stdout + r.stderr, commands


def test_every_command_of_the_gpu_check_parses_and_every_recipe_runs_compiled_and_not(tmp_path, shared):
    code, out, commands = run_gpu_check(tmp_path, shared)
    assert code == 0, out
    recipes = {}
    for argv in commands:
        name = argv[1] if argv[0] == "-m" else argv[0]
        args = argv[2:] if argv[0] == "-m" else argv[1:]
        if name == "pytest":
            assert all((ROOT / a).is_file() for a in args if a.startswith("tests/")), argv
            continue
        if "--resume" in args:  # (its parser reads the folder, which a recorded run did not make)
            resumed = args[args.index("--resume") + 1]
            (run,) = [a for a in commands if a[-2:] == ["--out", resumed]]  # the run it resumes: ran before it,
            assert commands.index(run) < commands.index(argv) and "--keep-checkpoint" in run  # and kept its checkpoint
            continue
        PARSERS[name](args)  # an unknown flag or a bad value: SystemExit 2, and the test fails
        if name.startswith("train_"):
            recipes.setdefault(name, set()).add("--compile" in args)
    assert recipes == {name: {False, True} for name in PARSERS if name.startswith("train_")}
    assert {p.name for p in ROOT.glob("train_*.py")} == set(recipes)  # a new recipe belongs in .ci/gpu too
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["checks"]) == len(commands) == 23  # a command each
    assert f"GPU check: {len(commands)} passed, 0 failed;" in out


@pytest.mark.parametrize("part, checks", [("checks", 20), ("bench", 3)])
def test_the_gpu_check_runs_one_part(part, checks, tmp_path, shared):
    code, out, commands = run_gpu_check(tmp_path, shared, PART=part)
    benches = [argv for argv in commands if argv[:2] in (["-m", "nanotune.bench"], ["-m", "nanotune.bench.sampling"])]
    assert code == 0 and len(commands) == checks and len(benches) == (3 if part == "bench" else 0), out


@pytest.mark.parametrize(
    "env",
    [
        {"fail": "train_dpo.py"},  # two checks fail
        {"fail": "train_dpo.py", "fail_code": 124},  # two stop at CHECK_TIMEOUT (a hang): they failed too
        {"fail": "train_dpo.py", "fail_code": 124, "TIME_LIMIT": "800"},  # two stop at TIME_LIMIT: not a failure
        {"TIME_LIMIT": "1"},  # no time to start anything
    ],
)
def test_the_gpu_check_counts_failures_and_skips(env, tmp_path, shared):
    code, out, commands = run_gpu_check(tmp_path, shared, **env)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    statuses = {name: check["status"] for name, check in summary["checks"].items()}
    dpo = {k: v for k, v in statuses.items() if k.startswith("dpo")}
    if "TIME_LIMIT" in env and "fail" in env:  # cut short by the time limit, the rest ran: exit status 0
        assert code == 0 and dpo == {"dpo": "stopped", "dpo-compiled": "stopped"}
        assert "0 failed, 2 not run to the end (TIME_LIMIT): dpo-compiled dpo;" in out
    elif "fail" in env:  # the two DPO runs failed, the rest ran: the exit status counts the failures
        assert code == 2 and dpo == {"dpo": "FAILED", "dpo-compiled": "FAILED"}
        assert "2 failed: dpo-compiled dpo;" in out
    else:  # with no time left nothing starts, nothing fails
        assert code == 0 and commands == [] and set(statuses.values()) == {"skipped"}
        assert f"0 passed, 0 failed, {len(statuses)} not run to the end (TIME_LIMIT)" in out
