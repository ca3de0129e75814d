"""DistributedDataParallel on CPU with 2 Gloo processes: the same maths as one process, outputs written once."""

import contextlib
import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from nanotune import GPT
from nanotune.lifecycle.step import make_optimizer, no_sync_unless_last
from train_gulliver import next_token_nll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sgd_steps(model, batch, accums, sync=lambda last: contextlib.nullcontext()):
    # SGD: the update is linear in the gradient, so fp32 summation order cannot be amplified (Adam divides
    # near-zero gradients by their own size, turning 1e-12 differences into visible ones)
    optimizer = make_optimizer(model, "sgd", 0.5)
    for accum in accums:  # one optimizer step per entry, over `accum` micro-batches
        for k, micro in enumerate(batch.chunk(accum)):
            with sync(k == accum - 1):
                (next_token_nll(model(micro), micro) / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def ddp_worker(rank, world, init_file, model_dir, batch, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ddp = DDP(GPT.from_pretrained(model_dir))
    all_reduces = []

    def counting_hook(state, bucket):
        all_reduces.append(1)
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_hook)
    shard = batch.chunk(world)[rank]  # each rank sees its own half of the global batch
    sgd_steps(ddp, shard, [1], lambda last: no_sync_unless_last(ddp, last))
    counts = [len(all_reduces)]
    for accum in (4, 1):  # gradient accumulation: the all-reduce should run once, as for a plain step
        sgd_steps(ddp, shard, [accum], lambda last: no_sync_unless_last(ddp, last))
        counts.append(len(all_reduces) - sum(counts))
    if rank == 0:
        torch.save({"weights": ddp.module.state_dict(), "all_reduces": counts}, out_file)
    dist.destroy_process_group()


def test_ddp_steps_equal_single_process_steps(tiny, tmp_path):
    # 3 steps on 2 Gloo ranks (the middle one accumulated over 4 micro-batches per rank) == 3 steps in one
    # process on the whole global batch
    batch = torch.randint(0, 50257, (8, 32), generator=torch.Generator().manual_seed(0))
    torch_mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), tiny, batch, str(tmp_path / "ddp.pt")), nprocs=2)
    result = torch.load(tmp_path / "ddp.pt")
    ddp_weights = result["weights"]
    plain, accumulated, plain_again = result["all_reduces"]
    assert plain >= 1 and accumulated == plain_again  # no all-reduce on the 3 micro-batches before the last

    single = GPT.from_pretrained(tiny)
    sgd_steps(single, batch, [1, 1, 1])
    start = GPT.from_pretrained(tiny).state_dict()
    worst = 0.0
    for key, value in single.state_dict().items():
        assert not torch.equal(value, start[key]) or key.endswith("bias"), f"{key} did not move"
        worst = max(worst, (value - ddp_weights[key]).abs().max().item())
    assert worst < 1e-5, worst


def test_recipe_under_torchrun_writes_outputs_once(tiny, tmp_path):
    out = tmp_path / "xkl-ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train_xkl.py",
        "--model",
        tiny,
        "--out",
        str(out),
        "--steps",
        "4",
        "--log-every",
        "2",
        "--seq-len",
        "8",
        "--gen-tokens",
        "10",
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4]  # logged by rank 0 only: no duplicates
    assert r.stdout.count("effective batch 8 sequences") == 1  # 4 per rank x 2 ranks, printed once
    assert r.stdout.count("x_share") == 3  # before, after, final line: once each
    assert (out / "model.safetensors").is_file()


def test_peft_under_torchrun_with_grad_accum(tiny, tmp_path):
    # LoRA under 2 Gloo ranks with accumulation: it trains (the adapter moves), rank 0 writes the peft files
    # and the merged model once, and the merged model is a loadable plain GPT-2
    out = tmp_path / "lora-ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train_xkl.py",
        "--model",
        tiny,
        "--out",
        str(out),
        "--steps",
        "3",
        "--seq-len",
        "8",
        "--gen-tokens",
        "4",
        "--device",
        "cpu",
        "--peft",
        "lora",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("(lora: trainable") == 1
    from safetensors.torch import load_file

    lora = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())  # B left zero: it trained
    merged, base = GPT.from_pretrained(out), GPT.from_pretrained(tiny)
    assert not torch.equal(merged.h[0].attn.c_attn.weight, base.h[0].attn.c_attn.weight)


def test_ppo_under_torchrun_with_ptx_and_grad_accum(tiny, shared, tmp_path):
    # two models in DDP (policy and value), two forwards (PPO and PPO-ptx) before one backward, accumulation:
    # it runs, every rank stops at the same step, rank 0 writes each line once
    out = tmp_path / "ppo-ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    data = shared / "data"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train_ppo.py",
        "--model",
        tiny,
        "--out",
        str(out),
        "--reward",
        "letter:e",
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
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--ppo-epochs",
        "1",
        "--eval-prompts",
        "4",
        "--samples",
        "1",
        "--steps",
        "2",
        "--ptx-coef",
        "0.5",
        "--device",
        "cpu",
        "--log-every",
        "1",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
    assert all(m["ptx_loss"] > 5 for m in lines if "loss" in m)
    assert r.stdout.count("16 answers per step") == 1  # 8 per rank x 2 ranks, printed once
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_dpo_under_torchrun_gathers_every_reference_log_prob(tiny, shared, tmp_path):
    # each process computes half of the reference's log-probs and the halves are gathered: with a reference other
    # than the policy, the held-out metrics before training depend on every one of them being in its place
    from nanotune import GPTConfig

    torch.manual_seed(1)
    GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=256)).save_pretrained(tmp_path / "other")
    data = str(shared / "data" / "instruction-data-with-preference.json")
    args = ["train_dpo.py", "--model", tiny, "--ref-model", str(tmp_path / "other"), "--data", data, "--limit", "60"]
    args += ["--max-len", "96", "--steps", "0", "--responses", "0", "--device", "cpu", "--no-save"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable] + args + ["--out", str(tmp_path / "one")], cwd=ROOT, env=env, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run(
        torchrun + args + ["--out", str(tmp_path / "two")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0 and r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and abs(one["val_margin_before"]) > 1e-3  # the reference matters here
    for key in ("val_loss_before", "val_margin_before", "val_reward_accuracy_before"):
        assert abs(one[key] - two[key]) <= 1e-5, (key, one[key], two[key])


def test_grpo_under_torchrun_keeps_each_group_on_one_rank(tiny, shared, tmp_path):
    # every rank samples its own prompts and all G answers to each: a group's baseline never needs another rank's
    # answers. With 2 ranks x 2 prompts x 4 answers the uniform share is a mean over 4 groups (a multiple of 1/4)
    out = tmp_path / "grpo-ddp"
    data = shared / "data"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_grpo.py"]
    cmd += ["--model", tiny, "--out", str(out), "--reward", "letter:e", "--books", str(data / "corpus" / "pg11.txt")]
    cmd += ["--heldout-book", str(data / "gulliver.txt"), "--prompt-len", "8", "--max-new-tokens", "4"]
    cmd += ["--prompts-per-step", "2", "--group-size", "4", "--batch-size", "4", "--grad-accum", "2", "--beta", "0.1"]
    cmd += ["--eval-prompts", "4", "--steps", "2", "--device", "cpu", "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [m["step"] for m in steps] == [1, 2] and all(m["first_ratio"] == 1.0 for m in steps)
    assert all((4 * m["uniform_share"]).is_integer() for m in steps)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
