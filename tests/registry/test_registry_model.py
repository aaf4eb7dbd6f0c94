"""Pure cores of discovery: translating a health/connect answer, diffing snapshots, the index
rules, registration payloads, backoff and watch staleness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshd.backoff import backoff_delay
from meshd.config.parse import parse_host_config
from meshd.registry import registration
from meshd.registry.consul import next_index
from meshd.registry.model import Endpoint, diff_endpoints, endpoints_from_health_connect
from meshd.registry.watch import WatchStatus


def _entry(node: str, addr: str, version: str, status: str = "passing",
           kind: str = "connect-proxy", dest: str = "payments") -> dict[str, Any]:
    return {
        "Node": {"Node": "registry", "Address": "127.0.0.1"},
        "Service": {
            "ID": f"{dest}-{node}-sidecar-proxy", "Service": f"{dest}-sidecar-proxy",
            "Kind": kind, "Address": addr, "Port": 15001,
            "Meta": {"version": version, "meshd-node": node},
            "Proxy": {"DestinationServiceName": dest, "DestinationServiceID": f"{dest}-{node}"},
        },
        "Checks": [{"CheckID": "serfHealth", "Status": "passing"},
                   {"CheckID": f"service:{dest}-{node}-sidecar-proxy", "Status": status}],
    }


def test_endpoints_from_health_connect() -> None:
    entries = [_entry("host-c", "127.0.0.4", "v2"), _entry("host-b", "127.0.0.3", "v1"),
               _entry("host-d", "127.0.0.5", "v1", status="critical"),
               _entry("host-e", "127.0.0.6", "v1", kind=""),
               _entry("host-f", "127.0.0.7", "v1", dest="cart")]
    eps = endpoints_from_health_connect("payments", entries)
    assert [(e.node, e.address, e.port, e.version, e.healthy) for e in eps] == [
        ("host-b", "127.0.0.3", 15001, "v1", True),
        ("host-c", "127.0.0.4", 15001, "v2", True),
        ("host-d", "127.0.0.5", 15001, "v1", False),
    ]
    assert eps[0].instance_id == "payments-host-b"


def test_diff_endpoints() -> None:
    a = Endpoint("p", "p-1", "n1", "127.0.0.3", 15001, "v1")
    b = Endpoint("p", "p-2", "n2", "127.0.0.4", 15001, "v2")
    b_down = Endpoint("p", "p-2", "n2", "127.0.0.4", 15001, "v2", healthy=False)
    c = Endpoint("p", "p-3", "n3", "127.0.0.5", 15001, "v1")
    d = diff_endpoints([a, b], [b_down, c])
    assert d.added == (c,) and d.removed == (a,) and d.changed == (b_down,)
    assert diff_endpoints([a], [a]).empty


@pytest.mark.parametrize(("prev", "returned", "expected"), [
    (0, 0, 1), (0, 7, 7), (7, 7, 7), (7, 9, 9), (9, 3, 0),
])
def test_next_index_rules(prev: int, returned: int, expected: int) -> None:
    assert next_index(prev, returned) == expected


def test_backoff_grows_caps_and_jitters() -> None:
    assert backoff_delay(0, 0.0) == pytest.approx(0.125)
    assert backoff_delay(0, 0.999) < 0.25
    assert backoff_delay(3, 0.0) == pytest.approx(1.0)
    assert backoff_delay(100, 0.0) == pytest.approx(15.0)
    assert backoff_delay(100, 0.999) <= 30.0


def test_watch_staleness() -> None:
    w = WatchStatus("endpoints/payments", created=90.0)
    assert w.stale(100.0) and w.staleness(100.0) == 10.0  # never read from the registry yet
    w.succeeded(100.0, 5)
    w.failed(110.0, "connection refused")
    assert w.staleness(130.0) == pytest.approx(30.0)
    w.succeeded(131.0, 6)
    assert w.staleness(200.0) == 0.0 and w.last_error == ""


def test_registration_follows_the_sidecar_convention(tmp_path: Path) -> None:
    config = parse_host_config({
        "node": "host-b", "address": "127.0.0.3", "trust_domain": "shop.mesh",
        "ca": {"url": "https://127.0.0.1:8443", "fingerprint": "sha256:" + "0" * 64,
               "token_file": "t"},
        "inbound": {"port": 15001},
        "services": [{"name": "payments", "port": 9001, "version": "v2",
                      "address": "127.0.0.3", "health": {"http": "/healthz", "interval": "2s"}}],
    }, "m.toml", tmp_path)
    svc = config.services[0]
    app = registration.app_registration(config, svc)
    proxy = registration.proxy_registration(config, svc)
    assert app["ID"] == "payments-host-b" and app["Port"] == 9001
    assert app["Meta"]["version"] == "v2" and "v2" in app["Tags"]
    assert app["Check"]["TTL"] == "6s"
    assert app["Check"]["DeregisterCriticalServiceAfter"] == "1m"
    assert app["Check"]["Status"] == "critical"  # until a probe says otherwise
    assert registration.proxy_registration(config, svc, "passing")["Check"]["Status"] == "passing"
    assert proxy["Kind"] == "connect-proxy" and proxy["Port"] == 15001
    assert proxy["Proxy"]["DestinationServiceName"] == "payments"
    assert proxy["Proxy"]["LocalServicePort"] == 9001
    assert proxy["Address"] == "127.0.0.3"


def test_host_labels_travel_in_meta_to_the_endpoints(tmp_path: Path) -> None:
    config = parse_host_config({
        "node": "host-b", "address": "127.0.0.3", "trust_domain": "shop.mesh",
        "ca": {"url": "https://127.0.0.1:8443", "fingerprint": "sha256:" + "0" * 64,
               "token_file": "t"},
        "labels": {"zone": "eu-1", "region": "eu"},
        "services": [{"name": "payments", "port": 9001}],
    }, "m.toml", tmp_path)
    proxy = registration.proxy_registration(config, config.services[0], "passing")
    assert proxy["Meta"]["meshd-label-zone"] == "eu-1"
    entry = _entry("host-b", "127.0.0.3", "v1")
    entry["Service"]["Meta"] = proxy["Meta"] | {"meshd-label-": "x", "meshd-label-odd": 3}
    (endpoint,) = endpoints_from_health_connect("payments", [entry])
    assert endpoint.labels == (("region", "eu"), ("zone", "eu-1"))
    assert endpoint.label("zone") == "eu-1" and endpoint.label("rack") is None


@pytest.mark.parametrize(("admin", "published"), [
    ({}, ("127.0.0.1:15000", "false")),  # the default: loopback only, published as it is
    ({"address": "10.0.0.5:15000", "tls": True}, ("10.0.0.5:15000", "true")),
    ({"address": "0.0.0.0:15100", "tls": True}, ("10.0.0.5:15100", "true")),  # wildcard: host's
    ({"address": "[::]:15100", "tls": True}, ("10.0.0.5:15100", "true")),
    ({"address": "[fd00::5]:15100", "tls": True}, ("[fd00::5]:15100", "true")),
])
def test_each_registration_publishes_the_admin_address_and_whether_it_needs_tls(
        tmp_path: Path, admin: dict[str, Any], published: tuple[str, str]) -> None:
    config = parse_host_config({
        "node": "host-b", "address": "10.0.0.5", "trust_domain": "shop.mesh",
        "ca": {"url": "https://127.0.0.1:8443", "fingerprint": "sha256:" + "0" * 64,
               "token_file": "t"},
        "admin": admin, "services": [{"name": "payments", "port": 9001}],
    }, "m.toml", tmp_path)
    svc = config.services[0]
    for definition in (registration.app_registration(config, svc),
                       registration.proxy_registration(config, svc)):
        meta = definition["Meta"]
        assert (meta["meshd-admin"], meta["meshd-admin-tls"]) == published
