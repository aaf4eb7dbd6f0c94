"""The admin endpoint of one meshd: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus) and
``/v1/state`` (the JSON snapshot the console reads). Loopback by default.

With ``[admin] tls = true`` it speaks HTTPS with the node certificate and requires a client
certificate from the mesh CA naming an operator (``meshd ca issue --operator NAME``); any other
identity (a service's, another trust domain's, a revoked one) gets a JSON 403 with the reason,
and the refusal is logged and counted."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import trio

from meshd.errors import MeshError
from meshd.httpd import Request, Response, serve_http
from meshd.identity.tls import HandshakeRefused, TLSState
from meshd.metrics import Metrics

log = logging.getLogger(__name__)

ROUTES = ("/healthz", "/readyz", "/metrics", "/v1/state")


class AdminAPI:
    def __init__(
        self, metrics: Metrics, ready: Callable[[], bool],
        state: Callable[[], Mapping[str, Any]], refresh: Callable[[], None] = lambda: None,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._state = state
        self._refresh = refresh  # updates gauges that are computed, not counted
        self._tls: TLSState | None = None  # set when serving over mutual TLS

    async def handle(self, request: Request) -> Response:
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
            if self._ready():
                return Response.text("ready\n")
            return Response.text("not ready\n", 503)
        if request.path == "/metrics":
            self._refresh()
            body = await trio.to_thread.run_sync(self._metrics.render)
            return Response(200, body, [("Content-Type", self._metrics.content_type)])
        self._refresh()
        return Response.json(self._state(), pretty=request.has_param("pretty"))

    async def serve(
        self, host: str, port: int, *, tls: TLSState | None = None,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; with ``tls`` (built with ``admin=True``), over mutual TLS
        for operators only."""
        self._tls = tls
        context = tls.admin_context if tls is not None else None
        try:
            await serve_http(self.handle, host, port, ssl_context=context,
                             task_status=task_status)
        except OSError as exc:
            raise MeshError(f"cannot listen on admin address {host}:{port}: "
                            f"{exc.strerror or exc}") from exc
