"""Dependency-free SVG line plots of a run's curves (loss.svg, kl_score.svg, ...)."""

from __future__ import annotations

import html
import math
from pathlib import Path

from .utils import atomic_write


def plot_curves(path: Path, series: dict[str, list[tuple[float, float]]], title: str = "loss", xlabel: str = "step"):
    """A dependency-free SVG line plot: {name: [(step, value), ...]} (or other x values, named by xlabel)."""
    title, xlabel = html.escape(title), html.escape(xlabel)  # a run's name or a title may hold < > &
    points = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not points:
        return
    W, H, pad = 640, 400, 50
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    sx = lambda x: pad + (x - x0) / (x1 - x0) * (W - 2 * pad)  # noqa: E731
    sy = lambda y: H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad)  # noqa: E731
    colors = [
        "#1f77b4",
        "#d62728",
        "#2ca02c",
        "#9467bd",
        "#ff7f0e",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle">{title}</text>',
        f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
        f'<text x="{pad}" y="{H - pad + 15}">{x0:g}</text>',
        f'<text x="{W - pad}" y="{H - pad + 15}" text-anchor="end">{xlabel} {x1:g}</text>',
        f'<text x="{pad - 5}" y="{H - pad}" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{pad - 5}" y="{pad + 4}" text-anchor="end">{y1:.3g}</text>',
    ]
    for i, (name, pts) in enumerate(series.items()):
        pts = [p for p in pts if math.isfinite(p[1])]
        if not pts:
            continue
        color = colors[i % len(colors)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{line}"/>')
        if len(pts) <= 30:  # few points (evaluations): mark each
            svg += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
        label = html.escape(name)
        svg.append(f'<text x="{W - pad - 5}" y="{pad + 15 * (i + 1)}" fill="{color}" text-anchor="end">{label}</text>')
    svg.append("</svg>")
    atomic_write(path, "\n".join(svg) + "\n")
