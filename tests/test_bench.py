"""The benchmark's child processes: a result comes back, and a child that dies ends the bench with a message
instead of leaving it waiting (on a GPU machine that is the difference between a failed check and a lost lease)."""

import os

import pytest

from nanotune.bench.vs_transformers import in_child


def reports(name, queue):
    queue.put({"times": [0.5, 0.25]})


def dies(name, queue):
    os._exit(3)  # as a child killed for memory, before it reports


def test_a_child_reports_its_result():
    assert in_child(reports, "nanotune") == {"times": [0.5, 0.25]}


def test_a_child_that_dies_before_reporting_stops_the_bench_with_its_exit_code():
    with pytest.raises(SystemExit, match="dies nanotune: the child process ended with exit code 3"):
        in_child(dies, "nanotune")
