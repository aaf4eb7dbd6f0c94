"""A small OTLP/HTTP trace receiver for tests: ``POST /v1/traces`` with an
``ExportTraceServiceRequest`` in protobuf, decoded with the official ``opentelemetry-proto``
messages (independent of meshd's encoder, which only builds them). h11 on a real loopback
socket. ``answer`` makes it refuse (an HTTP status) or ``hang`` (never answer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h11
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    resource: dict[str, Any]
    span: Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return _values(self.span.attributes)


def _values(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@dataclass
class OTLPReceiver:
    port: int = 0
    answer: int = 200
    hang: bool = False
    posts: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (path, headers)
    spans: list[ReceivedSpan] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, [listener])

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_request(conn, stream)
                if request is None:
                    return
                headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                self.posts.append((request.target.decode(), headers))
                if self.hang:
                    await trio.sleep_forever()
                status, payload = self.answer, b""
                if request.method != b"POST" or request.target != b"/v1/traces":
                    status = 404
                elif status == 200:
                    decoded = ExportTraceServiceRequest.FromString(body)
                    for rs in decoded.resource_spans:
                        resource = _values(rs.resource.attributes)
                        for ss in rs.scope_spans:
                            self.spans += [ReceivedSpan(resource["service.name"], resource, s)
                                           for s in ss.spans]
                    payload = ExportTraceServiceResponse().SerializeToString()
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                    ("content-type", "application/x-protobuf"),
                    ("content-length", str(len(payload)))])) or b"")
                await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def _read_request(conn: h11.Connection, stream: trio.SocketStream
                        ) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            if not data and request is None:
                return None, b""
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""
