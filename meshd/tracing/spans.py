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
from typing import TYPE_CHECKING

import meshd

# The protobuf messages (opentelemetry-proto and protobuf's runtime: a few MB) are loaded by the
# first export, so a meshd with tracing off never loads them.
if TYPE_CHECKING:
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

# OTLP's Span.SpanKind values (fixed by the protocol; tests/tracing checks them against the
# messages)
SERVER = 2  # the inbound side of a hop
CLIENT = 3  # the outbound side
MAX_TEXT = 200  # a path or a detail longer than this is cut (it ends up in a trace store)
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
    """``records`` as the body of an OTLP/HTTP export (``application/x-protobuf``).

    Most of a span is the same for every request of one hop (its kind, services, subset,
    route, endpoint, method): that part is built once per batch and serialized, and each span
    starts as a copy of it (``MergeFromString``) before its own fields are set in place. Building
    every attribute message anew costs several times as much."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    request = ExportTraceServiceRequest()
    scopes: dict[str, ScopeSpans] = {}
    shared: dict[tuple[object, ...], bytes] = {}
    for r in records:
        name = host.service_name or r.service
        scope = scopes.get(name)
        if scope is None:
            resource_spans = request.resource_spans.add()
            _add_attributes(resource_spans.resource, (
                ("service.name", name), ("host.name", host.node), ("meshd.node", host.node),
                ("service.instance.id", f"{host.node}/{name}")))
            scope = scopes[name] = resource_spans.scope_spans.add()
            scope.scope.name, scope.scope.version = "meshd", meshd.__version__
        key = (r.kind, r.service, r.peer, r.destination, r.subset, r.route, r.endpoint,
               r.method)
        common = shared.get(key)
        if common is None:
            common = shared[key] = _common(r, host).SerializeToString()
        span = scope.spans.add()
        span.MergeFromString(common)
        _fill(span, r)
    body: bytes = request.SerializeToString()
    return body


def _common(r: SpanRecord, host: HostResource) -> Span:
    """What every span of ``r``'s hop, destination and method has."""
    method = r.method.decode("ascii", "replace")
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    peer = r.peer if r.peer == "unknown" else spiffe_id(host.trust_domain, r.peer)
    span = Span(name=f"{method} {r.destination}", kind=r.kind)  # type: ignore[arg-type]
    _add_attributes(span, (
        ("http.request.method", method),
        # the calling service: ours on the outbound side, the peer's on the inbound side
        ("meshd.source", r.peer if r.kind == SERVER else r.service),
        ("meshd.destination", r.destination), ("meshd.peer.identity", peer),
        *((key, value) for key, value in (("meshd.subset", r.subset), ("meshd.route", r.route),
                                          ("meshd.endpoint", r.endpoint)) if value)))
    return span


def _fill(span: Span, r: SpanRecord) -> None:
    """The fields of one request's span."""
    tp = r.traceparent
    span.trace_id = bytes.fromhex(tp[3:35].decode("ascii"))
    span.span_id = bytes.fromhex(tp[36:52].decode("ascii"))
    if r.parent_span_id:
        span.parent_span_id = bytes.fromhex(r.parent_span_id.decode("ascii"))
    # the W3C trace flags, and whether the parent is remote (it is, when there is one)
    span.flags = (_REMOTE_PARENT if r.parent_span_id else _LOCAL_ROOT) | int(tp[53:55], 16)
    span.start_time_unix_nano = r.end_ns - int(r.duration * 1e9)
    span.end_time_unix_nano = r.end_ns
    path = r.target.split(b"?", 1)[0][:MAX_TEXT].decode("ascii", "backslashreplace")
    _add_attributes(span, (("url.path", path), ("http.response.status_code", r.status),
                           ("meshd.request_id", r.request_id)))
    if r.tries:
        _add_attributes(span, (("meshd.tries", r.tries),))
    if r.error:
        _add_attributes(span, (("meshd.error", r.error),))
    if r.grpc_status is not None:
        _add_attributes(span, (("rpc.grpc.status_code", r.grpc_status),))
    if r.status >= 500:
        from opentelemetry.proto.trace.v1.trace_pb2 import Status

        span.status.code = Status.STATUS_CODE_ERROR
        span.status.message = (r.error or r.detail or str(r.status))[:MAX_TEXT]


def _add_attributes(message: Span | Resource, pairs: Iterable[tuple[str, str | int]]) -> None:
    for key, value in pairs:
        attribute = message.attributes.add()
        attribute.key = key
        if isinstance(value, int):
            attribute.value.int_value = value
        else:
            attribute.value.string_value = value
