"""A CA that lives in the test's virtual time, for driving ``meshd.identity.manager`` through whole
certificate lifetimes with ``trio.testing.MockClock`` (imported as a plain module)."""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from meshd.ca import issuer
from meshd.errors import CAError
from meshd.identity import files, keys
from meshd.identity.ca_client import CARefusedError, DenyList
from meshd.identity.certs import Identity, JoinResult, TrustBundle
from meshd.identity.spiffe import Kind

TD = "mesh.test"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def virtual_clock() -> Callable[[], datetime]:
    """Wall time that follows trio's (mock) clock, starting at T0."""
    start = trio.current_time()
    return lambda: T0 + timedelta(seconds=trio.current_time() - start)


async def inline(fn: Callable[[], Any]) -> Any:
    """Blocking work run in the event loop: with a mock clock, a worker thread would let
    virtual time jump while it runs."""
    await trio.lowlevel.checkpoint()
    return fn()


@dataclass
class FakeCA:
    """Implements ``meshd.identity.ca_access.CAAccess``: issues real certificates stamped with the
    injected clock; ``up`` and ``refuse`` simulate an outage and a refusal."""

    clock: Callable[[], datetime]
    node: str = "n1"
    lifetime: timedelta = timedelta(hours=1)
    up: bool = True
    refuse_renewals: bool = False
    token_valid: bool = True
    deny: DenyList = field(default_factory=lambda: DenyList(0, frozenset()))
    calls: list[tuple[str, datetime]] = field(default_factory=list)
    signer: issuer.Signer = field(init=False)
    extra_roots: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        key = keys.new_private_key()
        self.signer = issuer.Signer(key, issuer.build_root(key, TD, T0 - timedelta(days=1)))

    def bundle(self) -> TrustBundle:
        return TrustBundle.from_pems(TD, [keys.cert_pem(self.signer.cert), *self.extra_roots])

    def _identity(self, kind: Kind, name: str) -> Identity:
        key = keys.new_private_key()
        cert = issuer.issue_identity(self.signer, key.public_key(), kind=kind, name=name,
                                     trust_domain=TD, now=self.clock(), lifetime=self.lifetime,
                                     backdate=timedelta(0))
        return Identity.from_pem(issuer.chain_pem(cert, self.signer),
                                 keys.private_key_pem(key), kind)

    def _issue(self, services: Sequence[str]) -> JoinResult:
        return JoinResult(TD, self.bundle(), types.MappingProxyType(
            {s: self._identity(Kind.SERVICE, s) for s in services}),
            self._identity(Kind.NODE, self.node))

    async def join(self, services: Sequence[str]) -> JoinResult:
        await trio.lowlevel.checkpoint()
        self.calls.append(("join", self.clock()))
        if not self.up:
            raise CAError("cannot reach the CA at https://ca (connection refused)")
        if not self.token_valid:
            raise CARefusedError(401, "token_used_up", "the join token has been used up")
        return self._issue(services)

    async def renew(self, services: Sequence[str]) -> JoinResult:
        await trio.lowlevel.checkpoint()
        self.calls.append(("renew", self.clock()))
        if not self.up:
            raise CAError("cannot reach the CA at https://ca (connection refused)")
        if self.refuse_renewals:
            raise CARefusedError(403, "node_revoked", "node 'n1' was revoked")
        return self._issue(services)

    async def roots(self) -> TrustBundle:
        await trio.lowlevel.checkpoint()
        if not self.up:
            raise CAError("cannot reach the CA")
        return self.bundle()

    async def denylist(self) -> DenyList:
        await trio.lowlevel.checkpoint()
        if not self.up:
            raise CAError("cannot reach the CA")
        return self.deny

    def files_changed(self) -> None:
        pass

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    def renewals(self) -> list[datetime]:
        return [t for kind, t in self.calls if kind == "renew"]


def write_identities(directory: Path, trust_domain: str,
                     services: list[str]) -> dict[str, Identity]:
    """A fresh root, its bundle and one identity per service in ``directory`` (real time)."""
    key = keys.new_private_key()
    signer = issuer.Signer(key, issuer.build_root(key, trust_domain, datetime.now(UTC)))
    files.write_bundle(directory, TrustBundle.from_pems(trust_domain,
                                                        [keys.cert_pem(signer.cert)]))
    out = {}
    for service in services:
        leaf_key = keys.new_private_key()
        cert = issuer.issue_leaf(signer, leaf_key.public_key(), service=service,
                                 trust_domain=trust_domain, now=datetime.now(UTC))
        out[service] = Identity.from_pem(keys.cert_pem(cert), keys.private_key_pem(leaf_key))
        files.write_identity(directory, out[service])
    return out


async def echo_server(address: str, port: int,
                      *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await trio.open_tcp_listeners(port, host=address)
    task_status.started()
    await trio.serve_listeners(echo, listeners)


@dataclass
class ScratchCA:
    """A root and leaves of any shape (kind, trust domain, validity), written as
    ``meshd.identity.files`` lays them out: for refusal tests that need certificates meshd's CA
    would never issue."""

    trust_domain: str = TD
    signer: issuer.Signer = field(init=False)

    def __post_init__(self) -> None:
        key = keys.new_private_key()
        self.signer = issuer.Signer(key, issuer.build_root(
            key, self.trust_domain, datetime.now(UTC) - timedelta(days=1)))

    def write(self, directory: Path, name: str, *, kind: Kind = Kind.SERVICE,
              trust_domain: str | None = None, now: datetime | None = None,
              lifetime: timedelta = timedelta(hours=1)) -> Identity:
        key = keys.new_private_key()
        cert = issuer.issue_identity(self.signer, key.public_key(), kind=kind, name=name,
                                     trust_domain=trust_domain or self.trust_domain,
                                     now=now or datetime.now(UTC), lifetime=lifetime,
                                     backdate=timedelta(0))
        directory.mkdir(parents=True, exist_ok=True)
        files.write_private_file(directory / f"{name}.key", keys.private_key_pem(key))
        files.write_public_file(directory / f"{name}.crt", keys.cert_pem(cert))
        files.write_public_file(directory / files.BUNDLE_FILE, keys.cert_pem(self.signer.cert))
        return Identity.from_pem(keys.cert_pem(cert), keys.private_key_pem(key), kind)
