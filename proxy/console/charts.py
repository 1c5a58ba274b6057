"""Stacked bar charts as geometry for an SVG template; pure.

The template draws what ``stacked`` returns (rectangles, ticks, labels), so every label goes
through autoescaping like any other text. Series get colours by index from the stylesheet
(``.s0`` … ``.s7``): the seven largest series are drawn, the rest added up as "other", and
the tables under the charts have every number. Coordinates come formatted, so the template
only places them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 8, 28
COLOURS = 8


OTHER = "other"


@dataclass(frozen=True, slots=True)
class Bar:
    x: str
    y: str
    width: str
    height: str
    colour: int
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    at: str
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    left: int
    bottom: float
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    legend: list[tuple[int, str]]


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return float(step * power)
    return float(10 * power)


def stacked(
    days: Sequence[str],
    series: Mapping[str, Mapping[str, float]],
    label: Callable[[float], str],
) -> Chart:
    """One bar per day, stacked by series (series name → day → value)."""
    series = _largest(series, COLOURS - 1)
    names = list(series)
    totals = [sum(series[name].get(day, 0.0) for name in names) for day in days]
    top = nice_ceiling(max(totals, default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(days), 1)
    width = max(min(slot * 0.7, 48.0), 1.0)
    bars = []
    for position, day in enumerate(days):
        x = LEFT + position * slot + (slot - width) / 2
        base = 0.0
        for colour, name in enumerate(names):
            value = series[name].get(day, 0.0)
            if value <= 0:
                continue
            height = value / top * plot_h
            y = TOP + plot_h - (base + value) / top * plot_h
            bars.append(
                Bar(
                    f"{x:.1f}",
                    f"{y:.1f}",
                    f"{width:.1f}",
                    f"{height:.1f}",
                    colour % COLOURS,
                    f"{day} {name}: {label(value)}",
                )
            )
            base += value
    every = max(1, math.ceil(len(days) / 10))  # at most ten dates under the axis
    x_ticks = [
        Tick(f"{LEFT + i * slot + slot / 2:.1f}", day[5:])
        for i, day in enumerate(days)
        if i % every == 0
    ]
    y_ticks = [Tick(f"{TOP + plot_h - f * plot_h:.1f}", label(top * f)) for f in (0.0, 0.5, 1.0)]
    legend = [(i % COLOURS, name) for i, name in enumerate(names)]
    return Chart(WIDTH, HEIGHT, LEFT, TOP + plot_h, bars, x_ticks, y_ticks, legend)


def _largest(
    series: Mapping[str, Mapping[str, float]], keep: int
) -> dict[str, Mapping[str, float]]:
    """The ``keep`` largest series by total, and the rest added up as ``OTHER``."""
    ranked = sorted(series, key=lambda name: -sum(series[name].values()))
    if len(ranked) <= keep + 1:
        return {name: series[name] for name in sorted(series)}
    shown: dict[str, Mapping[str, float]] = {name: series[name] for name in ranked[:keep]}
    rest: dict[str, float] = {}
    for name in ranked[keep:]:
        for day, value in series[name].items():
            rest[day] = rest.get(day, 0.0) + value
    shown[OTHER] = rest
    return shown
