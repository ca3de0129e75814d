"""Dependency-free SVG line plots of a run's curves (loss.svg, kl_score.svg, ...): round-number ticks on both
axes, axis titles, a light grid, and the legend beside the plot, where it covers no data."""

from __future__ import annotations

import html
import math
from pathlib import Path

from .utils import atomic_write

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About `count` round ticks (steps of 1, 2 or 5 times a power of ten) from at or below lo to at or above hi."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    digits = max(0, -math.floor(math.log10(step)))  # so that 0.1 + 0.2 prints as 0.3
    return [round(k * step, digits) for k in range(first, last + 1)]


def plot_curves(
    path: Path,
    series: dict[str, list[tuple[float, float]]],
    title: str = "loss",
    xlabel: str = "step",
    ylabel: str | None = None,
):
    """A line plot: {name: [(x, y), ...]} (x a step, or the values xlabel names), y titled ylabel (default: the
    title). Non-finite values are left out; nothing is written when no value is finite."""
    title, xlabel, ylabel = (html.escape(t) for t in (title, xlabel, ylabel or title))  # a name may hold < > &
    points = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not points:
        return
    W, H = 720, 420
    left, right, top, bottom = 70, W - 160, 35, H - 55  # the data area; the legend goes right of it
    xt = nice_ticks(min(p[0] for p in points), max(p[0] for p in points))
    yt = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    sx = lambda x: left + (x - xt[0]) / (xt[-1] - xt[0]) * (right - left)  # noqa: E731
    sy = lambda y: bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (bottom - top)  # noqa: E731
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{(left + right) / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
    ]
    for x in xt:  # grid, ticks and their labels
        svg.append(f'<line x1="{sx(x):.1f}" y1="{top}" x2="{sx(x):.1f}" y2="{bottom}" stroke="#e5e5e5"/>')
        svg.append(f'<text x="{sx(x):.1f}" y="{bottom + 16}" text-anchor="middle">{x:g}</text>')
    for y in yt:
        svg.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{right}" y2="{sy(y):.1f}" stroke="#e5e5e5"/>')
        svg.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    svg += [
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="black"/>',
        f'<text x="{(left + right) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>',
        f'<text transform="translate(16 {(top + bottom) / 2}) rotate(-90)" text-anchor="middle">{ylabel}</text>',
    ]
    for i, (name, pts) in enumerate(series.items()):
        pts = [p for p in pts if math.isfinite(p[1])]
        if not pts:
            continue
        color = COLORS[i % len(COLORS)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{line}"/>')
        if len(pts) <= 30:  # few points (evaluations): mark each
            svg += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
        y = top + 10 + 18 * i  # the legend, beside the data area
        svg.append(f'<line x1="{right + 12}" y1="{y}" x2="{right + 32}" y2="{y}" stroke="{color}" stroke-width="2"/>')
        svg.append(f'<text x="{right + 38}" y="{y + 4}" fill="{color}">{html.escape(name)}</text>')
    svg.append("</svg>")
    atomic_write(path, "\n".join(svg) + "\n")
