"""The pure parts of connection caps (``meshd.conns.limits``, ``connection_budget``) as tables,
and the caps as written in meshd.toml."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.config.parse import parse_host_config
from meshd.config.schema import (
    DEFAULT_ADMIN_LIMITS,
    DEFAULT_INBOUND_LIMITS,
    DEFAULT_OUTBOUND_LIMITS,
    ListenerLimits,
)
from meshd.conns.fdlimit import connection_budget
from meshd.conns.limits import Admission, ProcessCount, RefusalLog, Refused, TrimPolicy
from meshd.errors import ConfigError


def test_admission_refuses_by_listener_source_and_process_and_counts_nothing_then() -> None:
    process = ProcessCount(5)
    a = Admission(ListenerLimits(4, 2), process)
    b = Admission(ListenerLimits(10), process)
    assert [a.admit("x"), a.admit("x"), a.admit("x")] == [None, None, Refused.SOURCE_LIMIT]
    assert [a.admit("y"), a.admit("y")] == [None, None]
    assert a.admit("z") is Refused.LISTENER_LIMIT
    assert (a.open, a.by_source) == (4, {"x": 2, "y": 2})
    assert b.admit("q") is None
    assert b.admit("q") is Refused.PROCESS_LIMIT  # 5 open across both listeners
    a.release("x")
    a.release("x")
    assert a.by_source == {"y": 2} and process.open == 3
    assert b.admit("q") is None


@pytest.mark.parametrize(("reason", "text"), [
    (Refused.LISTENER_LIMIT, "1 connections open (max_connections = 1)"),
    (Refused.SOURCE_LIMIT, "1 connections open from 10.0.0.1 (max_connections_per_source = 1)"),
    (Refused.PROCESS_LIMIT, "1 connections open in this process, the most its file descriptor "
                            "limit allows (9)"),
])
def test_a_refusal_names_the_cap(reason: Refused, text: str) -> None:
    a = Admission(ListenerLimits(1, 1), ProcessCount(9))
    a.admit("10.0.0.1")
    assert a.describe(reason, "10.0.0.1") == text


def test_trim_after_a_flood_has_halved_never_for_a_quiet_listener() -> None:
    quiet = TrimPolicy(min_peak=256)
    for n in range(1, 100):
        quiet.opened(n)
    assert not any(quiet.closed(n) for n in range(98, -1, -1))
    flood = TrimPolicy(min_peak=256)
    for n in range(1, 5001):
        flood.opened(n)
    trims = [n for n in range(4999, -1, -1) if flood.closed(n)]
    assert trims == [2500, 1250, 625, 312, 156]


def test_refusal_log_lets_one_line_through_per_interval_and_counts_the_rest() -> None:
    log = RefusalLog(interval=10.0)
    assert log.should_log("inbound", Refused.SOURCE_LIMIT, 0.0) == 0
    assert log.should_log("inbound", Refused.SOURCE_LIMIT, 1.0) is None
    assert log.should_log("inbound", Refused.SOURCE_LIMIT, 2.0) is None
    assert log.should_log("inbound", Refused.LISTENER_LIMIT, 2.0) == 0  # another cap
    assert log.should_log("admin", Refused.SOURCE_LIMIT, 2.0) == 0  # another listener
    assert log.should_log("inbound", Refused.SOURCE_LIMIT, 10.0) == 2


@pytest.mark.parametrize(("soft", "budget"), [(1024, 384), (20000, 9488), (65536, 32256),
                                               (8, 3)])
def test_connection_budget_leaves_room_for_two_descriptors_each(soft: int, budget: int) -> None:
    assert connection_budget(soft) == budget


HOST: dict[str, Any] = {
    "node": "a", "trust_domain": "t.mesh",
    "ca": {"url": "https://127.0.0.1:8443", "fingerprint": "sha256:" + "0" * 64,
           "token_file": "t"},
}


def test_caps_default_and_come_from_meshd_toml() -> None:
    config = parse_host_config(HOST)
    assert (config.inbound_limits, config.outbound_limits, config.admin_limits) == \
        (DEFAULT_INBOUND_LIMITS, DEFAULT_OUTBOUND_LIMITS, DEFAULT_ADMIN_LIMITS)
    assert config.inbound_handshake_timeout == 10.0
    config = parse_host_config(HOST | {
        "inbound": {"max_connections": 500, "max_connections_per_source": 50,
                    "handshake_timeout": "3s"},
        "outbound": {"max_connections": 64}, "admin": {"max_connections": 8}})
    assert config.inbound_limits == ListenerLimits(500, 50)
    assert config.outbound_limits == ListenerLimits(64)
    assert config.admin_limits == ListenerLimits(8, 8)
    assert config.inbound_handshake_timeout == 3.0


@pytest.mark.parametrize(("table", "value", "where", "reason"), [
    ("inbound", {"max_connections": 0}, "inbound.max_connections",
     "expected a positive number of connections, got 0"),
    ("inbound", {"max_connections": 10, "max_connections_per_source": 20},
     "inbound.max_connections_per_source", "20 is more than inbound.max_connections (10): a "
     "source could never reach it"),
    ("inbound", {"handshake_timeout": "0s"}, "inbound.handshake_timeout",
     "duration must be greater than zero"),
    ("admin", {"max_connections": "many"}, "admin.max_connections", "expected an integer, got str"),
    ("outbound", {"max_connections_per_source": 5}, "outbound.max_connections_per_source",
     "unknown key"),
])
def test_bad_caps_are_refused_with_file_key_and_reason(table: str, value: dict[str, Any],
                                                       where: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_host_config(HOST | {table: value}, "hosts/a.toml")
    text = str(caught.value)
    assert "hosts/a.toml" in text and where in text and reason in text, text
