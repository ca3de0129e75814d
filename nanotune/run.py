"""One training run's life, shared by every train_*.py, so that no recipe can lose a finished run.

A recipe keeps what is its own (flags, data, loss, loop, evaluation, samples, the names of its outputs); a Run
holds the rest, and the recipe's loop shows where each part acts:

    with Run(args, __file__, outputs=("responses.jsonl", "loss.svg"), show=("loss", "val_loss")) as run:
        ...                                       # data and model; run.device, run.ctx (autocast), run.master
        first = run.track(model, optimizer, data_rng)   # with --resume: the checkpoint's weights, optimizer, RNG
        for step in range(first, args.steps + 1):
            ...                                   # forward, backward, clip
            run.check(step, loss, grad_norm)      # NaN/inf or an exploding loss stops here, before the update
            optimizer.step()
            run.log_step(step, tokens, loss=...)  # metrics.jsonl and the progress line, every --log-every steps
            run.checkpoint_if_due(step)           # every --save-every steps, at the end, and on Ctrl-C (exit 130)
        run.save_model(model)                     # weights + summary.json first...
        with run.optional("sampling"):            # ...then what may fail without losing them
            ...

The parts: the --out folder and its lock (outdir.py), checkpoints and what a model saves (checkpoint.py), the
metrics log and progress output (metrics.py). Exit codes: 0 finished; 2 bad input or divergence (one `error:`
line); 130 interrupted (Ctrl-C/SIGTERM: the current step finishes, a checkpoint is written, the --resume command
is printed).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import CHECKPOINTS, MODEL_FILES, SAVE_ERRORS
from .divergence import DivergenceRule
from .metrics import MetricsLog, Progress, clock, fmt, progress_line
from .outdir import OutputFolder
from .tracking import TRACKER_FILES, open_tracker
from .utils import (
    ROOT,
    DivergedError,
    NanotuneError,
    atomic_write,
    autocast,
    cleanup_distributed,
    configure_device,
    default_dtype,
    device_rng_state,
    die,
    peak_memory_mib,
    pick_device,
    save_json,
    seed_everything,
    setup_distributed,
)


class Run:
    """See the module docstring. script: the recipe's __file__; outputs: the files the recipe writes into --out
    besides the run's own (metrics, summary, model, checkpoints); show: the metrics its progress line prints.
    Attributes a recipe uses: device, rank, world, master (rank 0: logs, evaluates, saves), dtype, ctx
    (autocast), out, summary (written to summary.json), resumed, history."""

    def __init__(self, args, script: str, outputs: tuple[str, ...] = (), show: tuple[str, ...] = ("loss",)):
        self.args, self.script, self.show = args, Path(script), show
        self.summary, self.resumed, self.step = {}, bool(args.resume), 0
        self.stop_signal = None  # set by the SIGINT/SIGTERM handler
        self._tracked = None  # (model, optimizer, data_rng, extras) once training starts
        self._divergence = DivergenceRule()
        self._stop = False  # Ctrl-C seen by some process (under torchrun: agreed in check)
        self._restored = False  # with --resume: the checkpoint has loaded
        self._folder = self._log = self._bar = None
        self._old_handlers = {}
        self._tokens, self._t_log, self._elapsed_before = 0, time.time(), 0.0
        self._run_files = ("metrics.jsonl", "summary.json", CHECKPOINTS) + MODEL_FILES + TRACKER_FILES + tuple(outputs)

    # ---- start: device, processes, folder, lock, log, signal handlers

    def __enter__(self):
        try:
            self.rank, self.world, self.device = setup_distributed(pick_device(self.args.device))
            self.master = self.rank == 0
            seed_everything(self.args.seed + self.rank)
            configure_device(self.device)
            self.dtype = self.args.dtype or default_dtype(self.device)
            self.ctx = autocast(self.device, self.dtype)
            # how an RL recipe samples: --compile compiles the decode step; bf16 runs use a bf16 head and cache
            self.sampling = {
                "compile": self.args.compile,
                "dtype": torch.bfloat16 if self.dtype == "bfloat16" else None,
            }
            default = ROOT / "out" / f"{self.script.stem}-{datetime.now():%Y%m%d-%H%M%S}"
            self.out = Path(self.args.out) if self.args.out else default
            if self.master:
                self._open_folder()
        except NanotuneError as e:
            self._release()
            die(str(e))
        self.start = time.time() - self._elapsed_before  # elapsed time counts on across a resume
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def _open_folder(self):
        self._folder = OutputFolder(self.out, self._run_files)
        self._folder.claim(self.args.overwrite, self.resumed)
        history = []
        if self.resumed:  # (nothing in the folder changes until the checkpoint has loaded: see _restore)
            state = checkpoint.read_checkpoint_state(self.out)
            log = self.out / "metrics.jsonl"
            lines = log.read_text().splitlines() if log.is_file() else []
            # steps logged after the checkpoint will run again: metrics.jsonl is to hold each step once
            history = [m for m in map(json.loads, lines) if m.get("step", 0) <= state["step"]]
            self.summary = state["summary"]
            self._elapsed_before = state.get("elapsed_s", 0.0)
        else:
            checkpoint.remove_partial_checkpoints(self.out)
        tracker = open_tracker(self.args.tracker, self.out, self.out.name, vars(self.args))  # no package: stops here
        self._log = MetricsLog(self.out / "metrics.jsonl", history, tracker)  # mirrored to --tracker
        self.summary.update(status="running", script=self.script.name, args=vars(self.args))

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:  # the second Ctrl-C: stop now, from wherever we are
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        if self.master:
            message = "finishing the current step, then writing a checkpoint (press Ctrl-C again to stop at once)"
            print(f"\n{self.stop_signal}: {message}", file=sys.stderr, flush=True)

    def _write_summary(self):
        """summary.json: headline numbers first, the flags last."""
        summary = {k: v for k, v in self.summary.items() if k != "args"} | {"args": self.summary.get("args")}
        save_json(self.out / "summary.json", summary)

    # ---- the end: whatever happened, the summary says so, the lock is released, nothing temporary stays

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            status = "finished"
        elif issubclass(exc_type, SystemExit):
            status = {130: "interrupted", 0: "finished"}.get(exc.code, self.summary.get("status", "failed"))
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "interrupted"
        elif issubclass(exc_type, DivergedError):
            status = "diverged"
        else:
            status = "failed"
        if self._bar is not None:
            self._bar.close()
        if self.resumed and not self._restored and self._log is not None:  # a refused or failed resume: the
            self._log.close()  # run it names stays as it was, its summary.json included
            self._log = None
        started = self._tracked is not None or self.resumed
        if self._log is not None and not started:
            # stopped before training (bad input): leave no half-made run behind, so the retry is not refused
            self._log.close()
            self._log = None
            log = self.out / "metrics.jsonl"
            if log.is_file() and log.stat().st_size == 0:
                log.unlink()
        if self._log is not None:
            self.summary["status"] = status
            if exc is not None and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
                self.summary["error"] = str(exc)
            self.summary["elapsed_s"] = round(time.time() - self.start, 1)
            self.summary["peak_memory_mib"] = peak_memory_mib(self.device)  # (CPU: resident set; CUDA: tensors)
            try:
                self._write_summary()
            except OSError as e:
                print(f"warning: could not write {self.out / 'summary.json'}: {e}", file=sys.stderr)
        self._release(status)
        cleanup_distributed()
        if isinstance(exc, NanotuneError):
            die(str(exc))
        if isinstance(exc, KeyboardInterrupt):
            raise SystemExit(130)
        return False

    def _release(self, status: str = "failed"):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        if self._log is not None:
            self._log.close(status)  # (the status a tracker marks its run with)
            self._log = None
        if self._folder is not None:
            self._folder.release()

    # ---- training starts: what a checkpoint holds, and with --resume, where the run continues

    def track(self, model, optimizer, data_rng: torch.Generator, extras: dict | None = None) -> int:
        """What a checkpoint holds: the model's weights, the optimizer state, the step, this rank's data RNG and
        the global torch RNG, and extras: {name: a module (or a dict) with more training state}, such as PPO's
        value model and KL coefficient. With --resume, load them from the last checkpoint. -> the first step."""
        self._tracked = (model, optimizer, data_rng, extras or {})
        if self.resumed:
            self._restore()
        self._t_log = time.time()
        self._bar = Progress(self.args.steps - self.step, "step", enabled=self.master)
        return self.step + 1

    def _restore(self):
        model, optimizer, data_rng, extras = self._tracked
        state = checkpoint.read_checkpoint_state(self.out)
        ckpt = Path(state["path"])
        if state["script"] != self.script.name:
            raise NanotuneError(f"--resume {self.out}: it is a {state['script']} run, not {self.script.name}")
        if state["world_size"] != self.world:
            raise NanotuneError(
                f"--resume {self.out}: the run used {state['world_size']} processes, this one "
                f"{self.world}; resume with the same torchrun --nproc_per_node"
            )
        try:
            checkpoint.restore_training(ckpt, model, optimizer, data_rng, extras, self.rank, self.device)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise NanotuneError(
                f"--resume {self.out}: its checkpoint cannot be restored onto --model {self.args.model}: {e}"
            ) from None
        self.step = state["step"]
        # every rank (not only rank 0, which keeps the summary) restarts the explosion rule from the same loss
        self._divergence = DivergenceRule(state["summary"].get("loss_first"))
        self._restored = True  # from here on the folder is this run's again
        if self.master:
            self._log.rewrite()  # without the steps after the checkpoint
            checkpoint.remove_partial_checkpoints(self.out)
            print(f"resumed {self.out} at step {self.step} from {ckpt}", flush=True)

    # ---- each step

    def check(self, step: int, loss, grad_norm=None):
        """Stop before the optimizer step when training has diverged (nanotune/divergence.py: NaN/inf, or a loss
        that exploded); the last checkpoint stays as it was. loss and grad_norm may be tensors on the device: they
        are read back here, together, the step's one wait for the device, and averaged over the processes with
        the Ctrl-C flag, so that every rank decides alike."""
        self.step = step
        stop = self.stop_signal is not None
        loss, norm, stop = self.read_back([loss, 0.0 if grad_norm is None else grad_norm, stop])
        self._stop = stop > 0
        what = self._divergence.what_went_wrong(loss, None if grad_norm is None else norm)
        self.summary["loss_first"] = self._divergence.first_loss
        if what is None:
            return
        ckpt = checkpoint.latest_checkpoint(self.out) if self.master else None
        kept = f"the last good checkpoint ({ckpt.name}) is kept in {ckpt.parent}" if ckpt else "no checkpoint yet"
        raise DivergedError(
            f"training diverged at step {step}: {what}. Try a lower --lr (now {self.args.lr:g}), "
            f"--warmup, --grad-clip 1.0 or --dtype float32; {kept}"
        )

    def read_back(self, values: list, average: bool = True) -> list[float]:
        """Numbers and one-element tensors as floats, averaged over the processes (every rank must call it then):
        one collective and one wait for the device for all of them."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        t = torch.stack([torch.as_tensor(v, dtype=dtype).detach().to(self.device).reshape(()) for v in values])
        if average and self.world > 1:
            torch.distributed.all_reduce(t)
            t /= self.world
        return t.tolist()

    def log(self, step: int, **metrics):
        """One line in metrics.jsonl (rank 0), and the progress line with the recipe's `show` metrics. Values
        may be tensors (read back here)."""
        if not self.master:
            return
        metrics = dict(zip(metrics, self.read_back(list(metrics.values()), average=False))) if metrics else {}
        metrics = {"step": step, **metrics, "elapsed_s": round(time.time() - self.start, 2)}
        self._log.write(metrics)
        line = progress_line(metrics, self.show, self.args.steps)
        if "tokens_per_s" in metrics:  # a training step: throughput, time so far and to go
            eta = self._bar.eta() if self._bar is not None else None
            line += f" | {fmt(metrics['tokens_per_s'])} tok/s | {clock(metrics['elapsed_s'])}"
            line += f", eta {clock(eta)}" if eta is not None else ""
        if self._bar is not None:
            self._bar.write(line)  # above the bar of the steps
        else:
            print(line, flush=True)

    def log_step(self, step: int, tokens, **metrics):
        """After the optimizer step: count throughput (this process's tokens); every --log-every steps (and at
        the first and last) record the step's metrics, averaged over the processes, and print its progress line.
        Values may be tensors on the device: they are read back only then."""
        self._tokens = self._tokens + tokens
        metrics = {k: v for k, v in metrics.items() if v is not None}  # (a statistic this step has not)
        if self._bar is not None:
            self._bar.update()  # one more step done
        if step % self.args.log_every == 0 or step in (1, self.args.steps):
            numbers = self.read_back([self._tokens, *metrics.values()])
            tokens_per_s = numbers[0] * self.world / max(time.time() - self._t_log, 1e-9)
            self.log(step, **dict(zip(metrics, numbers[1:])), tokens_per_s=tokens_per_s)
            self._tokens, self._t_log = 0, time.time()

    def checkpoint_if_due(self, step: int):
        """A checkpoint every --save-every steps and at the last step; on Ctrl-C/SIGTERM one now, then exit 130
        with the command that resumes."""
        args = self.args
        # under torchrun every rank must stop at the same step: the flag they agreed on in check()
        stop = self._stop if self.world > 1 else self.stop_signal is not None
        if (args.save_every and (step % args.save_every == 0 or step == args.steps)) or stop:
            self._checkpoint(step)
        if stop:
            self.summary["status"] = "interrupted"
            if self.master:
                self._write_summary()
                torchrun = " (under the same torchrun command)" if self.world > 1 else ""
                where = checkpoint.latest_checkpoint(self.out)
                print(
                    f"interrupted at step {step} of {args.steps}; checkpoint in {where}.\n"
                    f"Resume with: python {self.script.name} --resume {self.out}{torchrun}",
                    file=sys.stderr,
                    flush=True,
                )
            raise SystemExit(130)

    def _checkpoint(self, step: int):
        model, optimizer, data_rng, extras = self._tracked
        # every rank draws its own data, and samples (PPO's answers, LoRA's dropout) with its device's generator
        rngs = [(data_rng.get_state(), device_rng_state(self.device))]
        if self.world > 1:  # keep every rank's
            rngs = [None] * self.world
            torch.distributed.all_gather_object(rngs, (data_rng.get_state(), device_rng_state(self.device)))
        if not self.master:
            return
        trainer = {
            "optimizer": optimizer.state_dict(),
            "data_rng": [data for data, _ in rngs],
            "device_rng": [device for _, device in rngs],
            "torch_rng": torch.get_rng_state(),
            "extras": {k: v.state_dict() if hasattr(v, "state_dict") else dict(v) for k, v in extras.items()},
        }
        state = {
            "step": step,
            "script": self.script.name,
            "world_size": self.world,
            "args": vars(self.args),
            "elapsed_s": round(time.time() - self.start, 2),
            "summary": self.summary,
        }
        try:
            checkpoint.write_checkpoint(self.out, step, model, trainer, state)
        except SAVE_ERRORS as e:
            raise checkpoint.save_error(
                f"the step-{step} checkpoint into {self.out / CHECKPOINTS}", e, self.out
            ) from None

    @property
    def history(self) -> list[dict]:
        return self._log.history if self._log is not None else []

    def curve(self, key: str) -> list[tuple[float, float]]:
        """[(step, value)] of every logged entry that has key, for plot_curves."""
        return self._log.curve(key) if self._log is not None else []

    # ---- after training: save first, then the optional extras

    def save_model(self, model):
        """The trained weights (unless --no-save) and summary.json as known so far, before anything optional runs
        (checkpoint.save_trained: the official layout, and with --peft the adapter files)."""
        if self._bar is not None:
            self._bar.close()
        if not self.master:
            return
        if not self.args.no_save:
            trained_on = {k: getattr(self.args, k, None) for k in ("template", "prompt_source")}
            try:  # with the chat template it was trained with (nanotune/folder.py)
                checkpoint.save_complete(model, self.out, **trained_on)
            except SAVE_ERRORS as e:
                raise checkpoint.save_error(f"the trained weights into {self.out}", e, self.out) from None
            # finished and saved: the optimizer state to resume from goes, unless --keep-checkpoint
            freed = 0 if self.args.keep_checkpoint else checkpoint.remove_checkpoints(self.out)
            if freed:
                print(
                    f"removed {self.out / CHECKPOINTS} ({freed / 2**20:.0f} MiB); --keep-checkpoint keeps it",
                    flush=True,
                )
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
