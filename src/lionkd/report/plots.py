"""The report's charts: each answers one question in one unit, and its legend sits outside the axes.

Every function returns PNG bytes (matplotlib's Agg canvas, no display, no global pyplot state), or
None when there is nothing to draw.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

# One colour per series name wherever it appears, so "teacher" is the same blue in every chart.
PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac",
           "#eeca3b"]
ROLE_COLOURS = {"teacher": "#4c78a8", "student": "#f58518", "referee": "#54a24b", "generator": "#b279a2"}


def _figure(width: float = 6.4, height: float = 3.3) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _finish(ax: Any, title: str, xlabel: str, ylabel: str, legend: bool) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    if legend:
        # outside the axes, to the right: a legend never covers a point
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def colour(name: str, index: int) -> str:
    return ROLE_COLOURS.get(name, PALETTE[index % len(PALETTE)])


def lines(title: str, series: Mapping[str, Mapping[int, float]], ylabel: str, *, xlabel: str = "iteration",
          ylim: tuple[float, float] | None = None, dashed: Sequence[str] = (), bold: Sequence[str] = ()) -> bytes | None:
    """One line per series over integer x (iterations); `dashed` and `bold` name series drawn so."""
    series = {name: points for name, points in series.items() if points}
    if not series:
        return None
    fig, ax = _figure()
    for i, (name, points) in enumerate(series.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", markersize=4, label=name, color=colour(name, i),
                linestyle="--" if name in dashed else "-", linewidth=2.6 if name in bold else 1.6)
    ax.set_xticks(sorted({x for points in series.values() for x in points}))
    if ylim is not None:
        ax.set_ylim(*ylim)
    _finish(ax, title, xlabel, ylabel, legend=len(series) > 1)
    return _png(fig)


def stacked_bars(title: str, stacks: Mapping[str, Mapping[int, float]], ylabel: str, *,
                 xlabel: str = "iteration", colours: Mapping[str, str] | None = None) -> bytes | None:
    """Bars per x (iteration), one stacked segment per named part; parts that are all zero are left out."""
    stacks = {name: values for name, values in stacks.items() if any(values.values())}
    if not stacks:
        return None
    xs = sorted({x for values in stacks.values() for x in values})
    fig, ax = _figure()
    bottom = [0.0] * len(xs)
    for i, (name, values) in enumerate(stacks.items()):
        heights = [float(values.get(x, 0.0)) for x in xs]
        ax.bar(xs, heights, bottom=bottom, label=name, width=0.6,
               color=(colours or {}).get(name) or colour(name, i))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(xs)
    _finish(ax, title, xlabel, ylabel, legend=True)
    ax.grid(axis="x", visible=False)
    return _png(fig)


def grouped_bars(title: str, groups: Mapping[str, Mapping[str, float]], ylabel: str) -> bytes | None:
    """Side-by-side bars: one group per key of `groups` (a metric), one bar per model inside it."""
    groups = {g: values for g, values in groups.items() if values}
    if not groups:
        return None
    members = list(dict.fromkeys(m for values in groups.values() for m in values))
    width = 0.8 / len(members)
    fig, ax = _figure()
    for i, member in enumerate(members):
        xs = [g + (i - (len(members) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [values.get(member, 0.0) for values in groups.values()], width=width, label=member,
               color=colour(member, i))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups), fontsize=9)
    _finish(ax, title, "", ylabel, legend=len(members) > 1)
    ax.grid(axis="x", visible=False)
    return _png(fig)


def loss_curve(title: str, segments: Sequence[tuple[str, Sequence[tuple[float, float]]]]) -> bytes | None:
    """Training loss per optimiser step over several trainings, end to end on one step axis.

    Each segment is (label, [(step, loss), ...]) with steps counted from 1 inside its training; the
    segments are laid one after another and a dotted line with the label marks where each begins.
    """
    segments = [(label, points) for label, points in segments if points]
    if not segments:
        return None
    fig, ax = _figure(7.2, 3.3)
    offset = 0.0
    xs: list[float] = []
    ys: list[float] = []
    starts: list[tuple[float, str]] = []
    for label, points in segments:
        starts.append((offset, label))
        xs += [offset + step for step, _ in points]
        ys += [loss for _, loss in points]
        offset += max(step for step, _ in points)
    ax.plot(xs, ys, color=PALETTE[0], linewidth=1.5, marker="o" if len(xs) <= 60 else None, markersize=3)
    top = max(ys)
    for start, label in starts:
        ax.axvline(start, color="#888888", linestyle=":", linewidth=1)
        # above the plot area, so a label never hides a point
        ax.annotate(label, (start, 1.0), xycoords=("data", "axes fraction"), xytext=(2, 2),
                    textcoords="offset points", fontsize=8, color="#555555", va="bottom")
    ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)
    ax.set_xlim(0, offset * 1.01 + 1)
    _finish(ax, title, "optimiser step (all trainings in sequence)", "training loss", legend=False)
    ax.set_title(title, fontsize=11, pad=16)
    return _png(fig)
