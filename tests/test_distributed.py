"""DistributedDataParallel on CPU with 2 Gloo processes: the same maths as one process, outputs written once."""

import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch.nn.parallel import DistributedDataParallel as DDP

from nanotune import GPT
from nanotune.utils import make_optimizer
from train_gulliver import next_token_nll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_step(model, batch):
    # SGD: the update is linear in the gradient, so fp32 summation order cannot be amplified (Adam divides
    # near-zero gradients by their own size, turning 1e-12 differences into visible ones)
    optimizer = make_optimizer(model, "sgd", 0.5)
    loss = next_token_nll(model(batch), batch)
    loss.backward()
    optimizer.step()


def ddp_worker(rank, world, init_file, model_dir, batch, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = GPT.from_pretrained(model_dir)
    shard = batch.chunk(world)[rank]  # each rank sees its own half of the global batch
    one_step(DDP(model), shard)
    if rank == 0:
        torch.save(model.state_dict(), out_file)
    dist.destroy_process_group()


def test_ddp_step_equals_single_process_step(tiny, tmp_path):
    batch = torch.randint(0, 50257, (4, 32), generator=torch.Generator().manual_seed(0))
    torch_mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), tiny, batch, str(tmp_path / "ddp.pt")), nprocs=2)
    ddp_weights = torch.load(tmp_path / "ddp.pt")

    single = GPT.from_pretrained(tiny)
    one_step(single, batch)  # the whole global batch in one process
    start = GPT.from_pretrained(tiny).state_dict()
    worst = 0.0
    for key, value in single.state_dict().items():
        assert not torch.equal(value, start[key]) or key.endswith("bias"), f"{key} did not move"
        worst = max(worst, (value - ddp_weights[key]).abs().max().item())
    assert worst < 1e-5, worst


def test_recipe_under_torchrun_writes_outputs_once(tiny, tmp_path):
    out = tmp_path / "xkl-ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_xkl.py",
           "--model", tiny, "--out", str(out), "--steps", "4", "--log-every", "2", "--seq-len", "8",
           "--gen-tokens", "10", "--device", "cpu"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4]  # logged by rank 0 only: no duplicates
    assert r.stdout.count("effective batch 8 sequences") == 1  # 4 per rank x 2 ranks, printed once
    assert r.stdout.count("x_share") == 3  # before, after, final line: once each
    assert (out / "model.safetensors").is_file()
