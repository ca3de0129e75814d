"""--tracker (nanotune/lifecycle/tracking.py): metrics.jsonl mirrored to TensorBoard and Weights & Biases, line by line,
across a crash, a Ctrl-C and a --resume, and read back with their own readers: TensorBoard's EventAccumulator,
and W&B's protobuf records from the offline run's .wandb log. W&B runs in a subprocess, offline, its folders
under tmp_path."""

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_main

import train_dpo
import train_grpo
import train_gulliver
import train_ppo
import train_reward
import train_sft
import train_xkl
from nanotune.lifecycle import tracking
from nanotune.lifecycle.run import Run

ROOT = Path(__file__).resolve().parent.parent
XKL = ["--seq-len", "8", "--gen-tokens", "4", "--lr", "1e-3", "--log-every", "1"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_mirrors(curves, lines):
    """curves ({key: [(step, value)]}, read back from a tracker) hold every number of every metrics.jsonl line,
    under its own name, at its step, once; float32 is as close as TensorBoard keeps them."""
    want = {}
    for m in lines:
        for key, value in m.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                want.setdefault(key, []).append((m["step"], value))
    assert sorted(curves) == sorted(want)
    for key, points in want.items():
        assert [step for step, _ in curves[key]] == [step for step, _ in points], key
        for (_, got), (step, value) in zip(curves[key], points):
            assert math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-12), (key, step, got, value)


def tensorboard_curves(folder):
    """-> ({tag: [(step, value)]}, [the flags recorded as text]), as TensorBoard's readers see the folder (they hide
    what a purge_step took back; the text is read by the reader TensorBoard's web page uses, the older one keeps
    text across a purge)."""
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator

    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    curves = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    acc = plugin_event_accumulator.EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("args/text_summary") if "args/text_summary" in acc.Tags()["tensors"] else []
    return curves, [json.loads(e.tensor_proto.string_val[0]) for e in texts]


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_mirrors_metrics_jsonl_across_a_crash_and_a_resume(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    closed = []
    finish = tracking.TensorBoard.finish
    monkeypatch.setattr(
        tracking.TensorBoard, "finish", lambda self, status: closed.append(status) or finish(self, status)
    )
    # a crash after step 5 is logged: the step-3 checkpoint stays, and steps 4 and 5 run (and log) again
    due = Run.checkpoint_due

    def crash_after_step_5(self, step):  # (step 5 is logged; its checkpoint is not due with --save-every 3)
        if step == 5:
            raise RuntimeError("simulated crash")
        return due(self, step)

    monkeypatch.setattr(Run, "checkpoint_due", crash_after_step_5)
    first = ["--model", tiny, "--out", str(out), "--steps", "6", "--save-every", "3", "--tracker", "tensorboard"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_xkl.main(first + XKL)
    assert closed == ["failed"]  # closed by the error, and told so
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    curves, flags = tensorboard_curves(out / "tensorboard")
    assert_mirrors(curves, lines)
    assert flags == [json.loads((out / "summary.json").read_text())["args"]]

    monkeypatch.setattr(Run, "checkpoint_due", due)
    assert run_main(train_xkl.main, ["--resume", str(out)]) == 0
    assert closed == ["failed", "finished"]
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per try
    curves, flags = tensorboard_curves(out / "tensorboard")
    assert_mirrors(curves, lines)  # steps 4 and 5 once, with the resumed run's values
    summary = json.loads((out / "summary.json").read_text())
    assert flags == [summary["args"]] and flags[0]["resume"] == str(out) and flags[0]["tracker"] == "tensorboard"


def test_a_tracker_logs_the_numbers_of_a_line_and_writes_nothing_before_its_first(tmp_path):
    assert tracking.open_tracker("none", tmp_path, "unit", {}) is None
    tracker = tracking.open_tracker("tensorboard", tmp_path, "unit", {"lr": 0.5})
    assert list(tmp_path.iterdir()) == []  # a run refused before it logs leaves no tracker files
    tracker.log({"step": 0, "loss": 2.5, "count": 3, "note": "text", "missing": None, "flag": True})
    # on disk at once, as metrics.jsonl is (a run killed now keeps it), before the tracker is closed
    assert tensorboard_curves(tmp_path / "tensorboard") == ({"loss": [(0, 2.5)], "count": [(0, 3.0)]}, [{"lr": 0.5}])
    tracker.close()
    tracker.close()  # (once is enough)


# ---------------------------------------------------------------- every recipe, and a missing package


@pytest.mark.parametrize(
    "recipe", [train_xkl, train_gulliver, train_sft, train_dpo, train_reward, train_ppo, train_grpo]
)
def test_every_recipe_has_the_flag_off_by_default(recipe, capsys):
    assert run_main(recipe.main, ["--help"]) == 0
    assert "--tracker {none,tensorboard,wandb}" in capsys.readouterr().out
    assert recipe.parse_args([]).tracker == "none"


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_stops_the_run_before_it_starts(kind, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, kind, None)  # `import kind` raises ImportError, as when it is not installed
    out = tmp_path / "run"
    assert run_main(train_xkl.main, ["--model", tiny, "--out", str(out), "--tracker", kind] + XKL) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: --tracker {kind} needs the {kind} package: pip install -e '.[{kind}]'\n"
    assert captured.out == "" and not out.exists()  # before the model loaded; no folder left behind


# ---------------------------------------------------------------- Weights & Biases


def test_wandb_goes_online_only_with_an_api_key(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    assert not tracking.wandb_has_key()
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")  # what `wandb login` writes
    assert tracking.wandb_has_key()
    netrc.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.wandb_has_key()


def wandb_records(run_folder):
    """The records of a W&B run's .wandb transaction log, parsed with wandb's own protobuf. The file is in LevelDB's
    log format: a 7-byte header (":W&B", 0xBEE1, version), then 32 KiB blocks of chunks, each with a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail too short for a header is padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run_folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, records, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(chunks))
            chunks = b""
    return records


def wandb_run(run_folder):
    """-> (the run record, its config {flag: value}, its history {key: [(step, value)]}, its exit code or None if
    it did not end)."""
    records = wandb_records(run_folder)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    curves = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # (W&B's own: _step, _runtime, _timestamp)
                    curves.setdefault(key, []).append((r.history.step.num, json.loads(item.value_json)))
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    return run, config, curves, exits[-1] if exits else None


def test_wandb_offline_run_mirrors_metrics_jsonl_across_ctrl_c_and_resume(tiny, tmp_path):
    # no WANDB_MODE and no API key: the tracker's own choice is offline; nothing of W&B's outside tmp_path, and
    # a base URL that goes nowhere, should anything try the network
    wandb = tmp_path / "wandb-home"
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "WANDB_DIR": str(wandb),
        "WANDB_CONFIG_DIR": str(wandb / "config"),
        "WANDB_CACHE_DIR": str(wandb / "cache"),
        "WANDB_DATA_DIR": str(wandb / "data"),
        "WANDB_SILENT": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "NETRC": str(netrc),
        "OMP_NUM_THREADS": "1",
    }
    out = tmp_path / "run"
    command = [sys.executable, "train_xkl.py", "--model", tiny, "--out", str(out), "--steps", "400"]
    command += ["--save-every", "0", "--tracker", "wandb", "--device", "cpu"] + XKL
    # Ctrl-C, as a terminal sends it, to the whole process group (W&B's service process too), at step 3 or so
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    log, deadline = out / "metrics.jsonl", time.time() + 120
    while proc.poll() is None and time.time() < deadline and (not log.exists() or log.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    interrupted = metrics(out), json.loads((out / "summary.json").read_text())["args"]  # (lines, flags)
    r = subprocess.run(
        [sys.executable, "train_xkl.py", "--resume", str(out), "--steps", str(interrupted[0][-1]["step"] + 3)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = metrics(out)
    assert [m["step"] for m in lines] == list(range(1, len(interrupted[0]) + 4))

    first, resumed = sorted((out / "wandb").glob("offline-run-*"))  # one W&B run per try, both offline
    finished = lines, json.loads((out / "summary.json").read_text())["args"]
    for folder, (want, flags), code in ((first, interrupted, 130), (resumed, finished, 0)):
        run, config, curves, exit_code = wandb_run(folder)
        assert run.project == "nanotune" and run.display_name == "run"
        assert exit_code == code  # ended, by Ctrl-C (W&B shows it failed) and at the end (finished)
        assert_mirrors(curves, want)  # the resumed W&B run holds the whole history
        assert config == flags and config["tracker"] == "wandb"
