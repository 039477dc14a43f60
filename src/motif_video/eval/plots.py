"""Charts for reports, drawn with matplotlib's object API and its Agg renderer (no pyplot: no global figure state,
no display needed, safe in a server thread). Files are written whole or not at all."""

from __future__ import annotations

import math
import os
from pathlib import Path

from matplotlib.figure import Figure

PALETTE = ["#4278c8", "#e68c32", "#50aa5a", "#c85050", "#8c64be", "#5aaab4", "#e377c2", "#7f7f7f"]


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` to `path` (format from the suffix) through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
    os.replace(tmp, path)
    return path


def bar_chart(bars: list[tuple[str, float | None]], title: str, path, groups: list[tuple[str, int]] | None = None):
    """A 0..1 bar chart in percent, one bar per (label, value), "n/a" where the value is missing. `groups`
    colours consecutive runs of bars."""
    fig = Figure(figsize=(max(4.0, 0.55 * len(bars) + 1.2), 4.2))
    ax = fig.add_subplot()
    colours = []
    for g, (_, n) in enumerate(groups or [("", len(bars))]):
        colours += [PALETTE[g % len(PALETTE)]] * n
    for i, ((label, value), colour) in enumerate(zip(bars, colours)):
        if value is not None and math.isfinite(value):
            shown = max(0.0, min(1.0, value))
            ax.bar(i, 100 * shown, color=colour, width=0.75)
            ax.text(i, 100 * shown + 1, f"{100 * value:.1f}", ha="center", va="bottom", fontsize=8)
        else:
            ax.text(i, 1, "n/a", ha="center", va="bottom", fontsize=8, color="gray")
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=90)
    ax.set_xlim(-0.6, len(bars) - 0.4)
    ax.set_ylim(0, 108)
    ax.set_yticks(range(0, 101, 20), [f"{v}%" for v in range(0, 101, 20)])
    ax.grid(axis="y", color="#e1e1e1")
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def line_chart(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, path) -> None:
    """One line per named series of (x, y) points."""
    fig = Figure(figsize=(7.6, 4.2))
    ax = fig.add_subplot()
    for k, (name, points) in enumerate(series.items()):
        ax.plot([x for x, _ in points], [y for _, y in points], color=PALETTE[k % len(PALETTE)], label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(color="#e1e1e1")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    save_figure(fig, path)
