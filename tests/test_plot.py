"""The SVG plots: round-number ticks, axis titles, a grid, and a legend that covers no data."""

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanotune.plot import nice_ticks, plot_curves


@pytest.mark.parametrize(
    "lo, hi, expected",
    [(0, 36.2, [0, 10, 20, 30, 40]), (0.1, 0.93, [0, 0.2, 0.4, 0.6, 0.8, 1.0]), (-0.4, 2.84, [-1, 0, 1, 2, 3])],
)
def test_ticks_are_round_numbers_that_cover_the_data(lo, hi, expected):
    assert nice_ticks(lo, hi) == expected


@given(st.floats(-1e6, 1e6), st.floats(1e-3, 1e6))
def test_ticks_cover_any_range_in_steps_of_one_two_or_five(lo, span):
    ticks = nice_ticks(lo, lo + span)
    step = ticks[1] - ticks[0]
    slack = 1e-6 * step + 1e-9 * abs(lo)  # (rounding: 0.30000000000000004 is not a tick past 0.3)
    assert ticks[0] <= lo + slack and ticks[-1] >= lo + span - slack
    assert 3 <= len(ticks) <= 13
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-4


def test_a_plot_has_axis_titles_a_grid_and_its_legend_beside_the_data(tmp_path):
    plot_curves(
        tmp_path / "p.svg",
        {"train": [(0, 9.0), (150, 0.1)], "valid<ation>": [(0, 8.8), (150, 4.9)]},
        "SFT: NLL",
        ylabel="NLL (nats per token)",
    )
    svg = (tmp_path / "p.svg").read_text()
    x, width = (float(v) for v in re.search(r'<rect x="(\d+)" y="\d+" width="(\d+)"', svg).groups())
    legend = [float(v) for v in re.findall(r'<text x="([\d.]+)" y="[\d.]+" fill=', svg)]
    assert len(legend) == 2 and all(v > x + width for v in legend)  # right of the data area
    assert ">step</text>" in svg and ">NLL (nats per token)</text>" in svg and "valid&lt;ation&gt;" in svg
    assert svg.count('stroke="#e5e5e5"') == 4 + 6  # grid lines at the ticks 0, 50, 100, 150 and 0, 2, ..., 10
    assert all(f">{t}</text>" in svg for t in ("0", "50", "100", "150", "2", "10"))
