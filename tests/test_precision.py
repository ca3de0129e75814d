"""Ready for a GPU, checked on the CPU: float32 logits and scores under bfloat16 autocast, a compiled model that
keeps few graphs and no graph break, every recipe in bfloat16 near its float32 self, and PPO's models held once
under --peft. (.ci/gpu runs the rest on a CUDA machine.)"""

import json

import pytest
import torch
from helpers import run_main

import train_dpo
import train_gulliver
import train_ppo
import train_reward
import train_sft
import train_xkl
from nanotune import GPT, KVCache
from nanotune.model.reward_model import RewardModel

IDX = torch.randint(0, 50257, (3, 24), generator=torch.Generator().manual_seed(0))


def test_logits_and_scores_are_float32_under_bfloat16_autocast(tiny):
    model = GPT.from_pretrained(tiny)
    reward = RewardModel(GPT.from_pretrained(tiny))
    with torch.no_grad():
        exact = model(IDX)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, scores = model(IDX), reward(IDX)
            cached = model(IDX, cache=KVCache(model, 3, 32))  # generation's path: the last position's logits
            values = reward(IDX, all_positions=True)
    assert logits.dtype == cached.dtype == scores.dtype == values.dtype == torch.float32
    # the body ran in bfloat16, so the logits differ from float32's, but by the body's rounding only
    assert (logits - exact).abs().max() < 0.1 and torch.allclose(cached[:, 0], logits[:, -1], atol=1e-5)


def count_graphs(run):
    """(graphs captured, graph breaks) while run() calls a model compiled with the eager backend."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run()
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_compiled_model_keeps_two_graphs_per_kind_of_call_and_no_break(tiny):
    model = GPT.from_pretrained(tiny)
    compiled = torch.compile(model, backend="eager")

    def plain():  # the recipes' training forward, at several sequence lengths
        for T in (6, 9, 12, 15, 18):
            compiled(IDX[:, :T])

    def padded():  # left-padded answers read back at their positions, as PPO does, at several prompt widths
        for P, T in ((4, 10), (6, 13), (7, 16), (9, 20), (10, 23)):
            mask = torch.ones(3, T, dtype=torch.long)
            mask[0, :2] = 0
            compiled(IDX[:, :T], attention_mask=mask, positions=torch.arange(P - 1, T - 1))

    with torch.no_grad():
        assert count_graphs(plain) == (2, 0)  # the first shape, then one graph with a dynamic length
        assert count_graphs(padded) == (2, 0)


def recipe_runs(shared):
    data = shared / "data"
    pref = ["--data", str(data / "instruction-data-with-preference.json"), "--limit", "24", "--max-len", "96"]
    books = ["--books", str(data / "corpus" / "pg11.txt"), "--heldout-book", str(data / "gulliver.txt")]
    return {
        "xkl": (train_xkl, ["--seq-len", "16", "--gen-tokens", "4"]),
        "gulliver": (
            train_gulliver,
            ["--data", str(data / "gulliver.txt"), "--seq-len", "32", "--samples", "1"]
            + ["--sample-tokens", "4", "--eval-batches", "1"],
        ),
        "sft": (
            train_sft,
            ["--data", str(data / "instruction-data.json"), "--limit", "40", "--max-len", "96", "--responses", "0"],
        ),
        "dpo": (train_dpo, pref + ["--responses", "0"]),
        "reward": (train_reward, pref),
        "ppo": (
            train_ppo,
            books
            + ["--reward", "letter:e", "--prompt-len", "8", "--max-new-tokens", "6"]
            + ["--rollout-batch", "4", "--ppo-epochs", "1", "--eval-prompts", "4", "--samples", "0"],
        ),
    }


@pytest.mark.parametrize("name", ["xkl", "gulliver", "sft", "dpo", "reward", "ppo"])
def test_every_recipe_trains_in_bfloat16_close_to_float32(name, tiny, shared, tmp_path):
    module, extra = recipe_runs(shared)[name]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        argv = ["--model", tiny, "--out", str(out), "--steps", "3", "--batch-size", "4", "--log-every", "1"]
        argv += ["--dtype", dtype, "--lr", "1e-3", "--eval-every", "100"] if name != "xkl" else ["--dtype", dtype]
        assert run_main(module.main, argv + extra) == 0
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[dtype] = [m["loss"] for m in logged if "loss" in m]
    assert len(losses["float32"]) == 3
    # the losses (in nats) of the same three steps: bfloat16's matmuls round to 8 bits, so a few hundredths apart
    for a, b in zip(losses["float32"], losses["bfloat16"]):
        assert abs(a - b) <= 0.05 + 0.01 * abs(a), (losses, name)


def storage_bytes(*modules) -> int:
    """Bytes of the distinct tensors behind the modules' parameters and buffers (a shared tensor counts once)."""
    seen = {}
    for module in modules:
        tensors = list(module.parameters()) + list(module.buffers())
        tensors += list(getattr(module, "model", torch.nn.Module()).parameters())  # peft.WithoutPEFT's model
        seen |= {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(seen.values())


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_ppo_holds_the_frozen_base_once_under_peft(peft, tiny, shared, tmp_path, monkeypatch):
    seen, real = {}, train_ppo.read_back
    monkeypatch.setattr(train_ppo, "read_back", lambda *a: seen.setdefault("models", a[:3]) and real(*a))
    module, extra = recipe_runs(shared)["ppo"]
    argv = ["--model", tiny, "--out", str(tmp_path / "ppo"), "--steps", "1", "--batch-size", "4", "--peft", peft]
    assert run_main(module.main, argv + extra) == 0
    base = storage_bytes(GPT.from_pretrained(tiny))
    held = storage_bytes(*seen["models"])  # policy, reference, value model
    if peft == "none":  # three models: the policy, its frozen copy and the value model
        assert 2.9 * base < held < 3.1 * base
    else:  # the base once, shared; LoRA's tensors and the value head on top
        assert base < held < 1.1 * base
