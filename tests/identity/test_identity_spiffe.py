from __future__ import annotations

import pytest

from meshd.identity.spiffe import parse_spiffe_id, spiffe_id_for, spiffe_ids_from_cert_der


def test_spiffe_id_for() -> None:
    assert spiffe_id_for("mesh.test", "web") == "spiffe://mesh.test/svc/web"
    assert spiffe_id_for("a-b_c.d", "pay-v2") == "spiffe://a-b_c.d/svc/pay-v2"


@pytest.mark.parametrize(
    ("trust_domain", "service"),
    [("", "web"), ("Mesh.test", "web"), ("mesh.test", ""), ("mesh.test", "a/b"),
     ("mesh.test", ".."), ("mesh test", "web"), ("mesh.test", "w" * 129)],
)
def test_spiffe_id_for_rejects_junk(trust_domain: str, service: str) -> None:
    with pytest.raises(ValueError):
        spiffe_id_for(trust_domain, service)


def test_parse_round_trips() -> None:
    assert parse_spiffe_id("spiffe://mesh.test/svc/web") == ("mesh.test", "web")
    assert parse_spiffe_id(spiffe_id_for("x.y", "cart-1")) == ("x.y", "cart-1")


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "web",
        "https://mesh.test/svc/web",
        "spiffe://",
        "spiffe://mesh.test",
        "spiffe://mesh.test/",
        "spiffe://mesh.test/svc/",
        "spiffe://mesh.test/svc/web/extra",
        "spiffe://mesh.test/ns/default/sa/web",
        "spiffe://MESH.test/svc/web",
        "spiffe://mesh.test:443/svc/web",
        "spiffe://user@mesh.test/svc/web",
        "spiffe://mesh.test/svc/web?x=1",
        "spiffe://mesh.test/svc/web#frag",
        "spiffe://mesh.test/svc/..",
        "spiffe:///svc/web",
    ],
)
def test_parse_rejects_junk(uri: str) -> None:
    with pytest.raises(ValueError):
        parse_spiffe_id(uri)


def test_spiffe_ids_from_cert_der_rejects_non_certificates() -> None:
    with pytest.raises(ValueError):
        spiffe_ids_from_cert_der(b"not a certificate")
