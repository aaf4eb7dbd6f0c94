"""The external-service part of ``meshd explain``: where an external destination's calls go,
how (TLS originated or plain, which roots verify the server, which name it must carry), and
the egress proxy's verdict on a host name. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshd.config.schema import DestinationRoutes, EgressMode, ExternalTLS, RouteTable
from meshd.proxy.core.egress import EgressKind, judge_egress


def render_external(dest: DestinationRoutes, mode: EgressMode) -> list[str]:
    ext = dest.external
    assert ext is not None
    if ext.hosts:
        where = f"{', '.join(ext.hosts)} port {ext.port} (resolved by the system resolver)"
    else:
        where = ", ".join(f"{a}:{p}" for a, p in ext.addresses)
    out = [f"external service {dest.service}, outside the mesh: meshd connects to {where}"]
    if ext.tls is ExternalTLS.ORIGINATE:
        roots = ext.ca_file or "the system roots"
        name = ext.sni or "the host's name"
        out.append(f"  TLS originated by meshd (HTTP/1.1): the server's certificate is "
                   f"verified against {roots} and must name {name}; one that does not "
                   "fails with 503 upstream-tls-failed")
    else:
        out.append("  plain TCP: no TLS (tls = \"none\")")
    out.append("  authorization: none (an external service has no meshd to enforce rules)")
    out.append(f"  egress proxy (egress = \"{mode.value}\"): requests and CONNECTs naming "
               f"{', '.join(ext.names) or 'its addresses'} follow this destination"
               + (f" (CONNECT to port {', '.join(str(p) for p in ext.ports)} only)"
                  if ext.names else ""))
    return out


def egress_notes(table: RouteTable, host: str, state: Mapping[str, Any]) -> list[str]:
    """What the egress proxy does with ``host`` (asked about as if a destination)."""
    listener = (state.get("egress") or {}).get("listener")
    where = f" at {listener}" if listener else " (not enabled on this host: outbound.egress_port)"
    verdict = judge_egress(table, host, 443, tunnel=False)
    if verdict.kind is EgressKind.EXTERNAL:
        return [f"egress proxy{where}: {host} is declared by external destination "
                f"{verdict.destination}: its routes and policy apply"]
    if verdict.kind is EgressKind.PASSTHROUGH:
        return [f"egress proxy{where}: {host} is not declared; egress = \"allow-any\" passes "
                "it through (counted as passthrough)"]
    return [f"egress proxy{where}: {host} is not declared; egress = \"registered-only\" "
            "refuses it (403 egress-denied)"]
