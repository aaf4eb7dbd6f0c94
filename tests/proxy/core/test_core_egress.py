"""The egress decisions, by tables: external endpoints, the egress verdict, the two proxy
request shapes."""

from __future__ import annotations

import pytest

from meshd.config.routes import parse_routes
from meshd.config.schema import ExternalService
from meshd.proxy.core.egress import (
    EgressKind,
    absolute_target,
    external_endpoints,
    judge_egress,
    parse_connect,
)
from meshd.proxy.core.http1 import ProtocolError

TABLE = {"destinations": {
    "bank": {"external": {"hosts": ["bank.example", "api.bank.example"], "port": 443}},
    "legacy": {"external": {"addresses": ["10.0.0.5:8080"], "tls": "none"}},
    "ledger": {"external": {"addresses": ["10.0.0.6:9443", "10.0.0.7:9444"],
                            "sni": "ledger.example"}},
}}


def test_external_endpoints_from_addresses_and_resolved_names() -> None:
    hosts = ExternalService(hosts=("a.example", "b.example"), port=443)
    found = external_endpoints("bank", hosts, {"a.example": ("192.0.2.1", "2001:db8::1")}, 5.0)
    assert [(e.node, e.address, e.port, e.instance_id) for e in found.endpoints] == [
        ("a.example", "192.0.2.1", 443, "192.0.2.1:443"),
        ("a.example", "2001:db8::1", 443, "[2001:db8::1]:443")]  # b.example: not resolved
    listed = ExternalService(addresses=(("10.0.0.6", 9443),), sni="ledger.example")
    (only,) = external_endpoints("ledger", listed, {}, 0.0).endpoints
    assert (only.node, only.address, only.port, only.service) == (
        "ledger.example", "10.0.0.6", 9443, "ledger")


@pytest.mark.parametrize(("egress", "host", "port", "tunnel", "kind", "destination"), [
    ("registered-only", "bank.example", 443, True, EgressKind.EXTERNAL, "bank"),
    ("registered-only", "API.bank.example.", 443, True, EgressKind.EXTERNAL, "bank"),
    ("registered-only", "bank.example", 80, False, EgressKind.EXTERNAL, "bank"),  # http://
    ("registered-only", "bank.example", 8443, True, EgressKind.DENIED, "bank"),
    ("allow-any", "bank.example", 8443, True, EgressKind.DENIED, "bank"),
    ("registered-only", "ledger.example", 9444, True, EgressKind.EXTERNAL, "ledger"),
    ("registered-only", "10.0.0.5", 8080, True, EgressKind.DENIED, ""),  # addresses: no name
    ("registered-only", "evil.example", 443, True, EgressKind.DENIED, ""),
    ("registered-only", "payments", 80, False, EgressKind.DENIED, ""),  # a mesh name
    ("allow-any", "evil.example", 443, True, EgressKind.PASSTHROUGH, ""),
    ("allow-any", "evil.example", 80, False, EgressKind.PASSTHROUGH, ""),
])
def test_egress_verdicts(egress: str, host: str, port: int, tunnel: bool, kind: EgressKind,
                         destination: str) -> None:
    verdict = judge_egress(parse_routes({**TABLE, "egress": egress}), host, port,
                           tunnel=tunnel)
    assert (verdict.kind, verdict.destination) == (kind, destination)
    if kind is EgressKind.DENIED and not destination:
        assert host in verdict.reason and '"registered-only"' in verdict.reason


@pytest.mark.parametrize(("head", "expected"), [
    (b"CONNECT bank.example:443 HTTP/1.1\r\nHost: bank.example:443\r\n\r\n",
     ("bank.example", 443)),
    (b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n", ("::1", 8443)),
    (b"CONNECT Bank.Example.:443 HTTP/1.0\r\n\r\n", ("bank.example", 443)),
])
def test_connect_heads(head: bytes, expected: tuple[str, int]) -> None:
    assert parse_connect(head) == expected


@pytest.mark.parametrize("head", [
    b"CONNECT bank.example HTTP/1.1\r\n\r\n", b"CONNECT bank.example:0 HTTP/1.1\r\n\r\n",
    b"CONNECT bank.example:443 HTTP/2\r\n\r\n", b"CONNECT  bank:443 HTTP/1.1\r\n\r\n",
    b"CONNECT bad_host!:443 HTTP/1.1\r\n\r\n", b"CONNECT \xff:443 HTTP/1.1\r\n\r\n",
])
def test_bad_connect_heads(head: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_connect(head)


@pytest.mark.parametrize(("target", "expected"), [
    (b"http://bank.example/charge?x=1", ("bank.example", 80, b"/charge?x=1")),
    (b"http://bank.example:8080", ("bank.example", 8080, b"/")),
    (b"http://127.0.0.1:9/a/b", ("127.0.0.1", 9, b"/a/b")),
])
def test_absolute_targets(target: bytes, expected: tuple[str, int, bytes]) -> None:
    assert absolute_target(target) == expected


@pytest.mark.parametrize("target", [
    b"/charge", b"https://bank.example/", b"http://user:pw@bank.example/",
    b"http:///nohost", b"http://bank.example:99999/",
])
def test_targets_the_egress_proxy_refuses(target: bytes) -> None:
    with pytest.raises(ProtocolError):
        absolute_target(target)
