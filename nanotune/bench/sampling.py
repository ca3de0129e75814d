"""How fast nanotune samples, against the memory bandwidth that bounds it and against transformers.

    python -m nanotune.bench.sampling                         # the bundled nano model, batch 1, 8 and 64
    python -m nanotune.bench.sampling --preset gpt2 --batches 1 --transformers --bf16   # random gpt2 weights
    python -m nanotune.bench.sampling --device cuda --compile

Decoding one token reads every weight once (the tied head alone is 50257 x width), by matrix-vector products at
batch 1, so the rate at which this machine reads a weight matrix for one (measured here on the head, by the faster
of BLAS and, on a CPU, oneDNN's kernel on a packed copy, and printed beside the copy bandwidth) divided by the
weights' bytes is the ceiling in tokens/s at batch 1: its last column is the share of it each variant reaches.
Rows, each greedy decoding of --tokens new tokens after a 16-token prompt, timed in one process, the variants
taking turns for --rounds rounds (a slow spell of a shared machine hits them all) and reported as the median:
  per-token forward   the way nanotune decoded before its static step: GPT.forward with the cache, per token
  static step         nanotune.generate: GPT.decode_step, attention over the slots filled so far
  compiled            the same step through torch.compile (--compile; compiling is not timed; on CUDA it also
                      reports how often inductor skipped CUDA graphs, which it does rather than fail)
  bfloat16            --bf16: generate(dtype=torch.bfloat16); on a CPU with oneDNN's bfloat16 kernels the head and
                      the large layers read packed bfloat16 weights, activations stay float32
  transformers        GPT2LMHeadModel.generate on the same weights (--transformers; "static step vs this": how
                      many times faster nanotune's sampling is)
With --bf16 it also reports how often bfloat16 decoding picks float32's greedy token, teacher-forced over the
passage nanotune.verify uses (one decode step per token, so every position counts, not only the first miss).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..decoding import KVCache, linear_packed, onednn, pack, packed_layers
from ..flags import Parser, integer
from ..generate import generate
from ..model.config import PRESETS, GPTConfig
from ..model.gpt import GPT
from ..model.loader import load_model
from ..tokenizer import load_tokenizer
from ..utils import pick_device
from .vs_transformers import run_times


def parse_args(argv=None):
    p = Parser(__doc__, prog="python -m nanotune.bench.sampling")
    p.add_argument("--model", default="weights/nano", help="what --model accepts (default: the bundled nano)")
    p.add_argument("--preset", default=None, help="instead: random weights of this shape (gpt2, gpt2-medium, ...)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--tokens", type=integer(1), default=200, help="new tokens per generation (default 200)")
    p.add_argument("--rounds", type=integer(1), default=3, help="turns of every variant (default 3)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile'd step")
    p.add_argument("--bf16", action="store_true", help="add the bf16 head and cache")
    p.add_argument("--transformers", action="store_true", help="add transformers' generate on the same weights")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results to this file")
    head = "also time the head's paths for 1-64 rows: MKL's layouts against the packed float32 copy (CPU)"
    p.add_argument("--head", action="store_true", help=head)
    layers = "also time each layer's paths for 1-8 rows: addmm against its packed float32 copy, and which is read"
    p.add_argument("--layers", action="store_true", help=layers)
    return p.parse_args(argv)


def bench_model(args, device) -> tuple[GPT, str]:
    """--model, or with --preset random weights of that shape (seed 0) in the official layout, in a folder that
    transformers reads too (args.model then names it) -> (the model in eval mode, its name)."""
    if args.preset:
        args.model = str(Path(tempfile.mkdtemp()) / args.preset)
        torch.manual_seed(0)
        GPT(GPTConfig(**PRESETS[args.preset])).save_pretrained(args.model)
    model, name = load_model(args.model, device)
    return model.eval(), name


def copy_bandwidth(device, megabytes: int = 512) -> float:
    """GB/s of a large tensor copy (read + write), the best of five: what streaming weights can reach."""
    src = torch.empty(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = min(run_times(lambda: dst.copy_(src), device, 0, 5))
    return 2 * src.numel() * 4 / best / 1e9


def matvec_rate(model, device) -> float:
    """GB/s at which this machine reads the tied head for one row's logits, the best of ten by the faster of its
    kernels: BLAS on a contiguous (C, V) copy, or on a CPU with oneDNN its kernel on a packed float32 copy (what
    batch-1 decoding reads there). The honest limit of batch-1 float32 decoding, which reads every weight once a
    token by matrix-vector products (well under the copy bandwidth on this CPU)."""
    wte = model.wte.weight.detach()
    x = torch.randn(1, wte.shape[1], device=device)
    head = wte.t().contiguous()
    best = min(run_times(lambda: x @ head, device, 0, 10))
    if onednn(device):
        packed = pack(wte, torch.float32)
        best = min(best, *run_times(lambda: linear_packed(x, packed, None, torch.float32), device, 0, 10))
    return wte.numel() * wte.element_size() / best / 1e9


def per_call_ms(path, rounds: int) -> float:
    """ms per call of path() on the CPU, median of `rounds` turns of 10 calls."""
    return statistics.median(run_times(lambda: [path() for _ in range(10)], torch.device("cpu"), 1, rounds)) * 100


def head_paths(model, batches, rounds: int = 7) -> list[dict]:
    """ms for the tied head's logits of B rows, median of `rounds` turns of 10: MKL on the layout it reads fastest
    (x @ a contiguous (C, V) copy for one row, wte (V, C) @ x.T for several) against oneDNN on a packed float32
    copy (what KVCache's copy_head makes on a CPU with oneDNN)."""
    wte = model.wte.weight.detach()
    packed, head = pack(wte, torch.float32), wte.t().contiguous()
    rows = []
    for batch in batches:
        x = torch.randn(batch, wte.shape[1])
        mkl = (lambda x=x: x @ head) if batch == 1 else (lambda x=x: wte @ x.t())
        ms = {"MKL": per_call_ms(mkl, rounds)}
        ms["packed"] = per_call_ms(lambda x=x: linear_packed(x, packed, None, torch.float32), rounds)
        rows.append({"batch": batch, **ms, "ratio": ms["MKL"] / ms["packed"]})
        layout = "x @ (C, V) copy" if batch == 1 else "wte @ x.T"
        print(f"head, {batch} rows: {layout} {ms['MKL']:.2f} ms, packed {ms['packed']:.2f} ms", flush=True)
    return rows


def addmm_against_packed(weight, bias, batches, rounds: int) -> list[dict]:
    """One layer's times for each row count: {"addmm": us, "packed": us}."""
    packed = pack(weight.t(), torch.float32)
    times = []
    for batch in batches:
        x = torch.randn(batch, weight.shape[0])
        addmm = per_call_ms(lambda x=x: torch.addmm(bias, x, weight), rounds)
        oned = per_call_ms(lambda x=x: linear_packed(x, packed, bias, torch.float32), rounds)
        times.append({"addmm": addmm * 1e3, "packed": oned * 1e3})
    return times


def layer_paths(model, batches, rounds: int = 7) -> list[dict]:
    """us for each of the first block's four layers on B rows, median of `rounds` turns of 10: MKL's addmm on the
    (in, out) weight against oneDNN on a packed float32 copy, and whether decoding.packed_layers has that layer
    read its copy at that row count."""
    rows = []
    layers = [m for m in model.h[0].modules() if hasattr(m, "packed")]
    with packed_layers(model, torch.float32):
        chosen = {id(m): m.packed for m in layers}  # (a decoding.Packed, or None)
    for m in layers:
        shape = " x ".join(map(str, m.weight.shape))
        for batch, us in zip(batches, addmm_against_packed(m.weight.detach(), m.bias.detach(), batches, rounds)):
            reads = chosen[id(m)] is not None and chosen[id(m)].reads(torch.empty(batch, m.weight.shape[0]))
            rows.append(
                {"layer": shape, "batch": batch, **us, "ratio": us["addmm"] / us["packed"], "packed_read": reads}
            )
            print(
                f"layer {shape}, {batch} rows: addmm {us['addmm']:.0f} us, packed {us['packed']:.0f} us "
                f"({us['addmm'] / us['packed']:.2f}x); decoding reads {'the packed copy' if reads else 'addmm'}",
                flush=True,
            )
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def per_token_forward(model, prompt, tokens: int):
    """The decoding loop nanotune had before GPT.decode_step: GPT.forward with the KV cache, one token at a time
    (with today's KVCache and its copies of the head, so that the step is what differs)."""
    cache = KVCache(model, prompt.shape[0], prompt.shape[1] + tokens, copy_head=tokens >= 32)
    logits = model(prompt, cache=cache)[:, -1]
    for _ in range(tokens - 1):
        logits = model(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
    return logits


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    model, name = bench_model(args, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth, matvec = copy_bandwidth(device), matvec_rate(model, device)
    limit = matvec * 1e9 / weight_bytes  # tokens/s at batch 1 if every weight were read once at the matvec rate
    print(
        f"{name}: {weight_bytes / 1e6:.0f} MB of weights on {device}; copy bandwidth {bandwidth:.1f} GB/s, the head's "
        f"matrix-vector product reads {matvec:.1f} GB/s, so at batch 1 at most {limit:.0f} tokens/s",
        flush=True,
    )
    hf = None
    if args.transformers:
        from ..model.weights import resolve_checkpoint
        from ..verify import load_transformers, quiet_transformers

        quiet_transformers()
        hf = load_transformers(*resolve_checkpoint(model_source(args.model, name)), model).to(device)
    if args.bf16:
        share = bf16_agreement(model, device)
        print(f"bfloat16 picks float32's greedy token at {share:.1%} of the verify passage's positions", flush=True)
    head = head_paths(model, (1, 2, 4, 8, 16, 64)) if args.head and onednn(device) else None
    layers = layer_paths(model, (1, 2, 4, 8)) if args.layers and onednn(device) else None
    results = []
    for batch in map(int, args.batches.split(",")):
        prompt = torch.randint(0, 50257, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
        variants = decoders(model, hf, prompt, args)
        times = {key: [] for key in variants}
        for run in variants.values():  # warm-up (and compilation), not timed
            run()
        for _ in range(args.rounds):
            for key, run in variants.items():
                sync(device)
                start = time.perf_counter()
                run()
                sync(device)
                times[key].append(time.perf_counter() - start)
        for key, seconds in times.items():
            rate = batch * args.tokens / statistics.median(seconds)
            share = rate / limit if batch == 1 else None  # the time of reading the weights / a token's time
            results.append({"batch": batch, "variant": key, "tokens_per_s": rate, "limit_share": share})
    print_table(results)
    report = {"model": name, "weight_bytes": weight_bytes, "copy_gb_s": bandwidth, "matvec_gb_s": matvec}
    report |= {"batch1_limit_tokens_per_s": limit, "rows": results, "head_paths": head, "layer_paths": layers}
    if args.compile and device.type == "cuda":  # did the compiled step run as CUDA graphs, or did inductor fall back?
        from torch._dynamo.utils import counters

        report["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
        print(f"CUDA graphs skipped {report['cudagraph_skips']} times (0: the compiled step replayed as graphs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def print_table(results: list[dict]):
    """The rows as a table: each against the per-token forward, transformers against the static step (the
    decoding every sampler uses), and at batch 1 the share of the matrix-vector limit it reaches."""
    rates = {(r["batch"], r["variant"]): r["tokens_per_s"] for r in results}
    print("| batch | variant | new tokens/s | vs per-token forward | static step vs this | share of the matvec limit |")
    print("|---|---|---|---|---|---|")
    for r in results:
        batch, rate = r["batch"], r["tokens_per_s"]
        versus = f"{rates[batch, 'static step'] / rate:.2f}x" if r["variant"] == "transformers" else ""
        share = f"{r['limit_share']:.0%}" if r["limit_share"] is not None else ""
        row = f"| {batch} | {r['variant']} | {rate:.1f} | {rate / rates[batch, 'per-token forward']:.2f}x | {versus} "
        print(row + f"| {share} |", flush=True)


@torch.no_grad()
def bf16_agreement(model: GPT, device) -> float:
    """Share of the verify passage's positions (up to 512) where the bfloat16 decode step's argmax is float32's."""
    text = (Path(__file__).parent.parent / "verify.txt").read_text(encoding="utf-8")
    tokens = torch.tensor(load_tokenizer().encode(text)[: min(512, model.config.n_positions)], device=device)
    picks = []
    for bf16 in (False, True):
        if not bf16:
            context = nullcontext()
        elif device.type == "cpu":
            context = packed_layers(model, torch.bfloat16)
        else:
            context = torch.autocast(device.type, dtype=torch.bfloat16)
        at, argmax = torch.zeros(1, dtype=torch.long, device=device), []
        with context:  # (the cache made inside: under autocast its keys and values take autocast's dtype)
            cache = KVCache(model, 1, len(tokens), packed=bf16 and device.type == "cpu")
            for token in tokens:
                argmax.append(model.decode_step(token.view(1, 1), cache, at).argmax(-1))  # (1,)
                at += 1
        picks.append(torch.cat(argmax))
    return (picks[0] == picks[1]).float().mean().item()


def decoders(model, hf, prompt, args) -> dict:
    """The variants of the table, each a function decoding --tokens tokens greedily after prompt (B, 16)."""
    tokens = args.tokens
    runs = {
        "per-token forward": lambda: per_token_forward(model, prompt, tokens),
        "static step": lambda: generate(model, prompt, tokens, temperature=0),
    }
    if args.compile:
        runs["compiled"] = lambda: generate(model, prompt, tokens, temperature=0, compile=True)
    if args.bf16:
        runs["bfloat16"] = lambda: generate(model, prompt, tokens, temperature=0, dtype=torch.bfloat16)
    if hf is not None:
        greedy = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        runs["transformers"] = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy)
    return runs


def model_source(spec: str, name: str) -> str:
    """The checkpoint behind --model (auto resolves to the name load_model reported)."""
    return name if spec == "auto" else spec


if __name__ == "__main__":
    main()
