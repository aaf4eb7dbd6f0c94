"""Table tests of tracing's pure parts: meshd.toml's ``[tracing]``, its merge with the OTEL_*
variables, the samplers, this hop's traceparent and parent span, and the OTLP encoding
(decoded back with the official messages)."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

import meshd
from meshd.config.parse import parse_host_config
from meshd.config.schema import TracingConfig
from meshd.errors import ConfigError
from meshd.proxy.core.trace import continue_trace, identify
from meshd.tracing.sampling import make_sampler
from meshd.tracing.settings import DEFAULT_ENDPOINT, TracingSettings, resolve
from meshd.tracing.spans import CLIENT, SERVER, HostResource, SpanRecord, encode
from meshd.tracing.tracer import Tracer

HOST: dict[str, Any] = {
    "node": "host-a", "trust_domain": "shop.mesh",
    "ca": {"url": "https://127.0.0.1:8443", "fingerprint": "sha256:" + "ab" * 32,
           "token_file": "join-token"},
}
TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = b"00f067aa0ba902b7"


def ones(n: int) -> bytes:
    return b"\x11" * n


# -- meshd.toml [tracing] -----------------------------------------------------------------------

def test_tracing_table_parses() -> None:
    config = parse_host_config({**HOST, "tracing": {
        "endpoint": "http://127.0.0.1:4318/v1/traces", "sampler": "parentbased_traceidratio",
        "ratio": 0.25, "service_name": "edge", "enabled": True}})
    assert config.tracing == TracingConfig(True, "http://127.0.0.1:4318/v1/traces",
                                           "parentbased_traceidratio", 0.25, "edge")
    assert parse_host_config(HOST).tracing == TracingConfig()


@pytest.mark.parametrize(("table", "path", "reason"), [
    ({"endpoint": "collector:4318"}, "tracing.endpoint", "http:// or https:// URL"),
    ({"sampler": "sometimes"}, "tracing.sampler", "must be one of always_on"),
    ({"ratio": 1.5}, "tracing.ratio", "between 0 and 1"),
    ({"enabled": "yes"}, "tracing.enabled", "expected a boolean"),
    ({"rate": 1}, "tracing.rate", "unknown key"),
])
def test_tracing_table_problems(table: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_host_config({**HOST, "tracing": table})
    (problem,) = caught.value.problems
    assert problem.path == path and reason in problem.reason


# -- the OTEL_* variables -----------------------------------------------------------------------

FILE = TracingConfig(endpoint="http://file:4318/v1/traces", sampler="always_on", ratio=0.5,
                     service_name="from-file")


@pytest.mark.parametrize(("config", "environ", "expected"), [
    (TracingConfig(), {}, None),  # nothing asks for it: off
    (TracingConfig(enabled=True), {}, TracingSettings(DEFAULT_ENDPOINT)),
    (FILE, {}, TracingSettings("http://file:4318/v1/traces", "always_on", 0.5, "from-file")),
    # the base endpoint gets v1/traces; the traces endpoint is taken as is and wins
    (TracingConfig(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
     TracingSettings("http://c:4318/v1/traces")),
    (TracingConfig(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c/otlp/"},
     TracingSettings("https://c/otlp/v1/traces")),
    (FILE, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/spans"},
     TracingSettings("http://t:9/spans", "always_on", 0.5, "from-file")),
    # every variable set wins over its key
    (FILE, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01",
            "OTEL_SERVICE_NAME": "mesh", "OTEL_EXPORTER_OTLP_HEADERS":
            "authorization=Bearer%20x, x-scope=a=b", "OTEL_EXPORTER_OTLP_TIMEOUT": "2500"},
     TracingSettings("http://file:4318/v1/traces", "parentbased_traceidratio", 0.01, "mesh",
                     (("authorization", "Bearer x"), ("x-scope", "a=b")), 2.5)),
    # the argument of a sampler that takes none is not read
    (TracingConfig(enabled=True), {"OTEL_TRACES_SAMPLER": "always_off",
                                   "OTEL_TRACES_SAMPLER_ARG": "x"},
     TracingSettings(DEFAULT_ENDPOINT, "always_off")),
    # off wins
    (FILE, {"OTEL_SDK_DISABLED": "true"}, None),
    (FILE, {"OTEL_TRACES_EXPORTER": "none"}, None),
    (TracingConfig(enabled=False), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
])
def test_settings(config: TracingConfig, environ: dict[str, str],
                  expected: TracingSettings | None) -> None:
    assert resolve(config, environ) == expected


@pytest.mark.parametrize(("environ", "variable"), [
    ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
     "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS"),
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "10s"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
])
def test_settings_problems_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(TracingConfig(enabled=True), environ)
    assert [p.path for p in caught.value.problems] == [variable]
    assert caught.value.problems[0].file == "environment"


# -- samplers -----------------------------------------------------------------------------------

LOW = b"0" * 16 + b"0000000000000001"  # low 64 bits: 1
HIGH = b"0" * 16 + b"ffffffffffffffff"


@pytest.mark.parametrize(("sampler", "ratio", "cases"), [
    ("always_on", 1.0, [(LOW, None, True), (LOW, False, True)]),
    ("always_off", 1.0, [(LOW, None, False), (LOW, True, False)]),
    ("traceidratio", 0.5, [(LOW, None, True), (HIGH, None, False), (HIGH, True, False)]),
    ("traceidratio", 0.0, [(LOW, None, False)]),
    ("traceidratio", 1.0, [(HIGH, None, True)]),
    ("parentbased_always_on", 1.0, [(LOW, None, True), (LOW, False, False), (LOW, True, True)]),
    ("parentbased_always_off", 1.0, [(LOW, None, False), (LOW, True, True)]),
    ("parentbased_traceidratio", 0.5, [(LOW, None, True), (HIGH, None, False),
                                       (HIGH, True, True), (LOW, False, False)]),
])
def test_samplers(sampler: str, ratio: float,
                  cases: list[tuple[bytes, bool | None, bool]]) -> None:
    decide = make_sampler(sampler, ratio)
    for trace_id, parent, expected in cases:
        assert decide(trace_id, parent) is expected, (trace_id, parent)


def test_ratio_sampler_keeps_about_its_share() -> None:
    decide = make_sampler("traceidratio", 0.01)
    ids = [b"%032x" % (n * 0x9E3779B97F4A7C15 % 2 ** 128) for n in range(1, 20001)]
    kept = sum(decide(t, None) for t in ids)
    assert 120 <= kept <= 280  # 1 % of 20000, give or take


# -- this hop's traceparent ---------------------------------------------------------------------

ON, OFF = make_sampler("always_on"), make_sampler("always_off")
PARENT_BASED = make_sampler("parentbased_always_on")


@pytest.mark.parametrize(("received", "sample", "sent", "parent"), [
    # tracing off: the flags pass as they came
    (b"00-%s-%s-01" % (TRACE, PARENT), None, b"00-%s-1111111111111111-01" % TRACE, PARENT),
    (b"00-%s-%s-00" % (TRACE, PARENT), None, b"00-%s-1111111111111111-00" % TRACE, PARENT),
    # the decision is what is sent on; other flag bits stay
    (b"00-%s-%s-00" % (TRACE, PARENT), ON, b"00-%s-1111111111111111-01" % TRACE, PARENT),
    (b"00-%s-%s-03" % (TRACE, PARENT), OFF, b"00-%s-1111111111111111-02" % TRACE, PARENT),
    (b"00-%s-%s-00" % (TRACE, PARENT), PARENT_BASED, b"00-%s-1111111111111111-00" % TRACE,
     PARENT),
    (b"01-%s-%s-01" % (TRACE, PARENT), PARENT_BASED, b"00-%s-1111111111111111-01" % TRACE,
     PARENT),
    # a new trace: no parent, the root sampler decides
    (None, PARENT_BASED, b"00-" + b"11" * 16 + b"-1111111111111111-01", None),
    (None, None, b"00-" + b"11" * 16 + b"-1111111111111111-00", None),
    (b"garbage", ON, b"00-" + b"11" * 16 + b"-1111111111111111-01", None),
    (b"ff-%s-%s-01" % (TRACE, PARENT), OFF, b"00-" + b"11" * 16 + b"-1111111111111111-00",
     None),
])
def test_continue_trace(received: bytes | None, sample: Any, sent: bytes,
                        parent: bytes | None) -> None:
    assert continue_trace(received, ones, sample) == (sent, parent)


def test_identity_carries_the_span_and_its_parent() -> None:
    ids = identify([(b"Traceparent", b"00-%s-%s-01" % (TRACE, PARENT))], ones,
                   sample=PARENT_BASED)
    assert (ids.trace_id, ids.span_id, ids.parent_span_id, ids.sampled) == (
        TRACE, b"1111111111111111", PARENT, True)
    assert not identify([], ones).sampled


def _stream(chunks: list[bytes]) -> Any:
    """A random source handing out ``chunks``' bytes in order, however they are asked for."""
    data = bytearray(b"".join(chunks))

    def take(n: int) -> bytes:
        out = bytes(data[:n])
        del data[:n]
        assert len(out) == n, "the test's random bytes ran out"
        return out
    return take


@pytest.mark.parametrize("sample", [None, ON, OFF])
def test_new_identity_takes_id_span_and_trace_in_order(sample: Any) -> None:
    # a request without id or traceparent: id, span id and trace id from the source in that
    # order, however it is fetched; the root sampler decides the flag
    ids = identify([(b"Host", b"payments")], _stream([bytes(range(1, 41))]), sample=sample)
    assert ids.request_id == "01020304-0506-0708-090a-0b0c0d0e0f10"
    assert ids.span_id == bytes(range(17, 25)).hex().encode()
    assert ids.trace_id == bytes(range(25, 41)).hex().encode()
    assert (ids.parent_span_id, ids.sampled) == (None, sample is ON)


def test_new_identity_never_has_a_zero_trace_or_span() -> None:
    # an all-zero trace id is invalid (W3C): the bytes that made one are not used
    ids = identify([], _stream([b"\x00" * 40, b"\x22" * 16, b"\x33" * 8, b"\x44" * 16]))
    assert ids.request_id == "22222222-2222-2222-2222-222222222222"
    assert (ids.span_id, ids.trace_id) == (b"33" * 8, b"44" * 16)


# -- encoding -----------------------------------------------------------------------------------

def _record(**kw: Any) -> SpanRecord:
    base: dict[str, Any] = dict(
        kind=CLIENT, service="web", peer="payments",
        traceparent=b"00-%s-1111111111111111-01" % TRACE, parent_span_id=PARENT,
        end_ns=2_000_000_000, duration=0.5, method=b"POST", target=b"/pay?card=secret",
        status=200, destination="payments", subset="v2", route="canary", endpoint="b/p-v2",
        request_id="r-1", tries=2)
    return SpanRecord(**{**base, **kw})


def test_encoding_decodes_with_the_official_messages() -> None:
    body = encode([_record(), _record(kind=SERVER, service="payments", peer="web", tries=0,
                                      status=502, error="upstream_reset", grpc_status=14)],
                  HostResource("node-a", "shop.mesh"))
    request = ExportTraceServiceRequest.FromString(body)
    by_service = {rs.resource.attributes[0].value.string_value: rs
                  for rs in request.resource_spans}
    assert set(by_service) == {"web", "payments"}
    (client,) = by_service["web"].scope_spans[0].spans
    assert by_service["web"].scope_spans[0].scope.name == "meshd"
    assert by_service["web"].scope_spans[0].scope.version == meshd.__version__
    assert client.trace_id.hex() == TRACE.decode() and client.span_id == b"\x11" * 8
    assert client.parent_span_id.hex() == PARENT.decode()
    assert client.kind == Span.SpanKind.SPAN_KIND_CLIENT and client.name == "POST payments"
    assert (client.start_time_unix_nano, client.end_time_unix_nano) == (
        1_500_000_000, 2_000_000_000)
    assert client.flags == 0x301  # sampled, parent known to be remote
    attrs = {kv.key: kv.value for kv in client.attributes}
    assert attrs["url.path"].string_value == "/pay"  # no query string in a trace store
    assert attrs["meshd.tries"].int_value == 2
    assert attrs["meshd.peer.identity"].string_value == "spiffe://shop.mesh/svc/payments"
    assert client.status.code == Status.STATUS_CODE_UNSET
    (server,) = by_service["payments"].scope_spans[0].spans
    assert server.kind == Span.SpanKind.SPAN_KIND_SERVER
    attrs = {kv.key: kv.value for kv in server.attributes}
    assert attrs["meshd.source"].string_value == "web"
    assert attrs["rpc.grpc.status_code"].int_value == 14
    assert "meshd.tries" not in attrs
    assert server.status.code == Status.STATUS_CODE_ERROR
    assert server.status.message == "upstream_reset"


def test_one_service_name_for_the_host() -> None:
    body = encode([_record(), _record(kind=SERVER, service="payments", peer="unknown")],
                  HostResource("node-a", "shop.mesh", service_name="meshd"))
    (rs,) = ExportTraceServiceRequest.FromString(body).resource_spans
    assert rs.resource.attributes[0].value.string_value == "meshd"
    server = rs.scope_spans[0].spans[1]
    assert {kv.key: kv.value.string_value for kv in server.attributes}[
        "meshd.peer.identity"] == "unknown"


# -- the daemon's tracer ------------------------------------------------------------------------

def test_the_hosts_tracer_follows_its_file_and_environment() -> None:
    config = parse_host_config({**HOST, "tracing": {"sampler": "always_off", "enabled": True}})
    tracer = Tracer.for_host(config, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                      "OTEL_SERVICE_NAME": "edge"})
    assert tracer.enabled and tracer.settings is not None
    assert tracer.settings.endpoint == "http://c:4318/v1/traces"
    assert tracer.host == HostResource("host-a", "shop.mesh", "edge")
    assert tracer.sample is not None and tracer.sample(TRACE, True) is False  # always_off
    assert not Tracer.for_host(parse_host_config(HOST), {}).enabled
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER"):
        Tracer.for_host(config, {"OTEL_TRACES_SAMPLER": "sometimes"})
