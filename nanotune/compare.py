"""Reinforcement-learning runs side by side (train_ppo.py, train_grpo.py): held-out score against KL to the start
model in one figure, and a table of where each run ended and what its steps cost.

    python -m nanotune.compare out/ppo-sentiment out/grpo-sentiment --svg docs/figures/sentiment.svg

Reads each run's metrics.jsonl (val_score and val_kl at every evaluation, the time_* split of every step) and its
summary.json, and prints a markdown table: the run, its method, steps, held-out score and KL at its last
evaluation, the median seconds of a step (its time_* phases summed: generation, scoring, update; the evaluations
left out), the peak memory and the wall time; then each run's step time and peak memory against the first's.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from .flags import Parser, real
from .plot import plot_curves
from .utils import die


def parse_args(argv=None):
    p = Parser(__doc__, prog="python -m nanotune.compare")
    p.add_argument("runs", nargs="+", help="output folders of train_ppo.py or train_grpo.py runs")
    p.add_argument("--svg", default=None, help="write the held-out score against KL figure here")
    p.add_argument("--title", default="held-out score against KL to the start model", help="the figure's title")
    max_kl = "draw only the evaluations at KL <= this (a run that drifted far would squeeze the others)"
    p.add_argument("--max-kl", type=real(0, low_open=True), default=None, help=max_kl)
    return p.parse_args(argv)


def read_run(folder: Path) -> dict:
    """One run's evaluations [(KL, score)], its steps' phase times and what its summary says."""
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        die(f"{folder}: no metrics.jsonl (not a run folder, or the run never started)")
    lines = []
    text = metrics.read_text().splitlines()
    for number, line in enumerate(text, start=1):
        try:
            lines += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError:
            if number < len(text):  # a bad line in the middle: not a file a run wrote
                die(f"{metrics}: line {number} is not valid JSON")
            print(
                f"warning: {metrics}: the last line was cut off (a run killed mid-write); read without it",
                file=sys.stderr,
            )
    summary_file = folder / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    evals = [(m["val_kl"], m["val_score"]) for m in lines if "val_score" in m and "val_kl" in m]
    if not evals:
        die(f"{folder}/metrics.jsonl: no held-out evaluation (val_score, val_kl) to compare")
    step_s = [sum(v for k, v in m.items() if k.startswith("time_")) for m in lines if "time_update_s" in m]
    return {"evals": evals, "step_s": step_s, "steps": max(m.get("step", 0) for m in lines), "summary": summary}


def method(summary: dict) -> str:
    """'PPO' or 'GRPO (advantage, loss aggregation)', from the run's arguments."""
    args = summary.get("args", {})
    if summary.get("script") == "train_grpo.py":
        beta = f", beta {args['beta']:g}" if args.get("beta") else ""
        return f"GRPO ({args.get('advantage')}, {args.get('loss_agg')}{beta})"
    return {"train_ppo.py": "PPO"}.get(summary.get("script"), summary.get("script", "?"))


def numbers(run: dict) -> dict:
    """What the table shows of one run: its last evaluation, median step time, peak memory and wall time."""
    kl, score = run["evals"][-1]
    summary = run["summary"]
    step_s = statistics.median(run["step_s"]) if run["step_s"] else None
    return {
        "score": score,
        "kl": kl,
        "step_s": step_s,
        "peak": summary.get("peak_memory_mib"),
        "wall": summary.get("elapsed_s"),
    }


def table(runs: dict[str, dict]) -> list[str]:
    show = lambda value, form: "?" if value is None else format(value, form)  # noqa: E731
    lines = [
        "| run | method | steps | held-out score | KL (nats) | median s/step | peak MiB | wall time (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        n = numbers(run)
        wall = None if n["wall"] is None else n["wall"] / 60
        lines.append(
            f"| {name} | {method(run['summary'])} | {run['steps']} | {n['score']:.3f} | {n['kl']:.1f} | "
            f"{show(n['step_s'], '.1f')} | {show(n['peak'], '.0f')} | {show(wall, '.1f')} |"
        )
    return lines


def ratios(runs: dict[str, dict]) -> list[str]:
    """Each run's step time and peak memory against the first run's (the benchmark of GRPO against PPO)."""
    (first, base), *others = [(name, numbers(run)) for name, run in runs.items()]
    lines = []
    for name, n in others:
        parts = [
            f"{what} {n[key] / base[key]:.2f}x"
            for what, key in (("step time", "step_s"), ("peak memory", "peak"))
            if n[key] is not None and base[key]
        ]
        lines.append(f"{name} against {first}: " + (", ".join(parts) or "nothing to compare"))
    return lines


def main(argv=None):
    args = parse_args(argv)
    if len(set(args.runs)) < len(args.runs):
        die("a run is named twice: give each folder once")
    # a run is its folder's name, or, where two folders share a name (out/a/ppo, out/b/ppo), its path as given
    names = [Path(folder).name for folder in args.runs]
    names = names if len(set(names)) == len(names) else list(args.runs)
    runs = {name: read_run(Path(folder)) for name, folder in zip(names, args.runs)}
    print("\n".join(table(runs) + [""] + ratios(runs)))
    if args.svg:
        limit = float("inf") if args.max_kl is None else args.max_kl
        curves = {name: [(kl, score) for kl, score in run["evals"] if kl <= limit] for name, run in runs.items()}
        title = args.title + ("" if args.max_kl is None else f" (KL <= {args.max_kl:g} drawn)")
        Path(args.svg).parent.mkdir(parents=True, exist_ok=True)
        plot_curves(Path(args.svg), curves, title, "KL to the reference (nats per answer)", "held-out score")
        print(f"figure: {args.svg}")


if __name__ == "__main__":
    main()
