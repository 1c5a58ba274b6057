"""Stacked bar charts as geometry for an SVG template; pure.

The template draws what ``stacked`` returns (rectangles, ticks, labels), so every label goes
through autoescaping like any other text. Series get colours by index from the stylesheet
(``.s0`` … ``.s7``); past eight they repeat, and the table under each chart has the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 8, 28
COLOURS = 8


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: int
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    at: float
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
            bars.append(Bar(x, y, width, height, colour % COLOURS, f"{day} {name}: {label(value)}"))
            base += value
    every = max(1, math.ceil(len(days) / 10))  # at most ten dates under the axis
    x_ticks = [
        Tick(LEFT + i * slot + slot / 2, day[5:]) for i, day in enumerate(days) if i % every == 0
    ]
    y_ticks = [Tick(TOP + plot_h - f * plot_h, label(top * f)) for f in (0.0, 0.5, 1.0)]
    legend = [(i % COLOURS, name) for i, name in enumerate(names)]
    return Chart(WIDTH, HEIGHT, LEFT, TOP + plot_h, bars, x_ticks, y_ticks, legend)
