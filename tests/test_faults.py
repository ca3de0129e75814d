"""Nothing lost, round two: the reward model, evaluation, generation, PEFT and PPO under bad input and faults.
Each case ends in one `error:` line (exit 2) or a `warning:` where going on is right, and leaves what was there
as it was."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_main
from safetensors import SafetensorError

import train_dpo
import train_ppo
import train_reward
import train_sft
import train_xkl
from nanotune import GPT, GPTConfig
from nanotune.model.loader import load_model
from nanotune.model.reward_model import RewardModel

ROOT = Path(__file__).resolve().parent.parent
XKL = ["--seq-len", "8", "--gen-tokens", "4", "--lr", "1e-2", "--log-every", "1"]


def one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert all(part in err for part in parts), err
    return err


def folder_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- resume


def test_a_refused_or_failed_resume_leaves_the_finished_run_as_it_was(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", tiny, "--out", str(out), "--steps", "4", "--peft", "lora", "--keep-checkpoint"] + XKL
    assert run_main(train_xkl.main, argv) == 0
    before = folder_state(out)
    assert json.loads(before["summary.json"])["status"] == "finished"
    capsys.readouterr()
    for flags, message in [
        (["--lora-r", "4"], "trained with --lora-r 8, not 4"),
        (["--peft", "none"], "trained with --peft lora, not none"),
        (["--letter", "e"], "trained with --letter X, not e"),
        (["--seed", "7"], "trained with --seed 1337, not 7"),
        (["--positions", "last"], "trained with --positions all, not last"),
    ]:
        assert run_main(train_xkl.main, ["--resume", str(out), "--steps", "6"] + flags) == 2
        one_line_error(capsys, f"--resume {out}", message)
        assert folder_state(out) == before  # summary.json still "finished", with every number
    # a resume that fails after the flags passed (its optimizer state is unreadable) changes nothing either
    trainer = next(out.glob("checkpoints/step-*/trainer.pt"))
    trainer.write_bytes(b"not a checkpoint")
    before = folder_state(out)
    assert run_main(train_xkl.main, ["--resume", str(out), "--steps", "6"]) == 2
    one_line_error(capsys, f"--resume {out}")
    assert folder_state(out) == before


def test_ppo_resume_with_another_reward_is_refused(tiny, shared, tmp_path, capsys):
    data = shared / "data"
    out = tmp_path / "ppo"
    argv = ["--model", tiny, "--out", str(out), "--reward", "letter:x", "--steps", "2", "--save-every", "1"]
    argv += ["--books", str(data / "corpus" / "pg11.txt"), "--heldout-book", str(data / "gulliver.txt")]
    argv += ["--prompt-len", "8", "--max-new-tokens", "4", "--rollout-batch", "4", "--batch-size", "4"]
    argv += ["--eval-prompts", "4", "--ppo-epochs", "1", "--keep-checkpoint"]
    assert run_main(train_ppo.main, argv) == 0
    capsys.readouterr()
    assert run_main(train_ppo.main, ["--resume", str(out), "--steps", "3", "--reward", "letter:e"]) == 2
    one_line_error(capsys, "trained with --reward letter:x, not letter:e")
    assert run_main(train_ppo.main, ["--resume", str(out), "--steps", "3", "--kl-coef", "0.2"]) == 2
    one_line_error(capsys, "trained with --kl-coef 0.05, not 0.2")


def test_a_finished_run_keeps_no_checkpoint_unless_asked(tiny, tmp_path, capsys):
    assert run_main(train_xkl.main, ["--model", tiny, "--out", str(tmp_path / "a"), "--steps", "2"] + XKL) == 0
    assert not (tmp_path / "a" / "checkpoints").exists() and (tmp_path / "a" / "model.safetensors").is_file()
    assert f"removed {tmp_path / 'a' / 'checkpoints'}" in capsys.readouterr().out
    assert (
        run_main(
            train_xkl.main, ["--model", tiny, "--out", str(tmp_path / "b"), "--steps", "2", "--keep-checkpoint"] + XKL
        )
        == 0
    )
    assert (tmp_path / "b" / "checkpoints" / "step-000002" / "trainer.pt").is_file()


# ---------------------------------------------------------------- a full disk, a folder that cannot be written


@pytest.mark.parametrize(
    "error",
    [
        SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })'),
        PermissionError(13, "Permission denied"),
    ],
)
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_good_one(error, tiny, tmp_path, monkeypatch, capsys):
    import nanotune.model.weights as weights

    real, calls = weights.save_file, []

    def full_disk_on_the_second_checkpoint(tensors, path, **kwargs):
        calls.append(path)
        if "tmp-step-000004" in path:
            raise error
        return real(tensors, path, **kwargs)

    monkeypatch.setattr(weights, "save_file", full_disk_on_the_second_checkpoint)
    out = tmp_path / "run"
    argv = ["--model", tiny, "--out", str(out), "--steps", "6", "--save-every", "2"] + XKL
    assert run_main(train_xkl.main, argv) == 2
    reason = "No space left on device" if isinstance(error, SafetensorError) else "Permission denied"
    one_line_error(capsys, "could not write the step-4 checkpoint", reason, "the last good checkpoint (step-000002)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no half-written one
    GPT.from_pretrained(out / "checkpoints" / "step-000002")
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"


def test_a_failed_write_of_the_final_weights_points_at_the_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    import nanotune.model.weights as weights

    real = weights.save_file

    def full_disk_for_the_result(tensors, path, **kwargs):
        if "checkpoints" not in path:
            raise SafetensorError("Error while serializing: IoError(No space left on device)")
        return real(tensors, path, **kwargs)

    monkeypatch.setattr(weights, "save_file", full_disk_for_the_result)
    out = tmp_path / "run"
    assert run_main(train_xkl.main, ["--model", tiny, "--out", str(out), "--steps", "2"] + XKL) == 2
    one_line_error(capsys, f"could not write the trained weights into {out}", "--resume")
    assert (out / "checkpoints" / "step-000002").is_dir() and not (out / "model.safetensors").exists()


# ---------------------------------------------------------------- models passed as --model


def test_a_lora_folder_as_model_trains_as_a_plain_model_and_an_adapter_folder_is_refused(
    tiny, shared, tmp_path, capsys
):
    lora = tmp_path / "lora-run"
    assert run_main(train_xkl.main, ["--model", tiny, "--out", str(lora), "--steps", "2", "--peft", "lora"] + XKL) == 0
    data = ["--data", str(shared / "data" / "instruction-data-with-preference.json"), "--limit", "40"]
    rm = tmp_path / "rm"
    argv = ["--model", str(lora / "lora"), "--out", str(rm), "--steps", "2", "--max-len", "96"] + data
    assert run_main(train_reward.main, argv) == 0
    from safetensors.torch import load_file

    assert not any("lora" in key for key in load_file(str(rm / "model.safetensors")))  # a plain reward model
    RewardModel.from_pretrained(rm)
    adapters = tmp_path / "adapter-run"
    argv = ["--model", tiny, "--out", str(adapters), "--steps", "2", "--peft", "adapter"] + XKL
    assert run_main(train_xkl.main, argv) == 0
    capsys.readouterr()
    argv = ["--model", str(adapters), "--out", str(tmp_path / "sft"), "--steps", "1", "--max-len", "96"] + data
    assert run_main(train_sft.main, argv) == 2
    one_line_error(capsys, "holds adapter on top of", "cannot be folded into GPT-2's weights")
    assert not (tmp_path / "sft").exists()


def test_an_adapter_folder_names_its_base_relative_to_itself(tmp_path):
    torch.manual_seed(0)
    project = tmp_path / "project"
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(project / "base")
    code = (
        "import train_xkl; train_xkl.main(['--model', 'base', '--out', 'run', '--steps', '1', '--peft', 'adapter', "
        "'--seq-len', '8', '--gen-tokens', '2', '--prompt', 'The'])"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((project / "run" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "../base"  # not the absolute path of this machine
    project.rename(tmp_path / "moved")  # the folders move together, to another place (or machine)
    model, _ = load_model(str(tmp_path / "moved" / "run"), torch.device("cpu"))
    assert model.peft["method"] == "adapter"


# ---------------------------------------------------------------- evaluate and generate


@pytest.fixture(scope="module")
def judge(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("judge")
    RewardModel(GPT.from_pretrained(tiny)).save_pretrained(folder)
    return folder


def evaluate(args, capsys):
    from nanotune import evaluate as module

    code = run_main(module.main, args)
    return code, capsys.readouterr()


def test_evaluate_checks_its_judge_and_models_before_answering(tiny, judge, shared, tmp_path, capsys):
    base = ["--data", str(shared / "data" / "instruction-data.json"), "--n", "2", "--out", str(tmp_path / "e")]
    code, out = evaluate(base + ["--models", tiny, str(tmp_path / "nowhere"), "--judge", str(judge)], capsys)
    assert code == 2 and "could not load --models" in out.err and "answering" not in out.out + out.err
    torch.manual_seed(0)
    other = tmp_path / "other-vocab"
    RewardModel(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=1000))).save_pretrained(other)
    code, out = evaluate(base + ["--models", tiny, tiny, "--judge", str(other)], capsys)
    assert code == 2 and "has a vocabulary of 1000 tokens, not GPT-2's 50257" in out.err
    # a judge whose scores are NaN: no comparison of them means anything
    nan_judge = tmp_path / "nan-judge"
    model = RewardModel(GPT.from_pretrained(tiny))
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(nan_judge)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"instruction": "Say hi.", "answers": {"a": "hi", "b": ""}}) + "\n")
    code, out = evaluate(["--answers", str(answers), "--judge", str(nan_judge), "--out", str(tmp_path / "n")], capsys)
    assert code == 2 and "gave 2 of 2 answers a NaN or infinite score" in out.err


def test_evaluate_answers_are_type_checked_and_empty_ones_flagged(judge, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"instruction": "Say hi.", "answers": {"a": "hi", "b": None}}) + "\n")
    code, out = evaluate(["--answers", str(answers), "--judge", str(judge), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "record 0 key 'answers.b' holds a NoneType, expected text" in out.err
    answers.write_text(json.dumps({"instruction": "Say hi.", "answers": {"a": "hi", "b": " "}}) + "\n")
    code, out = evaluate(["--answers", str(answers), "--judge", str(judge), "--out", str(tmp_path / "y")], capsys)
    assert "warning: every answer of b is empty" in out.err and (tmp_path / "y" / "summary.json").is_file()


def test_generate_refuses_an_empty_instruction_and_says_when_it_cuts(tiny, capsys):
    module = importlib.import_module("nanotune.generate")  # (nanotune.generate is also the function)

    assert run_main(module.main, ["--model", tiny, "--instruction", "  "]) == 2
    one_line_error(capsys, "--instruction is empty")
    assert run_main(module.main, ["--model", tiny, "--prompt", "Hi", "--top-k", "-5"]) == 2
    one_line_error(capsys, "argument --top-k: must be >= 0, got -5")
    assert run_main(module.main, ["--model", tiny, "--prompt", "Hi", "--max-new-tokens", "999"]) == 0
    out = capsys.readouterr()
    assert (
        "warning: --max-new-tokens 999 does not fit the model's context of 256 after the prompt; generating 255"
        in out.err
    )


# ---------------------------------------------------------------- data


def test_data_of_the_wrong_shape_is_named(tiny, tmp_path, capsys):
    base = ["--model", tiny, "--out", str(tmp_path / "o"), "--steps", "1"]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}] * 30}, indent=2))
    assert run_main(train_sft.main, base + ["--data", str(wrapped)]) == 2
    one_line_error(capsys, "holds an object with keys data, not records")
    truncated = tmp_path / "truncated.json"
    truncated.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "unterminated')
    assert run_main(train_sft.main, base + ["--data", str(truncated)]) == 2
    err = one_line_error(capsys, "is not valid JSON (Unterminated string starting at, line 2, column")
    assert "at at" not in err


def test_preference_pairs_of_identical_answers_are_flagged(tiny, tmp_path, capsys):
    base = ["--model", tiny, "--out", str(tmp_path / "rm"), "--steps", "1", "--max-len", "64"]
    same = [{"instruction": f"Say {i}.", "chosen": "Yes.", "rejected": "Yes."} for i in range(40)]
    (tmp_path / "same.json").write_text(json.dumps(same))
    assert run_main(train_reward.main, base + ["--data", str(tmp_path / "same.json")]) == 2
    one_line_error(capsys, "every training pair ranks two identical answers")
    some = same[:20] + [{"instruction": f"Tell {i}.", "chosen": "Yes.", "rejected": "No."} for i in range(20)]
    (tmp_path / "some.json").write_text(json.dumps(some))
    assert run_main(train_reward.main, base + ["--data", str(tmp_path / "some.json")]) == 0
    assert "training pairs rank two identical answers (they teach nothing)" in capsys.readouterr().err
    assert run_main(train_dpo.main, base + ["--data", str(tmp_path / "same.json"), "--out", str(tmp_path / "d")]) == 2
    one_line_error(capsys, "every training pair's chosen answer is its rejected one")


@pytest.mark.parametrize(
    "recipe, flags",
    [
        ("train_sft", ["--lm-weight", "0.5"]),
        ("train_reward", ["--margin", "1"]),
        ("train_reward", ["--center-coef", "0.1"]),
        ("train_grpo", ["--advantage", "rloo"]),
        ("train_grpo", ["--loss-agg", "token"]),
        ("train_grpo", ["--beta", "0.04"]),
        ("train_grpo", ["--clip-high", "0.28"]),
        ("train_grpo", ["--skip-uniform-groups"]),
        ("train_grpo", ["--missing-eos-penalty", "1"]),
        ("train_ppo", ["--whiten-scores"]),
        ("train_ppo", ["--gamma", "0.9"]),
        ("train_ppo", ["--lam", "0.9"]),
        ("train_ppo", ["--clip", "0.3"]),
        ("train_ppo", ["--vf-coef", "0.5"]),
        ("train_ppo", ["--ptx-coef", "0.5"]),
    ],
)
def test_a_resume_refuses_a_flag_that_changes_the_objective(recipe, flags, tmp_path, capsys):
    # DPO's rule in every recipe: what the run optimised stays what it optimises (--steps may change)
    module = importlib.import_module(recipe)
    state = tmp_path / "checkpoints" / "step-000005"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"args": vars(module.parse_args([]))}))
    assert module.parse_args(["--resume", str(tmp_path), "--steps", "9"]).steps == 9
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--resume", str(tmp_path), *flags])
    assert e.value.code == 2
    one_line_error(capsys, f"--resume {tmp_path}: the run was trained with {flags[0]}")
