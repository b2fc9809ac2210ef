"""PNG charts of a results JSON: one per scenario, written next to the JSON.

A chart has one panel per unit (tasks/s, ms, µs...) with corral's figures beside their
baselines, one panel of ratios against a line at 1x, and one panel per curve a scenario
recorded (:meth:`benchmarks.stats.Metrics.curve`). Bars and points are medians over repeats;
whiskers span min to max. Every bar carries its median, every ratio its value, so a reader sees
the figure without reading the table.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

COLOURS = {"value": "#1f77b4", "baseline": "#9a9a9a", "difference": "#ff7f0e"}
RATIO_COLOUR = "#2ca02c"
LEGEND = {"value": "corral", "baseline": "baseline", "difference": "corral minus baseline"}
BAR_HEIGHT_IN = 0.32  # inches per bar in a horizontal bar panel
WIDTH_IN = 11.0
LABEL_CHARS = 36  # a longer metric name wraps onto several lines


def plot_results(results: dict[str, Any], json_path: Path) -> list[Path]:
    """Write ``<json stem>.<scenario>.png`` beside ``json_path`` for each scenario with data."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    written = []
    for name, scenario in results["scenarios"].items():
        if scenario.get("error") or not scenario.get("metrics"):
            continue
        path = json_path.with_name(f"{json_path.stem}.{name}.png")
        plot_scenario(name, scenario, path, quick=bool(results.get("quick")))
        written.append(path)
    return written


def plot_scenario(name: str, scenario: dict[str, Any], path: Path, *, quick: bool) -> None:
    import matplotlib.pyplot as plt

    metrics: dict[str, dict[str, Any]] = scenario["metrics"]
    curves: dict[str, dict[str, Any]] = scenario.get("curves", {})
    drawn = {m for c in curves.values() for points in c["series"].values() for _, m in points}
    by_unit: dict[str, list[str]] = {}
    ratios = []
    for metric, s in metrics.items():
        if s["kind"] == "ratio":
            ratios.append(metric)
        elif metric not in drawn:  # a curve shows it already
            by_unit.setdefault(s["unit"], []).append(metric)
    panels: list[tuple[str, Any]] = [("curve", c) for c in curves.items()]
    if ratios:
        panels.append(("ratios", ratios))
    panels += [("unit", u) for u in by_unit.items()]
    heights = [panel_height(kind, data) for kind, data in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(WIDTH_IN, sum(heights) + 0.8),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (kind, data) in zip(axes[:, 0], panels, strict=True):
        if kind == "curve":
            draw_curve(ax, data[0], data[1], metrics)
        elif kind == "ratios":
            draw_ratios(ax, data, metrics)
        else:
            draw_unit(ax, data[0], data[1], metrics)
    repeats = max(len(s["values"]) for s in metrics.values())
    title = f"{name}: {scenario.get('summary', '')}"
    fig.suptitle(
        f"{title}\nmedian of {repeats} repeat(s), whiskers min–max"
        + (" (quick run)" if quick else ""),
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)


def panel_height(kind: str, data: Any) -> float:
    if kind == "curve":
        return 3.2
    bars = len(data) if kind == "ratios" else len(data[1])
    return max(1.4, 0.7 + BAR_HEIGHT_IN * bars)


def spans(metrics: dict[str, dict[str, Any]], names: list[str]) -> tuple[list[float], list[Any]]:
    """Medians and the (below, above) whisker lengths for min..max."""
    medians = [finite(metrics[n]["median"]) for n in names]
    below = [max(0.0, m - finite(metrics[n]["min"])) for m, n in zip(medians, names, strict=True)]
    above = [max(0.0, finite(metrics[n]["max"]) - m) for m, n in zip(medians, names, strict=True)]
    return medians, [below, above]


def wrap(name: str) -> str:
    return "\n".join(textwrap.wrap(name, LABEL_CHARS)) or name


def finite(value: Any) -> float:
    number = float(value)
    return number if math.isfinite(number) else 0.0


def label(value: float) -> str:
    from benchmarks.report import fmt

    return fmt(value)


def draw_unit(ax: Axes, unit: str, names: list[str], metrics: dict[str, dict[str, Any]]) -> None:
    from matplotlib.patches import Patch

    medians, err = spans(metrics, names)
    colours = [COLOURS.get(metrics[n]["kind"], COLOURS["value"]) for n in names]
    rows = range(len(names))
    ax.barh(rows, medians, xerr=err, color=colours, capsize=3, error_kw={"elinewidth": 1})
    ax.set_yticks(list(rows), [wrap(n) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    if any(m < 0 for m in medians):
        ax.axvline(0, color="black", linewidth=0.8)
    for row, median, high in zip(rows, medians, err[1], strict=True):
        ax.annotate(
            f" {label(median)}",
            (median + high if median >= 0 else median, row),
            va="center",
            fontsize=7,
        )
    ax.margins(x=0.15)
    kinds = [k for k in LEGEND if any(metrics[n]["kind"] == k for n in names)]
    handles = [Patch(color=COLOURS[k], label=LEGEND[k]) for k in kinds]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def draw_ratios(ax: Axes, names: list[str], metrics: dict[str, dict[str, Any]]) -> None:
    """Each ratio as a stem from 1x to its median: its length and side say how far from the
    baseline and which way. A log axis when the ratios span more than 10x."""
    medians, err = spans(metrics, names)
    rows = list(range(len(names)))
    ax.hlines(rows, 1.0, medians, color=RATIO_COLOUR, linewidth=6, alpha=0.6)
    ax.errorbar(medians, rows, xerr=err, fmt="o", color=RATIO_COLOUR, capsize=3)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    positive = [m for m in medians if m > 0] + [1.0]
    ax.margins(x=0.2)
    if max(positive) / min(positive) > 10:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)  # bar lengths stay proportional to the ratios
    ax.set_yticks(rows, [wrap(n) for n in names], fontsize=8, fontweight="bold")
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("ratio (x); dashed line: 1x, equal to the baseline", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    for row, median, high in zip(rows, medians, err[1], strict=True):
        ax.annotate(f"  {label(median)}x", (median + high, row), va="center", fontsize=8)


def draw_curve(
    ax: Axes, title: str, curve: dict[str, Any], metrics: dict[str, dict[str, Any]]
) -> None:
    """``curve``: ``{"x_label", "unit", "log_x", "series": {label: [[x, metric], ...]}}``."""
    ticks: set[float] = set()
    for series_label, points in curve["series"].items():
        present = [(x, m) for x, m in points if m in metrics]
        if not present:
            continue
        xs = [float(x) for x, _ in present]
        ticks.update(xs)
        medians, err = spans(metrics, [m for _, m in present])
        baseline = all(metrics[m]["kind"] == "baseline" for _, m in present)
        ax.errorbar(
            xs,
            medians,
            yerr=err,
            marker="o",
            capsize=3,
            label=series_label,
            linestyle="--" if baseline else "-",
        )
    if curve.get("log_x"):
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(sorted(ticks), [f"{x:g}" for x in sorted(ticks)])
    ax.set_xlabel(curve["x_label"], fontsize=8)
    ax.set_ylabel(curve["unit"], fontsize=8)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
