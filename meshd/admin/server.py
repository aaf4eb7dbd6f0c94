"""The admin endpoint of one meshd: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus) and
``/v1/state`` (the JSON snapshot the console reads). Loopback by default.

``/readyz`` answers 200 ``ready`` when this host should receive traffic, else 503 ``not ready:``
with the reasons (``meshd.admin.state.not_ready_reasons``: starting, stopping, or a local
service whose health check is critical). ``/healthz`` answers 200 while the process serves.

With ``[admin] tls = true`` it speaks HTTPS with the node certificate and requires a client
certificate from the mesh CA naming an operator (``meshd ca issue --operator NAME``); any other
identity (a service's, another trust domain's, a revoked one) gets a JSON 403 with the reason,
and the refusal is logged and counted.

Every request's ``Host`` must be an IP address, ``localhost``, or a name listed in
``[admin] allowed_hosts``: a web page cannot use DNS rebinding (its own name resolving to
127.0.0.1) to read ``/v1/state`` or the metrics through the operator's browser; such a request
gets a 421 naming the host. A request without ``Host`` (HTTP/1.0 tools) is served."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import trio

from meshd.config.schema import DEFAULT_ADMIN_LIMITS, ListenerLimits
from meshd.errors import MeshError
from meshd.httpd import Request, Response, serve_http
from meshd.identity.tls import HandshakeRefused, TLSState
from meshd.metrics import Metrics

log = logging.getLogger(__name__)

ROUTES = ("/healthz", "/readyz", "/metrics", "/v1/state")


class AdminAPI:
    def __init__(
        self, metrics: Metrics, ready: Callable[[], Sequence[str]],
        state: Callable[[], Mapping[str, Any]], refresh: Callable[[], None] = lambda: None,
        *, allowed_hosts: Iterable[str] = (), limits: ListenerLimits = DEFAULT_ADMIN_LIMITS,
        gather: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._metrics = metrics
        self._limits = limits
        self._ready = ready
        self._state = state
        self._refresh = refresh  # updates gauges that are computed, not counted
        # asks the worker processes for their metrics and state (bounded), when there are some
        self._gather = gather
        self._tls: TLSState | None = None  # set when serving over mutual TLS
        self._allowed_hosts = frozenset({"localhost", *(h.lower() for h in allowed_hosts)})

    async def handle(self, request: Request) -> Response:
        host = request.header("host")
        if host is not None and not host_allowed(host, self._allowed_hosts):
            peer = f"{request.remote[0]}" if request.remote else "?"
            log.warning("admin request %s %s from %s refused: Host %r is not an address of "
                        "this admin API", request.method, request.path, peer, host)
            self._metrics.connection_errors.labels("admin", "host_not_allowed").inc()
            return Response.json({"error": "host_not_allowed", "reason":
                                  f"Host {host!r} is not an IP address, localhost or one of "
                                  "[admin] allowed_hosts"}, 421)
        if self._tls is not None:
            try:
                self._tls.check_operator(request.peer_cert_der)
            except HandshakeRefused as exc:
                peer = f"{request.remote[0]}" if request.remote else "?"
                log.warning("admin request %s %s from %s refused (%s): %s", request.method,
                            request.path, peer, exc.reason, exc)
                self._metrics.connection_errors.labels("admin", exc.reason).inc()
                return Response.json({"error": exc.reason, "reason": str(exc)}, 403)
        return await self._route(request)

    async def _route(self, request: Request) -> Response:
        if request.path not in ROUTES:
            return Response.text(f"unknown path {request.path}; try {', '.join(ROUTES)}\n", 404)
        if request.method not in ("GET", "HEAD"):
            return Response.text(f"method {request.method} not allowed\n", 405,
                                 headers=[("Allow", "GET, HEAD")])
        if request.path == "/healthz":
            return Response.text("ok\n")
        if request.path == "/readyz":
            reasons = self._ready()  # why not ready: none when ready
            if not reasons:
                return Response.text("ready\n")
            return Response.text("not ready: " + "; ".join(reasons) + "\n", 503)
        if self._gather is not None:
            await self._gather()
        if request.path == "/metrics":
            self._refresh()
            body = await trio.to_thread.run_sync(self._metrics.render)
            return Response(200, body, [("Content-Type", self._metrics.content_type)])
        self._refresh()
        return Response.json(self._state(), pretty=request.has_param("pretty"))

    async def serve(
        self, host: str, port: int, *, tls: TLSState | None = None,
        inherited: socket.socket | None = None,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; with ``tls`` (built with ``admin=True``), over mutual TLS
        for operators only; on ``inherited`` (already listening there) instead of binding."""
        self._tls = tls
        context = tls.admin_context if tls is not None else None
        try:
            await serve_http(self.handle, host, port, ssl_context=context,
                             inherited=inherited,
                             limits=self._limits, listener="admin", metrics=self._metrics,
                             task_status=task_status)
        except OSError as exc:
            raise MeshError(f"cannot listen on admin address {host}:{port}: "
                            f"{exc.strerror or exc}") from exc


def host_allowed(host: str, names: frozenset[str]) -> bool:
    """Whether a ``Host`` header names this API: an IP literal (``[v6]`` too), with or without
    a port, or one of ``names`` (lower case). Pure."""
    value = host.strip().lower()
    if value.startswith("["):
        literal, bracket, rest = value[1:].partition("]")
        return bool(bracket) and (rest == "" or _is_port(rest)) and _is_ip(literal)
    name, colon, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if colon and not _is_port(":" + port):
        return False
    return _is_ip(name) or name in names


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and 0 < int(text[1:]) < 65536


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
