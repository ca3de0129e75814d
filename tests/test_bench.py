"""The benchmark's child processes: a result comes back, and a child that dies ends the bench with a message
instead of leaving it waiting (on a GPU machine that is the difference between a failed check and a lost lease).
The breakdown's categories: each operator of a step counted where it belongs."""

import os

import pytest
import torch

from nanotune.bench import breakdown
from nanotune.bench.vs_transformers import in_child
from nanotune.model.gpt import GPT
from nanotune.tokenizer import load_tokenizer


def reports(name, queue):
    queue.put({"times": [0.5, 0.25]})


def dies(name, queue):
    os._exit(3)  # as a child killed for memory, before it reports


def test_a_child_reports_its_result():
    assert in_child(reports, "nanotune") == {"times": [0.5, 0.25]}


def test_a_child_that_dies_before_reporting_stops_the_bench_with_its_exit_code():
    with pytest.raises(SystemExit, match="dies nanotune: the child process ended with exit code 3"):
        in_child(dies, "nanotune")


@pytest.mark.parametrize("rows", [1, 2])
def test_the_breakdown_counts_the_head_as_the_head_whichever_kernel_reads_it(tiny, rows):
    """One row reads the head's (C, V) copy with MKL; several read its packed copy with oneDNN's kernel, the
    layers' kernel too: both are the head's time, and almost nothing is left as "other operators"."""
    model = GPT.from_pretrained(tiny).eval()
    with torch.no_grad():
        case = breakdown.measure(breakdown.engine_steps(model, load_tokenizer(), rows, 8), 8)
    parts = case["breakdown"]
    head = parts[breakdown.HEAD]
    assert head > parts["layers' matrix products"], parts  # (a 50257 x 64 head: 40x the 2 layers' weights)
    assert parts.get("other operators", 0) < 0.25 * head, parts
    assert sum(parts.values()) == pytest.approx(case["profiled_ms"])


def test_the_breakdown_counts_each_operator_called_from_python_once():
    """Top-level operators and those directly under a label count; the operators they call in turn (layer_norm's
    native_layer_norm, matmul's mm) and the labels themselves do not."""
    x, w = torch.ones(2, 4), torch.ones(4, 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            x + x
        with torch.profiler.record_function(breakdown.HEAD):
            x @ w
            x.view(-1)
        torch.nn.functional.layer_norm(x, (4,))
    assert breakdown.operators(prof) == 13
