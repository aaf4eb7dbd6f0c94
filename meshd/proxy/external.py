"""Reaching destinations outside the mesh: their endpoints and their connections.

``ExternalResolver`` keeps the ``MeshView``'s external endpoints in step with the route table:
an ``addresses`` declaration as soon as the table is in force, ``hosts`` through the system
resolver in the background (never on a request's path), each name again every
``REFRESH`` seconds (the system resolver does not say a record's TTL), sooner after a failure,
keeping the last addresses it had while a name does not resolve.

``ExternalConnector`` is the connector ``Attempts`` uses for such a destination in place of the
mTLS one: TCP to the endpoint, then (``tls = "originate"``) TLS with SNI, the server's
certificate verified against the declared ``ca_file`` or the system roots and its name checked
against the ``sni`` (else the host). A certificate that does not verify fails the try with
``upstream_tls_failed`` (``x-meshd-error: upstream-tls-failed``) and a log line naming the
host and why.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from meshd.config.schema import ExternalService, ExternalTLS
from meshd.identity.tls import classify_tls_failure
from meshd.metrics import Metrics
from meshd.proxy.core.egress import external_endpoints
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.proxy.pool import ConnectFailed
from meshd.proxy.sockio import SocketConnection, connect_tcp
from meshd.proxy.streams import TLSStream
from meshd.registry.model import Endpoint

log = logging.getLogger(__name__)

REFRESH = 30.0  # a resolved name is looked up again after this long
RETRY = 5.0  # ... and this soon after a failed lookup
RESOLVE_TIMEOUT = 5.0
TLS_FAILED = "upstream_tls_failed"

Resolve = Callable[[str, int], Awaitable[tuple[str, ...]]]


async def system_resolve(host: str, port: int) -> tuple[str, ...]:
    """The addresses the system resolver gives for ``host`` (TCP), in its order, no repeats."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in out:
            out.append(address)
    return tuple(out)


@dataclass
class _Name:
    addresses: tuple[str, ...] = ()
    due: float = 0.0  # trio clock: when to look it up again
    error: str = ""  # the last lookup's failure ("" when it worked)
    resolved_at: float | None = None  # wall clock of the last successful lookup


class ExternalResolver:
    """The external destinations' endpoints in the view (module doc)."""

    def __init__(self, view: ViewCell, *, resolve: Resolve = system_resolve,
                 refresh: float = REFRESH, retry: float = RETRY) -> None:
        self.view = view
        self._resolve = resolve
        self._refresh = refresh
        self._retry = retry
        self._names: dict[tuple[str, int], _Name] = {}
        self._wake = trio.Event()

    def status(self) -> dict[str, dict[str, object]]:
        """Per external destination: its names' addresses and lookup errors (``/v1/state``)."""
        out: dict[str, dict[str, object]] = {}
        for dest in self.view.current.routes.destinations:
            ext = dest.external
            if ext is None or not ext.hosts:
                continue
            assert ext.port is not None
            names = {}
            for host in ext.hosts:
                found = self._names.get((host, ext.port), _Name())
                names[host] = {"addresses": list(found.addresses), "error": found.error,
                               "resolved_at": found.resolved_at}
            out[dest.service] = {"lookups": names}
        return out

    def _routes_changed(self, view: MeshView) -> None:
        """A new route table: the external destinations' endpoint sets from what is known
        now (addresses at once), and the resolver woken for new names."""
        now = trio.current_time()
        wanted: set[tuple[str, int]] = set()
        externals = {d.service: d.external for d in view.routes.destinations
                     if d.external is not None}
        for name in list(view.external):
            if name not in externals:
                self.view.set_external(name, None)
        for name, ext in externals.items():
            if ext.hosts:
                assert ext.port is not None
                wanted.update((host, ext.port) for host in ext.hosts)
            self._publish(name, ext, now)
        for key in list(self._names):
            if key not in wanted:
                del self._names[key]
        for key in wanted:
            self._names.setdefault(key, _Name())
        self._wake.set()

    def _publish(self, name: str, ext: ExternalService, now: float) -> None:
        resolved = {host: found.addresses for (host, port), found in self._names.items()
                    if port == ext.port}
        self.view.set_external(name, external_endpoints(name, ext, resolved, now))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Follow the route table and look names up when due, until cancelled."""
        stop_watching = self.view.watch_routes(self._routes_changed)
        self._routes_changed(self.view.current)
        task_status.started()
        try:
            while True:
                self._wake = trio.Event()
                now = trio.current_time()
                due = [key for key, found in self._names.items() if found.due <= now]
                for key in due:
                    await self._lookup(*key)
                if due:
                    self._republish()
                upcoming = min((found.due for found in self._names.values()), default=None)
                with trio.move_on_at(upcoming if upcoming is not None else float("inf")):
                    await self._wake.wait()
        finally:
            stop_watching()

    async def _lookup(self, host: str, port: int) -> None:
        found = self._names.get((host, port))
        if found is None:  # the table changed meanwhile
            return
        try:
            with trio.fail_after(RESOLVE_TIMEOUT):
                addresses = await self._resolve(host, port)
        except (OSError, trio.TooSlowError) as exc:
            error = "timed out" if isinstance(exc, trio.TooSlowError) else \
                (getattr(exc, "strerror", None) or str(exc))
            if error != found.error:
                log.warning("external host %s does not resolve: %s%s", host, error,
                            f" (keeping {', '.join(found.addresses)})" if found.addresses
                            else "")
            found.error = error
            found.due = trio.current_time() + self._retry
            return
        if addresses != found.addresses:
            log.info("external host %s resolves to %s", host, ", ".join(addresses) or "nothing")
        found.addresses, found.error = addresses, ""
        found.resolved_at = time.time()
        found.due = trio.current_time() + self._refresh

    def _republish(self) -> None:
        now = trio.current_time()
        for dest in self.view.current.routes.destinations:
            if dest.external is not None and dest.external.hosts:
                self._publish(dest.service, dest.external, now)


class ExternalConnector:
    """New connections to external endpoints (module doc); TLS contexts built once per CA
    file (again when the file changes)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._contexts: dict[str | None, tuple[int, ssl.SSLContext]] = {}

    async def connect(self, destination: str, external: ExternalService, endpoint: Endpoint,
                      limit: float) -> trio.abc.HalfCloseableStream:
        """A connection to ``endpoint`` of the external ``destination``; raises
        ``ConnectFailed``."""
        where = f"{endpoint.address}:{endpoint.port}"
        name = external.sni or endpoint.node
        try:
            with trio.fail_after(limit):
                transport = await connect_tcp(endpoint.address, endpoint.port)
                if external.tls is ExternalTLS.NONE:
                    return transport
                return await self._handshake(transport, external, name, where)
        except trio.TooSlowError:
            failure = ConnectFailed("connect_timeout",
                                    f"connecting to {destination} at {where} timed out")
        except OSError as exc:
            failure = ConnectFailed("connect_failed", f"cannot connect to {destination} at "
                                    f"{where}: {exc.strerror or exc}")
        except ConnectFailed as exc:
            failure = exc
        if failure.reason == TLS_FAILED:
            log.warning("external %s: %s", destination, failure)
        self.metrics.connection_errors.labels("outbound", failure.reason).inc()
        raise failure

    async def _handshake(self, transport: SocketConnection, external: ExternalService,
                         name: str, where: str) -> TLSStream:
        try:
            context = await self._context(external.ca_file)
        except (OSError, ssl.SSLError) as exc:
            transport.close()
            raise ConnectFailed(TLS_FAILED, f"TLS to {name} ({where}): cannot load ca_file "
                                f"{external.ca_file}: {exc}") from exc
        stream = TLSStream(transport, context, server_side=False, server_hostname=name)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            raise ConnectFailed(TLS_FAILED, f"TLS to {name} ({where}) failed: "
                                f"{_tls_failure(exc)}") from exc
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _context(self, ca_file: str | None) -> ssl.SSLContext:
        version = os.stat(ca_file).st_mtime_ns if ca_file is not None else 0
        cached = self._contexts.get(ca_file)
        if cached is not None and cached[0] == version:
            return cached[1]
        context = await trio.to_thread.run_sync(client_context, ca_file)
        self._contexts[ca_file] = (version, context)
        return context


def _tls_failure(exc: BaseException) -> str:
    """Why a handshake with an external server failed, in words."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {seen.verify_message}"
        seen = seen.__cause__ or seen.__context__
    return classify_tls_failure(exc)[1]


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """A TLS client context verifying servers against ``ca_file`` (None: the system roots),
    their names checked, TLS 1.2 at least, HTTP/1.1 offered by ALPN."""
    context = ssl.create_default_context(cafile=ca_file)  # without one: the system roots
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context
