"""The console against a real meshd whose admin API is served over mutual TLS (``[admin] tls =
true``): an in-process registry, CA and daemon on loopback; an operator certificate issued by
the real ``meshd ca issue --operator``; the console's data source built from the real
``meshd tui --admin-ca/--admin-cert/--admin-key`` options. The source runs under asyncio (as in
the console), in a thread beside the trio daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from net_testing import free_port

from meshd.ca.server import serve_ca
from meshd.ca.store import TokenStore, init_ca
from meshd.cli.main import build_parser
from meshd.cli.tui import admin_tls
from meshd.config.parse import parse_host_config
from meshd.config.schema import HostConfig
from meshd.daemon.lifetime import Daemon
from meshd.errors import MeshError
from meshd.httpd import Request, Response, serve_http
from meshd.registry.embedded.server import RegistryConfig, listen_port, serve_registry
from tui.model import MeshModel
from tui.observe import HostPoll, Observation
from tui.source import RegistrySource
from tui.views import host_rows

TD = "console.mesh"
HOST = "127.0.26.2"


@dataclasses.dataclass
class TLSMesh:
    registry_url: str
    ca_dir: Path
    tmp: Path
    admin_port: int
    daemon: Daemon


async def _app(port: int, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
               ) -> None:
    async def handle(request: Request) -> Response:
        return Response.text("ok\n")

    await serve_http(handle, HOST, port, task_status=task_status)


def _host_config(tmp: Path, registry_url: str, ca_url: str, fingerprint: str,
                 app_port: int) -> HostConfig:
    base = tmp / "host-b"
    base.mkdir()
    token, _ = TokenStore(tmp / "ca").mint("host-b", ["payments"], now=datetime.now(UTC),
                                           ttl=timedelta(hours=1))
    (base / "join-token").write_text(token + "\n")
    return parse_host_config({
        "node": "host-b", "address": HOST, "trust_domain": TD,
        "registry": registry_url, "state_dir": "state",
        "ca": {"url": ca_url, "fingerprint": fingerprint, "token_file": "join-token"},
        "inbound": {"port": free_port(HOST)},
        "admin": {"address": f"{HOST}:{free_port(HOST)}", "tls": True},
        "services": [{"name": "payments", "version": "v1", "address": HOST, "port": app_port,
                      "health": {"none": True}}],
    }, "host-b.toml", base)


@pytest.fixture
async def tls_mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[TLSMesh]:
    listeners = await nursery.start(serve_registry, RegistryConfig(host="127.0.0.1", port=0))
    registry_url = f"http://127.0.0.1:{listen_port(listeners)}"
    init_ca(tmp_path / "ca", TD, now=datetime.now(UTC))
    endpoint = await nursery.start(partial(serve_ca, tmp_path / "ca", "127.0.0.1", 0))
    app_port = free_port(HOST)
    await nursery.start(_app, app_port)
    config = _host_config(tmp_path, registry_url, endpoint.url, endpoint.fingerprint, app_port)
    assert config.admin_tls
    daemon = Daemon(config)
    with trio.fail_after(20):
        await nursery.start(daemon.run)
    yield TLSMesh(registry_url, tmp_path / "ca", tmp_path, config.admin_port, daemon)
    await daemon.stop()


def issue(mesh: TLSMesh, *who: str) -> Path:
    """``meshd ca issue --dir CA --operator NAME --out DIR`` (or ``--service NAME``), in-process:
    NAME.crt, NAME.key and ca.crt in DIR."""
    out = mesh.tmp / "issued" / who[1]
    args = build_parser().parse_args(["ca", "issue", "--dir", str(mesh.ca_dir), *who,
                                      "--out", str(out)])
    assert args.func(args) == 0
    return out


def tui_args(mesh: TLSMesh, *tls: str) -> Any:
    return build_parser().parse_args(["tui", "--registry", mesh.registry_url,
                                      "--admin-port", str(mesh.admin_port), *tls])


def poll_until(mesh: TLSMesh, args: Any, done: Callable[[HostPoll], bool],
               within: float = 15.0) -> list[Observation]:
    """Run the console's data source as ``meshd tui`` builds it, under asyncio, until a poll
    of host-b satisfies ``done`` (or time runs out); every observation made."""

    async def main() -> list[Observation]:
        source = RegistrySource(args.registry, args.admin_port, timeout=2.0,
                                admin_tls=admin_tls(args))
        seen: list[Observation] = []
        deadline = time.monotonic() + within
        try:
            while time.monotonic() < deadline:
                seen.append(await source.poll())
                if any(done(h) for h in seen[-1].hosts):
                    break
                await asyncio.sleep(0.1)
        finally:
            await source.aclose()
        return seen

    return asyncio.run(main())


def console_model(seen: list[Observation]) -> MeshModel:
    model = MeshModel()
    for obs in seen:
        model.ingest(obs)
    return model


@pytest.mark.trio
async def test_the_console_reads_state_and_metrics_with_an_operator_certificate(
        tls_mesh: TLSMesh) -> None:
    ops = issue(tls_mesh, "--operator", "alice")
    assert {p.name for p in ops.iterdir()} == {"alice.crt", "alice.key", "ca.crt"}
    args = tui_args(tls_mesh, "--admin-ca", str(ops / "ca.crt"),
                    "--admin-cert", str(ops / "alice.crt"), "--admin-key", str(ops / "alice.key"))
    seen = await trio.to_thread.run_sync(
        poll_until, tls_mesh, args,
        lambda h: h.ok and h.state is not None and h.state.get("ready") is True)
    last = seen[-1]
    assert not last.registry.error and [i.node for i in last.registry.instances] == ["host-b"]
    (host,) = last.hosts
    assert host.ok and host.admin == f"{HOST}:{tls_mesh.admin_port}", host.error
    assert host.state is not None and host.state["node"] == "host-b"  # /v1/state, over mTLS
    assert [s["name"] for s in host.state["services"]] == ["payments"]
    assert host.metrics is not None and host.metrics.reloads  # /metrics, over mTLS
    model = console_model(seen)
    (row,) = host_rows(model, time.time())
    assert row.record.reachable and row.services == ("payments",) and row.cert_expiry
    assert any(e.text.startswith(f"host-b found at {HOST}:") for e in model.events)


@pytest.mark.parametrize(("who", "reason"), [
    ("nobody", "TLS handshake broken off: an operator certificate is required "
               "(--admin-cert, --admin-key)"),
    ("service", "refused: client spiffe://console.mesh/svc/payments is not an operator "
                "(`meshd ca issue --operator NAME`)"),
    # the host publishes that its admin API needs one: not contacted without
    ("plain", "admin API over TLS: an operator certificate is required (--admin-ca, "
              "--admin-cert, --admin-key)"),
])
@pytest.mark.trio
async def test_without_an_operator_certificate_the_host_is_unreachable_with_a_reason(
        tls_mesh: TLSMesh, who: str, reason: str) -> None:
    ops = issue(tls_mesh, "--operator", "alice")
    svc = issue(tls_mesh, "--service", "payments")  # from the mesh CA, but not an operator's
    tls = {"nobody": ["--admin-ca", str(ops / "ca.crt")],
           "service": ["--admin-ca", str(ops / "ca.crt"), "--admin-cert",
                       str(svc / "payments.crt"), "--admin-key", str(svc / "payments.key")],
           "plain": []}[who]
    seen = await trio.to_thread.run_sync(poll_until, tls_mesh, tui_args(tls_mesh, *tls),
                                         lambda h: bool(h.error))
    (host,) = seen[-1].hosts
    assert not host.ok and host.state is None and host.error == reason
    model = console_model(seen)
    (row,) = host_rows(model, time.time())
    assert not row.record.reachable and row.record.error == reason
    assert f"host-b ({HOST}:{tls_mesh.admin_port}) unreachable: {reason}" in [
        e.text for e in model.events]


def test_tls_options_that_cannot_work_are_refused_before_starting(tmp_path: Path) -> None:
    def context(*tls: str) -> object:
        return admin_tls(build_parser().parse_args(["tui", *tls]))

    assert context() is None
    with pytest.raises(MeshError, match=r"--admin-ca FILE is needed over TLS"):
        context("--admin-cert", "x.crt", "--admin-key", "x.key")
    with pytest.raises(MeshError, match=r"--admin-key without --admin-cert"):
        context("--admin-ca", "ca.crt", "--admin-key", "x.key")
    with pytest.raises(MeshError, match=r"cannot load the admin TLS files"):
        context("--admin-ca", str(tmp_path / "missing.crt"))
