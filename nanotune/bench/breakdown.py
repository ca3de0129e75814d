"""python -m nanotune.bench.breakdown: where one generated token's time goes, measured with torch.profiler.

    python -m nanotune.bench.breakdown                          # nano: generate() at batch 1 and 8, engine steps
    python -m nanotune.bench.breakdown --preset gpt2 --batches 1,8 --rows 0

For generate() (greedy, eager, the step every sampler uses) at each --batches size, and for one step of the
server's engine (nanotune/serve/engine.py, no HTTP) with each --rows count of rows, the time of a token (a step)
split into: the tied head, the layers' matrix products, attention, the cache writes, LayerNorm/GELU/residual
adds, embeddings and positions, views and copies, sampling, the engine's per-row work (a row's next token picked,
its text decoded and sent), and the rest: Python between the operators (with the profiler's own cost per
operator, which is why the profiled token is slower than the unprofiled one printed beside it).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..decoding import KVCache, packed_layers
from ..flags import Parser, integer
from ..generate import generate
from ..utils import save_json
from .sampling import bench_model
from .vs_transformers import run_times

# the operators of a decode step, by what they do (anything else counts as "other operators")
CATEGORIES = {
    "head (tied, vocabulary x width)": ("aten::matmul", "aten::mm"),  # (and every operator of KVCache.logits)
    "layers' matrix products": ("aten::addmm", "aten::linear", "mkldnn::_linear_pointwise"),
    "attention": ("aten::scaled_dot_product_attention",),
    "cache writes": ("aten::scatter_", "aten::index_put_", "aten::copy_", "aten::fill_"),
    "LayerNorm, GELU, residual adds": ("aten::layer_norm", "aten::gelu", "aten::add", "aten::add_"),
    "embeddings and positions": ("aten::embedding", "aten::sum", "aten::sub", "aten::arange", "aten::cumsum"),
    "views and copies": (
        "aten::view",
        "aten::transpose",
        "aten::split",
        "aten::expand",
        "aten::reshape",
        "aten::contiguous",
        "aten::t",
        "aten::select",
        "aten::slice",
        "aten::unsqueeze",
        "aten::index",
        "aten::to",
        "aten::clone",
        "aten::detach",
        "aten::lift_fresh",
        "aten::empty",
        "aten::zeros",
        "aten::cat",
        "aten::narrow",
        "mkldnn::_reorder_linear_weight",
    ),  # fmt: skip  (with the copies made once per generation: the head's (C, V) copy, the packed layers)
    "sampling": ("aten::argmax", "aten::topk", "aten::softmax", "aten::multinomial", "aten::where", "aten::eq"),
}
ROW_WORK = "engine: per-row work"  # a record_function around Row.advance
HEAD = "head (tied, vocabulary x width)"  # a record_function around KVCache.logits (the packed copies' kernel is
# the layers' too)


@contextlib.contextmanager
def labelled(owner, method: str, label: str):
    """owner.method's operators profiled under one record_function named label, while the context lasts."""
    original = getattr(owner, method)

    def wrapper(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(owner, method, wrapper)
    try:
        yield
    finally:
        setattr(owner, method, original)


def parse_args(argv=None):
    p = Parser(__doc__, prog="python -m nanotune.bench.breakdown")
    p.add_argument("--model", default="weights/nano", help="what --model accepts (default: the bundled nano)")
    p.add_argument("--preset", default=None, help="instead: random weights of this shape (gpt2, gpt2-medium, ...)")
    p.add_argument("--batches", default="1,8", help="generate()'s batch sizes, comma-separated (default 1,8)")
    p.add_argument("--rows", default="1,2,8", help="engine rows, comma-separated; 0: no engine (default 1,2,8)")
    p.add_argument("--tokens", type=integer(8), default=64, help="tokens (steps) measured per case (default 64)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the breakdowns to this file")
    return p.parse_args(argv)


def operators(prof) -> int:
    """The operators the profiled run called from Python: its top-level events, and those directly under one of
    the labels (the head, the engine's per-row work), not the operators they call in turn."""
    return sum(
        event.name not in (ROW_WORK, HEAD) and (event.cpu_parent is None or event.cpu_parent.name in (ROW_WORK, HEAD))
        for event in prof.events()
    )


def dispatch_us(calls: int = 2000) -> float:
    """What one operator costs from Python when its kernel has nothing to do: a 1-element add (a new tensor, as
    most of a step's operators make), in microseconds, the median of 5 loops."""
    a, b = torch.ones(1), torch.ones(1)
    times = run_times(lambda: [a + b for _ in range(calls)], torch.device("cpu"), 1, 5)
    return statistics.median(times) / calls * 1e6


def split_by_category(prof, wall_s: float, units: int) -> dict[str, float]:
    """The profiled run's top-level operators (their total times never overlap) summed by CATEGORIES, and the
    rest of the wall time as Python; -> {category: ms per unit}."""
    totals = dict.fromkeys([*CATEGORIES, ROW_WORK, "other operators"], 0.0)
    names = {name: category for category, ops in CATEGORIES.items() for name in ops}
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        if event.name in (ROW_WORK, HEAD):
            category = event.name
        else:
            category = names.get(event.name, "other operators")
        totals[category] += event.cpu_time_total / 1e3  # (us -> ms)
    totals["Python between operators (and the profiler)"] = wall_s * 1e3 - sum(totals.values())
    return {category: ms / units for category, ms in totals.items() if ms}


def measure(prepare, units: int) -> dict:
    """prepare() -> run, a function to time (what prepare does is not timed); run unprofiled (median of 3, after a
    warm-up) and profiled once -> {ms per unit, profiled ms per unit, breakdown, operators per unit}."""
    prepare()()
    times = []
    for _ in range(3):
        run = prepare()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    run = prepare()
    with labelled(KVCache, "logits", HEAD), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    return {
        "ms": statistics.median(times) * 1e3 / units,
        "profiled_ms": wall * 1e3 / units,
        "breakdown": split_by_category(prof, wall, units),
        "operators": operators(prof) / units,
    }


def engine_steps(model, enc, rows: int, steps: int):
    """-> prepare: the server's batch filled with `rows` greedy rows, then a function that runs `steps` of its
    decode steps, with the large layers' packed copies the server reads (Engine.run)."""
    from ..serve import engine

    prompt = enc.encode_ordinary("It was the best of times, it was the worst of times, it was the age of wisdom")

    def prepare():
        layers = contextlib.ExitStack()  # packed once, as the server does for its life (not timed)
        layers.enter_context(packed_layers(model, torch.float32))
        batch = engine.Batch(model, enc, packed=False, fail=lambda request, error: None)
        batch.join([engine.Request(prompt, steps + 1, lambda *a, **k: None, temperature=0.0) for _ in range(rows)])

        def run():
            with layers, labelled(engine.Row, "advance", ROW_WORK):
                for _ in range(steps):
                    batch.step()

        return run

    return prepare


def print_table(title: str, cases: dict[str, dict], empty_us: float):
    categories = list(dict.fromkeys(c for case in cases.values() for c in case["breakdown"]))
    print(f"\n{title}\n\n| ms | " + " | ".join(cases) + " |\n|---|" + "---|" * len(cases))
    for category in categories:
        cells = [f"{case['breakdown'].get(category, 0):.3f}" for case in cases.values()]
        print(f"| {category} | " + " | ".join(cells) + " |")
    print("| **profiled, in all** | " + " | ".join(f"{c['profiled_ms']:.3f}" for c in cases.values()) + " |")
    print("| **unprofiled** | " + " | ".join(f"{c['ms']:.3f}" for c in cases.values()) + " |")
    print("| operators called from Python | " + " | ".join(f"{c['operators']:.0f}" for c in cases.values()) + " |")
    # a floor no kernel can lower: each operator's own cost from Python, at the price of an empty one
    floors = [c["operators"] * empty_us / 1e3 for c in cases.values()]  # ms
    floors = [f"{ms:.3f} ({ms / c['ms']:.0%})" for ms, c in zip(floors, cases.values())]
    print("| their dispatch alone, ms (share of unprofiled) | " + " | ".join(floors) + " |", flush=True)


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    model, name = bench_model(args, "cpu")
    from ..tokenizer import load_tokenizer

    enc = load_tokenizer()
    print(f"{name} on the CPU, {torch.get_num_threads()} threads: {args.tokens} greedy tokens per case", flush=True)
    empty_us = dispatch_us()
    print(f"one operator with nothing to do (a 1-element add) costs {empty_us:.2f} us from Python here", flush=True)
    report = {"model": name, "threads": torch.get_num_threads(), "empty_operator_us": empty_us}
    report |= {"generate": {}, "engine": {}}
    for batch in map(int, args.batches.split(",")):
        prompt = torch.randint(0, 50257, (batch, 16), generator=torch.Generator().manual_seed(0))
        prepare = partial(partial, generate, model, prompt, args.tokens, temperature=0)  # () -> a generation
        report["generate"][f"batch {batch}"] = measure(prepare, args.tokens)
    print_table("generate(): ms per decoding step (a token per row)", report["generate"], empty_us)
    for rows in (int(r) for r in args.rows.split(",") if int(r) > 0):
        report["engine"][f"{rows} rows"] = measure(engine_steps(model, enc, rows, args.tokens), args.tokens)
    if report["engine"]:
        title = "The server's engine: ms per step (a token for every row; joining not counted)"
        print_table(title, report["engine"], empty_us)
    if args.json:
        save_json(Path(args.json), report)


if __name__ == "__main__":
    main()
