"""The run lifecycle every recipe shares (nanotune/lifecycle/run.py): checkpoints and bit-identical resume, Ctrl-C and
SIGTERM, kill -9, atomic outputs, protected and locked folders, divergence, save-first, and one clear `error:`
line for each kind of bad input."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import run_main
from safetensors.torch import load_file, save_file

import train_dpo
import train_grpo
import train_gulliver
import train_ppo
import train_reward
import train_sft
import train_xkl
from nanotune import GPT, GPTConfig
from nanotune.data.formats import examples as read_examples
from nanotune.data.instruct import split_examples
from nanotune.lifecycle.run import Run
from nanotune.utils import perplexity, save_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"xkl": train_xkl, "gulliver": train_gulliver, "sft": train_sft, "dpo": train_dpo, "ppo": train_ppo}
RECIPES |= {"reward": train_reward, "reward-lora": train_reward, "grpo": train_grpo}


def recipe_args(name, shared):
    """Seconds-long settings of each recipe on the tiny model."""
    data = shared / "data"
    return {
        "xkl": ["--seq-len", "8", "--gen-tokens", "4", "--lr", "1e-3"],
        "gulliver": [
            "--data",
            str(data / "gulliver.txt"),
            "--seq-len",
            "32",
            "--eval-every",
            "2",
            "--eval-batches",
            "1",
            "--samples",
            "1",
            "--sample-tokens",
            "4",
            "--lr",
            "1e-3",
        ],
        "sft": [
            "--data",
            str(data / "instruction-data.json"),
            "--limit",
            "60",
            "--max-len",
            "64",
            "--eval-every",
            "3",
            "--responses",
            "1",
            "--max-new-tokens",
            "4",
            "--lr",
            "1e-3",
        ],
        "dpo": [
            "--data",
            str(data / "instruction-data-with-preference.json"),
            "--limit",
            "60",
            "--max-len",
            "64",
            "--eval-every",
            "3",
            "--responses",
            "1",
            "--max-new-tokens",
            "4",
            "--lr",
            "1e-3",
        ],
        "reward": ["--data", str(data / "instruction-data-with-preference.json"), "--limit", "60", "--max-len", "64"]
        + ["--eval-every", "3", "--lr", "1e-3"],
        "reward-lora": ["--data", str(data / "instruction-data-with-preference.json"), "--limit", "60"]
        + ["--max-len", "64", "--eval-every", "3", "--lr", "1e-2", "--peft", "lora", "--lora-targets", "all"],
        "grpo": ["--reward", "letter:x", "--books", str(data / "corpus" / "pg11.txt"), "--heldout-book"]
        + [str(data / "gulliver.txt"), "--prompt-len", "8", "--max-new-tokens", "4", "--prompts-per-step", "2"]
        + [
            "--group-size",
            "4",
            "--epochs",
            "2",
            "--beta",
            "0.04",
            "--eval-every",
            "3",
            "--eval-prompts",
            "4",
            "--lr",
            "1e-3",
        ],
        "ppo": [
            "--reward",
            "letter:x",
            "--books",
            str(data / "corpus" / "pg11.txt"),
            "--heldout-book",
            str(data / "gulliver.txt"),
            "--prompt-len",
            "8",
            "--max-new-tokens",
            "4",
            "--rollout-batch",
            "8",
            "--ppo-epochs",
            "1",
            "--eval-every",
            "3",
            "--eval-prompts",
            "4",
            "--samples",
            "1",
            "--lr",
            "1e-3",
        ],
    }[name]


def weights(out):
    return load_file(str(out / "model.safetensors"))


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def leftovers(out):
    """Temporary files or folders, or a lock, left in a run folder."""
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-") or p.name == "run.lock"]


# ---------------------------------------------------------------- interrupt and resume, every recipe


@pytest.mark.parametrize("name", list(RECIPES))
def test_interrupted_and_resumed_run_is_bit_identical(name, tiny, shared, tmp_path, monkeypatch, capsys):
    main = RECIPES[name].main
    base = ["--model", tiny, "--steps", "6", "--batch-size", "4", "--log-every", "1"] + recipe_args(name, shared)
    assert run_main(main, base + ["--out", str(tmp_path / "whole"), "--save-every", "0"]) == 0
    assert not (tmp_path / "whole" / "checkpoints").exists()  # --save-every 0: no checkpoint on a clean run

    # Ctrl-C arrives during step 3: the step finishes, a checkpoint is written, exit 130 with the command
    check, sent = Run.stop_if_diverged, []

    def check_and_interrupt(self, step, *args, **kwargs):
        if step == 3 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return check(self, step, *args, **kwargs)

    monkeypatch.setattr(Run, "stop_if_diverged", check_and_interrupt)
    out = tmp_path / "interrupted"
    capsys.readouterr()
    assert run_main(main, base + ["--out", str(out), "--save-every", "0"]) == 130
    err = capsys.readouterr().err
    assert f"Resume with: python {RECIPES[name].__name__}.py --resume {out}" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert not (out / "model.safetensors").exists() and not leftovers(out)
    monkeypatch.setattr(Run, "stop_if_diverged", check)

    assert run_main(main, ["--resume", str(out)]) == 0  # the saved flags come back with --resume alone
    assert_bit_identical(weights(tmp_path / "whole"), weights(out))
    steps = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once across the two processes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["args"]["steps"] == 6
    assert 100 < summary["peak_memory_mib"] < 20000  # this process's peak resident set: torch alone is ~200 MiB
    assert not leftovers(out)


def test_kill_9_loses_only_the_steps_after_the_last_checkpoint(tiny, shared, tmp_path):
    # a real kill -9 of a real process once its step-5 checkpoint is on disk; the resumed run still ends
    # bit-identical to one that was never killed
    base = [
        sys.executable,
        "train_xkl.py",
        "--model",
        tiny,
        "--seq-len",
        "8",
        "--gen-tokens",
        "4",
        "--lr",
        "1e-3",
        "--steps",
        "400",
        "--save-every",
        "5",
        "--log-every",
        "1",
        "--device",
        "cpu",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        base + ["--out", str(killed)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000010").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    r = subprocess.run(
        base[:2] + ["--resume", str(killed), "--steps", "40"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed" in r.stdout
    whole = tmp_path / "whole"
    r = subprocess.run(
        base + ["--out", str(whole), "--steps", "40"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert_bit_identical(weights(whole), weights(killed))
    steps = [m["step"] for m in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, 41))


def test_sigterm_checkpoints_and_exits_130(tiny, tmp_path):
    out = tmp_path / "term"
    cmd = [
        sys.executable,
        "train_xkl.py",
        "--model",
        tiny,
        "--out",
        str(out),
        "--seq-len",
        "8",
        "--gen-tokens",
        "4",
        "--steps",
        "100000",
        "--log-every",
        "1",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGTERM: finishing the current step" in err and f"--resume {out}" in err
    step = json.loads((out / "checkpoints").iterdir().__next__().joinpath("state.json").read_text())["step"]
    assert step >= 3 and GPT.from_pretrained(out / "checkpoints" / f"step-{step:06d}")  # a loadable checkpoint
    assert not leftovers(out)


# ---------------------------------------------------------------- atomic, consistent outputs


def test_a_failure_between_the_two_weight_files_leaves_the_old_model(tmp_path, monkeypatch):
    import nanotune.model.weights as weights_module

    torch.manual_seed(0)
    old, new = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)), GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32))
    old.save_pretrained(tmp_path)
    real_replace = os.replace

    def fail_on_the_model(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise OSError("injected: disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(weights_module.os, "replace", fail_on_the_model)
    with pytest.raises(OSError, match="injected"):
        new.save_pretrained(tmp_path)
    monkeypatch.setattr(weights_module.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temporaries
    assert_bit_identical(GPT.from_pretrained(tmp_path).state_dict(), old.state_dict())
    # into an empty folder, the same failure leaves no model at all, never a model without its config
    empty = tmp_path / "empty"
    monkeypatch.setattr(weights_module.os, "replace", fail_on_the_model)
    with pytest.raises(OSError):
        new.save_pretrained(empty)
    assert not (empty / "model.safetensors").exists()


SAVE_LOOP = """
import sys, torch
from nanotune import GPT, GPTConfig
models = []
for seed in (0, 1):
    torch.manual_seed(seed)
    models.append(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128)))
models[0].save_pretrained(sys.argv[1])
print("ready", flush=True)
i = 1
while True:
    models[i % 2].save_pretrained(sys.argv[1])
    i += 1
"""


def test_kill_9_during_saves_never_leaves_a_broken_model(tmp_path):
    # a process saving two different models into one folder over and over, killed at random moments: the
    # folder always loads, and holds exactly one of the two models
    torch.manual_seed(0)
    a = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128)).state_dict()
    torch.manual_seed(1)
    b = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128)).state_dict()
    rng = random.Random(0)
    for trial in range(6):
        folder = tmp_path / f"trial{trial}"
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(folder)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.0))
        proc.kill()
        proc.wait()
        loaded = GPT.from_pretrained(folder).state_dict()
        assert all(torch.equal(loaded[k], a[k]) for k in a) or all(torch.equal(loaded[k], b[k]) for k in b)


# ---------------------------------------------------------------- protected and locked folders


def test_an_out_folder_holding_a_run_is_refused_unless_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", tiny, "--out", str(out), "--steps", "2", "--seq-len", "8", "--gen-tokens", "4"]
    assert run_main(train_xkl.main, base) == 0
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert run_main(train_xkl.main, base + ["--no-save", "--lr", "1e-2"]) == 2
    assert f"--out {out} already holds a run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first  # untouched
    (out / "notes.txt").write_text("mine")
    # --overwrite removes nothing before the new run succeeds: one refused before training (a model that does
    # not exist) puts the old run back as it was; one that diverges keeps it aside in .replaced/
    assert run_main(train_xkl.main, base + ["--overwrite", "--model", str(tmp_path / "none")]) == 2
    assert (out / "model.safetensors").read_bytes() == first and not (out / ".replaced").exists()
    capsys.readouterr()
    assert run_main(train_xkl.main, base + ["--overwrite", "--lr", "1e3", "--steps", "6"]) == 2
    assert "kept in" in capsys.readouterr().err
    assert (out / ".replaced" / "model.safetensors").read_bytes() == first
    assert run_main(train_xkl.main, base + ["--overwrite"]) == 2  # a second --overwrite would lose one of the two
    assert ".replaced, and the run that replaced it never finished" in capsys.readouterr().err
    assert (out / ".replaced" / "model.safetensors").read_bytes() == first
    shutil.rmtree(out / ".replaced")  # (the user gives the first run up)
    assert run_main(train_xkl.main, base + ["--no-save", "--overwrite"]) == 0
    # finished: the old run's files are gone (no weights of the first run beside the second's summary); the
    # user's stay
    assert not (out / "model.safetensors").exists() and (out / "notes.txt").read_text() == "mine"
    assert not (out / ".replaced").exists()
    assert json.loads((out / "summary.json").read_text())["args"]["no_save"] is True


def test_a_second_concurrent_run_into_the_same_folder_fails_at_once(tiny, tmp_path, capsys):
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / "run.lock", "w") as lock:  # what a run in progress holds
        lock.write("pid 12345, started 2026-11-24 10:00:00\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        t0 = time.time()
        assert run_main(train_xkl.main, ["--model", tiny, "--out", str(out), "--steps", "2"]) == 2
        assert time.time() - t0 < 10
        err = capsys.readouterr().err
        assert f"--out {out} is in use by another run (pid 12345" in err
    assert not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------- divergence and broken weights


@pytest.mark.parametrize("name", ["xkl", "dpo"])
def test_an_exploding_loss_stops_the_run_and_keeps_the_last_checkpoint(name, tiny, shared, tmp_path, capsys):
    out = tmp_path / name
    argv = (
        [
            "--model",
            tiny,
            "--out",
            str(out),
            "--steps",
            "60",
            "--batch-size",
            "4",
            "--save-every",
            "1",
            "--log-every",
            "1",
        ]
        + recipe_args(name, shared)
        + ["--lr", "1e3"]
    )
    assert run_main(RECIPES[name].main, argv) == 2
    err = capsys.readouterr().err
    assert "error: training diverged at step" in err and "Try a lower --lr" in err and "last good checkpoint" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert not (out / "model.safetensors").exists()  # the diverged weights are not saved as the result
    [ckpt] = list((out / "checkpoints").iterdir())
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    assert ckpt.name == f"step-{step - 1:06d}"  # the last step that passed the check
    GPT.from_pretrained(ckpt)  # loads: finite weights


def test_the_explosion_rule_needs_three_steps_in_a_row_above_ten_times_the_first_loss():
    from nanotune.lifecycle.run import DivergenceRule

    def first_stop(losses, grad_norm=1.0):
        rule = DivergenceRule()
        for step, loss in enumerate(losses, start=1):
            if what := rule.what_went_wrong(loss, grad_norm):
                return step, what
        return None

    assert first_stop([4.0, 41.0, 41.0, 3.0, 41.0, 41.0, 39.0]) is None  # never three in a row above 10 x 4
    assert first_stop([0.2, 9.9, 9.9, 9.9, 9.9]) is None  # a first loss below 1 counts as 1: the bound is 10, not 2
    step, what = first_stop([4.0, 3.0, 41.0, 41.0, 41.0])
    assert step == 5 and what.startswith("the loss has exploded: 41, above 10 x max(first loss 4, 1)")
    assert first_stop([4.0, float("nan")]) == (2, "the loss is nan")
    assert first_stop([4.0], grad_norm=float("inf")) == (1, "the gradient norm is inf (loss 4)")


def test_nan_weights_are_refused_at_load_naming_the_tensor(tiny, tmp_path):
    tensors = load_file(os.path.join(tiny, "model.safetensors"))
    tensors["h.1.mlp.c_fc.weight"][3, 4] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(tiny, "config.json")).read())
    with pytest.raises(ValueError, match=r"tensor h\.1\.mlp\.c_fc\.weight holds 1 NaN/inf values"):
        GPT.from_pretrained(tmp_path)


# ---------------------------------------------------------------- save first


def test_a_failure_after_training_keeps_the_weights(tiny, tmp_path, monkeypatch, capsys):
    def broken_plot(*args, **kwargs):
        raise RuntimeError("injected plot failure")

    monkeypatch.setattr(train_xkl, "plot_curves", broken_plot)
    out = tmp_path / "run"
    assert (
        run_main(
            train_xkl.main, ["--model", tiny, "--out", str(out), "--steps", "2", "--seq-len", "8", "--gen-tokens", "4"]
        )
        == 0
    )
    assert "warning: the loss plot failed: RuntimeError: injected plot failure" in capsys.readouterr().err
    GPT.from_pretrained(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["x_share_after"] is not None
    assert summary["warnings"] == ["the loss plot failed: RuntimeError: injected plot failure"]


def test_a_diverged_validation_loss_is_infinite_perplexity_not_a_crash(tmp_path):
    assert perplexity(2.0) == pytest.approx(7.389056) and perplexity(1e4) == float("inf")
    save_json(tmp_path / "s.json", {"val_ppl": float("inf"), "nested": [float("nan")]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"val_ppl": None, "nested": [None]}  # strict JSON


# ---------------------------------------------------------------- tokenizer and the hub


def test_tokenizer_writes_nothing_and_works_with_an_unwritable_cache(tmp_path, monkeypatch):
    from nanotune.tokenizer import load_tokenizer

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    enc = load_tokenizer.__wrapped__()  # not the process-wide cached instance
    assert enc.encode("Hello world") == [15496, 995]
    assert list(cache.iterdir()) == []
    blocker = tmp_path / "a-file"  # a cache "folder" that is a file: any write fails, even as root
    blocker.write_text("")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(blocker / "sub"))
    assert load_tokenizer.__wrapped__().encode("Hello world") == [15496, 995]


def test_auto_falls_back_quickly_when_the_hub_is_unreachable(tmp_path):
    # the hub "endpoint" is a closed port on this machine: connection refused, no network used
    env = dict(
        os.environ,
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HOME=str(tmp_path / "hf"),
        NANOTUNE_WEIGHTS_DIR=str(tmp_path / "weights"),
    )
    env.pop("HF_HUB_OFFLINE", None)
    code = (
        "import time, torch; from nanotune.model.loader import load_model; t = time.time(); "
        "m, name = load_model('auto', torch.device('cpu')); print(name, round(time.time() - t, 1))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    name, seconds = r.stdout.split()[-2:]
    assert name.endswith("nano") and float(seconds) < 5  # one quick attempt, not ~25 s of retries
    assert "using the bundled weights/nano model" in r.stdout and "Retrying" not in r.stderr


# ---------------------------------------------------------------- one clear error line for each bad input


def refused(main, argv, capsys, message):
    capsys.readouterr()
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    return err


def test_bad_flags_are_one_line_errors(tiny, shared, tmp_path, capsys):
    g = ["--model", tiny, "--data", str(shared / "data" / "gulliver.txt"), "--out", str(tmp_path / "g")]
    x = ["--model", tiny, "--out", str(tmp_path / "x")]
    refused(train_xkl.main, x + ["--lr", "nan"], capsys, "argument --lr: must be > 0, got nan")
    refused(train_gulliver.main, g + ["--eval-every", "0"], capsys, "argument --eval-every: must be >= 1, got 0")
    refused(train_gulliver.main, g + ["--seq-len", "0"], capsys, "argument --seq-len: must be >= 2, got 0")
    refused(train_gulliver.main, g + ["--seq-len", "1.5"], capsys, "argument --seq-len: expected a whole number")
    refused(train_xkl.main, x + ["--gen-tokens", "300"], capsys, "+ --gen-tokens 300 exceed the model's context of 256")
    refused(train_xkl.main, x + ["--device", "tpu"], capsys, "--device 'tpu' is not a device")
    refused(train_xkl.main, x + ["--dtype", "float16"], capsys, "argument --dtype: invalid choice: 'float16'")
    refused(train_xkl.main, x + ["--grad-clip", "-1"], capsys, "argument --grad-clip: must be >= 0, got -1")
    refused(train_sft.main, x + ["--max-new-tokens", "-5"], capsys, "argument --max-new-tokens: must be >= 1, got -5")
    refused(train_sft.main, x + ["--limit", "-3"], capsys, "argument --limit: must be >= 1, got -3")
    refused(train_xkl.main, x + ["--resume", str(tmp_path / "nothing")], capsys, "no such folder")
    (tmp_path / "file").write_text("")
    refused(train_xkl.main, ["--model", tiny, "--out", str(tmp_path / "file")], capsys, "is a file, not a folder")
    refused(train_xkl.main, ["--model", tiny, "--out", str(tmp_path / "file" / "sub")], capsys, "cannot be written")
    assert not (tmp_path / "g").exists() and not (tmp_path / "x").exists()  # nothing was started


def test_bad_data_files_are_one_line_errors(tiny, shared, tmp_path, capsys):
    base = ["--model", tiny, "--out", str(tmp_path / "s")]
    (tmp_path / "latin1.json").write_bytes('[{"instruction": "Caf\u00e9", "output": "ok"}]'.encode("latin-1"))
    refused(
        train_sft.main,
        base + ["--data", str(tmp_path / "latin1.json")],
        capsys,
        "latin1.json is not UTF-8 text (byte 0xe9 at offset 21, line 1)",
    )
    (tmp_path / "book.txt").write_bytes(b"Once upon a time\n" * 500 + b"na\xefve\n")
    refused(train_gulliver.main, base + ["--data", str(tmp_path / "book.txt")], capsys, "line 501")
    good = json.dumps({"instruction": "Say hi.", "output": "Hi."})
    (tmp_path / "broken.jsonl").write_text("\n".join([good] * 12 + ['{"instruction": "x", "output": '] + [good] * 5))
    refused(
        train_sft.main,
        base + ["--data", str(tmp_path / "broken.jsonl")],
        capsys,
        "broken.jsonl: line 13 is not valid JSON",
    )
    bad_config = tmp_path / "model"
    bad_config.mkdir()
    (bad_config / "model.safetensors").write_bytes(open(os.path.join(tiny, "model.safetensors"), "rb").read())
    (bad_config / "config.json").write_text("[1, 2]")
    refused(
        train_xkl.main,
        ["--model", str(bad_config), "--out", str(tmp_path / "x")],
        capsys,
        "config.json: expected a JSON object of GPT-2 settings, got a JSON list",
    )
    pairs = [{"instruction": f"Say hi ({i}).", "chosen": "Hi.", "rejected": "Go away."} for i in range(40)]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    refused(
        train_dpo.main,
        base + ["--data", str(tmp_path / "pairs.json"), "--ref-model", "/nope"],
        capsys,
        "could not load --ref-model /nope",
    )
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


def test_long_prompts_are_named_by_their_record_in_the_file_before_training(tiny, tmp_path, capsys):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(40)]
    examples = read_examples(records, "x")
    train, _, test = split_examples(examples, 1337)
    long_train, long_test = train[5]["record"], test[0]["record"]
    base = ["--model", tiny, "--out", str(tmp_path / "s")]

    records[long_train]["instruction"] = "word " * 100
    (tmp_path / "a.json").write_text(json.dumps(records))
    refused(
        train_sft.main,
        base + ["--data", str(tmp_path / "a.json"), "--max-len", "64"],
        capsys,
        f"record {long_train}: the prompt has",
    )
    records[long_train]["instruction"] = "Short."
    records[long_test]["instruction"] = "word " * 300  # a held-out prompt that would only be used after training
    (tmp_path / "b.json").write_text(json.dumps(records))
    refused(
        train_sft.main,
        base + ["--data", str(tmp_path / "b.json"), "--max-len", "64"],
        capsys,
        f"record {long_test} (a held-out prompt answered after training) has",
    )
    assert not (tmp_path / "s").exists()
