"""Which method buys the most reward for the least drift: the DPO paper's reward-vs-KL frontier (Rafailov et al.
2023, section 6.1, Figure 2), on nano, with VADER's sentiment as the ground-truth reward.

The task: continue a 64-token window of a novel with positive sentiment. From the start model (nano) and the
books, one run of this script
  1. samples --k answers to --pair-prompts training windows and labels every pair with the true reward
     (python -m nanotune.pairs),
  2. trains each method from the start model, at several strengths:
       DPO          train_dpo.py on those pairs, each --loss (sigmoid, ipo, hinge, robust, simpo), several --beta
       PPO-RM       a reward model trained on the same pairs (train_reward.py), then PPO against it
       PPO-GT       PPO with the true reward (train_ppo.py --reward sentiment), several --kl-coef
       GRPO-GT      GRPO with the true reward (train_grpo.py --reward sentiment), several --beta
       best-of-N    no training: the best of N answers of the start model, N = 1 ... 64
  3. measures every model the same way: --eval-prompts held-out windows of Gulliver's Travels, --eval-samples
     answers each; the mean VADER score of the answers, and the KL to the start model per answer (the sum of
     log pi - log ref over its tokens, averaged over the same answers); best-of-N's KL is its closed form,
  4. writes frontier.json (a list of {method, setting, kl, score, steps, seconds}), frontier.svg (score against
     KL, one series per method) and frontier.md (the table).

    python experiments/sentiment_frontier.py --out out/frontier                    # the full sweep
    python experiments/sentiment_frontier.py --quick --out out/frontier-quick      # a reduced sweep, <= 15 min

Every step is an ordinary command, printed before it runs; a step whose output is already finished is not run
again, so a sweep that stopped continues where it was (`--out` the same folder). Offline: --books and
--heldout-book (default: download, as the recipes do).
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the nanotune package beside this folder

from nanotune import load_tokenizer  # noqa: E402
from nanotune.flags import Parser, integer, real  # noqa: E402
from nanotune.model.loader import load_model  # noqa: E402
from nanotune.plot import plot_curves  # noqa: E402
from nanotune.rewards import BookPrompts, PromptSpec, make_reward  # noqa: E402
from nanotune.rollout import answer_logprobs, sample_rollout  # noqa: E402
from nanotune.utils import atomic_write, die, pick_device  # noqa: E402

PROMPT_LEN, ANSWER_LEN = 64, 24  # the task: 64-token windows of a book, continued by 24 tokens
OFF = contextlib.nullcontext()  # measured without autocast: float32 on every device


# The KL of best-of-N to its base policy, per answer: KL(best-of-N || pi) = log N - (N - 1) / N (Stiennon et al.
# 2020). Exact for a continuous score; with ties or few distinct answers it is an upper bound (Beirami et al. 2024).
def best_of_n_kl(n: int) -> float:
    return math.log(n) - (n - 1) / n


# The exact KL of best-of-N for a categorical base distribution over outcomes ranked by score (no ties), for the
# test of the formula above: the best of N draws is outcome i with probability F(i)^N - F(i-1)^N, F the CDF in
# score order. probs (K,) in increasing score order -> KL in nats
def best_of_n_kl_exact(probs: torch.Tensor, n: int) -> float:
    probs = probs.double()
    cdf = probs.cumsum(0)
    best = cdf**n - torch.cat([cdf.new_zeros(1), cdf[:-1]]) ** n  # (K,)
    keep = best > 0
    return float((best[keep] * (best[keep] / probs[keep]).log()).sum())


# The methods and their strengths: (method, setting, extra flags). The full sweep spans weak to strong
# regularisation; --quick keeps one or two settings of each.
def sweep(quick: bool) -> list[tuple[str, str, list[str]]]:
    dpo_betas = [0.1, 1.0] if quick else [0.1, 0.5, 2.0]
    runs = [("DPO", f"beta {b}", ["--loss", "sigmoid", "--beta", str(b)]) for b in dpo_betas]
    others = {"ipo": [0.5] if quick else [0.05, 0.5], "hinge": [1.0] if quick else [0.1, 1.0]}
    others |= {"robust": [0.1], "simpo": [2.0] if quick else [1.0, 2.0]}
    for loss, betas in others.items():
        smoothing = ["--label-smoothing", "0.1"] if loss == "robust" else []
        runs += [(f"DPO-{loss}", f"beta {b}", ["--loss", loss, "--beta", str(b)] + smoothing) for b in betas]
    kl_coefs = [0.05] if quick else [0.02, 0.1]
    runs += [("PPO-RM", f"kl-coef {c}", ["--kl-coef", str(c)]) for c in kl_coefs]
    runs += [("PPO-GT", f"kl-coef {c}", ["--kl-coef", str(c)]) for c in kl_coefs]
    runs += [("GRPO-GT", f"beta {b}", ["--beta", str(b)]) for b in ([0.05] if quick else [0.0, 0.05])]
    return runs


def parse_args(argv=None):
    p = Parser(__doc__, prog="python experiments/sentiment_frontier.py")
    add = p.add_argument
    add("--out", default="out/frontier", help="folder of the pairs, the runs and the results (default out/frontier)")
    add("--model", default="weights/nano", help="the start model and KL reference (default weights/nano)")
    add("--books", nargs="+", metavar="FILE", help="training books (default: download five, as train_ppo.py)")
    add("--heldout-book", metavar="FILE", help="the book of the held-out prompts (default: Gulliver's Travels)")
    add("--quick", action="store_true", help="a reduced sweep: fewer settings and steps (<= 15 min on 2 CPU cores)")
    add("--steps", type=integer(1), help="training steps of DPO and the reward model (default 100, --quick 30)")
    add("--rl-steps", type=integer(1), help="steps of PPO and GRPO (default 20, --quick 6)")
    add("--k", type=integer(2), default=4, help="answers sampled per pair prompt (default 4)")
    add("--pair-prompts", type=integer(1), help="training windows the pairs are sampled on (default 512, --quick 128)")
    add("--rollout", type=integer(2), help="answers per PPO/GRPO step (default 64, --quick 32)")
    add("--eval-prompts", type=integer(1), default=64, help="held-out windows every model is measured on (64)")
    add("--eval-samples", type=integer(1), default=4, help="answers per held-out window (default 4)")
    add("--max-n", type=integer(1), help="best-of-N up to this N, in powers of two (default 64, --quick 32)")
    add("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda")
    add("--seed", type=integer(0), default=1337, help="random seed (default 1337)")
    add("--max-kl", type=real(0, low_open=True), help="frontier.svg: draw only the points at KL <= this")
    add("--replot", action="store_true", help="only redraw frontier.md and frontier.svg from --out's frontier.json")
    args = p.parse_args(argv)
    defaults = {"steps": (100, 30), "rl_steps": (20, 6), "pair_prompts": (512, 128), "rollout": (64, 32)}
    defaults |= {"max_n": (64, 32)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.rollout % 16:  # PPO's and GRPO's minibatch is 16 answers, GRPO's groups 8
        die(f"--rollout {args.rollout}: must be a multiple of 16")
    return args


def book_flags(args) -> list[str]:
    return (["--books", *args.books] if args.books else []) + (
        ["--heldout-book", args.heldout_book] if args.heldout_book else []
    )


def run_step(argv: list[str], folder: Path, log: Path, again: bool = False) -> bool:
    """Run one command (a recipe or a nanotune tool), its output into log, unless its folder holds a finished run
    of the same command (command.txt) and nothing it reads was made again (again). -> True if it ran now; a
    failed command stops the sweep with its last line (a run that diverged is recorded as such, see main)."""
    command = [sys.executable, *argv, "--out", str(folder), "--overwrite"]
    shown = shlex.join(["python", *command[1:]])
    summary, record = folder / "summary.json", folder / "command.txt"
    done = summary.is_file() and json.loads(summary.read_text()).get("status") == "finished"
    if done and not again and record.is_file() and record.read_text() == shown:
        print(f"(done already) {folder}", flush=True)
        return False
    print("$ " + shown, flush=True)
    with open(log, "w") as f:
        child = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            code = child.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the child too: it saves a checkpoint and stops; wait for that
            child.wait()  # (subprocess.run would kill it 0.25 s in, mid-write)
            raise StepInterrupted(f"{shown} was interrupted; its folder keeps what it saved ({log})") from None
    if code:
        lines = log.read_text().strip().splitlines() or ["(no output)"]
        raise StepFailed(f"{shown} exited {code} ({log}): {lines[-1]}")
    atomic_write(record, shown)
    return True


class StepFailed(Exception):
    pass


class StepInterrupted(Exception):
    pass


def train_commands(args, out: Path) -> list[tuple[str, str, Path, list[str]]]:
    """(method, setting, output folder, command) of every trained model, the reward model's first. Every model
    starts from --model; every command names its device, prompt and answer lengths, so that training and the
    measurement below see the same task."""
    pairs, books, rm = out / "pairs", book_flags(args), out / "runs" / "reward-model"
    common = ["--model", args.model, "--seed", str(args.seed), "--log-every", "10", "--device", args.device]
    task = ["--prompt-len", str(PROMPT_LEN), "--max-new-tokens", str(ANSWER_LEN)]
    dpo = ["train_dpo.py", *common, "--data", str(pairs / "pairs.jsonl"), "--template", "raw"]
    dpo += ["--steps", str(args.steps), "--lr", "1e-4", "--batch-size", "16", "--eval-every", str(args.steps)]
    dpo += ["--responses", "0"]
    # the reward model reads the rankings, whose answers to one prompt stay in one split (train_reward.py)
    reward_model = ["train_reward.py", *common, "--data", str(pairs / "responses.jsonl"), "--template", "raw"]
    reward_model += ["--steps", str(args.steps), "--lr", "1e-4", "--batch-size", "16"]
    rl = [*common, *books, *task, "--steps", str(args.rl_steps), "--eval-every", str(args.rl_steps)]
    rl += ["--lr", "1e-4", "--batch-size", "16", "--samples", "0"]
    ppo = ["train_ppo.py", *rl, "--rollout-batch", str(args.rollout), "--ppo-epochs", "2"]
    grpo = ["train_grpo.py", *rl, "--prompts-per-step", str(args.rollout // 8), "--group-size", "8"]
    commands = [("reward model", "", rm, reward_model)]
    for method, setting, flags in sweep(args.quick):
        folder = out / "runs" / f"{method}-{setting}".lower().replace(" ", "-")
        if method.startswith("DPO"):  # DPO and its family: the pairs, no reward, no sampling
            command = dpo
        elif method == "PPO-RM":  # the reward model, trained on book continuations, scores book windows
            command = ppo + ["--reward", f"model:{rm}", "--prompt-source", "books"]
        else:  # PPO-GT, GRPO-GT: the true reward
            command = (ppo if method == "PPO-GT" else grpo) + ["--reward", "sentiment"]
        commands.append((method, setting, folder, command + flags))
    return commands


class Measure:
    """Every model measured the same way: the same held-out windows, the same number of answers each, sampled at
    temperature 1 with the same seed; the true reward of each answer and its KL to the start model."""

    def __init__(self, args, device):
        self.enc, self.device, self.seed = load_tokenizer(), device, args.seed
        self.reference, _ = load_model(args.model, device, quiet=True)
        self.reference.eval()
        spec = PromptSpec(max_new_tokens=ANSWER_LEN, eval_prompts=args.eval_prompts, prompt_len=PROMPT_LEN)
        spec.books, spec.heldout_book = args.books, args.heldout_book
        self.windows = BookPrompts(spec, self.enc, self.reference.config.n_positions).heldout
        self.samples = args.eval_samples
        self.reward = make_reward("sentiment", self.enc, device, OFF)

    @torch.no_grad()
    def answers(self, policy, prompts, with_kl: bool = True, chunk: int = 64):
        """The policy's answers to prompts, chunk at a time (the logits of 64 answers are 64 x 24 x 50257 floats,
        300 MB), drawn from one seeded generator. -> scores (B,) and, with_kl, the KL to the start model (B,)"""
        generator = torch.Generator(self.device).manual_seed(self.seed)
        scores, kls = [], []
        for i in range(0, len(prompts), chunk):
            batch = prompts[i : i + chunk]
            rollout = sample_rollout(policy, batch, ANSWER_LEN, self.enc.eot_token, OFF, generator)
            scores.append(self.reward(batch, rollout.answers))
            if with_kl:
                inputs = (rollout.input_ids, rollout.attention_mask, rollout.P, OFF)
                log_ratio = answer_logprobs(policy, *inputs)[0] - answer_logprobs(self.reference, *inputs)[0]
                kls.append((log_ratio * rollout.mask).sum(-1).cpu())  # (chunk,) sum over the answer's tokens
        return torch.cat(scores), (torch.cat(kls) if with_kl else None)

    def model(self, folder: Path) -> dict:
        policy, _ = load_model(str(folder), self.device, quiet=True)
        policy.eval()
        scores, kl = self.answers(policy, [w for w in self.windows for _ in range(self.samples)])
        return {"kl": kl.mean().item(), "score": scores.mean().item()}

    def best_of_n(self, max_n: int) -> list[dict]:
        """The start model's best of N answers, N = 1, 2, 4 ... max_n, from max_n answers per window sampled once
        (only scored: its KL is best_of_n_kl)."""
        scores = self.answers(self.reference, [w for w in self.windows for _ in range(max_n)], with_kl=False)[0]
        scores = scores.view(-1, max_n).double().sort(-1).values  # (windows, max_n), ascending
        points, n = [], 1
        while n <= max_n:
            score = (scores @ best_of_n_weights(max_n, n)).mean().item()
            points.append({"setting": f"N {n}", "kl": best_of_n_kl(n), "score": score})
            n *= 2
        return points


# The expected best of N draws, estimated from M >= N draws of which it uses all: of the C(M, N) subsets of N, the
# i-th smallest of the M (i = 1..M) is the best of C(i - 1, N - 1) of them. -> weights (M,) for the sorted scores
def best_of_n_weights(m: int, n: int) -> torch.Tensor:
    return torch.tensor([math.comb(i - 1, n - 1) / math.comb(m, n) for i in range(1, m + 1)], dtype=torch.float64)


def report(out: Path, points: list[dict], max_kl: float | None):
    """frontier.json, frontier.md (the table) and frontier.svg (score against KL, one series per method)."""
    atomic_write(out / "frontier.json", json.dumps(points, indent=1) + "\n")
    lines = ["| method | setting | KL to the start model (nats per answer) | held-out score | steps | seconds |"]
    lines.append("|---|---|---|---|---|---|")
    for p in points:
        if "failed" in p:
            lines.append(f"| {p['method']} | {p['setting']} | failed: {p['failed']} | | | |")
            continue
        seconds = "" if p["seconds"] is None else f"{p['seconds']:.0f}"
        numbers = f"{p['kl']:.2f} | {p['score']:.3f} | {p['steps']} | {seconds}"
        lines.append(f"| {p['method']} | {p['setting']} | {numbers} |")
    atomic_write(out / "frontier.md", "\n".join(lines) + "\n")
    series: dict[str, list] = {}
    for p in sorted((p for p in points if "kl" in p), key=lambda p: p["kl"]):
        if max_kl is None or p["kl"] <= max_kl:
            series.setdefault(p["method"], []).append((p["kl"], p["score"]))
    title = "held-out VADER score against KL to the start model (nats per answer)"
    title += "" if max_kl is None else f", KL <= {max_kl:g}"
    plot_curves(out / "frontier.svg", series, title, "KL to the start model (nats per answer)", "score")


def main(argv=None):
    args = parse_args(argv)
    out, started = Path(args.out), time.time()
    if args.replot:  # (a figure drawn again, say with --max-kl, without running the sweep again)
        try:
            points = json.loads((out / "frontier.json").read_text())
        except (OSError, ValueError) as e:
            die(f"--replot: cannot read {out / 'frontier.json'}: {e}")
        report(out, points, args.max_kl)
        print(f"{len(points)} points redrawn: {out}/frontier.md and frontier.svg", flush=True)
        return
    (out / "logs").mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)

    # ---- 1. preference pairs from the start model, labelled by the true reward
    pairs = ["-m", "nanotune.pairs", "--model", args.model, "--reward", "sentiment", "--k", str(args.k)]
    pairs += ["--prompts", str(args.pair_prompts), "--seed", str(args.seed), "--device", args.device]
    pairs += ["--prompt-len", str(PROMPT_LEN), "--max-new-tokens", str(ANSWER_LEN), *book_flags(args)]
    try:
        new_pairs = run_step(pairs, out / "pairs", out / "logs" / "pairs.log")
    except StepFailed as e:
        die(str(e))

    # ---- 2. every method at every strength, each run an ordinary command; what reads new data runs again, and a
    # run that fails (diverged, say) is a missing point, not the end of the sweep
    commands, failed, new_rm = train_commands(args, out), {}, False  # failed: {folder: why}
    reward_model = commands[0][2]
    for method, _, folder, command in commands:
        if method == "PPO-RM" and reward_model in failed:
            failed[folder] = "the reward model failed"
            continue
        reads_new = new_pairs if method.startswith("DPO") or folder == reward_model else new_rm
        try:
            ran = run_step(command, folder, out / "logs" / f"{folder.name}.log", again=reads_new)
        except StepFailed as e:
            print(f"warning: {e}", file=sys.stderr, flush=True)
            failed[folder] = str(e).rsplit(": ", 1)[-1]
            continue
        new_rm = new_rm or (ran and folder == reward_model)

    # ---- 3. every model measured the same way
    measure, points = Measure(args, device), []
    for method, setting, folder, _ in commands[1:]:  # (the reward model is not a policy)
        if folder in failed:
            points.append({"method": method, "setting": setting, "failed": failed[folder]})
            continue
        summary = json.loads((folder / "summary.json").read_text())
        point = {"method": method, "setting": setting, **measure.model(folder)}
        points.append(point | {"steps": summary.get("steps"), "seconds": summary.get("elapsed_s")})
        print(f"{method} {setting}: KL {point['kl']:.2f}, score {point['score']:.3f}", flush=True)
    for point in measure.best_of_n(args.max_n):  # (N = 1 is the start model itself: KL 0)
        points.append({"method": "best-of-N", **point, "steps": 0, "seconds": None})

    # ---- 4. the results
    report(out, points, args.max_kl)
    minutes = (time.time() - started) / 60
    print(f"{len(points)} points in {minutes:.1f} min: {out}/frontier.md and frontier.svg", flush=True)


def interruptible(main):
    """A Ctrl-C ends the sweep with one line and exit 130, after the running step has stopped as it stops."""
    try:
        main()
    except (KeyboardInterrupt, StepInterrupted) as e:
        what = str(e) or "the sweep was interrupted"
        print(f"interrupted: {what}; the same command again skips the finished steps", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    interruptible(main)
