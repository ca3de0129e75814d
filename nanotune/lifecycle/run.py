"""One training run's life, shared by every train_*.py, so that no recipe can lose a finished run.

A recipe keeps what is its own (flags, data, loss, loop, evaluation, samples, the names of its outputs) and its
loop decides, in its own lines, when each thing happens; a Run keeps the run safe and decides nothing the loop
cannot see:

    def main(argv=None):
        args = parse_args(argv)
        with Run(args, __file__, outputs=("loss.svg",), show=("loss",)) as run:
            train(args, run)
        if run.exit_code:  # 2: bad input or divergence (one `error:` line); 130: interrupted (the resume command)
            sys.exit(run.exit_code)

    def train(args, run):
        ...                                          # data and model; run.device, run.ctx (autocast), run.master
        first = run.track(model, optimizer, data_rng)   # with --resume: the checkpoint's weights, optimizer, RNG
        for step in range(first, args.steps + 1):
            ...                                      # forward, backward, clip
            run.stop_if_diverged(step, loss, grad_norm)  # raises before the update: NaN/inf or an exploded loss
            optimizer.step()
            run.log.count(tokens)                    # throughput and the bar of the steps
            if run.log.due(step):
                run.log.step(step, loss=loss, lr=lr)
            if run.checkpoint_due(step):             # every --save-every steps, the last, and after Ctrl-C
                run.save_checkpoint(step)
            if run.stop_requested:                   # Ctrl-C/SIGTERM: the step finished and is saved
                return
        run.save_model(model, template=...)          # weights + summary.json first...
        with run.optional("sampling"):               # ...then what may fail without losing them
            ...

The parts: the --out folder and its lock (outdir.py), checkpoints and what a model saves (checkpoint.py), the
metrics log and progress output (nanotune/metrics.py); the divergence rule is here (DivergenceRule). Exit codes:
0 finished; 2 bad input or divergence; 130 interrupted (Ctrl-C/SIGTERM: the current step finishes, a checkpoint
is written, the --resume command is printed).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import torch

from ..metrics import StepLog
from ..utils import (
    ROOT,
    DivergedError,
    NanotuneError,
    atomic_write,
    autocast,
    cleanup_distributed,
    configure_device,
    default_dtype,
    die,
    peak_memory_mib,
    pick_device,
    save_json,
    seed_everything,
    setup_distributed,
)
from . import checkpoint
from .checkpoint import CHECKPOINTS, MODEL_FILES, SAVE_ERRORS
from .outdir import OutputFolder
from .tracking import TRACKER_FILES, open_tracker

EXIT_CODES = {"finished": 0, "interrupted": 130}  # anything else: 2 (its error line printed)


# When training has diverged, the rule every recipe's loop applies before each optimizer step (stop_if_diverged):
# a NaN/inf loss or gradient norm, or a loss above EXPLODE_FACTOR x max(first loss, 1) for EXPLODE_STEPS steps in
# a row. The bound: every recipe's loss is in nats, and a model that starts at L and sits above 10 L (10 nats when
# L < 1: a chosen answer e^-10 times less likely than the rejected one for DPO) is not learning but blowing up, as
# --lr 1e3 does (losses near 2e8).
EXPLODE_FACTOR, EXPLODE_STEPS = 10.0, 3


class DivergenceRule:
    def __init__(self, first_loss: float | None = None):
        self.first_loss = first_loss  # the first finite loss (kept across a resume)
        self.exploding = 0  # steps in a row above the bound

    def what_went_wrong(self, loss: float, grad_norm: float | None) -> str | None:
        """None while training is fine, else what is wrong, in words."""
        if self.first_loss is None and math.isfinite(loss):
            self.first_loss = loss
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm} (loss {loss:.4g})"
        if loss <= EXPLODE_FACTOR * max(self.first_loss, 1.0):
            self.exploding = 0
            return None
        self.exploding += 1
        if self.exploding < EXPLODE_STEPS:
            return None
        return (
            f"the loss has exploded: {loss:.4g}, above {EXPLODE_FACTOR:g} x max(first loss {self.first_loss:.4g}, 1) "
            f"for {EXPLODE_STEPS} steps in a row"
        )


def diverged(step: int, what: str, lr: float, latest_checkpoint: Path | None) -> DivergedError:
    """The one line that stops a diverged run: what went wrong, what to try, what is kept."""
    ckpt = latest_checkpoint
    kept = f"the last good checkpoint ({ckpt.name}) is kept in {ckpt.parent}" if ckpt else "no checkpoint yet"
    return DivergedError(
        f"training diverged at step {step}: {what}. Try a lower --lr (now {lr:g}), --warmup, --grad-clip 1.0 or "
        f"--dtype float32; {kept}"
    )


class StopRequest:
    """SIGINT/SIGTERM while a run is open: the first asks the loop to stop after the current step (it reads
    run.stop_requested); a second stops at once (KeyboardInterrupt: exit 130 without a new checkpoint)."""

    def __init__(self):
        self.signal, self.announce, self._old = None, True, {}

    def install(self, announce: bool):
        self.announce = announce
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _on_signal(self, signum, frame):
        if self.signal is not None:  # the second Ctrl-C: stop now, from wherever we are
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if self.announce:
            message = "finishing the current step, then writing a checkpoint (press Ctrl-C again to stop at once)"
            print(f"\n{self.signal}: {message}", file=sys.stderr, flush=True)


def open_device(flags) -> tuple:
    """This process's place (rank, processes, device), seeded, and its precision -> (rank, world, device, dtype)."""
    rank, world, device = setup_distributed(pick_device(flags.device))
    seed_everything(flags.seed + rank)
    configure_device(device)
    return rank, world, device, flags.dtype or default_dtype(device)


def write_summary(out: Path, summary: dict):
    """summary.json: headline numbers first, the flags last."""
    save_json(out / "summary.json", {k: v for k, v in summary.items() if k != "args"} | {"args": summary.get("args")})


def claim_folder(out: Path, run_files: tuple, overwrite: bool, resumed: bool) -> tuple[OutputFolder, dict | None]:
    """The --out folder, locked for this run (outdir.py) -> it, and with --resume its newest checkpoint's state."""
    folder = OutputFolder(out, run_files)
    folder.claim(overwrite, resumed)
    if resumed:
        return folder, checkpoint.read_checkpoint_state(out)
    checkpoint.remove_partial_checkpoints(out)
    return folder, None


def ending(exc: BaseException) -> str:
    """The status of a run that an exception ended."""
    if isinstance(exc, SystemExit):  # (exit 0 or 130 from inside a recipe: what it says)
        return {0: "finished", 130: "interrupted"}.get(exc.code, "failed")
    kinds = ((KeyboardInterrupt, "interrupted"), (DivergedError, "diverged"), (BaseException, "failed"))
    return next(name for kind, name in kinds if isinstance(exc, kind))


def resume_command(script: str, out: Path, step: int, steps: int, world: int) -> str:
    """What an interrupted run prints: where it stopped, where its checkpoint is, how to go on."""
    on = " (under the same torchrun command)" if world > 1 else ""
    where = f"interrupted at step {step} of {steps}; checkpoint in {checkpoint.latest_checkpoint(out)}."
    return f"{where}\nResume with: python {script} --resume {out}{on}"


@contextlib.contextmanager
def optional(what: str, out: Path, summary: dict):
    """See Run.optional."""
    try:
        yield
    except Exception as exc:
        message = f"{what} failed: {type(exc).__name__}: {exc}"
        print(f"warning: {message} (the trained weights are saved in {out})", file=sys.stderr, flush=True)
        summary.setdefault("warnings", []).append(message)


class Run:
    """See the module docstring. args: the run's flags (it reads flags.add_common_args's, and records them all);
    script: the recipe's __file__; outputs: the files it writes into --out besides the run's own; show: the metrics
    of its progress line. A recipe reads device, rank, world, master (rank 0: logs, evaluates, saves), dtype, ctx
    (autocast), sampling, out, summary (summary.json), resumed, log (metrics.StepLog), stop_requested, exit_code."""

    def __init__(self, args, script: str, outputs: tuple[str, ...] = (), show: tuple[str, ...] = ("loss",)):
        self.args, self.script = args, Path(script)
        self.summary, self.resumed, self.exit_code, self.step = {}, bool(args.resume), 0, 0
        self.stop_requested = False  # a Ctrl-C, as the last stop_if_diverged read it (every process alike)
        self.log = StepLog(show, args.steps, args.log_every)  # opened in the folder by rank 0
        self._signals, self._divergence = StopRequest(), DivergenceRule()
        self._tracked, self._restored = None, False  # (model, optimizer, data_rng, extras); a resume's load done
        self._folder, self._elapsed_before = None, 0.0
        self._run_files = ("metrics.jsonl", "summary.json", CHECKPOINTS) + MODEL_FILES + TRACKER_FILES + tuple(outputs)

    # ---- start: device, processes, folder, lock, log, signal handlers

    def __enter__(self):
        args = self.args
        try:
            self.rank, self.world, self.device, self.dtype = open_device(args)
            self.master, self.ctx = self.rank == 0, autocast(self.device, self.dtype)
            self.log.device, self.log.world, self.log.master = self.device, self.world, self.master
            # --compile compiles the decode step of an RL recipe's sampling; bf16 runs use a bf16 head and cache
            self.sampling = {"compile": args.compile, "dtype": torch.bfloat16 if self.dtype == "bfloat16" else None}
            self.out = Path(args.out or ROOT / "out" / f"{self.script.stem}-{datetime.now():%Y%m%d-%H%M%S}")
            if self.master:
                self._folder, state = claim_folder(self.out, self._run_files, args.overwrite, self.resumed)
                if state is not None:  # (nothing in the folder changes until the checkpoint has loaded: see track)
                    self.summary, self._elapsed_before = state["summary"], state.get("elapsed_s", 0.0)
                tracker = open_tracker(args.tracker, self.out, self.out.name, vars(args))  # no package: stops here
                self.log.open(self.out, tracker, upto=state["step"] if state else None)  # mirrored to --tracker
                self.summary.update(status="running", script=self.script.name, args=vars(args))
        except NanotuneError as e:  # refused before the run began (like a bad flag): nothing of it to report
            self._release()
            die(str(e))
        self.start = self.log.start = time.time() - self._elapsed_before  # elapsed time counts on across a resume
        self._signals.install(announce=self.master)
        return self

    # ---- the end: whatever happened, the summary says so and exit_code tells main; the lock is released

    def __exit__(self, exc_type, exc, tb):
        status = "interrupted" if self.stop_requested else "finished"
        status = status if exc is None else ending(exc)
        self.log.close_bar()
        if self.resumed and not self._restored or self._tracked is None and not self.resumed:
            # a refused resume leaves the run it names as it was; a run stopped before training (bad input)
            # leaves nothing behind, so that the retry is not refused
            self.log.discard(status)
        elif self.log.is_open:
            error = {"error": str(exc)} if exc is not None and not isinstance(exc, KeyboardInterrupt) else {}
            elapsed = round(time.time() - self.start, 1)
            # peak memory: on CPU the resident set, on CUDA the tensors
            self.summary |= dict(
                status=status, **error, elapsed_s=elapsed, peak_memory_mib=peak_memory_mib(self.device)
            )
            try:
                write_summary(self.out, self.summary)
            except OSError as e:
                print(f"warning: could not write {self.out / 'summary.json'}: {e}", file=sys.stderr)
        if self.stop_requested and self.master:
            print(resume_command(self.script.name, self.out, self.step, self.args.steps, self.world), file=sys.stderr)
        self._release(status)
        cleanup_distributed()
        if isinstance(exc, NanotuneError):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        self.exit_code = EXIT_CODES.get(status, 2)
        return isinstance(exc, (NanotuneError, KeyboardInterrupt))  # those two end as exit_code; others go on

    def _release(self, status: str = "failed"):
        self._signals.uninstall()
        self.log.close(status)  # (the status a tracker marks its run with)
        if self._folder is not None:
            self._folder.release(status, started=self._tracked is not None)

    # ---- training: what a checkpoint holds, when it diverged, when to save, when to stop

    def track(self, model, optimizer, data_rng: torch.Generator, extras: dict | None = None) -> int:
        """What a checkpoint holds: the model's weights, the optimizer state, the step, this rank's data RNG and
        the global torch RNG, and extras: {name: a module (or a dict) with more training state}, such as PPO's
        value model and KL coefficient. With --resume, load them from the last checkpoint. -> the first step."""
        self._tracked = (model, optimizer, data_rng, extras or {})
        if self.resumed:
            where = (self.out, self.script.name, self.world, self.rank, self.device)
            self.step, first_loss = checkpoint.resume(*where, self._tracked, self.args.model)
            self._divergence = DivergenceRule(first_loss)  # every rank restarts the rule from the same loss
            self._restored = True  # from here on the folder is this run's again
            if self.master:
                self.log.rewrite()  # without the steps after the checkpoint: they run again
                checkpoint.remove_partial_checkpoints(self.out)
                print(f"resumed {self.out} at step {self.step} from {checkpoint.latest_checkpoint(self.out)}")
        self.log.start_steps(self.step)
        return self.step + 1

    def stop_if_diverged(self, step: int, loss, grad_norm=None):
        """Raise DivergedError before the optimizer step if training has diverged (DivergenceRule); the last
        checkpoint stays as it was. loss and grad_norm may be tensors on the device: they are read back here, the
        step's one wait for the device, with the Ctrl-C flag, averaged over the processes so that every rank
        decides alike (stop_requested: what they agreed)."""
        self.step = step
        norm = 0.0 if grad_norm is None else grad_norm
        loss, norm, stop = self.log.read_back([loss, norm, self._signals.signal is not None])
        self.stop_requested = stop > 0
        what = self._divergence.what_went_wrong(loss, None if grad_norm is None else norm)
        self.summary["loss_first"] = self._divergence.first_loss
        if what is not None:
            latest = checkpoint.latest_checkpoint(self.out) if self.master else None
            raise diverged(step, what, self.args.lr, latest)

    def checkpoint_due(self, step: int) -> bool:
        """Every --save-every steps, at the last step, and when a Ctrl-C/SIGTERM asks the run to stop."""
        every = self.args.save_every
        return bool(every and (step % every == 0 or step == self.args.steps)) or self.stop_requested

    def save_checkpoint(self, step: int):
        """checkpoints/step-NNNNNN/ (checkpoint.py: whole or absent, only the newest kept); every rank calls it."""
        elapsed, flags = round(time.time() - self.start, 2), vars(self.args)
        state = dict(step=step, script=self.script.name, world_size=self.world, args=flags, elapsed_s=elapsed)
        try:
            checkpoint.write_training(
                self.out, self._tracked, state | {"summary": self.summary}, self.rank, self.world, self.device
            )
        except SAVE_ERRORS as e:
            raise checkpoint.save_error(
                f"the step-{step} checkpoint into {self.out / CHECKPOINTS}", e, self.out
            ) from None

    # ---- after training: save first, then the optional extras

    def save_model(self, model, **trained_with):
        """The trained weights (unless --no-save) and summary.json as known so far, before anything optional runs;
        trained_with: the chat template and prompt source the folder's files record (checkpoint.save_final)."""
        self.log.close_bar()
        if self.master:
            if not self.args.no_save:
                checkpoint.save_final(model, self.out, self.args.keep_checkpoint, **trained_with)
            self.summary["status"] = "saved"
            write_summary(self.out, self.summary)

    def optional(self, what: str):
        """A context for work after the weights are saved: a failure is reported as a warning (and recorded in
        summary.json under "warnings"), the run goes on, the weights stay."""
        return optional(what, self.out, self.summary)

    def write_text(self, name: str, text: str):
        """A text output of the run (samples, answers), written atomically by rank 0."""
        if self.master:
            atomic_write(self.out / name, text)
