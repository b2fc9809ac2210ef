"""Percentiles, medians and per-repeat series: the only arithmetic the benchmarks do.

Percentiles interpolate linearly between samples (numpy's default). A :class:`Series` holds one
value per repeat; ratios are computed inside each repeat first and summarised afterwards, so a
slow repeat moves a ratio's min or max, not every figure at once.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, linearly interpolated."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; NaN (reported as such, never hidden) for a zero denominator."""
    return numerator / denominator if denominator else math.nan


@dataclass
class Series:
    """One metric, one value per repeat."""

    unit: str
    kind: str = "value"  # value | baseline | ratio | difference
    values: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        finite = [v for v in self.values if math.isfinite(v)]
        return {
            "unit": self.unit,
            "kind": self.kind,
            "median": statistics.median(finite) if finite else math.nan,
            "min": min(finite) if finite else math.nan,
            "max": max(finite) if finite else math.nan,
            "values": list(self.values),
        }


class Metrics:
    """Named series of one scenario, in the order they were first recorded."""

    def __init__(self) -> None:
        self.series: dict[str, Series] = {}
        self.notes: list[str] = []
        self.curves: dict[str, dict[str, object]] = {}

    def add(self, name: str, value: float, unit: str, kind: str = "value") -> None:
        if name not in self.series:
            self.series[name] = Series(unit, kind)
        self.series[name].values.append(float(value))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def curve(
        self,
        title: str,
        x_label: str,
        unit: str,
        series: Mapping[str, Sequence[tuple[float, str]]],
        *,
        log_x: bool = False,
    ) -> None:
        """Ask ``--plot`` for a line chart: each series is ``(x, metric name)`` points, drawn at
        the metric's median with min-max whiskers."""
        self.curves[title] = {
            "x_label": x_label,
            "unit": unit,
            "log_x": log_x,
            "series": {
                name: [[x, metric] for x, metric in points] for name, points in series.items()
            },
        }

    def summary(self) -> dict[str, dict[str, object]]:
        return {name: series.summary() for name, series in self.series.items()}


def median_of(values: Sequence[float]) -> float:
    return statistics.median(values)


def interleaved(
    subjects: Mapping[str, Callable[[], object]], calls: int, repeat: int
) -> dict[str, list[float]]:
    """Time each subject ``calls`` times in ms, call by call, rotating who goes first."""
    samples: dict[str, list[float]] = {name: [] for name in subjects}
    order = list(subjects)
    for i in range(calls):
        shift = (i + repeat) % len(order)
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            subjects[name]()
            samples[name].append((time.perf_counter() - start) * 1000)
    return samples


@dataclass(frozen=True)
class Trend:
    """A least-squares line through ``(x, y)`` samples: its slope and the slope's standard
    error (the noise: a slope within about two standard errors of zero is no trend).

    ``stderr`` allows for residuals that move together (Santer et al., 2000, J. Geophys. Res.
    105(D6)): with lag-1 autocorrelation ``r`` > 0 the samples count as ``n (1 - r) / (1 + r)``
    independent ones. Resident memory is such a series: it steps up to a new high-water mark
    and stays there, and a single step fits a slope whose plain standard error is small.
    NaN when fewer than three samples count as independent: the series cannot tell.
    """

    slope: float
    stderr: float
    residual_sd: float
    lag1: float = math.nan  # autocorrelation of neighbouring residuals
    plain_stderr: float = math.nan  # as if every residual were independent


def trend(xs: Sequence[float], ys: Sequence[float]) -> Trend:
    """Ordinary least squares of ``ys`` on ``xs``; NaN figures for fewer than three samples."""
    n = len(xs)
    if n != len(ys):
        raise ValueError("trend of series of different lengths")
    if n < 3:
        return Trend(math.nan, math.nan, math.nan)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return Trend(math.nan, math.nan, math.nan)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    residuals = [y - (mean_y + slope * (x - mean_x)) for x, y in zip(xs, ys, strict=True)]
    squares = sum(r * r for r in residuals)
    plain = math.sqrt(squares / (n - 2) / sxx)
    neighbours = zip(residuals, residuals[1:], strict=False)
    lag1 = sum(a * b for a, b in neighbours) / squares if squares else 0.0
    effective_n = n * (1 - lag1) / (1 + lag1) if lag1 > 0 else n
    stderr = plain * math.sqrt((n - 2) / (effective_n - 2)) if effective_n > 2 else math.nan
    return Trend(slope, stderr, math.sqrt(squares / (n - 2)), lag1, plain)
