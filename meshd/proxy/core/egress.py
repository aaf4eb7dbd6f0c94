"""External destinations and the egress proxy's decisions. Pure.

* ``external_endpoints``: the endpoints of an external destination, from its declaration and
  the addresses its host names resolved to (the shell resolves, off the request path).
* ``judge_egress``: what the egress proxy listener does with a request naming a host (an
  absolute-form ``http://host/...`` or a ``CONNECT host:port``): the declared external
  destination's policy, a passthrough (``egress = "allow-any"``) or a refusal.
* ``parse_connect`` and ``absolute_target``: the two request shapes a forward proxy gets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from meshd.config.schema import EgressMode, ExternalService, RouteTable
from meshd.proxy.core.http1 import ProtocolError
from meshd.registry.model import Endpoint, EndpointSet

EGRESS_DENIED_CODE = "egress-denied"
MAX_CONNECT_HEAD = 8 * 1024


def external_endpoints(name: str, external: ExternalService,
                       resolved: Mapping[str, tuple[str, ...]], now: float) -> EndpointSet:
    """``name``'s endpoints: each address as given, or each address a host resolved to (in
    ``resolved``; a host not resolved yet adds none). An endpoint's ``node`` is the host name
    (the TLS name when no ``sni`` is declared), its ``instance_id`` the ``IP:PORT``."""
    found: list[Endpoint] = []
    if external.addresses:
        for address, port in external.addresses:
            node = external.sni or address
            found.append(_endpoint(name, node, address, port))
    else:
        assert external.port is not None
        for host in external.hosts:
            for address in resolved.get(host, ()):
                found.append(_endpoint(name, host, address, external.port))
    return EndpointSet(name, tuple(found), 0, now)


def _endpoint(name: str, node: str, address: str, port: int) -> Endpoint:
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return Endpoint(service=name, instance_id=where, node=node, address=address, port=port,
                    version="external")


class EgressKind(StrEnum):
    EXTERNAL = "external"  # a declared external destination: its policy applies
    PASSTHROUGH = "passthrough"  # undeclared, egress = "allow-any"
    DENIED = "denied"  # undeclared, egress = "registered-only"; or a declared host, wrong port


@dataclass(frozen=True)
class EgressVerdict:
    kind: EgressKind
    destination: str = ""  # the external destination (EXTERNAL)
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.kind is not EgressKind.DENIED


def judge_egress(table: RouteTable, host: str, port: int, *, tunnel: bool) -> EgressVerdict:
    """The egress proxy's verdict on a request to ``host:port`` (``tunnel``: a CONNECT, which
    must name one of the declared ports; a plain ``http://`` request is matched by host: meshd
    itself reaches the destination as declared)."""
    host = host.lower().rstrip(".")
    dest = table.external_for(host)
    if dest is not None:
        assert dest.external is not None
        if tunnel and port not in dest.external.ports:
            ports = ", ".join(str(p) for p in dest.external.ports)
            return EgressVerdict(EgressKind.DENIED, dest.service,
                                 f"{host}:{port} refused: external destination {dest.service} "
                                 f"declares port {ports}")
        return EgressVerdict(EgressKind.EXTERNAL, dest.service,
                             f"{host} is external destination {dest.service}")
    if table.egress is EgressMode.ALLOW_ANY:
        return EgressVerdict(EgressKind.PASSTHROUGH, "",
                             f"{host}:{port} is not declared; egress = \"allow-any\" passes it")
    return EgressVerdict(EgressKind.DENIED, "",
                         f"{host}:{port} is not a declared external service and egress = "
                         f"\"registered-only\"")


def parse_connect(head: bytes) -> tuple[str, int]:
    """The ``host:port`` of a ``CONNECT`` request head (up to its blank line). Raises
    ``ProtocolError``."""
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ProtocolError("malformed CONNECT request line")
    try:
        authority = parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("CONNECT target is not ASCII") from None
    host, sep, port = authority.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProtocolError(f"CONNECT target must be HOST:PORT, got {authority!r}")
    return _checked_host(host), int(port)


def absolute_target(target: bytes) -> tuple[str, int, bytes]:
    """``http://host[:port]/path?q`` -> ``(host, port, b"/path?q")``. Raises ``ProtocolError``
    (``https://`` goes through CONNECT; an origin-form target names no destination)."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("request target is not ASCII") from None
    if not text.startswith("http://"):
        raise ProtocolError("the egress proxy takes absolute-form http:// targets (use "
                            "CONNECT for https)")
    try:
        parts = urlsplit(text)
        port = parts.port or 80
    except ValueError as exc:
        raise ProtocolError(f"bad request target: {exc}") from None
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ProtocolError("request target names no host (or carries credentials)")
    path = parts.path or "/"
    origin = f"{path}?{parts.query}" if parts.query else path
    return _checked_host(parts.hostname), port, origin.encode("ascii")


def _checked_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    lowered = host.lower().rstrip(".")
    if not lowered or len(lowered) > 253 or not all(
            c.isalnum() or c in "-." for c in lowered):
        raise ProtocolError(f"bad host name {host!r}")
    return lowered
