"""The charts' series math by tables: rate and success from counter increases (a restarted meshd's
reset included), no traffic shown as a dash and not as 100 %, p99 from bucket increases (+Inf too),
hosts summed and a host back from a gap averaged, columns over time, bounded ring buffers; and
the charts' scale and bars."""

from __future__ import annotations

import pytest
from rich.console import Console
from tui_data import T0, fixed_model

from meshd.metrics import Metrics
from tui import fmt
from tui.charts import (
    P99,
    RATE,
    SUCCESS,
    SubsetChart,
    SubsetCharts,
    SubsetSparks,
    bar_cells,
    chart_lines,
    destination_charts,
    nice_ceiling,
    scale,
)
from tui.prom import Buckets, MetricSample, parse_metrics
from tui.series import (
    HostIncrease,
    Point,
    Reading,
    SubsetSeries,
    columns,
    increase,
    latest,
    points_at,
    reading,
)

INF = float("inf")
OK = "200"


def sample(requests: dict[str, float], buckets: Buckets = ()) -> MetricSample:
    """One meshd's scrape: web's requests to payments v1 by code, and their latency buckets."""
    return MetricSample(
        {("outbound", "web", "payments", "v1", code): n for code, n in requests.items()},
        {("outbound", "payments", "v1"): buckets} if buckets else {})


def reqs(**by_code: float) -> dict[str, float]:
    """``c200=3`` -> {"200": 3}; ``c=2``: requests that got no status."""
    return {code.removeprefix("c"): n for code, n in by_code.items()}


# -- one meshd's increase between two scrapes ----------------------------------------------------


@pytest.mark.parametrize(("old", "new", "requests", "errors"), [
    ({"c200": 10}, {"c200": 25}, 15, 0),
    ({"c200": 10, "c503": 1}, {"c200": 25, "c503": 4}, 18, 3),
    ({"c200": 10, "c500": 2}, {"c200": 10, "c500": 2}, 0, 0),  # no traffic
    ({"c200": 100}, {"c200": 7}, 7, 0),  # the meshd restarted: counts from zero
    ({"c200": 100, "c503": 50}, {"c200": 7, "c503": 1}, 8, 1),
    ({}, {"c200": 3, "c404": 2}, 5, 0),  # a 4xx is an answer, not a failure
    ({}, {"c": 2, "c200": 2}, 4, 2),  # no status at all (a reset connection) is a failure
])
def test_increase_counts_requests_and_5xx_with_resets(
    old: dict[str, float], new: dict[str, float], requests: float, errors: float,
) -> None:
    got = increase(sample(reqs(**new)), sample(reqs(**old)))
    assert got[("payments", "v1")][:2] == (requests, errors)


def test_increase_sums_calling_services_and_skips_inbound() -> None:
    old = MetricSample({("outbound", "web", "payments", "v1", OK): 10,
                        ("outbound", "admin", "payments", "v1", OK): 1,
                        ("inbound", "web", "payments", "", OK): 10})
    new = MetricSample({("outbound", "web", "payments", "v1", OK): 20,
                        ("outbound", "admin", "payments", "v1", OK): 3,
                        ("inbound", "web", "payments", "", OK): 40})
    assert increase(new, old) == {("payments", "v1"): (12, 0, ())}


@pytest.mark.parametrize(("old", "new", "delta"), [
    (((0.1, 5), (1.0, 9), (INF, 10)), ((0.1, 8), (1.0, 14), (INF, 16)),
     ((0.1, 3), (1.0, 5), (INF, 6))),
    (((0.1, 5), (1.0, 9), (INF, 10)), ((0.1, 1), (1.0, 2), (INF, 2)),
     ((0.1, 1), (1.0, 2), (INF, 2))),  # reset
    ((), ((0.1, 1), (INF, 1)), ((0.1, 1), (INF, 1))),  # first scrape of that series
])
def test_increase_of_latency_buckets(old: Buckets, new: Buckets, delta: Buckets) -> None:
    got = increase(sample(reqs(c200=1), new), sample(reqs(c200=1), old))
    assert got[("payments", "v1")][2] == delta


# -- readings: rate, success, p99 ----------------------------------------------------------------


@pytest.mark.parametrize(("points", "rate", "success", "p99"), [
    ([Point(1, 1.0, 20, 0, ((0.1, 20), (INF, 20)))], 20.0, 1.0, pytest.approx(0.099)),
    ([Point(1, 1.0, 20, 1)], 20.0, 0.95, None),
    ([Point(1, 1.0, 0, 0)], 0.0, None, None),  # no traffic: a dash, not 100 %
    ([Point(1, 1.0, 10, 10)], 10.0, 0.0, None),
    # two intervals: counts summed, then divided (not an average of ratios)
    ([Point(1, 1.0, 90, 0), Point(2, 1.0, 10, 10)], 50.0, 0.9, None),
    # p99 from summed bucket increases: 98 fast, 2 slow
    ([Point(1, 1.0, 50, 0, ((0.01, 49), (1.0, 50), (INF, 50))),
      Point(2, 1.0, 50, 0, ((0.01, 49), (1.0, 50), (INF, 50)))],
     50.0, 1.0, pytest.approx(0.505)),
    # the slowest in +Inf: the largest finite bound, not infinity
    ([Point(1, 2.0, 10, 0, ((0.01, 0), (0.5, 0), (INF, 10)))], 5.0, 1.0, 0.5),
    ([Point(1, 2.0, 0, 0, ((0.01, 0), (INF, 0)))], 0.0, None, None),
])
def test_reading(points: list[Point], rate: float, success: float | None,
                 p99: object) -> None:
    got = reading(points)
    assert got is not None
    assert (got.rate, got.success, got.p99) == (rate, success, p99)


def test_no_point_is_no_reading_and_shows_a_dash() -> None:
    assert reading([]) is None
    assert fmt.percent(Reading(1.0, 0, 0, ()).success) == fmt.DASH


# -- a refresh: hosts summed, a host back from a gap averaged ------------------------------------


def scrape(ok: float, failed: float, slow: float) -> MetricSample:
    return sample(reqs(c200=ok, c503=failed),
                  ((0.05, ok + failed - slow), (0.5, ok + failed), (INF, ok + failed)))


def test_points_sum_the_hosts_calling_a_subset() -> None:
    a = HostIncrease(1.0, scrape(30, 0, 0), scrape(10, 0, 0))
    b = HostIncrease(1.0, scrape(12, 2, 4), scrape(2, 0, 0))
    point = points_at(T0, 1.0, [a, b])[("payments", "v1")]
    assert (point.requests, point.errors) == (32, 2)
    assert point.latency == ((0.05, 28), (0.5, 32), (INF, 32))
    got = reading([point])
    assert got is not None and got.rate == 32 and got.success == pytest.approx(30 / 32)


def test_a_host_back_after_a_gap_adds_its_average_not_a_spike() -> None:
    # unreachable for 9 refreshes: its 100 requests over 10 s count as 10 in this second
    back = HostIncrease(10.0, scrape(200, 0, 0), scrape(100, 0, 0))
    point = points_at(T0, 1.0, [back])[("payments", "v1")]
    assert point.requests == pytest.approx(10)
    assert point.latency[-1] == (INF, pytest.approx(10))


def series_after(*scrapes: MetricSample | None, max_points: int = 600) -> SubsetSeries:
    """A series fed one scrape of one meshd per second (None: it did not answer)."""
    series = SubsetSeries(max_points)
    last: tuple[float, MetricSample] | None = None
    for i, new in enumerate(scrapes):
        at = T0 + i
        hosts = [] if new is None or last is None else [HostIncrease(at - last[0], new, last[1])]
        series.add(at, hosts)
        if new is not None:
            last = (at, new)
    return series


def test_series_a_subset_that_goes_quiet_gets_empty_points_and_a_silent_refresh_a_gap() -> None:
    series = series_after(scrape(10, 0, 0), scrape(20, 0, 0), scrape(20, 0, 0), None,
                          scrape(25, 0, 0))
    points = list(series.of("payments")["v1"])
    # at 4 s: the 5 requests of the last 2 s, averaged over them (the rest is in the gap)
    assert [(p.at - T0, p.requests) for p in points] == [(1, 10), (2, 0), (4, 2.5)]
    # the refresh at 3 s has no point: that column is blank, not zero
    cols = columns(points, T0 + 4, 4, span=4.0)
    assert [None if c is None else c.rate for c in cols] == [10.0, 0.0, None, 2.5]
    assert cols[1] is not None and cols[1].success is None


def test_series_ring_buffer_is_bounded() -> None:
    series = series_after(*(scrape(10.0 * i, 0, 0) for i in range(50)), max_points=8)
    points = series.of("payments")["v1"]
    assert len(points) == 8
    assert points[-1].at == T0 + 49


@pytest.mark.parametrize(("ats", "width", "span", "filled"), [
    ([1, 2, 3, 4], 4, 4.0, [1, 1, 1, 1]),
    ([1, 2, 3, 4], 2, 4.0, [2, 2]),
    ([3, 4], 4, 4.0, [0, 0, 1, 1]),  # the console started 2 s ago: the left is blank
    ([0, 4], 4, 4.0, [0, 0, 0, 1]),  # older than the span: left out
])
def test_columns_place_points_by_time(ats: list[float], width: int, span: float,
                                      filled: list[int]) -> None:
    points = [Point(T0 + at, 1.0, 1.0) for at in ats]
    cols = columns(points, T0 + 4, width, span)
    assert [0 if c is None else round(c.elapsed) for c in cols] == filled


def test_latest_is_the_window_up_to_now() -> None:
    points = [Point(T0 + i, 1.0, float(i)) for i in range(1, 11)]
    got = latest(points, T0 + 10, 5.0)
    assert got is not None and (got.elapsed, got.requests) == (5.0, 40.0)


# -- parsing: the histogram summed over labels the console does not split by ---------------------


def test_parse_sums_latency_buckets_over_other_labels() -> None:
    text = "\n".join(
        f'meshd_request_duration_seconds_bucket{{direction="outbound",destination="payments",'
        f'subset="v1",source="{src}",code="{code}",le="{le}"}} {n}'
        for src, code, le, n in [("web", "200", "0.1", 3), ("web", "200", "+Inf", 4),
                                 ("web", "503", "0.1", 0), ("web", "503", "+Inf", 1),
                                 ("admin", "200", "0.1", 2), ("admin", "200", "+Inf", 2)])
    parsed = parse_metrics("# TYPE meshd_request_duration_seconds histogram\n" + text + "\n")
    assert parsed.latency[("outbound", "payments", "v1")] == ((0.1, 5.0), (INF, 7.0))


def test_series_from_meshd_own_metrics() -> None:
    """Two real scrapes of meshd's registry: 10 requests, 1 of them a 503, 9 fast, 1 slow."""
    m = Metrics()
    before = parse_metrics(m.render().decode())
    for i in range(10):
        m.request_done("outbound", "web", "payments", "v2", 503 if i == 0 else 200,
                       0.004 if i else 2.0)
    after = parse_metrics(m.render().decode())
    point = points_at(T0, 2.0, [HostIncrease(2.0, after, before)])[("payments", "v2")]
    got = reading([point])
    assert got is not None
    assert (got.rate, got.success) == (5.0, 0.9)
    assert got.p99 is not None and 1.0 < got.p99 <= 2.5


# -- charts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "ceiling"), [
    (0.0, 1.0), (0.3, 0.5), (1.0, 1.0), (1.2, 2.0), (2.4, 2.5), (18.0, 20.0), (21, 25),
    (60, 100), (0.187, 0.2), (1200, 2000),
])
def test_nice_ceiling(value: float, ceiling: float) -> None:
    assert nice_ceiling(value) == pytest.approx(ceiling)


@pytest.mark.parametrize(("metric", "values", "bounds"), [
    (RATE, [3.0, 18.0, None], (0.0, 20.0)),
    (RATE, [None, None], (0.0, 1.0)),
    (SUCCESS, [1.0, 0.995], (0.9, 1.0)),
    (SUCCESS, [1.0, 0.76], (0.5, 1.0)),  # a failing canary is not flattened at the top
    (SUCCESS, [0.2], (0.0, 1.0)),
    (SUCCESS, [None], (0.9, 1.0)),
    (P99, [0.115, 0.187], (0.0, 0.2)),
])
def test_scale(metric: object, values: list[float | None], bounds: tuple[float, float]
               ) -> None:
    assert scale(metric, values) == pytest.approx(bounds)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "present", "rows", "cells"), [
    (None, False, 3, [" ", " ", " "]),  # no point: blank
    (None, True, 3, [" ", " ", "·"]),  # a point without traffic: a dot
    (0.0, True, 3, [" ", " ", "▁"]),  # zero is drawn
    (10.0, True, 3, ["█", "█", "█"]),
    (5.0, True, 3, [" ", "▄", "█"]),
    (20.0, True, 3, ["█", "█", "█"]),  # above the top: clipped
    (5.0, True, 1, ["▅"]),  # one row: eight levels from ▁ (bottom) to █ (top)
    (0.0, True, 1, ["▁"]),
])
def test_bar_cells(value: float | None, present: bool, rows: int, cells: list[str]) -> None:
    assert bar_cells(value, present, 0.0, 10.0, rows) == cells


def test_a_chart_is_labelled_with_subset_metric_value_and_axis() -> None:
    points = tuple(Point(T0 + i, 1.0, 20.0, 1.0 if i > 8 else 0.0) for i in range(1, 11))
    chart = SubsetChart("v2", "v2 10%", points)
    rate = [line.plain for line in chart_lines(chart, RATE, 24, T0 + 10, 5.0, span=10.0)]
    assert rate[0].startswith("v2 10% rate 20.0/s")
    assert rate[1].endswith("20/s  ") and rate[3].endswith("0/s   ")
    assert all(len(line) == 24 for line in rate)
    success = [line.plain for line in chart_lines(chart, SUCCESS, 24, T0 + 10, 5.0,
                                                  span=10.0)]
    assert success[0].startswith("v2 10% success 98.0%")  # 2 of 100 failed in the last 5 s
    assert success[1].endswith("100%  ") and success[3].endswith("90%   ")
    p99 = [line.plain for line in chart_lines(chart, P99, 24, T0 + 10, 5.0, span=10.0)]
    assert p99[0] == f"v2 10% p99 {fmt.DASH}".ljust(24)  # no histogram: no p99


def render(renderable: object, width: int) -> list[str]:
    console = Console(width=width, color_system=None, record=True)
    console.print(renderable)
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_charts_three_abreast_at_80_columns_and_stacked_when_narrow() -> None:
    model = fixed_model(history=True)
    charts = destination_charts(model, "payments")
    assert [c.title for c in charts] == ["v1 90%", "v2 10%"]
    wide = render(SubsetCharts(charts, model.last_at, model.window), 78)
    assert wide[0] == "last 5m, a column ≈ 18s; values now: last 5.0s"
    assert wide[1].split() == ["v1", "90%", "rate", "18.0/s", "v1", "90%", "success", "100%",
                               "v1", "90%", "p99", "115ms"]
    assert wide[5].split()[:4] == ["v2", "10%", "rate", "2.00/s"]
    assert "success 76.0%" in wide[5]
    assert len(wide) == 1 + 2 * 4 and max(map(len, wide)) <= 78
    narrow = render(SubsetCharts(charts, model.last_at, model.window), 50)
    assert len(narrow) == 1 + 2 * 3 * 4 and max(map(len, narrow)) <= 50


def test_compact_charts_have_one_line_per_subset() -> None:
    model = fixed_model(history=True)
    charts = destination_charts(model, "payments", titled=False)
    lines = render(SubsetSparks(charts, model.last_at, model.window), 78)
    assert lines[0].split() == ["last", "5m", "rate", "≤25/s", "success", "≥50%", "p99",
                                "≤250ms"]
    v1, v2 = lines[1].split(), lines[2].split()
    assert (v1[0], v1[2], v1[4], v1[6]) == ("v1", "18.0/s", "100%", "115ms")
    assert (v2[0], v2[2], v2[4], v2[6]) == ("v2", "2.00/s", "76.0%", "235ms")
    assert len(lines) == 3 and max(map(len, lines)) <= 78


def test_no_caller_no_chart() -> None:
    model = fixed_model(history=True)
    assert destination_charts(model, "web") == []
    assert render(SubsetCharts([], model.last_at, model.window, empty="nobody"), 78) == [
        "nobody"]
