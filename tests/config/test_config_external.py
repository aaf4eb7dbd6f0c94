"""``external`` destinations and the ``egress`` mode in routes.toml: what is accepted, what
is refused with its key path, the canonical form, and ``meshd validate`` on a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshd.config.routes import parse_routes, routes_to_data
from meshd.config.schema import EgressMode, ExternalService, ExternalTLS
from meshd.errors import ConfigError


def table(external: Any, **dest: Any) -> dict[str, Any]:
    return {"destinations": {"bank": {"external": external, **dest}}}


def problems(data: dict[str, Any]) -> set[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_routes(data)
    return {(p.path, p.reason) for p in info.value.problems}


def test_hosts_and_addresses_forms_and_their_defaults() -> None:
    t = parse_routes(table({"hosts": ["api.bank.example"], "port": 443},
                           timeout="2s", retries={"attempts": 2},
                           policy={"max_connections": 10}))
    bank = t.get("bank")
    assert bank is not None and bank.external == ExternalService(
        hosts=("api.bank.example",), port=443, tls=ExternalTLS.ORIGINATE)
    assert bank.external.authority == "api.bank.example"
    assert bank.timeout == 2.0 and bank.policy.max_connections == 10
    assert t.egress is EgressMode.REGISTERED_ONLY  # fail closed by default
    t2 = parse_routes({"egress": "allow-any", **table(
        {"addresses": ["127.0.0.1:9443", "[::1]:9443"], "sni": "bank.example",
         "ca_file": "/etc/meshd/bank-ca.pem"})})
    ext = t2.get("bank").external  # type: ignore[union-attr]
    assert ext is not None and ext.addresses == (("127.0.0.1", 9443), ("::1", 9443))
    assert ext.names == ("bank.example",) and ext.authority == "bank.example:9443"
    assert t2.egress is EgressMode.ALLOW_ANY
    assert t2.external_for("bank.example") is t2.get("bank")
    for t_ in (t, t2):  # the canonical form reads back the same
        assert parse_routes(routes_to_data(t_)) == t_


@pytest.mark.parametrize(("external", "dest", "path", "reason"), [
    ({"hosts": ["bank.example"]}, {}, "destinations.bank.external.port",
     "required key is missing"),
    ({"hosts": ["bank.example"], "port": 443, "addresses": ["1.2.3.4:443"]}, {},
     "destinations.bank.external",
     'expected exactly one of hosts (DNS names, with port) or addresses ("IP:PORT")'),
    ({"hosts": [], "port": 443}, {}, "destinations.bank.external.hosts",
     "empty: name at least one host"),
    ({"hosts": ["Bank_Example"], "port": 443}, {}, "destinations.bank.external.hosts[0]",
     "expected a DNS name in lower case, got 'Bank_Example'"),
    ({"hosts": ["10.0.0.1"], "port": 443}, {}, "destinations.bank.external.hosts[0]",
     "'10.0.0.1' is an IP address: use addresses"),
    ({"hosts": ["bank.example"], "port": 70000}, {}, "destinations.bank.external.port",
     "port 70000 out of range (1-65535)"),
    ({"addresses": ["bank.example:443"], "sni": "bank.example"}, {},
     "destinations.bank.external.addresses[0]", "'bank.example' is not an IP address"),
    ({"addresses": ["127.0.0.1:9443"]}, {}, "destinations.bank.external.sni",
     'required with addresses and tls = "originate": the name the server\'s certificate '
     "must carry"),
    ({"addresses": ["127.0.0.1:9443"], "port": 1, "tls": "none"}, {},
     "destinations.bank.external.port", 'addresses carry their own port ("IP:PORT")'),
    ({"hosts": ["bank.example"], "port": 443, "tls": "mtls"}, {},
     "destinations.bank.external.tls", "must be one of originate, none, got 'mtls'"),
    ({"hosts": ["bank.example"], "port": 80, "tls": "none", "ca_file": "/ca.pem"}, {},
     "destinations.bank.external.ca_file", 'only with tls = "originate"'),
    ({"hosts": ["bank.example"], "port": 443, "ca_file": "ca.pem"}, {},
     "destinations.bank.external.ca_file",
     "expected an absolute path (the table is mesh-wide: each host reads this file), "
     "got 'ca.pem'"),
    ({"hosts": ["bank.example"], "port": 443, "cert": "x"}, {},
     "destinations.bank.external.cert",
     "unknown key (expected one of: addresses, ca_file, hosts, port, sni, tls)"),
    ({"hosts": ["bank.example"], "port": 443}, {"subsets": {"v1": {"version": "v1"}}},
     "destinations.bank.subsets",
     "not allowed with external: an external service has no versions to split among"),
    ({"hosts": ["bank.example"], "port": 443}, {"authorization": {"rules": []}},
     "destinations.bank.authorization", "not allowed with external: authorization is "
     "checked by a destination's inbound meshd; an external service has none"),
    ("bank.example", {}, "destinations.bank.external", "expected a table, got str"),
])
def test_invalid_external_values_name_their_key_path(external: Any, dest: dict[str, Any],
                                                     path: str, reason: str) -> None:
    assert (path, reason) in problems(table(external, **dest))


def test_a_host_declared_twice_and_a_bad_egress_mode() -> None:
    found = problems({"egress": "open", "destinations": {
        "bank": {"external": {"hosts": ["bank.example"], "port": 443}},
        "bank2": {"external": {"hosts": ["bank.example"], "port": 8443}}}})
    assert ("destinations.bank2.external",
            "host 'bank.example' is also declared by destinations.bank") in found
    assert ("egress", "must be one of registered-only, allow-any, got 'open'") in found


def test_meshd_validate_reports_external_problems_with_key_paths(tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text('egress = "registered-only"\n'
                      '[destinations.bank]\n'
                      'external = { addresses = ["127.0.0.1:9443"], ca_file = "bank.pem" }\n')
    res = subprocess.run([sys.executable, "-m", "meshd", "validate", str(routes)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert any(line.startswith(f"{routes}: destinations.bank.external.sni: required")
               for line in lines), lines
    assert any(line.startswith(f"{routes}: destinations.bank.external.ca_file: expected an "
                               "absolute path") for line in lines), lines
