"""One hop's span as recorded on the request path, and a batch of them encoded as an OTLP
``ExportTraceServiceRequest`` (protobuf, the official ``opentelemetry-proto`` messages). Pure.

The request path only stores what it already holds (``SpanRecord``: ids as hex, method and
target as bytes, names as strings); turning that into attributes and protobuf happens at
export time, in the exporter task, a batch at a time.

Each span is grouped under the resource of its local service (``service.name`` = the service
the hop acts for: the caller's on the outbound side, the callee's on the inbound side), unless
one service name is configured for the whole host (``OTEL_SERVICE_NAME``). Attributes follow the
OpenTelemetry HTTP conventions where one exists (``http.request.method``, ``url.path``,
``http.response.status_code``, ``rpc.grpc.status_code``) and are ``meshd.*`` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

import meshd

CLIENT = Span.SpanKind.SPAN_KIND_CLIENT  # the outbound side of a hop
SERVER = Span.SpanKind.SPAN_KIND_SERVER  # the inbound side
MAX_TEXT = 200  # a path or a detail longer than this is cut (it ends up in a trace store)
SCOPE = InstrumentationScope(name="meshd", version=meshd.__version__)
# Span.flags bits 8 and 9: "whether the parent is remote" is known, and its value
_LOCAL_ROOT, _REMOTE_PARENT = 0x100, 0x300


@dataclass(slots=True)
class SpanRecord:
    kind: int  # CLIENT or SERVER
    service: str  # the local service the hop acts for
    peer: str  # the other side's service (from its certificate), "unknown" if unauthenticated
    traceparent: bytes  # this hop's, as sent on: its trace id and span id
    parent_span_id: bytes | None  # hex; None: a trace this hop started
    end_ns: int  # wall clock, ns since the epoch
    duration: float  # seconds
    method: bytes
    target: bytes
    status: int
    destination: str
    subset: str = ""
    route: str = ""
    endpoint: str = ""
    request_id: str = ""
    tries: int = 0
    error: str = ""  # the x-meshd-error code of meshd's own answer
    detail: str = ""
    grpc_status: int | None = None  # grpc-status of a gRPC response, when there is one


@dataclass(frozen=True)
class HostResource:
    """What identifies this meshd in every export."""

    node: str
    trust_domain: str
    service_name: str = ""  # one name for every span of the host; "": each span's service


def spiffe_id(trust_domain: str, service: str) -> str:
    return f"spiffe://{trust_domain}/svc/{service}"


def encode(records: Sequence[SpanRecord], host: HostResource) -> bytes:
    """``records`` as the body of an OTLP/HTTP export (``application/x-protobuf``)."""
    by_service: dict[str, list[Span]] = {}
    for record in records:
        name = host.service_name or record.service
        by_service.setdefault(name, []).append(_span(record, host))
    request = ExportTraceServiceRequest(resource_spans=[
        ResourceSpans(resource=Resource(attributes=_attributes((
            ("service.name", name), ("host.name", host.node), ("meshd.node", host.node),
            ("service.instance.id", f"{host.node}/{name}")))),
            scope_spans=[ScopeSpans(scope=SCOPE, spans=spans)])
        for name, spans in by_service.items()])
    body: bytes = request.SerializeToString()
    return body


def _span(r: SpanRecord, host: HostResource) -> Span:
    tp = r.traceparent
    method = r.method.decode("ascii", "replace")
    path = r.target.split(b"?", 1)[0][:MAX_TEXT].decode("ascii", "backslashreplace")
    start_ns = r.end_ns - int(r.duration * 1e9)
    peer = r.peer if r.peer == "unknown" else spiffe_id(host.trust_domain, r.peer)
    attributes: list[tuple[str, str | int]] = [
        ("http.request.method", method), ("url.path", path),
        ("http.response.status_code", r.status),
        # the calling service: ours on the outbound side, the peer's on the inbound side
        ("meshd.source", r.peer if r.kind == SERVER else r.service),
        ("meshd.destination", r.destination), ("meshd.peer.identity", peer),
        ("meshd.request_id", r.request_id)]
    for key, value in (("meshd.subset", r.subset), ("meshd.route", r.route),
                       ("meshd.endpoint", r.endpoint), ("meshd.error", r.error)):
        if value:
            attributes.append((key, value))
    if r.tries:
        attributes.append(("meshd.tries", r.tries))
    if r.grpc_status is not None:
        attributes.append(("rpc.grpc.status_code", r.grpc_status))
    failed = r.status >= 500
    return Span(
        trace_id=bytes.fromhex(tp[3:35].decode("ascii")),
        span_id=bytes.fromhex(tp[36:52].decode("ascii")),
        parent_span_id=bytes.fromhex(r.parent_span_id.decode("ascii"))
        if r.parent_span_id else b"",
        # the W3C trace flags, and whether the parent is remote (it is, when there is one)
        flags=(_REMOTE_PARENT if r.parent_span_id else _LOCAL_ROOT) | int(tp[53:55], 16),
        name=f"{method} {r.destination}", kind=r.kind,  # type: ignore[arg-type]
        start_time_unix_nano=start_ns, end_time_unix_nano=r.end_ns,
        attributes=_attributes(attributes),
        status=Status(code=Status.STATUS_CODE_ERROR,
                      message=(r.error or r.detail or str(r.status))[:MAX_TEXT])
        if failed else Status())


def _attributes(pairs: Iterable[tuple[str, str | int]]) -> list[KeyValue]:
    return [KeyValue(key=k, value=AnyValue(int_value=v) if isinstance(v, int)
                     else AnyValue(string_value=v)) for k, v in pairs]
