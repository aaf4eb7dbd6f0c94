"""Table tests for meshd.toml / routes.toml parsing: every defect names its key path and reason,
and all defects of a file are reported at once."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshd.config.durations import format_duration, parse_duration
from meshd.config.load import load_host_config, validate_file
from meshd.config.parse import parse_host_config, parse_routes, routes_to_data
from meshd.config.schema import AccessLogFormat, Protocol
from meshd.errors import ConfigError

FP = "sha256:" + "ab" * 32

HOST: dict[str, Any] = {
    "node": "host-a",
    "address": "127.0.0.2",
    "trust_domain": "shop.mesh",
    "registry": "consul://127.0.0.1:8500",
    "ca": {"url": "https://127.0.0.1:8443", "fingerprint": FP, "token_file": "join-token"},
    "inbound": {"port": 15001},
    "admin": {"address": "127.0.0.2:15000"},
    "services": [
        {"name": "web", "port": 8080, "version": "v1",
         "health": {"http": "/healthz", "interval": "1s"},
         "upstreams": [{"name": "payments", "local_port": 9191}]},
        {"name": "db", "port": 5432, "protocol": "tcp"},
    ],
}

ROUTES: dict[str, Any] = {
    "destinations": {
        "payments": {
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
            "split": {"v1": 90, "v2": 10},
            "timeout": "3s",
        }
    }
}


def test_valid_host_config_parses_into_frozen_tree(tmp_path: Path) -> None:
    config = parse_host_config(HOST, "meshd.toml", tmp_path)
    assert config.node == "host-a"
    assert config.registry_url == "http://127.0.0.1:8500"
    assert config.ca.token_file == tmp_path / "join-token"
    assert config.admin_host == "127.0.0.2" and config.admin_port == 15000
    web, db = config.services
    assert web.health.kind == "http" and web.health.interval == 1.0
    assert web.upstreams[0].name == "payments" and web.upstreams[0].local_port == 9191
    assert db.protocol is Protocol.TCP
    with pytest.raises(AttributeError):
        config.node = "other"  # type: ignore[misc]


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(base)
    keys = path.replace("]", "").replace("[", ".").split(".")
    target: Any = data
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if value is _DELETE:
        del target[last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return data


_DELETE = object()

OPEN_OUTBOUND = (
    " is not a loopback address: an outbound listener is plaintext and calls the mesh with this "
    "host's service identities, so beyond loopback anyone who reaches it speaks as those "
    "services; keep it on loopback, or say why it is safe in outbound.beyond_loopback = \"...\" "
    "(e.g. a firewall admits only the local containers)")
HOST_CASES = [
    ("services[0].port", 70000, "services[0].port", "port 70000 out of range (1-65535)"),
    ("services[0].port", "8080", "services[0].port", "expected an integer, got str"),
    ("services[0].port", True, "services[0].port", "expected an integer, got a boolean"),
    ("services[1].port", 8080, "services[1].port",
     "duplicate local port 8080 (also services[0].port)"),
    ("services[0].upstreams[0].local_port", 15001, "services[0].upstreams[0].local_port",
     "duplicate local port 15001 (also inbound.port)"),
    ("services[0].upstreams[0].local_port", 8080, "services[0].upstreams[0].local_port",
     "duplicate local port 8080 (also services[0].port)"),
    ("admin.address", "0.0.0.0:15000", "admin.address",
     "0.0.0.0 is not a loopback address: without TLS the admin API (state, metrics) is "
     "unauthenticated and stays on loopback (127.0.0.0/8 or ::1); set admin.tls = true to serve "
     "it beyond, to holders of an operator certificate (`meshd ca issue --operator NAME`)"),
    ("outbound", {"address": "0.0.0.0"}, "outbound.address", "0.0.0.0" + OPEN_OUTBOUND),
    ("outbound", {"address": "10.0.0.5", "beyond_loopback": "  "}, "outbound.address",
     "10.0.0.5" + OPEN_OUTBOUND),
    ("outbound", {"address": "127.0.0.1", "open": True}, "outbound.open",
     "unknown key (expected one of: address, beyond_loopback, egress_port, max_connections)"),
    ("admin", {"address": "127.0.0.1:15000", "allowed_hosts": ["ok.example", "bad name"]},
     "admin.allowed_hosts[1]",
     "expected a DNS name clients use to reach the admin API, got 'bad name'"),
    ("services[1].mtls", "off", "services[1].mtls",
     "must be one of strict, permissive, got 'off'"),
    ("services[0].protocol", "h3", "services[0].protocol",
     "must be one of http, http2, grpc, tcp, got 'h3'"),
    ("services[0].name", "Web_1", "services[0].name",
     "invalid name 'Web_1': use lowercase letters, digits and '-' (max 63)"),
    ("services[1].name", "web", "services[1].name", "duplicate service 'web' (also services[0])"),
    ("services[0].health.interval", "soon", "services[0].health.interval",
     "invalid duration 'soon' (use e.g. 500ms, 10s, 1m30s, 24h)"),
    ("services[0].health", {"grpc": "greeter v1"}, "services[0].health.grpc",
     "expected a gRPC service name, got 'greeter v1'"),
    ("services[0].health", {"grpc": "", "tcp": True}, "services[0].health",
     "choose one check kind, got grpc and tcp"),
    ("node", _DELETE, "node", "required key is missing"),
    ("ca", _DELETE, "ca", "required table is missing (url, fingerprint, token_file)"),
    ("ca.url", "http://127.0.0.1:8443", "ca.url",
     "the CA is only reached over https, got 'http://127.0.0.1:8443'"),
    ("ca.fingerprint", "abc", "ca.fingerprint",
     "expected sha256:<64 hex digits> as printed by `meshd ca init`"),
    ("registry", "redis://x", "registry",
     "expected consul://HOST:PORT or http(s)://HOST:PORT, got 'redis://x'"),
    ("admin.address", "localhost", "admin.address",
     "expected HOST:PORT with a port in 1-65535, got 'localhost'"),
    ("address", "host-a.local", "address", "'host-a.local' is not an IP address"),
    ("access_log", {"format": "xml"}, "access_log.format",
     "must be one of text, json, envoy, off, got 'xml'"),
    ("access_log", {"format": "json", "file": "/var/log/x"}, "access_log.file",
     "unknown key (expected one of: format)"),
    ("access_log", "json", "access_log", "expected a table, got str"),
    ("colour", "blue", "colour", "unknown key (expected one of: access_log, address, admin, ca, "
     "drain_timeout, gateways, inbound, labels, node, outbound, registry, registry_token, "
     "registry_token_file, services, state_dir, tracing, trust_domain, workers)"),
    ("drain_timeout", "soon", "drain_timeout",
     "invalid duration 'soon' (use e.g. 500ms, 10s, 1m30s, 24h)"),
    ("drain_timeout", 0, "drain_timeout", "duration must be greater than zero"),
    ("workers", 0, "workers",
     "expected \"auto\" or a number of worker processes from 1 to 64, got 0"),
    ("workers", "many", "workers",
     "expected \"auto\" or a number of worker processes from 1 to 64, got 'many'"),
    ("workers", True, "workers",
     "expected \"auto\" or a number of worker processes from 1 to 64, got True"),
]


def test_workers_default_to_auto_and_take_a_count() -> None:
    assert parse_host_config(HOST, "a.toml").workers is None  # auto: decided on the host
    assert parse_host_config(HOST | {"workers": "auto"}, "a.toml").workers is None
    assert parse_host_config(HOST | {"workers": 4}, "a.toml").workers == 4


def test_access_log_format_defaults_to_text_and_takes_each_format() -> None:
    assert parse_host_config(HOST, "a.toml").access_log is AccessLogFormat.TEXT
    for fmt in AccessLogFormat:
        config = parse_host_config(HOST | {"access_log": {"format": fmt.value}}, "a.toml")
        assert config.access_log is fmt


def test_drain_timeout_defaults_to_ten_seconds_and_takes_a_duration() -> None:
    assert parse_host_config(HOST, "a.toml").drain_timeout == 10.0
    assert parse_host_config(_with(HOST, "drain_timeout", "1m30s"), "a.toml").drain_timeout == 90



@pytest.mark.parametrize(("path", "value", "where", "reason"), HOST_CASES)
def test_host_config_problem_names_key_path_and_reason(
    path: str, value: Any, where: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_host_config(_with(HOST, path, value), "hosts/a.toml")
    rendered = [str(p) for p in info.value.problems]
    assert f"hosts/a.toml: {where}: {reason}" in rendered


def test_host_labels_are_names_and_values() -> None:
    config = parse_host_config(HOST | {"labels": {"zone": "eu-1", "region": "eu"}}, "a.toml")
    assert config.labels == (("region", "eu"), ("zone", "eu-1"))
    assert parse_host_config(HOST, "a.toml").labels == ()
    with pytest.raises(ConfigError) as info:
        parse_host_config(HOST | {"labels": {"Zone": "x", "rack": 7}}, "a.toml")
    assert [str(p) for p in info.value.problems] == [
        "a.toml: labels.Zone: invalid label name 'Zone' (use lowercase letters, digits and "
        "'-' (max 63))",
        "a.toml: labels.rack: invalid label value 7 (use lowercase letters, digits and '-' "
        "(max 63))"]


def test_admin_allowed_hosts_are_kept_in_lower_case() -> None:
    data = _with(HOST, "admin", {"address": "127.0.0.1:15000", "allowed_hosts": ["VM1.Example"]})
    assert parse_host_config(data, "hosts/a.toml").admin_allowed_hosts == ("vm1.example",)


def test_an_outbound_listener_beyond_loopback_needs_a_reason() -> None:
    data = _with(HOST, "outbound", {"address": "172.17.0.1",
                                    "beyond_loopback": "docker bridge, firewalled to containers"})
    config = parse_host_config(data, "hosts/a.toml")
    assert config.outbound_address == "172.17.0.1"
    assert config.outbound_beyond_loopback == "docker bridge, firewalled to containers"
    assert parse_host_config(HOST, "hosts/a.toml").outbound_beyond_loopback == ""


def test_registry_token_file_is_read_at_load(tmp_path: Path) -> None:
    (tmp_path / "registry-token").write_text("  s3cret\n\n")
    (tmp_path / "meshd.toml").write_text(
        'node = "host-a"\ntrust_domain = "shop.mesh"\nregistry_token_file = "registry-token"\n'
        f'[ca]\nurl = "https://127.0.0.1:8443"\nfingerprint = "{FP}"\n'
        'token_file = "join-token"\n')
    parsed = parse_host_config({**HOST, "registry_token_file": "registry-token"},
                               base_dir=tmp_path)
    assert (parsed.registry_token_file, parsed.registry_token) == (
        tmp_path / "registry-token", "")   # pure: the file is not read
    loaded = load_host_config(tmp_path / "meshd.toml")
    assert loaded.registry_token == "s3cret"
    assert loaded.registry_token_file == tmp_path / "registry-token"

    (tmp_path / "registry-token").write_text("\n")
    with pytest.raises(ConfigError) as info:
        load_host_config(tmp_path / "meshd.toml")
    assert str(info.value) == (f"{tmp_path / 'meshd.toml'}: registry_token_file: "
                               f"{tmp_path / 'registry-token'} is empty")
    (tmp_path / "registry-token").unlink()
    with pytest.raises(ConfigError) as info:
        load_host_config(tmp_path / "meshd.toml")
    assert str(info.value) == (f"{tmp_path / 'meshd.toml'}: registry_token_file: cannot read "
                               f"{tmp_path / 'registry-token'}: No such file or directory")


@pytest.mark.parametrize(("extra", "reason"), [
    ({"registry_token_file": "t", "registry_token": "x"},
     "registry_token is set too: give the token in one place"),
    ({"registry_token_file": " "}, "expected the path of a file holding the ACL token"),
    ({"registry_token_file": 7}, "expected a string, got int"),
])
def test_registry_token_file_problems(extra: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_host_config({**HOST, **extra}, "a.toml")
    assert [(p.path, p.reason) for p in info.value.problems] == [
        ("registry_token_file", reason)]


def test_every_problem_is_reported_at_once() -> None:
    data = _with(_with(HOST, "services[0].port", 0), "ca.fingerprint", "x")
    with pytest.raises(ConfigError) as info:
        parse_host_config(data, "m.toml")
    assert {p.path for p in info.value.problems} == {"services[0].port", "ca.fingerprint"}


ROUTE_CASES = [
    ("destinations.payments.split.v1", 85, "destinations.payments.split",
     "weights sum to 95, must sum to 100"),
    ("destinations.payments.split.v3", 0, "destinations.payments.split.v3",
     "unknown subset 'v3' (declared: v1, v2)"),
    ("destinations.payments.split.v1", 101, "destinations.payments.split.v1",
     "weight 101 out of range (0-100)"),
    ("destinations.payments.split.v1", 89.5, "destinations.payments.split.v1",
     "weight must be an integer, got 89.5"),
    ("destinations.payments.timeout", "-1s", "destinations.payments.timeout",
     "invalid duration '-1s' (use e.g. 500ms, 10s, 1m30s, 24h)"),
    ("destinations.payments.subsets.v2", "v2", "destinations.payments.subsets.v2",
     'expected a table like { version = "v1" }'),
    ("destinations.payments.retry", 3, "destinations.payments.retry",
     "unknown key (expected one of: authorization, external, fault, mirror, policy, "
     "rate_limit, request_headers, response_headers, retries, routes, split, subsets, "
     "timeout)"),
    ("destinations.payments.retries", 3, "destinations.payments.retries",
     "expected a table, got int"),
]


@pytest.mark.parametrize(("path", "value", "where", "reason"), ROUTE_CASES)
def test_routes_problem_names_key_path_and_reason(
    path: str, value: Any, where: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_routes(_with(ROUTES, path, value), "routes.toml")
    assert f"routes.toml: {where}: {reason}" in [str(p) for p in info.value.problems]


def test_routes_round_trip_through_canonical_form() -> None:
    table = parse_routes(ROUTES)
    dest = table.get("payments")
    assert dest is not None and dest.timeout == 3.0
    assert [(leg.subset, leg.weight) for leg in dest.split] == [("v1", 90), ("v2", 10)]
    assert parse_routes(routes_to_data(table)) == table


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25), ("10s", 10.0), ("1m30s", 90.0), ("24h", 86400.0), ("1.5s", 1.5), ("0", 0.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "1x", "1s2", "-1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_validate_command_exit_codes_and_lines(tmp_path: Path) -> None:
    good = tmp_path / "routes.toml"
    good.write_text('[destinations.payments]\nsplit = { v1 = 100 }\n'
                    '[destinations.payments.subsets]\nv1 = { version = "v1" }\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[destinations.payments]\nsplit = { v1 = 90, v2 = 5 }\n'
                   '[destinations.payments.subsets]\nv1 = { version = "v1" }\n'
                   'v2 = { version = "v2" }\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("node = \n")
    ok = subprocess.run([sys.executable, "-m", "meshd", "validate", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    res = subprocess.run([sys.executable, "-m", "meshd", "validate", str(good), str(bad),
                          str(broken)], capture_output=True, text=True)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert f"{bad}: destinations.payments.split: weights sum to 95, must sum to 100" in lines
    assert any(line.startswith(f"{broken}: <root>: invalid TOML") for line in lines)
    assert validate_file(tmp_path / "missing.toml")[0].reason == "file not found"
