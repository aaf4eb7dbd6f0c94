"""The labels and byte counts of meshd's request series, through a real two-hop mesh."""

from __future__ import annotations

import httpx
from proxy_mesh_testing import Mesh
from proxy_testing import sample


async def test_request_series_carry_source_code_subset_mtls_and_body_bytes(mesh: Mesh) -> None:
    mesh.set_payments((("v2", 100),))  # host c's payments, version v2
    body = b"x" * 10_000
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        for _ in range(3):
            response = await client.post("/echo", content=body)  # echoed back as it arrives
            assert response.status_code == 200 and response.content == body
        mesh.v2.status = 404
        missing = await client.get("/nowhere")  # the app's 404, a body of its own
        assert missing.status_code == 404
    a, c = mesh.a.metrics, mesh.c.metrics
    for direction, m in (("outbound", a), ("inbound", c)):
        common = {"direction": direction, "source": "web", "destination": "payments",
                  "subset": "v2"}  # inbound: the local service's version
        assert sample(m, "meshd_requests_total", code="200", mtls="true", grpc_status="",
                      **common) == 3
        assert sample(m, "meshd_requests_total", code="404", **common) == 1
        # the latency histogram is split by source and code too
        assert sample(m, "meshd_request_duration_seconds_count", code="200", **common) == 3
        assert sample(m, "meshd_request_duration_seconds_count", code="404", **common) == 1
        assert sample(m, "meshd_request_bytes_total", **common) == 3 * len(body)
        # the three echoes and the 404's body
        assert sample(m, "meshd_response_bytes_total", **common) == (
            3 * len(body) + len(missing.content))
    assert "_created" not in a.render().decode()
    assert "process_cpu_seconds_total" in a.render().decode()
