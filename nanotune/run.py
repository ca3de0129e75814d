"""One training run's life, shared by every train_*.py, so that no recipe can lose a finished run.

A recipe reads top to bottom and keeps what is its own (data, loss, loop, evaluation, sampling); a Run owns
the rest:

    with Run(args, "sft") as run:          # device, DDP, seeds; the --out folder (protected, locked), metrics
        ...                                 # data and model
        first = run.track(model, optimizer, data_rng)   # with --resume: the checkpoint's weights, optimizer, RNG
        for step in range(first, args.steps + 1):
            ...                             # forward, backward, clip
            run.check(step, loss, grad_norm)   # NaN/inf or an exploding loss stops here, before the update
            optimizer.step()
            run.end_step(step, tokens, loss=..., lr=..., grad_norm=...)  # logs, checkpoints, honours Ctrl-C
        run.save_model(model)               # weights + summary.json first...
        with run.optional("sampling"):      # ...then what may fail without losing them
            ...

Folder contents: metrics.jsonl (one JSON object per logged step), summary.json (status and headline numbers,
rewritten as they become known), model.safetensors + config.json, checkpoints/step-NNNNNN/ (model, optimizer,
step, RNG states, arguments) and whatever the recipe adds (samples, responses, loss.svg). Every file is
written under a temporary name and renamed, so a crash leaves the old version or the new one, never half.

Exit codes: 0 finished; 2 bad input or divergence (one `error:` line); 130 interrupted (Ctrl-C/SIGTERM:
the current step finishes, a checkpoint is written, the --resume command is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import torch

from .utils import (
    ROOT,
    NanotuneError,
    all_reduce_mean,
    atomic_write,
    autocast,
    cleanup_distributed,
    default_dtype,
    die,
    pick_device,
    save_json,
    seed_everything,
    setup_distributed,
)

# what a run writes into --out; a folder holding any of these holds a run (--overwrite removes exactly these)
RUN_FILES = (
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    "config.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "lora",
    "loss.svg",
    "samples_before.txt",
    "samples_after.txt",
    "responses.jsonl",
    "kl_score.svg",
    "score.svg",
)
CHECKPOINTS = "checkpoints"
LOCK = "run.lock"
EXPLODE_FACTOR, EXPLODE_STEPS = 10.0, 3  # see Run.check


# ---------------------------------------------------------------- the flags every recipe shares


def add_common_args(parser, lr: float, steps: int, batch_size: int):
    """The flags every train_*.py shares (see the README's conventions)."""
    parser.add_argument(
        "--model",
        default="auto",
        help="auto (gpt2 if available, else the bundled weights/nano), a preset "
        "(gpt2, gpt2-medium, gpt2-large, gpt2-xl), a directory or a .safetensors file",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute precision; default float32 on CPU, bf16 autocast on CUDA",
    )
    parser.add_argument("--seed", type=int, default=1337, help="random seed for data order, init and sampling")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    parser.add_argument(
        "--lr-schedule",
        default="constant",
        choices=["constant", "cosine"],
        help="after warmup: constant, or cosine decay to 10%% of --lr at the last step",
    )
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warmup (default 0)")
    parser.add_argument(
        "--grad-clip",
        type=float,
        default=1.0,
        help="clip the global gradient norm to this (default 1.0, as nanoGPT and llm.c; 0: off)",
    )
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"sequences per optimizer step per process (default {batch_size})",
    )
    parser.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="split each batch into this many micro-batches (same maths, less memory)",
    )
    parser.add_argument("--log-every", type=int, default=10, help="print and record metrics every N steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPU)")
    parser.add_argument(
        "--activation-checkpointing",
        nargs="?",
        type=int,
        const=True,
        default=False,
        metavar="N",
        help="keep only each block's input and recompute the block in backward: much less "
        "activation memory for about one extra forward pass; with N, only the first N blocks "
        "(part of the saving for part of the cost)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default out/<script>-<timestamp>); "
        "refused if it already holds a run, unless --overwrite or --resume",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its last checkpoint, with its saved flags "
        "(flags given here override them, e.g. --steps to train longer)",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=100,
        help="write a checkpoint every N steps and at the end (default 100; 0: only on Ctrl-C)",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write the fine-tuned weights")
    from .peft import add_peft_args

    add_peft_args(parser)


def parse_run_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parser.parse_args, except that with --resume DIR the flags saved in DIR's checkpoint become the defaults,
    so `--resume DIR` alone continues the same run and any flag given beside it overrides."""
    args = parser.parse_args(argv)
    if args.resume:
        try:
            saved = read_checkpoint_state(Path(args.resume))["args"]
        except NanotuneError as e:
            die(str(e))
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "overwrite", "out")})
        args = parser.parse_args(argv)
        args.out = args.resume
    return args


def check_common_args(args):
    """Stop on a flag that cannot be right, before anything runs."""
    if not (math.isfinite(args.lr) and args.lr > 0):
        die(f"--lr must be a positive number, got {args.lr}")
    if args.steps < 0:
        die(f"--steps must be >= 0, got {args.steps}")
    if args.batch_size < 1 or args.grad_accum < 1 or args.batch_size % args.grad_accum:
        die(f"--batch-size ({args.batch_size}) must be a positive multiple of --grad-accum ({args.grad_accum})")
    for flag in ("log_every", "eval_every"):
        if getattr(args, flag, 1) < 1:
            die(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.save_every < 0:
        die("--warmup and --save-every must be >= 0")
    if not (math.isfinite(args.grad_clip) and args.grad_clip >= 0):
        die(f"--grad-clip must be >= 0 (0 turns clipping off), got {args.grad_clip}")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        die(f"--limit must be >= 1 (the first N records), got {args.limit}")
    if args.resume and args.overwrite:
        die("--resume continues the run in its folder and --overwrite replaces it: pick one")
    from .peft import check_peft_args

    try:
        check_peft_args(args)
    except NanotuneError as e:
        die(str(e))


# ---------------------------------------------------------------- checkpoints


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if p.is_dir())
    return steps[-1] if steps else None


def read_checkpoint_state(out: Path) -> dict:
    """state.json of the newest checkpoint in a run folder (step, script, args, summary, world size)."""
    if not out.is_dir():
        raise NanotuneError(f"--resume {out}: no such folder")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise NanotuneError(
            f"--resume {out}: it holds no checkpoint ({out / CHECKPOINTS} is empty or missing); "
            "the run ended before its first --save-every step and was killed, not interrupted"
        )
    return json.loads((ckpt / "state.json").read_text()) | {"path": str(ckpt)}


class Run:
    """See the module docstring. Attributes a recipe uses: device, rank, world, master (rank 0: logs, evaluates,
    saves), dtype, ctx (autocast), out, summary (dict written to summary.json), resumed, history."""

    def __init__(self, args, script: str):
        self.args, self.script = args, script
        self.summary: dict = {}
        self.history: list[dict] = []
        self.resumed = bool(args.resume)
        self.step = 0
        self.stop_signal = None  # set by the SIGINT/SIGTERM handler
        self._tracked = None  # (model, optimizer, data_rng) once training starts
        self._first_loss = None
        self._exploding = 0
        self._lock_file = None
        self._created_out = False
        self._log_file = None
        self._old_handlers = {}
        self._tokens, self._t_log = 0, time.time()
        self._elapsed_before = 0.0

    # ---- start: device, processes, folder, lock, log, signal handlers

    def __enter__(self):
        try:
            device = pick_device(self.args.device)
            self.rank, self.world, self.device = setup_distributed(device)
            self.master = self.rank == 0
            seed_everything(self.args.seed + self.rank)
            self.dtype = self.args.dtype or default_dtype(self.device)
            self.ctx = autocast(self.device, self.dtype)
            default = ROOT / "out" / f"{self.script}-{datetime.now():%Y%m%d-%H%M%S}"
            self.out = Path(self.args.out) if self.args.out else default
            if self.master:
                self._prepare_folder()
        except NanotuneError as e:
            self._release()
            die(str(e))
        self.start = time.time() - self._elapsed_before  # elapsed time counts on across a resume
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def _prepare_folder(self):
        out = self.out
        if out.exists() and not out.is_dir():
            raise NanotuneError(f"--out {out} is a file, not a folder")
        present = sorted(p.name for p in out.iterdir() if p.name in RUN_FILES + (CHECKPOINTS,)) if out.is_dir() else []
        if present and not (self.args.overwrite or self.resumed):
            raise NanotuneError(
                f"--out {out} already holds a run ({', '.join(present)}); pass --overwrite to "
                f"replace it or --resume {out} to continue it"
            )
        self._created_out = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(out / LOCK, "a+")
        except OSError as e:
            raise NanotuneError(f"--out {out} cannot be written: {e.strerror}") from None
        try:
            import fcntl

            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no fcntl (Windows): no lock
        except OSError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            self._lock_file = None
            raise NanotuneError(
                f"--out {out} is in use by another run ({holder}); wait for it to end or pick another --out"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()}, started {datetime.now():%Y-%m-%d %H:%M:%S}\n")
        self._lock_file.flush()
        if self.args.overwrite:
            for name in present:
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        if self.resumed:
            state = read_checkpoint_state(out)
            # steps logged after the checkpoint will run again: drop them so metrics.jsonl has each step once
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
            self.history = [m for m in map(json.loads, lines) if m.get("step", 0) <= state["step"]]
            atomic_write(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.history))
            self.summary = state["summary"]
            self._elapsed_before = state.get("elapsed_s", 0.0)
        for stale in out.glob(f"{CHECKPOINTS}/.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a checkpoint that a kill interrupted
        self._log_file = open(out / "metrics.jsonl", "a")
        self.summary.update(status="running", script=self.script, args=vars(self.args))

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:  # the second Ctrl-C: stop now, from wherever we are
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        if self.master:
            print(
                f"\n{self.stop_signal}: finishing step {self.step + 1}, then writing a checkpoint "
                "(press Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    def _write_summary(self):
        """summary.json: headline numbers first, the flags last."""
        save_json(
            self.out / "summary.json",
            {k: v for k, v in self.summary.items() if k != "args"} | {"args": self.summary.get("args")},
        )

    # ---- the end: whatever happened, the summary says so, the lock is released, nothing temporary stays

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            status = "finished"
        elif issubclass(exc_type, SystemExit):
            status = {130: "interrupted", 0: "finished"}.get(exc.code, self.summary.get("status", "failed"))
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "interrupted"
        else:
            status = "failed"
        if status == "failed" and self.summary.get("status") == "diverged":
            status = "diverged"
        started = self._tracked is not None or self.resumed
        if self.master and self._log_file is not None and not started:
            # stopped before training (bad input): leave no half-made run behind, so the retry is not refused
            self._log_file.close()
            self._log_file = None
            log = self.out / "metrics.jsonl"
            if log.is_file() and log.stat().st_size == 0:
                log.unlink()
        if self.master and self._log_file is not None:
            self.summary["status"] = status
            if exc is not None and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
                self.summary["error"] = str(exc)
            self.summary["elapsed_s"] = round(time.time() - self.start, 1)
            try:
                self._write_summary()
            except OSError as e:
                print(f"warning: could not write {self.out / 'summary.json'}: {e}", file=sys.stderr)
        self._release()
        cleanup_distributed()
        if isinstance(exc, NanotuneError):
            die(str(exc))
        if isinstance(exc, KeyboardInterrupt):
            raise SystemExit(130)
        return False

    def _release(self):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
            (self.out / LOCK).unlink(missing_ok=True)
            # a run that stopped before writing anything leaves no folder behind
            if self._created_out and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()

    # ---- checkpoints and resume

    def track(self, model, optimizer, data_rng: torch.Generator, extras: dict | None = None) -> int:
        """What a checkpoint holds: the model's weights, the optimizer state, the step, this rank's data RNG and
        the global torch RNG, and extras: {name: a module (or a dict) with more training state}, such as PPO's
        value model and KL coefficient. With --resume, load them from the last checkpoint. -> the first step."""
        self._tracked = (model, optimizer, data_rng, extras or {})
        self._t_log = time.time()
        if not self.resumed:
            return 1
        state = read_checkpoint_state(self.out)
        ckpt = Path(state["path"])
        if state["script"] != self.script:
            raise NanotuneError(f"--resume {self.out}: its checkpoint is from {state['script']}, not {self.script}")
        if state["world_size"] != self.world:
            raise NanotuneError(
                f"--resume {self.out}: the run used {state['world_size']} processes, this one "
                f"{self.world}; resume with the same torchrun --nproc_per_node"
            )
        from .peft import load_trained

        try:
            load_trained(model, ckpt)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise NanotuneError(
                f"--resume {self.out}: the checkpoint does not fit --model {self.args.model}: {e}"
            ) from None
        trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(trainer["optimizer"])
        for name, obj in self._tracked[3].items():
            saved = trainer["extras"][name]
            obj.load_state_dict(saved) if hasattr(obj, "load_state_dict") else obj.update(saved)
        data_rng.set_state(trainer["data_rng"][self.rank])
        torch.set_rng_state(trainer["torch_rng"])
        self.step = state["step"]
        # every rank (not only rank 0, which keeps the summary) restarts the explosion rule from the same loss
        self._first_loss = state["summary"].get("loss_first")
        if self.master:
            print(f"resumed {self.out} at step {self.step} from {ckpt}", flush=True)
        return self.step + 1

    def checkpoint(self, step: int):
        """checkpoints/step-NNNNNN/: model.safetensors + config.json (loadable; with --peft, only the adapter files),
        trainer.pt (optimizer, RNG states of every rank), state.json (step, flags, summary so far). Written into a
        temporary folder and renamed, so it is whole or absent; older checkpoints go once it is in place."""
        model, optimizer, data_rng, extras = self._tracked
        rng_states = [data_rng.get_state()]
        if self.world > 1:  # every rank draws its own data: keep all their positions
            rng_states = [None] * self.world
            torch.distributed.all_gather_object(rng_states, data_rng.get_state())
        if not self.master:
            return
        from .peft import save_trained

        root = self.out / CHECKPOINTS
        final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_trained(model, tmp, final=False)  # the full model, or only what PEFT trains
        extra_states = {
            name: obj.state_dict() if hasattr(obj, "state_dict") else dict(obj) for name, obj in extras.items()
        }
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "data_rng": rng_states,
                "torch_rng": torch.get_rng_state(),
                "extras": extra_states,
            },
            tmp / "trainer.pt",
        )
        state = {
            "step": step,
            "script": self.script,
            "world_size": self.world,
            "args": vars(self.args),
            "elapsed_s": round(time.time() - self.start, 2),
            "summary": self.summary,
        }
        save_json(tmp / "state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    # ---- each step

    def check(self, step: int, loss: float, grad_norm: float | None = None):
        """Stop before the optimizer step when training has diverged: a NaN/inf loss or gradient norm, or a loss
        above EXPLODE_FACTOR x max(first loss, 1) for EXPLODE_STEPS steps in a row. The bound: every recipe's
        loss is in nats, and a model that starts at L and sits above 10 L (10 nats when L < 1: a chosen answer
        e^-10 times less likely than the rejected one for DPO) is not learning but blowing up, as --lr 1e3 does
        (losses near 2e8). The last checkpoint stays as it was."""
        self.step = step
        if self._first_loss is None and math.isfinite(loss):
            self._first_loss = self.summary["loss_first"] = loss
        what = None
        if not math.isfinite(loss):
            what = f"the loss is {loss}"
        elif grad_norm is not None and not math.isfinite(grad_norm):
            what = f"the gradient norm is {grad_norm} (loss {loss:.4g})"
        elif loss > EXPLODE_FACTOR * max(self._first_loss, 1.0):
            self._exploding += 1
            if self._exploding >= EXPLODE_STEPS:
                what = (
                    f"the loss has exploded: {loss:.4g}, above {EXPLODE_FACTOR:g} x max(first loss "
                    f"{self._first_loss:.4g}, 1) for {EXPLODE_STEPS} steps in a row"
                )
        else:
            self._exploding = 0
        if what is None:
            return
        ckpt = latest_checkpoint(self.out) if self.master else None
        kept = (
            f"the last good checkpoint ({ckpt.name}) is kept in {ckpt.parent}"
            if ckpt
            else "no checkpoint was written yet"
        )
        self.summary["status"] = "diverged"
        raise NanotuneError(
            f"training diverged at step {step}: {what}. Try a lower --lr (now {self.args.lr:g}), "
            f"--warmup, --grad-clip 1.0 or --dtype float32; {kept}"
        )

    def log(self, **metrics):
        """Record one line in metrics.jsonl (rank 0) and print it as a progress line."""
        if not self.master:
            return
        metrics["elapsed_s"] = round(time.time() - self.start, 2)
        self.history.append(metrics)
        self._log_file.write(json.dumps(metrics) + "\n")
        self._log_file.flush()
        parts = []
        for k, v in metrics.items():
            if isinstance(v, float):
                v = f"{v:.3e}" if k == "lr" else (f"{v:.0f}" if k.endswith("_per_s") else f"{v:.4f}")
            parts.append(f"{k} {v}")
        print(" | ".join(parts), flush=True)

    def end_step(self, step: int, tokens: int, **metrics):
        """After the optimizer step: count throughput (tokens over all processes), log the step's metrics every
        --log-every steps (and the first and last), write a checkpoint every --save-every steps (and at the last),
        and on Ctrl-C/SIGTERM write one and exit 130 with the command that resumes."""
        args = self.args
        self._tokens += tokens
        if step % args.log_every == 0 or step in (1, args.steps):
            tokens_per_s = self._tokens / max(time.time() - self._t_log, 1e-9)
            self.log(step=step, **metrics, tokens_per_s=tokens_per_s)
            self._tokens, self._t_log = 0, time.time()
        stop = self.stop_signal is not None
        if self.world > 1:  # every rank must stop at the same step
            stop = all_reduce_mean(float(stop), self.device) > 0
        due = args.save_every and (step % args.save_every == 0 or step == args.steps)
        if due or stop:
            self.checkpoint(step)
        if stop:
            self.summary["status"] = "interrupted"
            if self.master:
                self._write_summary()
                print(
                    f"interrupted at step {step} of {args.steps}; checkpoint in {latest_checkpoint(self.out)}.\n"
                    f"Resume with: python train_{self.script}.py --resume {self.out}"
                    + (" (under the same torchrun command)" if self.world > 1 else ""),
                    file=sys.stderr,
                    flush=True,
                )
            raise SystemExit(130)

    def curve(self, key: str) -> list[tuple[float, float]]:
        """[(step, value)] of every logged entry that has key, for plot_curves."""
        return [(m["step"], m[key]) for m in self.history if key in m and m[key] is not None]

    # ---- after training: save first, then the optional extras

    def save_model(self, model):
        """The trained weights (unless --no-save) and summary.json as known so far, before anything optional runs:
        model.safetensors + config.json in the official layout, and with --peft the adapter files (peft.py)."""
        from .peft import save_trained

        if not self.master:
            return
        if not self.args.no_save:
            save_trained(model, self.out)
        self.summary["status"] = "saved"
        self._write_summary()

    @contextlib.contextmanager
    def optional(self, what: str):
        """A context for work after the weights are saved: a failure is reported as a warning (and recorded in
        summary.json under "warnings"), the run goes on, the weights stay."""
        try:
            yield
        except Exception as exc:
            message = f"{what} failed: {type(exc).__name__}: {exc}"
            print(f"warning: {message} (the trained weights are saved in {self.out})", file=sys.stderr, flush=True)
            self.summary.setdefault("warnings", []).append(message)

    def write_text(self, name: str, text: str):
        """A text output of the run (samples, answers), written atomically by rank 0."""
        if self.master:
            atomic_write(self.out / name, text)
