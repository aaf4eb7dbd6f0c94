"""What meshd registers for each local service, following Consul's sidecar convention so that a
real Consul's UI and catalog show a mesh service: the app itself, and a ``connect-proxy`` service
(meshd's inbound listener) fronting it. Both carry a TTL check that meshd feeds from its own probe
of the app, and ``DeregisterCriticalServiceAfter`` so a crashed host's entries disappear. Pure."""

from __future__ import annotations

from typing import Any

from meshd.config.gateway import Gateway
from meshd.config.schema import HealthCheck, HostConfig, LocalService, Protocol
from meshd.registry.model import (
    ADMIN_META,
    ADMIN_TLS_META,
    LABEL_META_PREFIX,
    NODE_META,
    VERSION_META,
)

CHECK_TTL_FACTOR = 3  # a TTL of three probe intervals tolerates one late report
MIN_TTL = 3.0
DEREGISTER_CRITICAL_AFTER = "1m"


def service_id(config: HostConfig, svc: LocalService) -> str:
    return f"{svc.name}-{config.node}"


def proxy_id(config: HostConfig, svc: LocalService) -> str:
    return f"{service_id(config, svc)}-sidecar-proxy"


def proxy_service_name(service: str) -> str:
    """The name of the ``connect-proxy`` service fronting ``service`` (Consul's convention)."""
    return f"{service}-sidecar-proxy"


def check_id(sid: str) -> str:
    return f"service:{sid}"


def _ttl(svc: LocalService) -> str:
    seconds = max(MIN_TTL, svc.health.interval * CHECK_TTL_FACTOR)
    return f"{seconds:g}s"


def admin_meta(config: HostConfig) -> dict[str, str]:
    """Where the host's admin API listens (a wildcard bind is published as the host's address)
    and whether it needs an operator certificate; nothing when it has no admin API."""
    if not config.admin_port:
        return {}
    host = config.address if config.admin_host in ("0.0.0.0", "::") else config.admin_host
    host = f"[{host}]" if ":" in host else host
    return {ADMIN_META: f"{host}:{config.admin_port}",
            ADMIN_TLS_META: "true" if config.admin_tls else "false"}


def _meta(config: HostConfig, svc: LocalService) -> dict[str, str]:
    return {VERSION_META: svc.version, NODE_META: config.node,
            "protocol": svc.protocol.value, **admin_meta(config),
            **{f"{LABEL_META_PREFIX}{name}": value for name, value in config.labels}}


def app_registration(
    config: HostConfig, svc: LocalService, status: str = "critical"
) -> dict[str, Any]:
    """``status``: the first probe's result, so a healthy new instance does not start critical
    (unroutable) until its first TTL report."""
    sid = service_id(config, svc)
    return {
        "ID": sid,
        "Name": svc.name,
        "Tags": [svc.version, "meshd"],
        "Address": config.address,
        "Port": svc.port,
        "Meta": _meta(config, svc),
        "Check": {
            "CheckID": check_id(sid),
            "Name": f"meshd probe of {svc.name} ({svc.health.kind})",
            "TTL": _ttl(svc),
            "Status": status,
            "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER,
        },
    }


def proxy_registration(
    config: HostConfig, svc: LocalService, status: str = "critical"
) -> dict[str, Any]:
    sid = service_id(config, svc)
    pid = proxy_id(config, svc)
    return {
        "ID": pid,
        "Name": proxy_service_name(svc.name),
        "Kind": "connect-proxy",
        "Tags": [svc.version, "meshd"],
        "Address": config.address,
        "Port": config.inbound_port,
        "Meta": _meta(config, svc),
        "Proxy": {
            "DestinationServiceName": svc.name,
            "DestinationServiceID": sid,
            "LocalServiceAddress": svc.address,
            "LocalServicePort": svc.port,
        },
        "Check": {
            "CheckID": check_id(pid),
            "Name": f"meshd inbound for {svc.name}",
            "TTL": _ttl(svc),
            "Status": status,
            "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER,
        },
    }


# -- ingress gateways ------------------------------------------------------------------------------

GATEWAY_CHECK = HealthCheck("tcp", "/", 5.0, 2.0)


def gateway_probe_target(gateway: Gateway) -> LocalService:
    """What meshd probes for a gateway's health: a TCP connect to its first listener (its own
    socket: passing while the gateway accepts)."""
    listener = gateway.listeners[0]
    address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listener.address, listener.address)
    return LocalService(gateway.name, listener.port, Protocol.TCP, address=address,
                        health=GATEWAY_CHECK)


def gateway_registration(config: HostConfig, gateway: Gateway,
                         status: str = "critical") -> dict[str, Any]:
    """A gateway as Consul registers an ingress gateway: ``Kind = "ingress-gateway"``, its
    first listener's port, every listener in ``Meta`` (``gateway-listeners``: PROTOCOL:PORT,
    comma-separated) and the services it routes to (``gateway-routes``)."""
    sid = f"{gateway.name}-{config.node}"
    target = gateway_probe_target(gateway)
    listeners = ",".join(f"{x.protocol}:{x.port}" for x in gateway.listeners)
    routes = ",".join(sorted({r.service for r in gateway.routes}))
    return {
        "ID": sid,
        "Name": gateway.name,
        "Kind": "ingress-gateway",
        "Tags": ["meshd", "gateway"],
        "Address": config.address,
        "Port": gateway.listeners[0].port,
        "Meta": {NODE_META: config.node, "gateway-listeners": listeners,
                 "gateway-routes": routes, **admin_meta(config)},
        "Check": {
            "CheckID": check_id(sid),
            "Name": f"meshd gateway {gateway.name} listening",
            "TTL": _ttl(target),
            "Status": status,
            "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER,
        },
    }
