"""``meshd routes apply | show | set-split`` as a process against a real registry over HTTP,
including a concurrent change between its read and its check-and-set write. Writes are signed
with an operator certificate from a test CA (``$MESHD_OPERATOR_CERT``/``KEY`` unless a test says
otherwise)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from operator_testing import issue_operator
from registry_testing import Registry, start_registry

from meshd.ca.store import init_ca
from meshd.config.load import load_routes
from meshd.config.routes import parse_routes, routes_to_data
from meshd.httpd import Request, Response, serve_http
from meshd.identity.signing import canonical_bytes, inspect
from meshd.operator_context import (
    OperatorContext,
    OperatorCredentials,
    context_path,
    write_context,
)
from meshd.registry.acl_policies import OPERATOR_POLICY, operator_rules
from meshd.registry.config_store import ROUTES_KEY
from meshd.registry.consul import ConsulClient
from meshd.registry.embedded.server import listen_port

SHOP_ROUTES = Path(__file__).resolve().parents[2] / "examples" / "shop" / "routes.toml"
ROUTES = """
[destinations.payments]
subsets = { v1 = { version = "v1" }, v2 = { version = "v2" } }
split = { v1 = 90, v2 = 10 }

[destinations.cart]
timeout = "2s"
"""


OPERATOR: dict[str, Path] = {}  # the operator certificate `meshd routes` signs with


@pytest.fixture(autouse=True, scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("operator")
    init_ca(tmp / "ca", "routes.test", now=datetime.now(UTC) - timedelta(hours=1))
    issue_operator(tmp / "ca", tmp / "out", "alice")
    OPERATOR.update(cert=tmp / "out" / "alice.crt", key=tmp / "out" / "alice.key",
                    ca=tmp / "out" / "ca.crt")
    yield OPERATOR
    OPERATOR.clear()


def table_of(value: bytes) -> Any:
    """The table in a stored value (a signed envelope, in canonical form)."""
    envelope = json.loads(value)
    assert value == canonical_bytes(envelope)
    return inspect(envelope, "routes").data


def meshd(registry: str, *args: str, token: str = "", runtime_dir: Path | None = None,
          signer_env: bool = True) -> subprocess.CompletedProcess[str]:
    # a private runtime dir: no operator context of a real `meshd up` of this user applies
    env = {"PATH": "/usr/bin:/bin", "CONSUL_HTTP_TOKEN": token,
           "XDG_RUNTIME_DIR": str(runtime_dir or Path("/nonexistent/runtime"))}
    if signer_env:
        env |= {"MESHD_OPERATOR_CERT": str(OPERATOR["cert"]),
                "MESHD_OPERATOR_KEY": str(OPERATOR["key"])}
    return subprocess.run([sys.executable, "-m", "meshd", "routes", "--registry", registry,
                           *args], capture_output=True, text=True, timeout=30, env=env)


async def run(registry: str, *args: str, token: str = "", runtime_dir: Path | None = None,
              signer_env: bool = True) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(
        lambda: meshd(registry, *args, token=token, runtime_dir=runtime_dir,
                      signer_env=signer_env))


async def stored(client: httpx.AsyncClient) -> tuple[bytes, int]:
    r = await client.get(f"/v1/kv/{ROUTES_KEY}?raw")
    if r.status_code == 404:
        return b"", 0
    return r.content, int(r.headers["X-Consul-Index"])


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES)
    return path


async def test_apply_show_and_set_split(registry: Registry, routes_file: Path) -> None:
    result = await run(registry.url, "show")
    assert result.returncode == 0, result.stderr
    assert "ModifyIndex 0" in result.stdout and "no route table stored" in result.stdout

    result = await run(registry.url, "apply", str(routes_file))
    assert result.returncode == 0, result.stderr
    value, index = await stored(registry.client)
    table = load_routes(routes_file)
    assert table_of(value) == routes_to_data(table)  # canonical, signed
    assert f"(ModifyIndex {index})" in result.stdout

    shown = await run(registry.url, "show")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"# {ROUTES_KEY} at ModifyIndex {index} ")
    signed = inspect(json.loads(value), "routes")
    assert (f"# signed by spiffe://routes.test/operator/alice (certificate {signed.serial}), "
            f"version {signed.version}, at ") in shown.stdout
    assert parse_routes(tomllib.loads(shown.stdout)) == table  # TOML that applies back

    result = await run(registry.url, "set-split", "payments", "v1=50", "v2=50")
    assert result.returncode == 0, result.stderr
    assert "v1=90, v2=10 -> v1=50, v2=50" in result.stdout
    value, new_index = await stored(registry.client)
    assert new_index > index
    assert table_of(value)["destinations"]["payments"]["split"] == {"v1": 50, "v2": 50}
    assert table_of(value)["destinations"]["cart"]["timeout"] == 2.0  # the rest is kept
    assert inspect(json.loads(value), "routes").version > signed.version

    for bad, reason in ((["payments", "v1=50", "v2=40"], "must sum to 100"),
                        (["payments", "v1=50", "v3=50"], "unknown subset 'v3'"),
                        (["payments", "v1=fifty"], "expected SUBSET=WEIGHT"),
                        (["nowhere", "v1=100"], "no such destination")):
        result = await run(registry.url, "set-split", *bad)
        assert result.returncode == 1 and reason in result.stderr, (bad, result.stderr)
    assert (await stored(registry.client))[1] == new_index  # refusals write nothing

    # the shipped demo file applies too
    assert (await run(registry.url, "apply", str(SHOP_ROUTES))).returncode == 0


async def test_writing_needs_an_operator_certificate(registry: Registry, routes_file: Path,
                                                     tmp_path: Path) -> None:
    result = await run(registry.url, "apply", str(routes_file), signer_env=False)
    assert result.returncode == 1
    assert "needs an operator certificate" in result.stderr
    assert "--operator-cert FILE --operator-key FILE" in result.stderr
    assert await stored(registry.client) == (b"", 0)  # nothing written

    result = await run(registry.url, "apply", str(routes_file), "--operator-cert",
                       str(OPERATOR["cert"]), "--operator-key", str(OPERATOR["key"]),
                       signer_env=False)
    assert result.returncode == 0, result.stderr

    # an unsigned table (written by anyone holding a registry token) shows as such
    await registry.client.put(f"/v1/kv/{ROUTES_KEY}", content=b'{"destinations": {}}')
    shown = await run(registry.url, "show", signer_env=False)
    assert shown.returncode == 0, shown.stderr
    assert "# UNSIGNED: every meshd refuses this table" in shown.stdout


async def test_apply_refuses_an_invalid_file(registry: Registry, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[destinations.payments]\nsplit = { v1 = 100 }\n')
    result = await run(registry.url, "apply", str(bad))
    assert result.returncode == 1
    assert f"{bad}: destinations.payments.split.v1: unknown subset 'v1'" in result.stderr
    assert await stored(registry.client) == (b"", 0)


async def test_conflicting_change_is_reported_never_overwritten(
        registry: Registry, routes_file: Path, nursery: trio.Nursery) -> None:
    """A proxy in front of the registry lets someone else write the key just before the
    command's check-and-set write arrives."""
    assert (await run(registry.url, "apply", str(routes_file))).returncode == 0
    theirs = {"destinations": {"payments": {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "split": {"v1": 0, "v2": 100}}}}
    interfered: list[int] = []

    async with httpx.AsyncClient(base_url=registry.url, trust_env=False,
                                 headers=registry.client.headers) as upstream:
        async def interpose(request: Request) -> Response:
            if request.method == "PUT" and "cas" in request.query and not interfered:
                r = await upstream.put(f"/v1/kv/{ROUTES_KEY}",
                                       content=json.dumps(theirs, sort_keys=True).encode())
                interfered.append(int(r.status_code))
            r = await upstream.request(request.method, request.target, content=request.body)
            keep = [(k, v) for k, v in r.headers.items()
                    if k.lower() in ("content-type", "x-consul-index")]
            return Response(r.status_code, r.content, keep)

        listeners = await nursery.start(serve_http, interpose, "127.0.0.1", 0)
        proxy = f"http://127.0.0.1:{listen_port(listeners)}"
        _, before = await stored(registry.client)

        result = await run(proxy, "set-split", "payments", "v1=50", "v2=50")
        assert interfered == [200]
        assert result.returncode == 1
        _, after = await stored(registry.client)
        assert f"ModifyIndex {before} -> {after}" in result.stderr
        assert "who changed what is unknown" in result.stderr
        assert "v2 = 100" in result.stdout  # the new value is shown
        value, _ = await stored(registry.client)
        assert json.loads(value) == theirs  # theirs stays: nothing overwritten

        interfered.clear()
        result = await run(proxy, "apply", str(routes_file))
        assert result.returncode == 1 and "conflict" in result.stderr
        assert json.loads((await stored(registry.client))[0]) == theirs
    nursery.cancel_scope.cancel()


@pytest.mark.embedded_only("starts the embedded registry with a master token")
async def test_token_from_the_environment(nursery: trio.Nursery, routes_file: Path) -> None:
    reg = await start_registry(nursery, acl_master_token="t0ken")
    async with reg.client:
        denied = await run(reg.url, "apply", str(routes_file))
        assert denied.returncode == 1 and "403" in denied.stderr
        allowed = await run(reg.url, "apply", str(routes_file), token="t0ken")
        assert allowed.returncode == 0, allowed.stderr
        shown = await run(reg.url, "--token", "t0ken", "show")
        assert shown.returncode == 0 and "[destinations.payments]" in shown.stdout
    nursery.cancel_scope.cancel()


@pytest.mark.embedded_only("starts the embedded registry with ACLs on")
async def test_token_from_the_operator_context(nursery: trio.Nursery, routes_file: Path,
                                               tmp_path: Path) -> None:
    reg = await start_registry(nursery, acl_enabled=True, acl_default_policy="deny",
                               acl_initial_management="root")
    async with ConsulClient(reg.url, token="root") as admin:
        await admin.acl_create_policy(OPERATOR_POLICY, operator_rules())
        token = await admin.acl_create_token("operator", [OPERATOR_POLICY])
    (tmp_path / "operator-token").write_text(token + "\n")
    runtime = tmp_path / "runtime"
    # this test process stands in for the `meshd up` that wrote the context
    # with the token and the operator certificate of the context
    credentials = OperatorCredentials("alice", OPERATOR["cert"], OPERATOR["key"], OPERATOR["ca"])
    write_context(OperatorContext(registry=reg.url, token_file=tmp_path / "operator-token",
                                  admin=(), operator=credentials, run_dir=tmp_path,
                                  pid=os.getpid()), context_path({"XDG_RUNTIME_DIR": str(runtime)}))
    async with reg.client:
        denied = await run(reg.url, "apply", str(routes_file))
        assert denied.returncode == 1 and "403" in denied.stderr
        applied = await run(reg.url, "apply", str(routes_file), runtime_dir=runtime,
                            signer_env=False)
        assert applied.returncode == 0, applied.stderr
        split = await run(reg.url, "set-split", "payments", "v1=50", "v2=50", runtime_dir=runtime,
                          signer_env=False)
        assert split.returncode == 0, split.stderr
        assert "v1=90, v2=10 -> v1=50, v2=50" in split.stdout
        wrong = await run(reg.url, "--token", "not-the-token", "show", runtime_dir=runtime)
        assert wrong.returncode == 1 and "403 ACL not found" in wrong.stderr
    nursery.cancel_scope.cancel()


async def test_an_empty_table_is_refused_and_clear_empties_on_purpose(
        registry: Registry, routes_file: Path, tmp_path: Path) -> None:
    result = await run(registry.url, "apply", str(routes_file))
    assert result.returncode == 0, result.stderr
    _, index = await stored(registry.client)

    empty = tmp_path / "empty.toml"
    empty.write_text('default_policy = "allow"\n')
    result = await run(registry.url, "apply", str(empty))
    assert result.returncode == 1
    assert "no destinations: every meshd would refuse the table" in result.stderr
    assert "meshd routes clear" in result.stderr
    assert (await stored(registry.client))[1] == index  # nothing written

    result = await run(registry.url, "clear")
    assert result.returncode == 0, result.stderr
    assert "cleared" in result.stdout
    value, _ = await stored(registry.client)
    assert table_of(value) == {"clear": True, "destinations": {}}
    shown = await run(registry.url, "show")
    assert shown.returncode == 0 and "clear = true" in shown.stdout, shown.stdout

    allow = tmp_path / "allow.toml"
    allow.write_text('default_policy = "allow"\n' + ROUTES)
    assert (await run(registry.url, "apply", str(allow))).returncode == 0
    shown = await run(registry.url, "show")
    assert parse_routes(tomllib.loads(shown.stdout)) == load_routes(allow)  # round trip


async def test_show_as_json(registry: Registry, routes_file: Path) -> None:
    empty = await run(registry.url, "show", "-o", "json")
    assert empty.returncode == 0, empty.stderr
    document = json.loads(empty.stdout)
    assert (document["format"], document["key"], document["modify_index"],
            document["signed"]) == ("meshd.routes/1", ROUTES_KEY, 0, None)
    assert document["routes"]["destinations"] == {}

    assert (await run(registry.url, "apply", str(routes_file))).returncode == 0
    value, index = await stored(registry.client)
    shown = await run(registry.url, "show", "--output", "json")
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    signed = inspect(json.loads(value), "routes")
    assert document["registry"] == registry.url and document["modify_index"] == index
    assert document["signed"] == {"version": signed.version,
                                  "signed_at": document["signed"]["signed_at"],
                                  "signer": "alice",
                                  "signer_id": "spiffe://routes.test/operator/alice",
                                  "serial": signed.serial}
    # the canonical form meshds read, which parses back to the applied table
    assert document["routes"] == table_of(value)
    assert parse_routes(document["routes"]) == load_routes(routes_file)


@pytest.mark.embedded_only("starts the embedded registry with ACLs on")
async def test_an_unreachable_registry_exits_3_and_a_refusal_1(nursery: trio.Nursery) -> None:
    with socket.socket() as unused:  # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"
        result = await run(url, "show")
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"meshd: registry {url}: GET /v1/kv/{ROUTES_KEY}")
    assert result.stderr.endswith("(cannot reach the registry: is it running, and is that "
                                  "its address?)\n")

    reg = await start_registry(nursery, acl_enabled=True, acl_default_policy="deny",
                               acl_initial_management="root")
    async with reg.client:
        refused = await run(reg.url, "--token", "not-a-token", "show", "-o", "json")
    assert refused.returncode == 1 and "403" in refused.stderr and refused.stdout == ""
    nursery.cancel_scope.cancel()


def test_a_usage_error_exits_2() -> None:
    result = meshd("http://127.0.0.1:1", "set-split", "payments")  # no SUBSET=WEIGHT
    assert result.returncode == 2
    assert "the following arguments are required: SUBSET=WEIGHT" in result.stderr
    result = meshd("http://127.0.0.1:1", "show", "-o", "yaml")
    assert result.returncode == 2 and "invalid choice: 'yaml'" in result.stderr
