"""The admin endpoint of one meshd: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus) and
``/v1/state`` (the JSON snapshot the console reads). Loopback by default."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from meshd.errors import MeshError
from meshd.httpd import Request, Response, serve_http
from meshd.metrics import Metrics

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

    async def handle(self, request: Request) -> Response:
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
        self, host: str, port: int,
        *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await serve_http(self.handle, host, port, task_status=task_status)
        except OSError as exc:
            raise MeshError(f"cannot listen on admin address {host}:{port}: "
                            f"{exc.strerror or exc}") from exc
