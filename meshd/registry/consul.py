"""The one adapter between meshd and a Consul HTTP API (real Consul or ``meshd registry serve``).

It speaks the HTTP API directly with httpx, which runs natively under trio, so a blocking query is
an ordinary cancellable await rather than a worker thread parked for up to ten minutes (py-consul
is synchronous; it remains the compatibility oracle in the tests). Every transport or protocol
failure is raised as ``RegistryError``.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from meshd.client_tls import public_bundle_context
from meshd.config.durations import format_duration
from meshd.config.load import read_token_file
from meshd.errors import RegistryError, RegistryNotFound
from meshd.operator_context import OperatorContext, load_context

CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int


@dataclass(frozen=True)
class Blocking:
    """The result of a blocking-capable read: the data and the index to send next time."""

    data: Any
    index: int


DEFAULT_REGISTRY = "http://127.0.0.1:8500"


def registry_url(addr: str | None = None) -> str:
    """A registry base URL from ``HOST:PORT``, ``http(s)://...`` or ``consul://HOST:PORT``;
    without one, ``$CONSUL_HTTP_ADDR`` or http://127.0.0.1:8500 (as Consul's own tools do)."""
    addr = addr or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_REGISTRY
    if addr.startswith("consul://"):
        addr = "http://" + addr[len("consul://"):]
    elif "://" not in addr:
        addr = "http://" + addr
    return addr.rstrip("/")


def registry_token(configured: str | None = None) -> str | None:
    """The ACL token to send: the configured one, else ``$CONSUL_HTTP_TOKEN``, else the content
    of the file ``$CONSUL_HTTP_TOKEN_FILE`` names (as with Consul's own tools), else none.
    ConfigError when that file cannot be read or is empty."""
    if configured or os.environ.get("CONSUL_HTTP_TOKEN"):
        return configured or os.environ["CONSUL_HTTP_TOKEN"]
    token_file = os.environ.get("CONSUL_HTTP_TOKEN_FILE")
    if token_file:
        return read_token_file(Path(token_file), key="CONSUL_HTTP_TOKEN_FILE")
    return None


def operator_token(given: str | None, url: str) -> str | None:
    """The ACL token of an operator's command (``meshd routes``, ``meshd tui``) talking to the
    registry at ``url``: as ``registry_token``, else the operator token of the context a running
    ``meshd up`` recorded, if ``url`` is that mesh's registry. The daemon never calls this: a
    meshd sends only its own token."""
    token = registry_token(given)
    if token is not None:
        return token
    context = context_for(url)
    if context is None:
        return None
    return read_token_file(context.token_file, key="operator context registry_token_file")


def context_for(url: str) -> OperatorContext | None:
    """The operator context a running ``meshd up`` recorded, if ``url`` is its registry."""
    context = load_context()
    if context is None or registry_url(context.registry) != registry_url(url):
        return None
    return context


def next_index(previous: int, returned: int) -> int:
    """What to send as ``index`` next, per Consul's client rules: reset when the index went
    backwards (a restored or restarted registry), and never send 0 after a first answer."""
    if returned < previous:
        return 0
    return max(returned, 1)


class ConsulClient:
    def __init__(self, base_url: str, *, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"X-Consul-Token": token} if token else {}
        # trust_env=False: an HTTP(S)_PROXY meant for the outside world must never carry
        # registry traffic (nor the token in its headers)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, trust_env=False,
            verify=public_bundle_context(),
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_keepalive_connections=16, keepalive_expiry=30.0),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ConsulClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- transport ---------------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None,
        json_body: Any = None, content: bytes | None = None, wait: float | None = None,
        ok_404: bool = False,
    ) -> httpx.Response:
        timeout: httpx.Timeout | None = None
        if wait is not None:
            # the server may hold the request for wait + wait/16; give it that and some slack
            timeout = httpx.Timeout(wait + wait / 16 + REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)
        kwargs: dict[str, Any] = {"params": params}
        if json_body is not None:
            kwargs["content"] = json.dumps(json_body).encode()
        elif content is not None:
            kwargs["content"] = content
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RegistryError(f"registry {self.base_url}: {method} {path}: {exc!r}") from exc
        if response.status_code == 404 and ok_404:
            return response
        if response.status_code == 404:
            raise RegistryNotFound(
                f"registry {self.base_url}: {method} {path}: 404 {response.text.strip()[:200]}")
        if response.status_code >= 400:
            raise RegistryError(
                f"registry {self.base_url}: {method} {path}: {response.status_code} "
                f"{response.text.strip()[:200]}"
            )
        return response

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise RegistryError(
                f"{response.request.url.path}: answer is not JSON: {response.text[:100]!r}"
            ) from exc

    @staticmethod
    def _index(response: httpx.Response) -> int:
        raw = response.headers.get("X-Consul-Index")
        if raw is None or not raw.isdigit():
            raise RegistryError(f"{response.request.url.path}: missing X-Consul-Index header")
        return int(raw)

    @staticmethod
    def _blocking_params(index: int, wait: float | None) -> dict[str, str]:
        params: dict[str, str] = {}
        if index > 0:
            params["index"] = str(index)
            if wait is not None:
                params["wait"] = format_duration(max(1.0, math.ceil(wait)))
        return params

    # -- agent -------------------------------------------------------------------------------

    async def register_service(self, definition: Mapping[str, Any]) -> None:
        await self._request("PUT", "/v1/agent/service/register", json_body=definition,
                            params={"replace-existing-checks": "true"})

    async def deregister_service(self, service_id: str) -> None:
        await self._request("PUT", f"/v1/agent/service/deregister/{service_id}", ok_404=True)

    async def update_ttl(self, check_id: str, status: str, output: str = "") -> None:
        await self._request("PUT", f"/v1/agent/check/update/{check_id}",
                            json_body={"Status": status, "Output": output})

    # -- health / catalog ----------------------------------------------------------------------

    async def health_connect(
        self, service: str, *, index: int = 0, wait: float | None = None, passing: bool = False,
    ) -> Blocking:
        """``/v1/health/connect/:service``: the proxies fronting ``service`` (blocking)."""
        params = self._blocking_params(index, wait)
        if passing:
            params["passing"] = "1"
        response = await self._request("GET", f"/v1/health/connect/{service}", params=params,
                                       wait=wait if index else None)
        data = self._json(response)
        if not isinstance(data, list):
            raise RegistryError(f"/v1/health/connect/{service}: expected a JSON array")
        return Blocking(data, self._index(response))

    async def catalog_services(self) -> dict[str, list[str]]:
        response = await self._request("GET", "/v1/catalog/services")
        data = self._json(response)
        if not isinstance(data, dict):
            raise RegistryError("/v1/catalog/services: expected a JSON object")
        return data

    # -- ACL -----------------------------------------------------------------------------------

    async def acl_create_policy(self, name: str, rules: str, description: str = "") -> str:
        """``PUT /v1/acl/policy``; the new policy's ID."""
        response = await self._request("PUT", "/v1/acl/policy", json_body={
            "Name": name, "Description": description, "Rules": rules})
        return self._field(response, "ID")

    async def acl_create_token(self, description: str, policies: Sequence[str]) -> str:
        """``PUT /v1/acl/token`` linked to ``policies`` by name; the new token's SecretID."""
        response = await self._request("PUT", "/v1/acl/token", json_body={
            "Description": description, "Policies": [{"Name": p} for p in policies]})
        return self._field(response, "SecretID")

    def _field(self, response: httpx.Response, name: str) -> str:
        data = self._json(response)
        if not isinstance(data, dict) or not isinstance(data.get(name), str):
            raise RegistryError(f"{response.request.url.path}: answer has no {name}")
        return str(data[name])

    async def leader(self) -> str:
        response = await self._request("GET", "/v1/status/leader")
        return str(self._json(response))

    # -- KV ------------------------------------------------------------------------------------

    async def kv_get(
        self, key: str, *, index: int = 0, wait: float | None = None
    ) -> Blocking:
        """One key; ``Blocking.data`` is a ``KVEntry`` or None when the key does not exist."""
        response = await self._request("GET", f"/v1/kv/{key}",
                                       params=self._blocking_params(index, wait),
                                       wait=wait if index else None, ok_404=True)
        idx = self._index(response)
        if response.status_code == 404:
            return Blocking(None, idx)
        try:
            raw = self._json(response)[0]
            value = base64.b64decode(raw["Value"]) if raw.get("Value") else b""
            entry = KVEntry(raw["Key"], value, int(raw.get("Flags", 0)),
                            int(raw["CreateIndex"]), int(raw["ModifyIndex"]))
        except (LookupError, TypeError, ValueError, AttributeError) as exc:
            raise RegistryError(f"/v1/kv/{key}: unexpected answer: {exc!r}") from exc
        return Blocking(entry, idx)

    async def kv_put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        """Write a key; with ``cas`` only if its ModifyIndex still equals it (0: only if new).
        Returns whether the write happened."""
        params = {"cas": str(cas)} if cas is not None else None
        response = await self._request("PUT", f"/v1/kv/{key}", content=value, params=params)
        return self._json(response) is True

    async def kv_delete(self, key: str) -> None:
        await self._request("DELETE", f"/v1/kv/{key}")
