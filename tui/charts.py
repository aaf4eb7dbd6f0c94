"""Charts of a destination's per-subset series (tui/series.py) as Rich renderables: rate, success
rate and p99 side by side, one row of charts per subset, in block characters (they read the
same over SSH in any terminal font). Each chart is labelled with its subset, metric and current
value, and its axis with the top and bottom of its scale. The layout follows the width it is
given: three charts abreast from ``3 * MIN_CHART`` columns, stacked below that; a compact form
(one line per subset, a one-row sparkline per metric) serves the split editor."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from tui import fmt
from tui.fmt import BLOCKS, STYLE, Status
from tui.model import MeshModel
from tui.series import SPAN, Point, Reading, by_subset, columns, latest
from tui.views import SUCCESS_FAIL, SUCCESS_WARN, subset_views

AXIS = 6  # columns of a chart's axis labels
GAP = 2  # between charts abreast
MIN_CHART = 22
ROWS = 3  # a chart's height in lines (24 levels)


@dataclass(frozen=True)
class Metric:
    name: str  # as labelled
    value: Callable[[Reading], float | None]
    label: Callable[[float | None], str]  # of a current value
    axis: Callable[[float], str]  # of a bound of the axis (a round number)
    style: Callable[[float], str]  # of a bar or a current value


def rate_axis(value: float) -> str:
    return f"{value / 1000:g}k/s" if value >= 1000 else f"{value:g}/s"


def percent_axis(value: float) -> str:
    return f"{value * 100:g}%"


def duration_axis(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds < 0.001:
        return f"{seconds * 1e6:g}µs"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def seconds_text(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 10 else fmt.age(seconds)


def success_style(value: float) -> str:
    if value < SUCCESS_FAIL:
        return STYLE[Status.FAIL]
    return STYLE[Status.WARN] if value < SUCCESS_WARN else STYLE[Status.OK]


RATE = Metric("rate", lambda r: r.rate, fmt.rate, rate_axis, lambda v: fmt.RATE_STYLE)
SUCCESS = Metric("success", lambda r: r.success, fmt.percent, percent_axis, success_style)
P99 = Metric("p99", lambda r: r.p99, fmt.duration, duration_axis,
             lambda v: fmt.LATENCY_STYLE)
METRICS = (RATE, SUCCESS, P99)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten at or above ``value`` (> 0)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * power * (1 + 1e-9):
            return step * power
    return 10.0 * power


def scale(metric: Metric, values: Sequence[float | None]) -> tuple[float, float]:
    """(bottom, top) of a chart's axis. Rate and p99 from zero to a round number above the
    largest value; success up to 100 % from 90 % (50 %, or 0 %) when every value is above it,
    so that a canary at 97 % does not look like one at 100 %."""
    found = [v for v in values if v is not None]
    if metric is SUCCESS:
        low = min(found, default=1.0)
        return next(b for b in (0.9, 0.5, 0.0) if low >= b), 1.0
    top = max(found, default=0.0)
    if metric is P99 and top > 0:
        return 0.0, _duration_ceiling(top)
    return 0.0, nice_ceiling(top)


def _duration_ceiling(seconds: float) -> float:
    # a round number of milliseconds (or microseconds), not 0.25 s shown as "250ms" by chance
    return nice_ceiling(seconds * 1000) / 1000


def bar_cells(value: float | None, present: bool, bottom: float, top: float, rows: int
              ) -> list[str]:
    """One column of a chart, top line first. ``present``: a point covers this column (without
    one it is blank); a point without a value (no traffic for a success rate) is a dim dot."""
    if not present:
        return [" "] * rows
    if value is None:
        return [" "] * (rows - 1) + ["·"]
    span = top - bottom
    fraction = 0.0 if span <= 0 else min(1.0, max(0.0, (value - bottom) / span))
    if rows == 1:
        return [BLOCKS[round(fraction * (len(BLOCKS) - 1))]]
    eighths = round(fraction * rows * 8)
    cells = []
    for row in reversed(range(rows)):
        fill = min(8, max(0, eighths - row * 8))
        cells.append("█" if fill == 8 else (BLOCKS[fill - 1] if fill else " "))
    if eighths == 0:
        cells[-1] = BLOCKS[0]  # a value at the bottom of the axis is still drawn
    return cells


@dataclass(frozen=True)
class SubsetChart:
    """One subset's points, and how to name it (``title``: "v2 10%")."""

    subset: str
    title: str
    points: tuple[Point, ...]


def chart_lines(chart: SubsetChart, metric: Metric, width: int, now: float, window: float,
                rows: int = ROWS, span: float = SPAN) -> list[Text]:
    """A chart ``width`` columns wide: its label line (subset, metric, current value over the
    last ``window`` seconds), then ``rows`` lines of bars with the axis on the right."""
    bars = max(1, width - AXIS - 1)
    cols = columns(chart.points, now, bars, span)
    values = [None if c is None else metric.value(c) for c in cols]
    bottom, top = scale(metric, values)
    current = latest(chart.points, now, window)
    value = None if current is None else metric.value(current)
    head = Text()
    head.append(chart.title, style="bold")
    head.append(f" {metric.name} ", style="dim")
    head.append(metric.label(value), style="bold " + metric.style(value)
                if value is not None else "dim")
    lines = [head]
    grid = [bar_cells(v, c is not None, bottom, top, rows) for v, c in zip(values, cols,
                                                                          strict=True)]
    for row in range(rows):
        line = Text()
        for v, cells in zip(values, grid, strict=True):
            cell = cells[row]
            line.append(cell, style="dim" if v is None or (cell == BLOCKS[0] and not v)
                        else metric.style(v))
        axis = metric.axis(top) if row == 0 else (
            metric.axis(bottom) if row == rows - 1 else "")
        line.append(f" {axis:<{AXIS}}"[:AXIS + 1], style="dim")
        lines.append(line)
    return [line_fit(line, width) for line in lines]


def line_fit(line: Text, width: int) -> Text:
    line = line.copy()
    line.truncate(width, overflow="ellipsis", pad=True)
    return line


def side_by_side(blocks: Sequence[Sequence[Text]], gap: int) -> Iterator[Text]:
    for parts in zip(*blocks, strict=True):
        line = Text()
        for i, part in enumerate(parts):
            if i:
                line.append(" " * gap)
            line.append_text(part)
        yield line


class SubsetCharts:
    """Every subset's three charts, laid out for the width Rich gives (a renderable)."""

    def __init__(self, charts: Sequence[SubsetChart], now: float, window: float,
                 span: float = SPAN, rows: int = ROWS, empty: str = "no traffic seen") -> None:
        self.charts = tuple(charts)
        self.now, self.window, self.span, self.rows = now, window, span, rows
        self.empty = empty

    def lines(self, width: int) -> list[Text]:
        if not self.charts:
            return [Text(self.empty, style="dim")]
        abreast = width >= len(METRICS) * MIN_CHART + GAP * (len(METRICS) - 1)
        chart_width = (width - GAP * (len(METRICS) - 1)) // len(METRICS) if abreast else width
        bars = max(1, chart_width - AXIS - 1)
        out = [line_fit(Text(f"last {seconds_text(self.span)}, a column ≈ "
                             f"{seconds_text(self.span / bars)}; values now: last "
                             f"{seconds_text(self.window)}", style="dim"), width)]
        for chart in self.charts:
            blocks = [chart_lines(chart, m, chart_width, self.now, self.window, self.rows,
                                  self.span) for m in METRICS]
            if abreast:
                out.extend(side_by_side(blocks, GAP))
            else:
                out.extend(line for block in blocks for line in block)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from _joined(self.lines(options.max_width))


class SubsetSparks:
    """The compact form: a header naming each metric with its axis, then one line per subset
    with a one-row sparkline and the current value of each metric (a renderable)."""

    def __init__(self, charts: Sequence[SubsetChart], now: float, window: float,
                 span: float = SPAN, indent: int = 2) -> None:
        self.charts = tuple(charts)
        self.now, self.window, self.span, self.indent = now, window, span, indent

    def lines(self, width: int) -> list[Text]:
        pad = " " * self.indent
        if not self.charts:
            return [Text(pad + "no traffic seen", style="dim")]
        when = "last " + seconds_text(self.span)
        name_width = max(len(when), *(len(c.title) for c in self.charts)) + 1
        cell = max(12, (width - self.indent - name_width) // len(METRICS) - 1)
        value_width = 7
        spark = cell - value_width - 1
        header = Text(pad + f"{when:<{name_width}}", style="bold")
        body = [Text(pad) for _ in self.charts]
        for line, chart in zip(body, self.charts, strict=True):
            line.append(f"{chart.title:<{name_width}}", style="bold")
        for metric in METRICS:
            cols = [columns(c.points, self.now, spark, self.span) for c in self.charts]
            values = [[None if c is None else metric.value(c) for c in row] for row in cols]
            bottom, top = scale(metric, [v for row in values for v in row])
            axis = "≥" + metric.axis(bottom) if metric is SUCCESS else "≤" + metric.axis(top)
            header.append(f"{metric.name} ")
            header.append(f"{axis:<{cell - len(metric.name)}}", style="dim")
            for line, chart, row, row_values in zip(body, self.charts, cols, values,
                                                    strict=True):
                for v, c in zip(row_values, row, strict=True):
                    line.append(bar_cells(v, c is not None, bottom, top, 1)[0],
                                style="dim" if v is None else metric.style(v))
                current = latest(chart.points, self.now, self.window)
                value = None if current is None else metric.value(current)
                line.append(f" {metric.label(value):>{value_width}} ",
                            style="dim" if value is None else "bold " + metric.style(value))
        return [line_fit(line, width) for line in (header, *body)]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from _joined(self.lines(options.max_width))


def _joined(lines: Sequence[Text]) -> Iterator[Text]:
    text = Text()
    for i, line in enumerate(lines):
        if i:
            text.append("\n")
        text.append_text(line)
    yield text


def destination_charts(model: MeshModel, destination: str, titled: bool = True
                       ) -> list[SubsetChart]:
    """A chart per subset of ``destination``: those its route declares, in order, then any
    other subset its callers sent requests to (no split: one, "all"). ``titled``: the title
    carries the subset's weight."""
    found = model.series.of(destination)
    if not found:
        return []
    declared = [s for s in subset_views(model, destination) if s.name]
    weights = {s.name: s.weight for s in declared}
    series = by_subset(found, weights or [""])
    out = []
    for name, points in series.items():
        weight = weights.get(name) if titled else None
        title = (name or "all") + ("" if weight is None else f" {weight}%")
        out.append(SubsetChart(name, title, tuple(points)))
    return out
