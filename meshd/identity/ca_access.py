"""How a host's meshd reaches the CA: ``CAAccess``, what the certificate manager
(``meshd.identity.manager``) needs, and ``HTTPCA``, the real thing over HTTPS (fakes in tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from meshd.config.schema import HostConfig
from meshd.errors import CAError
from meshd.identity import files as ca_files
from meshd.identity.ca_client import CAConnection, DenyList, join
from meshd.identity.certs import JoinResult, TrustBundle


class CAAccess(Protocol):
    """What the manager needs from the CA (``HTTPCA`` in production, fakes in tests)."""

    async def join(self, services: Sequence[str]) -> JoinResult: ...
    async def renew(self, services: Sequence[str]) -> JoinResult: ...
    async def roots(self) -> TrustBundle: ...
    async def denylist(self) -> DenyList: ...
    def files_changed(self) -> None: ...
    async def aclose(self) -> None: ...


class HTTPCA:
    """The CA API: the join with the token (pinned by fingerprint), everything after with the
    node certificate on disk, verified against the bundle on disk."""

    def __init__(self, config: HostConfig, directory: Path, token: Callable[[], str]) -> None:
        self._config = config
        self._dir = directory
        self._token = token
        self._poll: CAConnection | None = None
        self._stale = False

    def _connection(self) -> CAConnection:
        """Verified against the bundle on disk; the node certificate as client certificate
        while it is valid (the CA refuses a handshake with an expired one)."""
        try:
            valid = ca_files.read_node_identity(self._dir).valid_at(datetime.now(UTC))
        except CAError:
            valid = False
        return CAConnection(self._config.ca.url, self._config.trust_domain,
                            self._dir / ca_files.BUNDLE_FILE,
                            ca_files.node_files(self._dir) if valid else None)

    async def join(self, services: Sequence[str]) -> JoinResult:
        return await join(self._config.ca.url, token=self._token(), node=self._config.node,
                          services=services, fingerprint=self._config.ca.fingerprint)

    async def renew(self, services: Sequence[str]) -> JoinResult:
        connection = self._connection()
        try:
            return await connection.renew(self._config.node, services)
        finally:
            await connection.aclose()

    async def _poller(self) -> CAConnection:
        if self._poll is None or self._stale:
            if self._poll is not None:
                await self._poll.aclose()
            self._poll, self._stale = self._connection(), False
        return self._poll

    async def roots(self) -> TrustBundle:
        return await (await self._poller()).roots()

    async def denylist(self) -> DenyList:
        return await (await self._poller()).denylist()

    def files_changed(self) -> None:
        self._stale = True

    async def aclose(self) -> None:
        if self._poll is not None:
            await self._poll.aclose()
            self._poll = None
