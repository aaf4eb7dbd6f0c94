"""``meshd up``'s stand-ins for services outside the mesh: ``[[external]]`` in mesh.toml, the
demo PKI made for one, the route table pointed at its CA, and the shop's bank as a real child
process speaking verified TLS (free ports: no lock needed)."""

from __future__ import annotations

import copy
import http.client
import json
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from net_testing import free_port

from meshd.config.mesh import parse_mesh
from meshd.config.mesh_schema import MeshExternal, port_claims
from meshd.config.routes import parse_routes, routes_to_data
from meshd.dev import childlog
from meshd.dev.external import expand_external_command, make_tls_files, with_ca_files
from meshd.errors import ConfigError

SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop"
MESH: dict[str, Any] = {
    "trust_domain": "shop.mesh",
    "hosts": [{"name": "host-b", "address": "127.0.0.3", "services": [{
        "name": "payments", "port": 9001, "upstreams": [{"name": "bank", "local_port": 9393}],
        "command": ["{python}", "{here}/payments.py"]}]}],
    "external": [{"name": "bank", "port": 9443, "tls_name": "bank.shop.example",
                  "command": ["{python}", "{here}/bank.py", "--cert", "{cert}", "--key",
                              "{key}", "--port", "{port}"]}],
}


def test_an_external_stand_in_is_parsed_claims_its_port_and_satisfies_an_upstream() -> None:
    mesh = parse_mesh(MESH, "mesh.toml", Path("/m"))
    assert mesh.externals == (MeshExternal("bank", "127.0.0.1", 9443, tuple(
        MESH["external"][0]["command"]), "bank.shop.example"),)
    assert [(c.owner, c.key_path) for c in port_claims(mesh) if c.port == 9443] == [
        ("external bank", "external[0].port")]


@pytest.mark.parametrize(("change", "path", "reason"), [
    ({"tls_name": "Bank!"}, "external[0].tls_name", "expected a DNS name in lower case"),
    ({"tls_name": None}, "external[0].command", "{cert}, {key} and {ca} need tls_name"),
    ({"command": ["{python}", "{host}"]}, "external[0].command[1]",
     "unknown placeholder {host}"),
    ({"port": 9001, "address": "127.0.0.3"}, "external[0].port", "is also used by"),
    ({"colour": "red"}, "external[0].colour", "unknown key"),
])
def test_external_problems_name_their_key_path(change: dict[str, Any], path: str,
                                               reason: str) -> None:
    data = copy.deepcopy(MESH)
    data["external"][0].update(change)
    data["external"][0] = {k: v for k, v in data["external"][0].items() if v is not None}
    with pytest.raises(ConfigError) as info:
        parse_mesh(data, "mesh.toml", Path("/m"))
    found = {p.path: p.reason for p in info.value.problems}
    assert path in found and reason in found[path], found


def test_an_upstream_nobody_provides_is_still_refused() -> None:
    data = copy.deepcopy(MESH)
    data.pop("external")
    with pytest.raises(ConfigError) as info:
        parse_mesh(data, "mesh.toml", Path("/m"))
    assert any(p.path == "hosts[0].services[0].upstreams[0].name" for p in info.value.problems)


def test_the_route_table_gets_the_demo_ca_unless_it_names_its_own(tmp_path: Path) -> None:
    table = parse_routes({"destinations": {
        "bank": {"external": {"addresses": ["127.0.0.1:9443"], "sni": "bank.shop.example"}},
        "card": {"external": {"hosts": ["card.example"], "port": 443,
                              "ca_file": "/etc/card-ca.pem"}}}})
    ca = tmp_path / "ca.pem"
    changed = with_ca_files(table, {"bank": ca, "card": ca})
    assert changed.get("bank").external.ca_file == str(ca)  # type: ignore[union-attr]
    assert changed.get("card").external.ca_file == "/etc/card-ca.pem"  # type: ignore[union-attr]
    assert parse_routes(routes_to_data(changed)) == changed  # still a valid table


def test_the_shop_bank_serves_verified_tls_with_the_demo_certificate(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "bank", "bank.shop.example")
    assert files.key.stat().st_mode & 0o777 == 0o600
    port = free_port()
    shop = tomllib.loads((SHOP / "mesh.toml").read_text())
    (ext,) = parse_mesh(shop, "mesh.toml", SHOP).externals
    argv = expand_external_command(MeshExternal(ext.name, "127.0.0.1", port, ext.command,
                                                ext.tls_name),
                                   python=sys.executable, here=SHOP, files=files)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        trusted = ssl.create_default_context(cafile=str(files.ca))
        # the name is checked against the certificate's: connect by IP, name it bank.shop.example
        opener = urllib.request.build_opener(_SNIHandler(trusted, "bank.shop.example"))
        answer = _wait_for(lambda: opener.open(urllib.request.Request(
            f"https://127.0.0.1:{port}/charge", data=b'{"amount": 12}', method="POST"),
            timeout=5).read(), proc)
        assert json.loads(answer) == {"bank": "stand-in bank", "charge": "ch-1", "amount": 12,
                                      "approved": True}
        other = make_tls_files(tmp_path / "other", "bank.shop.example")
        refused = urllib.request.build_opener(_SNIHandler(
            ssl.create_default_context(cafile=str(other.ca)), "bank.shop.example"))
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            refused.open(f"https://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert b"bank: stopped" in (proc.stdout.read() if proc.stdout else b"")


class _SNIHandler(urllib.request.HTTPSHandler):
    """HTTPS to an IP address, with the certificate checked for ``name``."""

    def __init__(self, context: ssl.SSLContext, name: str) -> None:
        super().__init__(context=context)
        self.name = name

    def https_open(self, req: urllib.request.Request) -> Any:
        name = self.name
        context = self._context  # type: ignore[attr-defined]

        class Named(http.client.HTTPSConnection):
            def connect(self) -> None:
                http.client.HTTPConnection.connect(self)
                self.sock = context.wrap_socket(self.sock, server_hostname=name)

        return self.do_open(Named, req)


def _wait_for(call: Any, proc: subprocess.Popen[bytes]) -> bytes:
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            return bytes(call())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_the_route_table_line_says_where_an_external_destination_is() -> None:
    table = parse_routes({"destinations": {
        "bank": {"external": {"addresses": ["127.0.0.1:9443"], "sni": "bank.shop.example"}},
        "card": {"external": {"hosts": ["card.example", "card2.example"], "port": 443}}}})
    assert childlog.summarise_routes(routes_to_data(table)["destinations"]) == \
        "bank: external 127.0.0.1:9443; card: external card.example, card2.example"
