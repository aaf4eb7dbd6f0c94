"""The admin API serves only requests addressed to it: DNS rebinding cannot read /v1/state."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
import trio

from meshd.admin.server import AdminAPI, host_allowed
from meshd.metrics import Metrics

NAMES = frozenset({"localhost", "vm1.example"})


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:15000", True), ("127.0.0.1", True), ("10.1.2.3:15000", True),
    ("[::1]:15000", True), ("[::1]", True), ("::1", True),
    ("localhost:15000", True), ("LOCALHOST", True), ("vm1.example:15000", True),
    ("evil.example:15000", False), ("evil.example", False), ("127.0.0.1.evil.example", False),
    ("127.0.0.1:99999", False), ("127.0.0.1:", False), ("[::1]x", False), ("", False),
])
def test_which_hosts_name_the_admin_api(host: str, allowed: bool) -> None:
    assert host_allowed(host, NAMES) is allowed


async def test_a_rebound_name_gets_421_and_nothing_else(nursery: trio.Nursery) -> None:
    metrics = Metrics()
    api = AdminAPI(metrics, lambda: [], lambda: {"node": "secret-topology"},
                   allowed_hosts=["vm1.example"])
    listeners = await nursery.start(partial(api.serve, "127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
        ok = await http.get("/v1/state")
        assert ok.status_code == 200 and ok.json() == {"node": "secret-topology"}
        named = await http.get("/v1/state", headers={"Host": "vm1.example:15000"})
        assert named.status_code == 200
        for path in ("/v1/state", "/metrics", "/readyz"):
            r = await http.get(path, headers={"Host": f"attacker.example:{port}"})
            assert r.status_code == 421
            assert r.json()["error"] == "host_not_allowed"
            assert "secret-topology" not in r.text
    assert 'reason="host_not_allowed"' in metrics.render().decode()
