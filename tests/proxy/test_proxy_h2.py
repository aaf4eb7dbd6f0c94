"""HTTP/2 through the in-process mesh: h2c clients on an outbound listener, h2 between meshds
(ALPN), HTTP/1.1 apps behind (translated at the callee's meshd)."""

from __future__ import annotations

import json
import subprocess

import trio
from proxy_mesh_testing import Mesh


async def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(["curl", "-sS", "--max-time", "10", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)


async def test_h2c_prior_knowledge_reaches_an_http1_app_over_h2_between_meshds(
        mesh: Mesh) -> None:
    done = await _curl("--http2-prior-knowledge", "-w", "\n%{http_version}",
                       f"{mesh.url()}/version")
    assert done.returncode == 0, done.stderr
    body, version = done.stdout.rsplit(b"\n", 1)
    print(done.stdout, done.stderr)
    assert version == b"2"
    seen = json.loads(body)
    assert seen["headers"]["x-meshd-source"] == "web"
