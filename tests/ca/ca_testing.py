"""Helpers shared by the CA tests (imported as a plain module: tests/ca is not a package)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import httpx

from meshd.ca.server import CAEndpoint
from meshd.ca.store import CAMaterial
from meshd.identity import keys

TRUST_DOMAIN = "mesh.test"


def verified_context(ca: CAMaterial) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=keys.cert_pem(ca.signer.cert).decode())
    return context


async def post_join(
    endpoint: CAEndpoint, ca: CAMaterial, body: Mapping[str, Any] | bytes
) -> httpx.Response:
    """POST /v1/ca/join with an arbitrary body, over TLS verified against the root."""
    async with httpx.AsyncClient(verify=verified_context(ca), timeout=10) as http:
        if isinstance(body, bytes):
            return await http.post(f"{endpoint.url}/v1/ca/join", content=body)
        return await http.post(f"{endpoint.url}/v1/ca/join", json=dict(body))
