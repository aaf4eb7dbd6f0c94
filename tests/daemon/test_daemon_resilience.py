"""What the daemon does when its surroundings misbehave: the registry forgets it, the CA is not
up yet, the CA refuses its token, the registry answers junk, the environment names a proxy."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import tomlkit
import trio
from test_daemon import HOST_B, TD, Mesh, free_port, mesh, payments_app, start_daemon, wait_for

from meshd.ca.server import serve_ca
from meshd.config.parse import parse_host_config
from meshd.daemon.health import probe, probe_client
from meshd.daemon.lifetime import Daemon
from meshd.errors import RegistryError
from meshd.httpd import Request, Response, serve_http
from meshd.registry.consul import ConsulClient
from meshd.registry.model import PASSING

__all__ = ["mesh"]  # the fixture, imported for pytest


def _payments(app_port: int) -> list[dict[str, object]]:
    return [{"name": "payments", "port": app_port, "address": HOST_B, "version": "v1",
             "health": {"http": "/healthz", "interval": "200ms"}}]


async def test_a_registration_the_registry_lost_is_registered_again(
    mesh: Mesh, nursery: trio.Nursery
) -> None:
    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port, "v1")
    daemon = await start_daemon(nursery, mesh.host_config("host-b", HOST_B, _payments(app_port)))
    services_url = f"{mesh.registry_url}/v1/agent/services"
    assert "payments-host-b" in (await mesh.http.get(services_url)).json()

    # the registry forgets (as after a reap, or a registry restarted without its data)
    for sid in ("payments-host-b", "payments-host-b-sidecar-proxy"):
        r = await mesh.http.put(f"{mesh.registry_url}/v1/agent/service/deregister/{sid}")
        assert r.status_code == 200

    async def back() -> bool:
        services = (await mesh.http.get(services_url)).json()
        return {"payments-host-b", "payments-host-b-sidecar-proxy"} <= set(services)
    await wait_for(back)
    await daemon.stop()
    assert (await mesh.http.get(services_url)).json() == {}


async def test_ca_down_at_boot_means_not_ready_then_joins(
    mesh: Mesh, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A second CA (same root) that only comes up later: the daemon answers /readyz 503 and
    retries with backoff, then joins and becomes ready."""
    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port, "v1")
    ca_port = free_port("127.0.0.1")
    config = mesh.host_config("host-b", HOST_B, _payments(app_port))
    config = parse_host_config({
        "node": "host-b", "address": HOST_B, "trust_domain": TD,
        "registry": mesh.registry_url, "state_dir": "state",
        "ca": {"url": f"https://127.0.0.1:{ca_port}", "fingerprint": mesh.fingerprint,
               "token_file": "join-token"},
        "inbound": {"port": config.inbound_port},
        "admin": {"address": f"{config.admin_host}:{config.admin_port}"},
        "services": _payments(app_port),
    }, "host-b.toml", config.ca.token_file.parent)
    daemon = Daemon(config)
    ready_event = trio.Event()

    async def run() -> None:
        await nursery.start(daemon.run)
        ready_event.set()

    nursery.start_soon(run)
    admin = f"http://{config.admin_host}:{config.admin_port}/readyz"

    async def admin_up() -> bool:
        try:
            return (await mesh.http.get(admin)).status_code == 503
        except httpx.HTTPError:
            return False
    await wait_for(admin_up)
    await trio.sleep(1.0)
    assert not ready_event.is_set()
    assert (await mesh.http.get(admin)).status_code == 503

    await nursery.start(partial(serve_ca, mesh.ca_dir, "127.0.0.1", ca_port))
    with trio.fail_after(30):
        await ready_event.wait()
    assert (await mesh.http.get(admin)).status_code == 200
    await daemon.stop()


async def test_refused_token_is_one_clear_line(mesh: Mesh) -> None:
    """`meshd run` whose token the CA refuses: exit 1 with the CA's reason, no traceback, and
    the token never printed."""
    config = mesh.host_config("host-b", HOST_B, _payments(free_port(HOST_B)))
    token = config.ca.token_file.read_text().strip()
    config.ca.token_file.write_text(token.replace(".", ".x", 1))  # a wrong secret
    toml = config.ca.token_file.parent / "meshd.toml"
    toml.write_text(tomlkit.dumps({
        "node": "host-b", "address": HOST_B, "trust_domain": TD,
        "registry": mesh.registry_url, "state_dir": "state",
        "ca": {"url": mesh.ca_url, "fingerprint": mesh.fingerprint, "token_file": "join-token"},
        "inbound": {"port": config.inbound_port},
        "admin": {"address": f"{config.admin_host}:{config.admin_port}"},
        "services": _payments(config.services[0].port),
    }))
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "meshd", "run", "--config", str(toml)],
            capture_stdout=True, capture_stderr=True, check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("meshd: the CA refused the request"), stderr
    assert "Traceback" not in stderr
    assert token.split(".")[1] not in stderr


async def test_registry_answering_junk_is_a_registry_error(nursery: trio.Nursery) -> None:
    async def junk(request: Request) -> Response:
        return Response(200, b"<html>captive portal</html>",
                        [("Content-Type", "text/html"), ("X-Consul-Index", "5")])

    listeners = await nursery.start(serve_http, junk, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with ConsulClient(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(RegistryError, match="not JSON"):
            await client.health_connect("payments")
        with pytest.raises(RegistryError, match="not JSON"):
            await client.kv_get("meshd/config/routes")


async def test_probe_ignores_proxy_settings(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP_PROXY meant for the outside world must not turn a healthy local app critical."""
    port = free_port("127.0.0.1")
    await nursery.start(payments_app, "127.0.0.1", port, "v1")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")
    config = parse_host_config({
        "node": "n", "trust_domain": TD,
        "ca": {"url": "https://127.0.0.1:1", "fingerprint": "sha256:" + "0" * 64,
               "token_file": "t"},
        "services": [{"name": "payments", "port": port, "health": {"http": "/healthz"}}],
    })
    async with probe_client() as http:
        result = await probe(config.services[0], http)
    assert result.status == PASSING, result.output


async def test_watch_resyncs_at_once_when_the_registry_returns(tmp_path: Path) -> None:
    """A registry restarted with its data keeps its index; a watcher that went back to a
    blocking query on that index would stay stale for a whole `wait`. It must resync with a
    plain read as soon as the registry answers."""
    from meshd.registry.embedded.server import RegistryConfig, serve_registry
    from meshd.registry.watch import WatchStatus, watch_endpoints

    port = free_port("127.0.0.1")
    config = RegistryConfig(host="127.0.0.1", port=port, data_dir=tmp_path / "data")
    status = WatchStatus("endpoints/payments")
    async with trio.open_nursery() as outer:
        registry_scope = trio.CancelScope()

        async def registry(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with registry_scope:
                await serve_registry(config, task_status=task_status)

        await outer.start(registry)
        async with ConsulClient(f"http://127.0.0.1:{port}") as client:
            await outer.start(partial(watch_endpoints, client, "payments", lambda _: None,
                                      status, wait=60.0))
            registry_scope.cancel()  # the registry goes away...
            with trio.fail_after(10):
                while status.failing_since is None:  # noqa: ASYNC110 - a value, no event
                    await trio.sleep(0.05)
            registry_scope = trio.CancelScope()
            await outer.start(registry)  # ...and comes back with the same data and index
            with trio.fail_after(10):  # far less than the 60 s wait
                while status.failing_since is not None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert status.staleness(trio.current_time()) == 0.0
            outer.cancel_scope.cancel()
