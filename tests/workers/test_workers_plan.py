"""The pure part of the worker processes: how many, each one's share of a host-wide limit, and
the host's metrics and state merged from every process."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshd.errors import ConfigError
from meshd.workers.plan import (
    AUTO_CAP,
    merge_endpoint_states,
    merge_families,
    merge_open,
    share,
    share_rate,
    worker_count,
)


@pytest.mark.parametrize(("configured", "env", "cores", "expected"), [
    (None, {}, 2, 2),  # auto: the usable cores
    (None, {}, 1, 1),
    (None, {}, 96, AUTO_CAP),  # capped
    (3, {}, 96, 3),  # the file says
    (3, {"MESHD_WORKERS": "1"}, 96, 1),  # the environment wins
    (1, {"MESHD_WORKERS": "auto"}, 4, 4),
    (2, {"MESHD_WORKERS": " "}, 4, 2),  # blank: unset
])
def test_worker_count(configured: int | None, env: dict[str, str], cores: int,
                      expected: int) -> None:
    assert worker_count(configured, env, cores) == expected


@pytest.mark.parametrize("raw", ["0", "-1", "two", "65", "1.5"])
def test_a_malformed_worker_count_in_the_environment_is_an_error(raw: str) -> None:
    with pytest.raises(ConfigError, match="MESHD_WORKERS"):
        worker_count(None, {"MESHD_WORKERS": raw}, 2)


def test_each_worker_holds_its_share_of_a_limit() -> None:
    assert share(None, 4) is None  # no limit stays no limit
    assert share(100, 1) == 100
    assert share(100, 4) == 25
    assert share(10, 4) == 3  # rounded up
    assert share(1, 4) == 1  # never none at all
    assert share_rate(10.0, 4) == 2.5
    assert share_rate(10.0, 1) == 10.0


def _families(requests: int, open_now: int, generation: int, seconds: list[float]
              ) -> CollectorRegistry:
    r = CollectorRegistry()
    c = Counter("meshd_requests", "requests", ["code"], registry=r)
    if requests:
        c.labels("200").inc(requests)
    Gauge("meshd_connections_open", "open", ["listener"], registry=r).labels("x").set(open_now)
    Gauge("meshd_config_generation", "generation", registry=r).set(generation)
    h = Histogram("meshd_request_duration_seconds", "d", buckets=(0.1, 1.0), registry=r)
    for value in seconds:
        h.observe(value)
    return r


def _value(families: list, sample_name: str, **labels: str) -> float:
    for family in families:
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v
                                                  for k, v in labels.items()):
                return float(sample.value)
    raise KeyError(sample_name)


def test_metrics_are_summed_over_the_workers_and_gauges_kept_by_their_owner() -> None:
    own = _families(0, 1, generation=7, seconds=[])  # the supervisor: admin connection, table
    one = _families(3, 2, generation=0, seconds=[0.05, 0.5])
    two = _families(4, 5, generation=0, seconds=[2.0])
    merged = merge_families(own.collect(), [list(one.collect()), list(two.collect())],
                            frozenset({"meshd_connections_open"}))
    assert _value(merged, "meshd_requests_total", code="200") == 7
    assert _value(merged, "meshd_connections_open", listener="x") == 8  # 1 + 2 + 5
    assert _value(merged, "meshd_config_generation") == 7  # the supervisor's, not summed
    assert _value(merged, "meshd_request_duration_seconds_count") == 3
    assert _value(merged, "meshd_request_duration_seconds_bucket", le="0.1") == 1
    assert _value(merged, "meshd_request_duration_seconds_bucket", le="+Inf") == 3
    assert [f.name for f in merged].count("meshd_requests") == 1  # one family per name


def test_proxy_state_is_merged_over_the_workers() -> None:
    assert merge_open([{"inbound": 1, "outbound": 2}, {"outbound": 3, "gateway": 1}]) == \
        {"inbound": 1, "outbound": 5, "gateway": 1}
    row = {"node": "b", "instance_id": "payments-1", "ejected": False,
           "ejection_remaining_seconds": 0.0, "ejections": 0, "ejection_reason": "",
           "active_requests": 2}
    ejected = row | {"ejected": True, "ejection_remaining_seconds": 12.5, "ejections": 1,
                     "ejection_reason": "5xx", "active_requests": 1}
    merged = merge_endpoint_states([{"payments": [row]}, {"payments": [ejected]}])
    assert merged == {"payments": [row | {"ejected": True, "ejection_remaining_seconds": 12.5,
                                          "ejections": 1, "ejection_reason": "5xx",
                                          "active_requests": 3}]}
