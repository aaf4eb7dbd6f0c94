"""mesh.toml: parsing, every kind of problem with its key path, and the generated meshd.toml."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from meshd.config.load import validate_file
from meshd.config.mesh import parse_mesh
from meshd.config.mesh_schema import HostPort, port_claims
from meshd.config.parse import parse_host_config
from meshd.config.schema import HealthCheck, MTLSMode, Protocol, Upstream
from meshd.dev import gateway_certs
from meshd.dev.generate import expand_command, host_config_data, render_toml
from meshd.errors import ConfigError

SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop"
FINGERPRINT = "sha256:" + "ab" * 32


def mesh_data() -> dict[str, Any]:
    return {
        "trust_domain": "shop.mesh",
        "routes": "routes.toml",
        "hosts": [
            {"name": "host-a", "address": "127.0.0.2", "services": [{
                "name": "web", "port": 8080, "address": "127.0.0.1",
                "health": {"http": "/healthz", "interval": "1s"},
                "upstreams": [{"name": "payments", "local_port": 9191}],
                "command": ["{python}", "{here}/web.py", "--port", "{port}"],
            }]},
            {"name": "host-b", "address": "127.0.0.3", "services": [{
                "name": "payments", "port": 9001, "version": "v1",
                "command": ["{python}", "{here}/payments.py", "--node", "{host}"],
            }]},
        ],
    }


def problems_of(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_mesh(data, "mesh.toml", Path("/m"))
    assert all(p.file == "mesh.toml" for p in info.value.problems)
    return {p.path: p.reason for p in info.value.problems}


def test_valid_mesh_has_defaults_filled_in() -> None:
    mesh = parse_mesh(mesh_data(), "mesh.toml", Path("/m"))
    assert mesh.trust_domain == "shop.mesh"
    assert mesh.registry == HostPort("127.0.0.1", 8500)
    assert mesh.ca == HostPort("127.0.0.1", 8443)
    assert mesh.routes == Path("/m/routes.toml")
    assert mesh.run_dir is None
    a, b = mesh.hosts
    assert (a.name, a.address, a.inbound_port, a.admin_port, a.outbound_address) == \
        ("host-a", "127.0.0.2", 15001, 15000, "127.0.0.1")
    web = a.services[0].service
    assert web.address == "127.0.0.1"     # given
    assert web.upstreams == (Upstream("payments", 9191),)
    assert web.health == HealthCheck("http", "/healthz", 1.0, 2.0)
    payments = b.services[0]
    assert payments.service.address == "127.0.0.3"    # the host's address by default
    assert payments.command == ("{python}", "{here}/payments.py", "--node", "{host}")


def test_the_shop_example_is_valid() -> None:
    path = SHOP / "mesh.toml"
    assert validate_file(path) == []
    assert validate_file(SHOP / "routes.toml") == []
    mesh = parse_mesh(tomllib.loads(path.read_text()), str(path), path.parent)
    assert [h.address for h in mesh.hosts] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    versions = [ms.service.version for h in mesh.hosts for ms in h.services
                if ms.service.name == "payments"]
    assert versions == ["v1", "v2"]


@pytest.mark.parametrize(("mutate", "path", "reason"), [
    (lambda d: d.pop("trust_domain"), "trust_domain", "required key is missing"),
    (lambda d: d.update(trust_domain="Bad Domain"), "trust_domain", "invalid trust domain"),
    (lambda d: d.update(colour="red"), "colour", "unknown key"),
    (lambda d: d.update(registry="localhost:8500"), "registry", "is not an IP address"),
    (lambda d: d.update(ca="127.0.0.1"), "ca", "expected HOST:PORT"),
    (lambda d: d.update(routes=3), "routes", "expected a path"),
    (lambda d: d.update(**{"try": "curl"}), "try", "expected an array of strings"),
    (lambda d: d.pop("hosts"), "hosts", "required key is missing"),
    (lambda d: d.update(hosts=[]), "hosts", "non-empty array"),
    (lambda d: d["hosts"][1].pop("address"), "hosts[1].address", "required key is missing"),
    (lambda d: d["hosts"][1].update(address="host-b"), "hosts[1].address",
     "is not an IP address"),
    (lambda d: d["hosts"][1].update(name="Host_B"), "hosts[1].name", "invalid name"),
    (lambda d: d["hosts"][1].update(name="host-a"), "hosts[1].name", "duplicate host"),
    (lambda d: d["hosts"][1].update(admin_port=70000), "hosts[1].admin_port", "out of range"),
    (lambda d: d["hosts"][1].update(inbound_port="x"), "hosts[1].inbound_port",
     "expected an integer"),
    (lambda d: d["hosts"][1].update(admin_port=15001), "hosts[1].admin_port",
     "also the inbound port"),
    (lambda d: d["hosts"][1].update(services=[]), "hosts[1].services",
     "at least one service"),
    (lambda d: d["hosts"][1]["services"].append("x"), "hosts[1].services[1]",
     "expected a table"),
    (lambda d: d["hosts"][1]["services"][0].update(colour=1), "hosts[1].services[0].colour",
     "unknown key"),
    # service keys are checked by meshd.toml's own parser, reported at mesh.toml's key path
    (lambda d: d["hosts"][1]["services"][0].update(port=0), "hosts[1].services[0].port",
     "out of range"),
    (lambda d: d["hosts"][1]["services"][0].update(protocol="udp"),
     "hosts[1].services[0].protocol", "must be one of"),
    (lambda d: d["hosts"][0]["services"][0]["health"].update(interval="soon"),
     "hosts[0].services[0].health.interval", "invalid duration"),
    (lambda d: d["hosts"][0]["services"][0]["upstreams"][0].update(local_port=15001),
     "hosts[0].services[0].upstreams[0].local_port", "duplicate local port"),
    (lambda d: d["hosts"][1]["services"][0].update(command="payments.py"),
     "hosts[1].services[0].command", "non-empty array of strings"),
    (lambda d: d["hosts"][1]["services"][0].update(command=["{python}", "{pyhton}"]),
     "hosts[1].services[0].command[1]", "unknown placeholder {pyhton}"),
    (lambda d: d["hosts"][1]["services"][0].update(command=["{python", "x"]),
     "hosts[1].services[0].command[0]", "literal brace"),
    (lambda d: d["hosts"][0]["services"][0]["upstreams"][0].update(name="cart"),
     "hosts[0].services[0].upstreams[0].name", "no host in this mesh runs service 'cart'"),
])
def test_each_problem_is_reported_at_its_key_path(mutate: Any, path: str, reason: str) -> None:
    data = copy.deepcopy(mesh_data())
    mutate(data)
    found = problems_of(data)
    assert path in found, found
    assert reason in found[path]


def test_two_parts_on_one_address_and_port_clash() -> None:
    data = mesh_data()
    data["hosts"][1]["services"][0].update(address="127.0.0.1", port=8080)
    found = problems_of(data)
    assert found == {"hosts[1].services[0].port":
                     "127.0.0.1:8080 is also used by app web v1 (hosts[0].services[0].port)"}


def test_an_upstream_listener_clashes_with_another_hosts_upstream() -> None:
    data = mesh_data()
    data["hosts"][1]["services"][0]["upstreams"] = [{"name": "web", "local_port": 9191}]
    found = problems_of(data)
    assert "meshd host-a upstream payments" in found["hosts[1].services[0].upstreams[0].local_port"]


def test_a_wildcard_address_clashes_with_every_address_of_its_port() -> None:
    data = mesh_data()
    data["registry"] = "0.0.0.0:9001"
    found = problems_of(data)
    assert "is also used by registry" in found["hosts[1].services[0].port"]


def test_all_problems_are_reported_at_once() -> None:
    data = mesh_data()
    data.pop("trust_domain")
    data["hosts"][0]["name"] = "A"
    data["hosts"][1]["services"][0]["port"] = -1
    assert set(problems_of(data)) == {"trust_domain", "hosts[0].name",
                                      "hosts[1].services[0].port"}


def test_port_claims_name_every_listener_and_who_wants_it() -> None:
    mesh = parse_mesh(mesh_data())
    claims = {(c.address, c.port): (c.owner, c.key_path) for c in port_claims(mesh)}
    assert claims == {
        ("127.0.0.1", 8500): ("registry", "registry"),
        ("127.0.0.1", 8443): ("ca", "ca"),
        ("127.0.0.2", 15001): ("meshd host-a inbound", "hosts[0].inbound_port"),
        ("127.0.0.2", 15000): ("meshd host-a admin", "hosts[0].admin_port"),
        ("127.0.0.1", 8080): ("app web v1", "hosts[0].services[0].port"),
        ("127.0.0.1", 9191): ("meshd host-a upstream payments",
                              "hosts[0].services[0].upstreams[0].local_port"),
        ("127.0.0.3", 15001): ("meshd host-b inbound", "hosts[1].inbound_port"),
        ("127.0.0.3", 15000): ("meshd host-b admin", "hosts[1].admin_port"),
        ("127.0.0.3", 9001): ("app payments v1", "hosts[1].services[0].port"),
    }


# --------------------------------------------------------------------------------------------
# generated meshd.toml


def test_generated_host_config_is_accepted_by_the_daemons_parser(tmp_path: Path) -> None:
    mesh = parse_mesh(mesh_data(), "mesh.toml", tmp_path)
    host = mesh.hosts[0]
    data = host_config_data(mesh, host, fingerprint=FINGERPRINT,
                            registry_token_file="registry-token")
    text = render_toml(data, "generated\nby a test")
    assert text.startswith("# generated\n# by a test\n")
    assert tomllib.loads(text) == data

    config = parse_host_config(tomllib.loads(text), "meshd.toml", tmp_path / "hosts" / "host-a")
    assert config.node == "host-a"
    assert config.address == "127.0.0.2"
    assert config.trust_domain == "shop.mesh"
    assert config.registry_url == "http://127.0.0.1:8500"
    assert config.ca.url == "https://127.0.0.1:8443"
    assert config.ca.fingerprint == FINGERPRINT
    assert config.ca.token_file == tmp_path / "hosts" / "host-a" / "join-token"
    assert config.registry_token_file == tmp_path / "hosts" / "host-a" / "registry-token"
    assert config.state_dir == tmp_path / "hosts" / "host-a" / "state"
    assert (config.inbound_port, config.admin_host, config.admin_port) == \
        (15001, "127.0.0.2", 15000)
    assert config.outbound_address == "127.0.0.1"
    # the services round-trip exactly
    assert config.services == tuple(ms.service for ms in host.services)
    assert config.services[0].protocol is Protocol.HTTP


def test_a_permissive_service_stays_permissive_in_the_generated_meshd_toml(
        tmp_path: Path) -> None:
    data = mesh_data()
    data["hosts"][1]["services"][0]["mtls"] = "permissive"
    mesh = parse_mesh(data, "mesh.toml", tmp_path)
    text = render_toml(host_config_data(mesh, mesh.hosts[1], fingerprint=FINGERPRINT))
    assert tomllib.loads(text)["services"][0]["mtls"] == "permissive"
    config = parse_host_config(tomllib.loads(text))
    assert config.services == tuple(ms.service for ms in mesh.hosts[1].services)
    assert config.services[0].mtls is MTLSMode.PERMISSIVE


def test_every_host_of_the_shop_generates_a_valid_meshd_toml(tmp_path: Path) -> None:
    path = SHOP / "mesh.toml"
    mesh = parse_mesh(tomllib.loads(path.read_text()), str(path), path.parent)
    assert [g.name for h in mesh.hosts for g in h.gateways] == ["edge"]
    for host in mesh.hosts:
        if gateway_certs.needs_certificate(host):  # as `meshd up` does before writing
            _, cert, key = gateway_certs.make_certificate(tmp_path / "gateway")
            host = gateway_certs.with_certificate(host, cert, key)
        text = render_toml(host_config_data(mesh, host, fingerprint=FINGERPRINT))
        config = parse_host_config(tomllib.loads(text))
        assert config.services == tuple(ms.service for ms in host.services)
        assert config.gateways == host.gateways


def test_render_toml_escapes_strings_and_quotes_odd_keys() -> None:
    data = {"a": 'say "hi"\n\tand \\ bye ✓', "odd key": [1, 2.5, True],
            "t": {"x": 1}, "arr": [{"n": 1, "in": {"k": "v"}}, {"n": 2}]}
    assert tomllib.loads(render_toml(data)) == data


def test_expand_command_fills_placeholders() -> None:
    mesh = parse_mesh(mesh_data())
    host = mesh.hosts[1]
    ms = host.services[0]
    argv = expand_command((*ms.command, "{address}:{port}", "{name}-{version}", "{{x}}"),
                          host=host, service=ms.service, python="/py", here=Path("/m"))
    assert argv == ["/py", "/m/payments.py", "--node", "host-b", "127.0.0.3:9001",
                    "payments-v1", "{x}"]
