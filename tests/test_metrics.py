"""What a run shows a person: short progress lines with 4 significant digits, and progress bars with an ETA
(redrawn in place on a terminal, plain lines in a log)."""

import io
import re

from helpers import run_main

import train_ppo
from nanotune.metrics import Progress, clock, fmt, progress, progress_line


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_numbers_print_to_four_significant_digits():
    assert [fmt(x) for x in (9023.905, 37.41, 0.0012345, 1e-05, 3, float("nan"))] == [
        "9024",
        "37.41",
        "0.001234",
        "1e-05",
        "3",
        "nan",
    ]
    line = progress_line({"step": 40, "loss": 2.34567, "val_loss": None, "lr": 1e-4}, ["loss", "val_loss"], 300)
    assert line == "step 40/300 | loss 2.346"
    assert [clock(s) for s in (5, 75, 3725)] == ["0:05", "1:15", "1:02:05"]


def test_a_log_gets_plain_lines_at_most_every_few_seconds_and_a_terminal_a_bar():
    log = io.StringIO()
    for _ in progress(range(3), "answering", stream=log, every=0):
        pass
    lines = log.getvalue().splitlines()
    assert lines == ["answering 1/3, eta 0:00", "answering 2/3, eta 0:00", "answering 3/3, eta 0:00"]
    quiet = io.StringIO()
    for _ in progress(range(3), "answering", stream=quiet, every=3600):
        pass
    assert quiet.getvalue() == ""  # nothing to say within the interval

    terminal = Terminal()
    bar = Progress(4, "step", stream=terminal)
    bar.update()
    bar.write("step 1/4 | loss 3.1")
    bar.close()
    shown = terminal.getvalue()
    assert "\r\033[K" + "step [#####               ] 1/4" in shown and "step 1/4 | loss 3.1\n" in shown


def test_ppo_progress_lines_fit_120_characters_and_show_an_eta(tiny, shared, tmp_path, capsys):
    data = shared / "data"
    argv = ["--model", tiny, "--out", str(tmp_path / "ppo"), "--reward", "letter:x", "--steps", "3"]
    argv += ["--books", str(data / "corpus" / "pg11.txt"), "--heldout-book", str(data / "gulliver.txt")]
    argv += ["--prompt-len", "8", "--max-new-tokens", "4", "--rollout-batch", "4", "--batch-size", "4"]
    argv += ["--eval-prompts", "4", "--eval-every", "2", "--log-every", "1", "--ppo-epochs", "1"]
    assert run_main(train_ppo.main, argv) == 0
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(steps) == 1 + 3 + 2  # step 0's evaluation, three training steps, two more evaluations
    assert all(len(line) <= 120 for line in steps), max(steps, key=len)
    assert re.fullmatch(r"step 3/3 \| score \S+ \| kl \S+ \| \S+ tok/s \| \d+:\d\d, eta 0:00", steps[-1]), steps[-1]
