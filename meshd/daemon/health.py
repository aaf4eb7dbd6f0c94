"""meshd's own probe of each local app, reported to the registry through TTL checks (the way a
Consul agent runs a check, but done by meshd so the same code works against any registry)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
import trio

from meshd.client_tls import public_bundle_context
from meshd.config.schema import LocalService
from meshd.errors import RegistryError, RegistryNotFound
from meshd.proxy.core.grpc import grpc_status_of
from meshd.proxy.core.h2 import Body, Ended, Failed, Opened, Reset, Session, Trailers
from meshd.registry.consul import ConsulClient
from meshd.registry.model import CRITICAL, PASSING, ProbeResult

log = logging.getLogger(__name__)

async def probe(svc: LocalService, http: httpx.AsyncClient) -> ProbeResult:
    """Check the app once: an HTTP GET that must answer 2xx (over h2c for an app that speaks
    HTTP/2), a gRPC health check that must answer SERVING, or a TCP connect."""
    check = svc.health
    host = f"[{svc.address}]" if ":" in svc.address else svc.address
    if check.kind == "none":
        return ProbeResult(PASSING, "no check configured")
    if check.kind == "grpc" or (check.kind == "http" and svc.protocol.app_h2):
        return await _probe_h2c(svc)
    if check.kind == "http":
        url = f"http://{host}:{svc.port}{check.path}"
        try:
            with trio.fail_after(check.timeout):
                response = await http.get(url)
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            return ProbeResult(CRITICAL, f"HTTP GET {url}: {type(exc).__name__}: {exc}")
        if 200 <= response.status_code < 300:
            return ProbeResult(PASSING, f"HTTP GET {url}: {response.status_code}")
        return ProbeResult(CRITICAL, f"HTTP GET {url}: {response.status_code}")
    try:
        with trio.fail_after(check.timeout):
            stream = await trio.open_tcp_stream(svc.address, svc.port)
        await stream.aclose()
    except (OSError, trio.TooSlowError) as exc:
        return ProbeResult(CRITICAL, f"TCP connect {svc.address}:{svc.port}: {exc}")
    return ProbeResult(PASSING, f"TCP connect {svc.address}:{svc.port}: ok")


# grpc.health.v1.Health/Check: HealthCheckRequest {string service = 1}, and the answer's
# HealthCheckResponse {ServingStatus status = 1}, where SERVING is 1
GRPC_HEALTH_PATH = b"/grpc.health.v1.Health/Check"
_SERVING = b"\x08\x01"
_GRPC_STATUS_NAMES = {0: "OK", 5: "NOT_FOUND", 12: "UNIMPLEMENTED", 14: "UNAVAILABLE"}


async def _probe_h2c(svc: LocalService) -> ProbeResult:
    check = svc.health
    where = f"{svc.address}:{svc.port}"
    if check.kind == "grpc":
        name = check.path.encode("utf-8")
        message = (b"\x0a" + bytes([len(name)]) + name) if name else b""
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        what = f"gRPC health check of {check.path or 'the server'} at {where}"
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", where.encode()),
                  (b":path", GRPC_HEALTH_PATH), (b"content-type", b"application/grpc"),
                  (b"te", b"trailers")]
    else:
        body = b""
        what = f"HTTP/2 GET http://{where}{check.path}"
        fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", where.encode()),
                  (b":path", check.path.encode())]
    try:
        with trio.fail_after(check.timeout):
            status, data, trailers = await h2c_request(svc.address, svc.port, fields, body)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError) as exc:
        return ProbeResult(CRITICAL, f"{what}: {type(exc).__name__}: {exc}")
    if check.kind == "http":
        return ProbeResult(PASSING if 200 <= status < 300 else CRITICAL, f"{what}: {status}")
    grpc_status = grpc_status_of(trailers)
    if grpc_status != 0:
        label = _GRPC_STATUS_NAMES.get(grpc_status or -1, str(grpc_status))
        return ProbeResult(CRITICAL, f"{what}: gRPC status {label}")
    if data[5:] != _SERVING:
        return ProbeResult(CRITICAL, f"{what}: not SERVING")
    return ProbeResult(PASSING, f"{what}: SERVING")


async def h2c_request(address: str, port: int, fields: list[tuple[bytes, bytes]],
                      body: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """One request over a new h2c connection: the status, the body (64 KiB at most) and the
    trailers (or the head's fields, for a Trailers-Only answer). The caller bounds the time."""
    stream = await trio.open_tcp_stream(address, port)
    session = Session(client_side=True)
    status, data, trailers = 0, b"", []
    async with stream:
        session.start()
        stream_id = session.next_stream_id()
        session.send_headers(stream_id, fields, end=not body)
        if body:
            session.send_data(stream_id, body, end=True)
        await stream.send_all(session.outgoing())
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ValueError("connection closed before the answer ended")
            for event in session.feed(chunk, trio.current_time()):
                if isinstance(event, Failed):
                    raise ValueError(f"HTTP/2 error: {event.reason}")
                if isinstance(event, Opened) and event.stream_id == stream_id:
                    status = int(dict(event.headers).get(b":status", b"0"))
                    trailers = event.headers
                elif isinstance(event, Body) and event.stream_id == stream_id:
                    data = (data + event.data)[:65536]
                    session.consumed(stream_id, event.flow)
                elif isinstance(event, Trailers) and event.stream_id == stream_id:
                    trailers = event.headers
                elif isinstance(event, Ended) and event.stream_id == stream_id:
                    return status, data, trailers
                elif isinstance(event, Reset) and event.stream_id == stream_id:
                    raise ValueError(f"stream reset (error code {event.code})")
            pending = session.outgoing()
            if pending:
                await stream.send_all(pending)


def probe_client(timeout: float = 10.0) -> httpx.AsyncClient:
    """An HTTP client for loopback probes: an HTTP(S)_PROXY from the environment must not see
    them (it would mark a healthy local app critical)."""
    return httpx.AsyncClient(timeout=timeout, trust_env=False, verify=public_bundle_context())


async def report_health(
    svc: LocalService,
    consul: ConsulClient,
    check_ids: tuple[str, ...],
    on_result: Callable[[ProbeResult], None],
    reregister: Callable[[ProbeResult], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe every ``interval`` and push the result to each TTL check (which also refreshes the
    TTL). If the registry no longer knows a check (reaped after a long outage of the app, or a
    registry that lost its state), register the service again: anti-entropy, as Consul's own
    agent does. ``task_status.started()`` after the first report."""
    started = False
    last_status: str | None = None
    async with probe_client(svc.health.timeout) as http:
        while True:
            result = await probe(svc, http)
            result.at = trio.current_time()
            if result.status != last_status:
                log.log(logging.INFO if result.status == PASSING else logging.WARNING,
                        "local service %s is %s: %s", svc.name, result.status, result.output)
                last_status = result.status
            on_result(result)
            for cid in check_ids:
                try:
                    await consul.update_ttl(cid, result.status, result.output)
                except RegistryNotFound:
                    log.warning("the registry lost check %s of %s; registering %s again",
                                cid, svc.name, svc.name)
                    try:
                        await reregister(result)
                    except RegistryError as exc:
                        log.warning("registering %s again failed: %s", svc.name, exc)
                    break
                except RegistryError as exc:
                    log.warning("could not report health of %s: %s", svc.name, exc)
            if not started:
                task_status.started()
                started = True
            await trio.sleep(svc.health.interval)
