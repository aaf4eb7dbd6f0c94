"""``meshd status``: the rendering of a state document (pure), and the exit codes an operator's
script relies on: 0 ready (see test_notify_processes), 1 not ready, 2 options that cannot work,
3 unreachable or refused;
and a real meshd whose admin API is served over mutual TLS, read with an operator certificate
issued by the real `meshd ca issue --operator`."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from mesh_testing import open_mesh
from test_daemon import TD, free_port, payments_app, start_daemon

from meshd.admin.client import admin_url
from meshd.ca.store import init_ca
from meshd.cli.main import build_parser
from meshd.cli.status import duration, render
from meshd.httpd import Request, Response, serve_http
from meshd.operator_context import OperatorContext, context_path, write_context

STATE: dict[str, Any] = {
    "node": "host-a", "address": "10.0.0.2", "trust_domain": "shop.mesh", "version": "0.1.0",
    "ready": True, "uptime_seconds": 7384.2, "generation": 3,
    "inbound": {"address": "10.0.0.2", "port": 15001},
    "services": [{"name": "web", "version": "v1", "protocol": "http", "address": "127.0.0.1",
                  "port": 8080, "health": "passing",
                  "health_output": "HTTP GET http://127.0.0.1:8080/healthz: 200"}],
    "upstreams": [{"service": "web", "destination": "payments", "local_address": "127.0.0.1",
                   "local_port": 9191}],
    "destinations": {"payments": {"index": 12, "age_seconds": 1.5, "endpoints": [
        {"node": "host-b", "instance_id": "payments-host-b", "address": "10.0.0.3",
         "port": 15001, "version": "v1", "healthy": True},
        {"node": "host-c", "instance_id": "payments-host-c", "address": "10.0.0.4",
         "port": 15001, "version": "v2", "healthy": False},
    ]}},
    "routes": {"destinations": {"payments": {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "split": {"v1": 90, "v2": 10}}}},
    "registry": {"url": "http://10.0.0.9:8500", "staleness_seconds": 0.0, "watches": [
        {"name": "routes", "index": 5, "staleness_seconds": 0.0, "error": ""},
        {"name": "endpoints/payments", "index": 12, "staleness_seconds": 0.0, "error": ""}]},
    "certificates": [{"service": "web", "spiffe_id": "spiffe://shop.mesh/svc/web",
                      "serial": "ab", "not_after": "2030-01-02T03:04:05Z",
                      "expires_in_seconds": 80000}],
    "config_error": "",
    "routes_source": "registry",
    "routes_signed": {"version": 1780000000000000, "signed_at": "2026-05-28T20:26:40.000000Z",
                      "signer": "alice", "signer_id": "spiffe://shop.mesh/operator/alice",
                      "serial": "5f2a"},
    "process": {"pid": 4242, "cpu_seconds": 1.0, "rss_bytes": 1, "open_fds": 9},
}


def test_render_a_ready_host() -> None:
    assert render(STATE) == """\
meshd host-a (10.0.0.2), trust domain shop.mesh: READY
  up 2h03m, route generation 3, meshd 0.1.0, pid 4242
  inbound mTLS on 10.0.0.2:15001
services (1)
  web  v1  http  127.0.0.1:8080  passing  HTTP GET http://127.0.0.1:8080/healthz: 200
upstreams (1)
  web -> payments at 127.0.0.1:9191
      v1 90%: 1/1 healthy (host-b)
      v2 10%: 0/1 healthy
registry http://10.0.0.9:8500: up to date (2 watches)
certificates (1)
  spiffe://shop.mesh/svc/web  expires 2030-01-02T03:04:05Z  in 22h13m
route table signed by spiffe://shop.mesh/operator/alice (version 1780000000000000, at \
2026-05-28T20:26:40.000000Z, certificate 5f2a; from registry)
"""


def test_render_a_troubled_host() -> None:
    state = STATE | {
        "ready": False,
        "destinations": {},
        "routes": {"destinations": {}},
        "registry": {"url": "http://10.0.0.9:8500", "staleness_seconds": 95.0, "watches": [
            {"name": "routes", "index": 5, "staleness_seconds": 95.0,
             "error": "connection refused"}]},
        "certificates": [STATE["certificates"][0] | {"expires_in_seconds": 1800}],
        "config_error": "routes: destinations.payments.split: weights sum to 95\nsecond line",
        "routes_signed": None, "routes_source": "none",
    }
    text = render(state)
    assert text.splitlines()[0].endswith(": NOT READY")
    assert "      no endpoint view yet (waiting for the registry)" in text
    assert ("registry http://10.0.0.9:8500: STALE for 1m35s, serving the last known view: "
            "routes: connection refused") in text
    assert "EXPIRES SOON, in 30m00s" in text
    assert "route table signed by: none in force (from none)" in text
    assert ("route table REJECTED (the previous one stays): routes: "
            "destinations.payments.split: weights sum to 95\n  second line") in text


def test_render_endpoints_by_version_without_a_route() -> None:
    text = render(STATE | {"routes": {"destinations": {}}})
    assert "      v1: 1/1 healthy (host-b)\n      v2: 0/1 healthy\n" in text


def test_render_a_gateway_and_where_it_routes() -> None:
    gateway = {"name": "edge", "health": "passing",
               "listeners": [{"protocol": "http", "address": "0.0.0.0", "port": 80},
                             {"protocol": "https", "address": "0.0.0.0", "port": 443}],
               "routes": [{"hosts": ["shop.example.com"], "path_prefix": "/",
                           "service": "payments"}]}
    text = render(STATE | {"gateways": [gateway]})
    assert ("gateway edge (passing) on http://0.0.0.0:80, https://0.0.0.0:443\n"
            "  shop.example.com/ -> payments\n      v1") in text
    assert "gateway" not in render(STATE)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (59.9, "59s"), (61, "1m01s"), (3600, "1h00m"), (90000, "1d01h"), (-3, "0s")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# no operator context of a `meshd up` that may run on this machine: its hint would be added
NO_CONTEXT = {**os.environ, "XDG_RUNTIME_DIR": "/nonexistent/meshd-test"}


async def run_status(*args: str, runtime_dir: Path | None = None) -> tuple[int, str, str]:
    env = NO_CONTEXT if runtime_dir is None else {**NO_CONTEXT,
                                                  "XDG_RUNTIME_DIR": str(runtime_dir)}
    result = await trio.run_process([sys.executable, "-m", "meshd", "status", *args],
                                    capture_stdout=True, capture_stderr=True, check=False,
                                    env=env)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_not_ready_exits_1(nursery: trio.Nursery) -> None:
    async def handle(request: Request) -> Response:
        return Response(200, json.dumps(STATE | {"ready": False}).encode(),
                        [("Content-Type", "application/json")])

    port = free_port("127.0.0.1")
    await nursery.start(serve_http, handle, "127.0.0.1", port)
    code, out, _ = await run_status("--admin", f"127.0.0.1:{port}")
    assert code == 1
    assert out.startswith("meshd host-a (10.0.0.2), trust domain shop.mesh: NOT READY")


async def test_unreachable_exits_3_with_one_clear_line() -> None:
    port = free_port("127.0.0.1")
    code, out, err = await run_status("--admin", f"127.0.0.1:{port}")
    assert code == 3 and out == ""
    assert err == (f"meshd status: cannot read http://127.0.0.1:{port}/v1/state: connection "
                   "refused or unreachable (is meshd running, and is --admin its admin "
                   "address?)\n")


async def test_something_else_on_the_port_exits_3(nursery: trio.Nursery) -> None:
    async def handle(request: Request) -> Response:
        return Response.text("hello\n")

    port = free_port("127.0.0.1")
    await nursery.start(serve_http, handle, "127.0.0.1", port)
    code, _, err = await run_status("--admin", f"127.0.0.1:{port}")
    assert code == 3 and "cannot read" in err


async def serve_state(nursery: trio.Nursery, state: dict[str, Any]) -> str:
    """A stand-in admin API serving ``state``; its HOST:PORT."""
    async def handle(request: Request) -> Response:
        return Response(200, json.dumps(state).encode(), [("Content-Type", "application/json")])

    port = free_port("127.0.0.1")
    await nursery.start(serve_http, handle, "127.0.0.1", port)
    return f"127.0.0.1:{port}"


async def test_json_passes_the_state_document_through(nursery: trio.Nursery) -> None:
    # a field this command does not know (a newer daemon's) comes through untouched
    served = STATE | {"local_health": {"critical": [], "since_seconds": 4.5}}
    admin = await serve_state(nursery, served)
    code, out, err = await run_status("--admin", admin, "-o", "json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert document == {"format": "meshd.status/1", "admin": f"http://{admin}",
                        "reachable": True, "ready": True, "exit_code": 0, "error": None,
                        "state": served}

    not_ready = await serve_state(nursery, STATE | {"ready": False})
    code, out, _ = await run_status("--admin", not_ready, "--output", "json")
    document = json.loads(out)
    assert (code, document["exit_code"], document["ready"]) == (1, 1, False)
    assert document["state"]["node"] == "host-a"


async def test_json_of_an_unreachable_admin_api() -> None:
    port = free_port("127.0.0.1")
    code, out, err = await run_status("--admin", f"127.0.0.1:{port}", "-o", "json")
    assert code == 3 and err.startswith(f"meshd status: cannot read http://127.0.0.1:{port}")
    document = json.loads(out)
    assert document["error"]["failure"] == "connect"
    assert document["error"]["message"] == err.removeprefix("meshd status: ").rstrip("\n")
    assert {k: document[k] for k in ("format", "admin", "reachable", "ready", "exit_code",
                                     "state")} == {
        "format": "meshd.status/1", "admin": f"http://127.0.0.1:{port}", "reachable": False,
        "ready": None, "exit_code": 3, "state": None}


async def test_bare_status_while_meshd_up_runs_names_its_admin_addresses(
        tmp_path: Path) -> None:
    # the default admin address is held, bound and never listening, so a bare `meshd status`
    # is refused there (binding fails, and so does the test, if something listens on it)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 15000))
    try:
        await _bare_status_names_the_demo(tmp_path)
    finally:
        holder.close()


async def _bare_status_names_the_demo(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    demo = ("127.0.0.2:15000", "127.0.0.3:15000", "127.0.0.4:15000")
    # this test process stands in for the `meshd up` that wrote the context
    write_context(OperatorContext(registry="http://127.0.0.1:8500",
                                  token_file=tmp_path / "token", admin=demo, operator=None,
                                  run_dir=tmp_path, pid=os.getpid()),
                  context_path({"XDG_RUNTIME_DIR": str(runtime)}))
    code, out, err = await run_status(runtime_dir=runtime)
    assert (code, out) == (3, "")
    first, second = err.splitlines()
    assert first.startswith("meshd status: cannot read http://127.0.0.1:15000/v1/state")
    assert second == (f"meshd status: `meshd up` (pid {os.getpid()}) runs meshds with admin "
                      "APIs at 127.0.0.2:15000, 127.0.0.3:15000, 127.0.0.4:15000: try "
                      "`meshd status --admin 127.0.0.2:15000`")
    # asked at one of its addresses, no hint: the address was right, the meshd is not there
    port = free_port("127.0.0.1")
    write_context(OperatorContext(registry="http://127.0.0.1:8500",
                                  token_file=tmp_path / "token", admin=(f"127.0.0.1:{port}",),
                                  operator=None, run_dir=tmp_path, pid=os.getpid()),
                  context_path({"XDG_RUNTIME_DIR": str(runtime)}))
    code, _, err = await run_status("--admin", f"127.0.0.1:{port}", runtime_dir=runtime)
    assert code == 3 and len(err.splitlines()) == 1


def test_admin_addresses() -> None:
    assert admin_url("127.0.0.1:15000", False) == ("http://127.0.0.1:15000", False)
    assert admin_url("127.0.0.1:15000", True) == ("https://127.0.0.1:15000", True)
    assert admin_url("https://[::1]:15000/", False) == ("https://[::1]:15000", True)
    assert admin_url("http://10.0.0.5:15000", True) == ("http://10.0.0.5:15000", False)
    with pytest.raises(ValueError, match="unknown scheme ftp"):
        admin_url("ftp://10.0.0.5:15000", False)


async def test_tls_options_that_cannot_work_exit_2_before_connecting(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    code, out, err = await run_status("--admin", f"https://127.0.0.1:{port}")
    assert code == 2 and out == ""
    assert err.startswith("meshd status: --ca FILE is needed over TLS: the mesh CA bundle")
    code, _, err = await run_status("--admin", f"http://127.0.0.1:{port}", "--cert", "a.crt")
    assert code == 2 and "--cert/--key are for an admin API over TLS" in err
    code, _, err = await run_status("--admin", f"127.0.0.1:{port}",
                                    "--ca", str(tmp_path / "missing.crt"))
    assert code == 2 and err.startswith("meshd status: cannot load the admin TLS files:")


# -- a real meshd with its admin API over mutual TLS ----------------------------------------------

TLS_HOST = "127.0.27.2"


@dataclasses.dataclass
class TLSAdmin:
    address: str  # HOST:PORT
    ca_dir: Path
    tmp: Path

    def issue(self, *who: str) -> Path:
        """``meshd ca issue --dir CA --operator NAME --out DIR`` (or ``--service``),
        in-process: NAME.crt, NAME.key and ca.crt in DIR."""
        out = self.tmp / "issued" / who[1]
        args = build_parser().parse_args(["ca", "issue", "--dir", str(self.ca_dir), *who,
                                          "--out", str(out)])
        assert args.func(args) == 0
        return out


@pytest.fixture
async def tls_admin(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[TLSAdmin]:
    app_port = free_port(TLS_HOST)
    await nursery.start(payments_app, TLS_HOST, app_port, "v1")
    async with httpx.AsyncClient(timeout=10) as http:
        mesh = await open_mesh(nursery, tmp_path, http, TD)
        config = dataclasses.replace(mesh.host_config("host-b", TLS_HOST, [
            {"name": "payments", "version": "v1", "address": TLS_HOST, "port": app_port,
             "health": {"none": True}}]), admin_tls=True)
        daemon = await start_daemon(nursery, config)
        yield TLSAdmin(f"{TLS_HOST}:{config.admin_port}", tmp_path / "ca", tmp_path)
        await daemon.stop()


async def test_an_operator_certificate_reads_an_admin_api_over_tls(tls_admin: TLSAdmin) -> None:
    ops = tls_admin.issue("--operator", "alice")
    code, out, err = await run_status("--admin", f"https://{tls_admin.address}",
                                      "--ca", str(ops / "ca.crt"), "--cert",
                                      str(ops / "alice.crt"), "--key", str(ops / "alice.key"))
    assert (code, err) == (0, "")
    assert out.startswith(f"meshd host-b ({TLS_HOST}), trust domain {TD}: READY\n")
    assert "  payments  v1  http" in out


async def test_an_admin_api_over_tls_refusing_this_client_exits_3_with_one_clear_line(
        tls_admin: TLSAdmin) -> None:
    ops = tls_admin.issue("--operator", "alice")
    svc = tls_admin.issue("--service", "payments")
    url = f"https://{tls_admin.address}/v1/state"
    # a certificate of the mesh CA, but a service's: the admin API says why it refuses
    code, out, err = await run_status("--admin", f"https://{tls_admin.address}",
                                      "--ca", str(ops / "ca.crt"), "--cert",
                                      str(svc / "payments.crt"), "--key",
                                      str(svc / "payments.key"))
    assert (code, out) == (3, "")
    assert err == (f"meshd status: {url}: refused: client spiffe://{TD}/svc/payments is not "
                   "an operator (`meshd ca issue --operator NAME`)\n")
    # no certificate at all (the scheme follows from --ca): the handshake is broken off
    code, out, err = await run_status("--admin", tls_admin.address, "--ca", str(ops / "ca.crt"))
    assert (code, out) == (3, "")
    assert err == (f"meshd status: cannot read {url}: TLS handshake broken off: an operator "
                   "certificate is required (--cert, --key)\n")
    # plain HTTP to it
    code, _, err = await run_status("--admin", tls_admin.address)
    assert code == 3
    assert err == (f"meshd status: cannot read http://{tls_admin.address}/v1/state: closed "
                   "without an answer: is the admin API over TLS? then give --ca, --cert, "
                   "--key\n")
    # another CA's bundle: the admin API's certificate cannot be verified
    init_ca(tls_admin.tmp / "other-ca", TD, now=datetime.now(UTC))
    other = build_parser().parse_args(["ca", "issue", "--dir", str(tls_admin.tmp / "other-ca"),
                                       "--operator", "mallory", "--out",
                                       str(tls_admin.tmp / "other")])
    assert other.func(other) == 0
    code, _, err = await run_status("--admin", f"https://{tls_admin.address}", "--ca",
                                    str(tls_admin.tmp / "other" / "ca.crt"))
    assert code == 3
    assert err.startswith(f"meshd status: cannot read {url}: TLS: cannot verify the admin "
                          "API's certificate (")
    assert err.endswith("): is --ca this mesh's ca.crt?\n")


def test_render_a_host_with_workers() -> None:
    workers = [{"index": 0, "pid": 11, "ready": True, "restarts": 0},
               {"index": 1, "pid": 12, "ready": False, "restarts": 1}]
    text = render(STATE | {"process": STATE["process"] | {"workers": workers}})
    assert "  up 2h03m, route generation 3, meshd 0.1.0, pid 4242\n" \
           "  workers: 2 (pids 11, 12), 1 restarted, 1 not ready\n" in text
    assert "workers:" not in render(STATE)  # one process: no line
