"""Access log lines: the text, JSON and Envoy formats of one entry, Envoy's response flags, the
format's choice (meshd.toml, ``MESHD_ACCESS_LOG``), and real requests through the in-process
mesh written by the daemon's own formatters: every JSON line parses, the two hops of a request
share its trace and link their spans, body bytes are counted, Envoy lines have Envoy's shape."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from proxy_mesh_testing import Mesh
from proxy_testing import eventually

from meshd import logformat
from meshd.logformat import LogFormat
from meshd.proxy import access
from meshd.proxy.access import (
    AccessEntry,
    AccessLog,
    AccessLogFormat,
    format_from_env,
    response_flags,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
APP_SPAN = "b7ad6b7169203331"
HOP_SPAN = "00f067aa0ba902b7"
STARTED = 1_796_342_400.25  # 2026-12-04T00:00:00.250Z

ENTRY = AccessEntry(direction="outbound", source="web", destination="payments", method=b"GET",
                    target=b"/x?y=1", status=200, duration=0.0123, request_id="id-1",
                    route="default", subset="v1", endpoint="b:1", detail="", tries=1)
FULL = dataclasses.replace(
    ENTRY, started=STARTED, bytes_received=5, bytes_sent=120,
    headers=((b"Host", b"payments"), (b"User-Agent", b'curl/8 "quoted"'),
             (b"traceparent", f"00-{TRACE}-{APP_SPAN}-01".encode()),
             (b"X-Forwarded-For", b"10.0.0.1")),
    traceparent=f"00-{TRACE}-{HOP_SPAN}-01".encode())

# Envoy's default format, field by field
ENVOY_LINE = re.compile(
    r'^\[(?P<start>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\] '
    r'"(?P<method>\S+) (?P<path>\S+) (?P<protocol>HTTP/[\d.]+)" (?P<code>\d+) (?P<flags>\S+) '
    r'(?P<received>\d+) (?P<sent>\d+) (?P<duration>\d+) (?P<service_time>\d+|-) '
    r'"(?P<xff>[^"]*)" "(?P<agent>[^"]*)" "(?P<request_id>[^"]*)" "(?P<authority>[^"]*)" '
    r'"(?P<upstream>[^"]*)"$')


def _lines(log: AccessLog, *entries: AccessEntry) -> list[str]:
    with written(LogFormat.TEXT) as out:
        for entry in entries:
            log.record(entry)
    return out.getvalue().splitlines()


@contextmanager
def written(daemon_format: LogFormat) -> Iterator[io.StringIO]:
    """What ``meshd.access`` writes through the daemon's formatter in ``daemon_format``."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logformat.formatter(daemon_format))
    target = logging.getLogger("meshd.access")
    level, propagate = target.level, target.propagate
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    target.propagate = False
    try:
        yield out
    finally:
        target.removeHandler(handler)
        target.setLevel(level)
        target.propagate = propagate


def test_text_lines_keep_their_shape() -> None:
    failed_over = dataclasses.replace(ENTRY, subset="v2", status=503, tries=3,
                                      error="app-connect-failed", failover_from="v1")
    text, failed = _lines(AccessLog(AccessLogFormat.TEXT), ENTRY, failed_over)
    assert text.endswith(" INFO meshd.access: outbound web -> payments route=default "
                         "subset=v1 endpoint=b:1 GET /x?y=1 200 12.3ms id=id-1")
    assert failed.endswith(" INFO meshd.access: outbound web -> payments route=default "
                           "subset=v2 endpoint=b:1 GET /x?y=1 503 12.3ms id=id-1 tries=3 "
                           "error=app-connect-failed failover_from=v1")


def test_json_line_is_the_object_alone_with_every_field() -> None:
    (line,) = _lines(AccessLog(AccessLogFormat.JSON), FULL)
    assert json.loads(line) == {
        "timestamp": "2026-12-04T00:00:00.250Z", "trace_id": TRACE, "span_id": HOP_SPAN,
        "parent_span_id": APP_SPAN, "request_id": "id-1", "direction": "outbound",
        "source": "web", "destination": "payments", "method": "GET", "target": "/x?y=1",
        "protocol": "HTTP/1.1", "route": "default", "subset": "v1", "endpoint": "b:1",
        "status": 200, "grpc_status": "", "flags": "", "bytes_received": 5, "bytes_sent": 120,
        "duration_ms": 12.3, "tries": 1, "user_agent": 'curl/8 "quoted"',
        "authority": "payments", "x_forwarded_for": "10.0.0.1", "error": "", "detail": "",
        "failover_from": ""}
    timed = dataclasses.replace(FULL, upstream_service_time=0.0081)
    assert json.loads(_lines(AccessLog(AccessLogFormat.JSON), timed)[0])[
        "upstream_service_time_ms"] == 8.1


def test_a_new_trace_has_no_parent_span() -> None:
    """The app sent no (or a malformed) traceparent: this hop started the trace."""
    started = dataclasses.replace(FULL, headers=((b"traceparent", b"garbage"),))
    line = json.loads(_lines(AccessLog(AccessLogFormat.JSON), started)[0])
    assert (line["trace_id"], line["span_id"], line["parent_span_id"]) == (TRACE, HOP_SPAN, "")


def test_envoy_line_is_envoys_default_format() -> None:
    (line,) = _lines(AccessLog(AccessLogFormat.ENVOY), FULL)
    assert line == ('[2026-12-04T00:00:00.250Z] "GET /x?y=1 HTTP/1.1" 200 - 5 120 12 - '
                    '"10.0.0.1" "curl/8 %22quoted%22" "id-1" "payments" "b:1"')
    refused = dataclasses.replace(ENTRY, status=503, error="no-healthy-endpoint", endpoint="",
                                  request_id="", upstream_service_time=0.004)
    (line,) = _lines(AccessLog(AccessLogFormat.ENVOY), refused)
    fields = ENVOY_LINE.match(line)
    assert fields is not None, line
    assert fields["flags"] == "UH" and fields["service_time"] == "4"
    assert fields["agent"] == fields["upstream"] == fields["request_id"] == "-"


@pytest.mark.parametrize(("changes", "flags"), [
    ({}, ""),
    ({"status": 503, "error": "no-healthy-endpoint"}, "UH"),
    ({"status": 503, "error": "circuit-open"}, "UO"),
    ({"status": 504, "error": "timeout"}, "UT"),
    ({"status": 504, "error": "per-try-timeout", "tries": 3}, "UT,URX"),
    ({"status": 503, "error": "connect-failed"}, "UF"),
    ({"status": 503, "error": "app-connect-timeout"}, "UF"),
    ({"status": 503, "error": "wrong-identity"}, "UF"),
    ({"status": 502, "error": "upstream-reset"}, "UC"),
    ({"status": 502, "error": "app-bad-response"}, "UPE"),
    ({"status": 500, "error": "fault-injected"}, "FI"),
    ({"status": 500, "error": "fault-injected", "fault_delayed": True}, "DI,FI"),
    ({"fault_delayed": True}, "DI"),
    ({"status": 503, "tries": 2}, "URX"),
    ({"status": 200, "tries": 2}, ""),
    ({"status": 0}, "DC"),
    ({"status": 403, "detail": "access to payments denied"}, ""),
])
def test_response_flags(changes: dict[str, object], flags: str) -> None:
    assert response_flags(dataclasses.replace(ENTRY, **changes)) == flags  # type: ignore[arg-type]


def test_the_variable_wins_over_the_file() -> None:
    envoy = AccessLogFormat.ENVOY
    assert format_from_env({}, envoy) is envoy
    assert format_from_env({"MESHD_ACCESS_LOG": "JSON"}, envoy) is AccessLogFormat.JSON
    assert format_from_env({"MESHD_ACCESS_LOG": " "}, envoy) is envoy
    assert format_from_env({"MESHD_ACCESS_LOG": "xml"}, envoy) is envoy
    assert format_from_env({}) is AccessLogFormat.TEXT
    assert format_from_env({"MESHD_ACCESS_LOG": "off"}) is AccessLogFormat.OFF


def test_access_log_off_formats_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(entry: AccessEntry) -> str:
        raise AssertionError("formatted")

    for name in ("as_text", "as_json", "as_envoy"):
        monkeypatch.setattr(access, name, boom)
    log = AccessLog(AccessLogFormat.OFF)
    assert not log.enabled
    assert _lines(log, ENTRY) == []


# -- real requests through the in-process mesh ----------------------------------------------------

def _set_format(mesh: Mesh, fmt: AccessLogFormat) -> None:
    for host in (mesh.a, mesh.b, mesh.c):
        host.proxy._outbound.access.format = fmt  # the host's one AccessLog, both directions


async def _traffic(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        r = await client.get("/version", headers={
            "traceparent": f"00-{TRACE}-{APP_SPAN}-01", "user-agent": "probe/1",
            "x-request-id": "req-get"})
        assert r.status_code == 200
        r = await client.post("/echo", content=b"x" * 1000, headers={"x-request-id": "req-post"})
        assert r.status_code == 200 and len(r.content) == 1000
        r = await client.get("/big?n=70000", headers={"x-request-id": "req-big"})
        assert r.status_code == 200 and len(r.content) == 70000
    async with httpx.AsyncClient(base_url=mesh.url("orders")) as client:  # no endpoints
        r = await client.get("/", headers={"x-request-id": "req-none"})
        assert r.status_code == 503


@pytest.mark.parametrize("daemon_format", [LogFormat.TEXT, LogFormat.JSON])
async def test_json_lines_of_real_requests_parse_and_link_the_hops(
        mesh: Mesh, daemon_format: LogFormat) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    _set_format(mesh, AccessLogFormat.JSON)
    with written(daemon_format) as out:
        await _traffic(mesh)
        # 3 requests through both hops, 1 refused at the outbound side
        await eventually(lambda: len(out.getvalue().splitlines()) >= 7)
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(entries) == 7
    by = {(e["request_id"], e["direction"]): e for e in entries}

    out_get, in_get = by["req-get", "outbound"], by["req-get", "inbound"]
    assert out_get["trace_id"] == in_get["trace_id"] == TRACE
    assert out_get["parent_span_id"] == APP_SPAN  # the app's span
    assert in_get["parent_span_id"] == out_get["span_id"]  # the caller meshd's span
    assert in_get["span_id"] not in ("", out_get["span_id"])
    assert mesh.v1.seen[0]["headers"]["traceparent"] == f"00-{TRACE}-{in_get['span_id']}-01"
    assert out_get["user_agent"] == in_get["user_agent"] == "probe/1"
    assert out_get["authority"].startswith("127.0.0.1:")
    assert (out_get["route"], out_get["subset"], out_get["status"], out_get["flags"]) == (
        "default", "v1", 200, "")
    assert in_get["subset"] == "v1" and in_get["source"] == "web"
    assert in_get["x_forwarded_for"] == "127.0.0.1"  # added by the caller's meshd
    for e in entries:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["timestamp"])
        assert e["protocol"] == "HTTP/1.1" and e["duration_ms"] >= 0

    for direction in ("outbound", "inbound"):
        post, big = by["req-post", direction], by["req-big", direction]
        assert (post["bytes_received"], post["bytes_sent"]) == (1000, 1000)
        assert (big["bytes_received"], big["bytes_sent"]) == (0, 70000)
    refused = by["req-none", "outbound"]
    assert (refused["status"], refused["flags"], refused["error"]) == (
        503, "UH", "no-healthy-endpoint")


async def test_envoy_lines_of_real_requests(mesh: Mesh) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    _set_format(mesh, AccessLogFormat.ENVOY)
    with written(LogFormat.JSON) as out:
        await _traffic(mesh)
        await eventually(lambda: len(out.getvalue().splitlines()) >= 7)
    lines = out.getvalue().splitlines()
    fields = [ENVOY_LINE.match(line) for line in lines]
    assert all(fields), lines
    by = {(m["request_id"], m["upstream"]): m for m in fields if m is not None}
    big = [m for (rid, _), m in by.items() if rid == "req-big"]
    assert len(big) == 2 and all(m["sent"] == "70000" for m in big)
    (refused,) = [m for (rid, _), m in by.items() if rid == "req-none"]
    assert (refused["code"], refused["flags"], refused["upstream"]) == ("503", "UH", "-")
    (probe,) = [m for m in fields if m is not None and m["agent"] == "probe/1"
                and m["upstream"].endswith(f":{mesh.v1.port}")]  # the inbound hop's
    assert (probe["method"], probe["path"], probe["code"]) == ("GET", "/version", "200")
