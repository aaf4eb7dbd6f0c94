"""Test kit for the data plane: a throwaway PKI, host configs, and small real servers.

Certificates are built here with ``cryptography`` (not through meshd.ca) so these tests pin the
proxy's behaviour against certificates shaped exactly as the design says: ECDSA P-256 root,
leaves with one URI SAN ``spiffe://TD/svc/NAME`` and EKU server+client auth.

The HTTP backend uses h11, an implementation independent of the httptools code under test.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshd.config.schema import CASettings, HostConfig, LocalService
from meshd.metrics import Metrics

TD = "mesh.test"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class MiniCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "meshd test root") -> MiniCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, uri: str) -> tuple[bytes, bytes, x509.Certificate]:
        """A leaf (cert PEM, key PEM, cert) whose only SAN is the URI ``uri``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert

    def write_identity(self, directory: Path, service: str, td: str = TD) -> x509.Certificate:
        """``<service>.crt``/``.key`` and ``ca.crt`` in ``directory``, as meshd.identity.files lays
        them out."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_pem, key_pem, cert = self.issue(f"spiffe://{td}/svc/{service}")
        key_file = directory / f"{service}.key"
        key_file.write_bytes(key_pem)
        key_file.chmod(0o600)
        (directory / f"{service}.crt").write_bytes(cert_pem)
        (directory / "ca.crt").write_bytes(self.pem)
        return cert

    def files(self, directory: Path, uri: str) -> tuple[Path, Path]:
        """Write a leaf for ``uri`` and its key to ``directory``; return their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_pem, key_pem, _ = self.issue(uri)
        name = uri.rsplit("/", 1)[-1]
        cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        return cert_file, key_file


def host_config(node: str, state_dir: Path, services: list[LocalService],
                inbound_port: int = 0) -> HostConfig:
    return HostConfig(
        node=node, address="127.0.0.1", trust_domain=TD, registry_url="http://127.0.0.1:8500",
        ca=CASettings("https://127.0.0.1:1", "sha256:" + "0" * 64, state_dir / "token"),
        inbound_port=inbound_port, state_dir=state_dir, services=tuple(services))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (others may differ)."""
    return sum(s.value for family in metrics.registry.collect() for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def client_context(ca: MiniCA, cert_file: Path, key_file: Path,
                   verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if verify:
        ctx.load_verify_locations(cadata=ca.pem.decode())
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


# ------------------------------------------------------------------------------------------
# servers


async def _listen() -> trio.SocketListener:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener


def _port(listener: trio.SocketListener) -> int:
    return int(listener.socket.getsockname()[1])


@dataclass
class Backend:
    """A tiny HTTP/1.1 app (h11): ``/version`` answers JSON with its version and the headers it
    saw; ``/echo`` streams the request body back as it arrives; ``/sha`` hashes the body;
    ``/slow?delay=S``; ``/big?n=N`` sends N bytes; ``/close`` answers with Connection: close."""

    service: str
    version: str
    port: int = 0
    connections: int = 0
    requests: int = 0
    last_headers: dict[str, str] = field(default_factory=dict)
    # misbehaviour, for resilience tests: answer every request with ``status``, after
    # ``delay`` seconds; ``hang``: never answer; ``drop``: close the connection instead
    status: int = 200
    delay: float = 0.0
    hang: bool = False
    drop: bool = False
    extra_headers: list[tuple[str, str]] = field(default_factory=list)  # on every answer
    seen: list[dict[str, Any]] = field(default_factory=list)  # every request's headers/body

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listener = await _listen()
        self.port = _port(listener)
        task_status.started()
        await trio.serve_listeners(self._connection, [listener])

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)

        async def next_event() -> Any:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    conn.receive_data(data)
                    continue
                return event

        async def send(event: Any) -> None:
            data = conn.send(event)
            if data:
                await stream.send_all(data)

        try:
            while True:
                event = await next_event()
                if not isinstance(event, h11.Request):
                    break
                self.requests += 1
                await self._respond(event, next_event, send)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _respond(self, request: h11.Request, next_event: Any, send: Any) -> None:
        self.last_headers = {n.decode(): v.decode() for n, v in request.headers}
        url = urlsplit(request.target.decode())
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/echo":
            await send(h11.Response(status_code=200, headers=[("content-type", "app/echo")]))
            while isinstance(event := await next_event(), h11.Data):
                await send(h11.Data(data=bytes(event.data)))
            await send(h11.EndOfMessage())
            return
        digest = hashlib.sha256()
        size = 0
        while isinstance(event := await next_event(), h11.Data):
            digest.update(event.data)
            size += len(event.data)
        self.seen.append({"path": url.path, "method": request.method.decode(), "size": size,
                          "sha256": digest.hexdigest(), "headers": self.last_headers})
        if self.drop:
            raise trio.BrokenResourceError("dropped on purpose")
        if self.hang:
            await trio.sleep_forever()
        if self.delay:
            await trio.sleep(self.delay)
        if url.path == "/slow":
            await trio.sleep(float(query.get("delay", "1")))
        if url.path == "/big":
            n = int(query["n"])
            await send(h11.Response(status_code=200, headers=[("content-length", str(n))]))
            block = b"x" * 65536
            while n > 0:
                await send(h11.Data(data=block[:n]))
                n -= min(n, len(block))
            await send(h11.EndOfMessage())
            return
        body = json.dumps({
            "service": self.service, "version": self.version, "path": url.path,
            "method": request.method.decode(), "size": size, "sha256": digest.hexdigest(),
            "headers": self.last_headers,
        }).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        if url.path == "/close":
            headers.append(("connection", "close"))
        headers += self.extra_headers
        await send(h11.Response(status_code=self.status, headers=headers))
        if request.method != b"HEAD":
            await send(h11.Data(data=body))
        await send(h11.EndOfMessage())


@dataclass
class EchoServer:
    """TCP: echoes bytes back as they come; after the client's EOF sends ``<eof>`` then
    closes, which only arrives if the half-close crossed every hop."""

    port: int = 0
    connections: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listener = await _listen()
        self.port = _port(listener)
        task_status.started()
        await trio.serve_listeners(self._connection, [listener])

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_all(b"<eof>")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@dataclass
class RawServer:
    """Answers every connection with fixed bytes, then closes (a broken app)."""

    payload: bytes
    port: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listener = await _listen()
        self.port = _port(listener)
        task_status.started()
        await trio.serve_listeners(self._connection, [listener])

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            await stream.receive_some(65536)
            await stream.send_all(self.payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def read_until_eof(stream: trio.abc.ReceiveStream, limit: float = 5.0) -> bytes:
    out = bytearray()
    with trio.fail_after(limit):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            out += data
    return bytes(out)


async def duplex_exchange(stream: trio.abc.Stream, target: str, body: bytes,
                          chunk: int = 256 * 1024) -> tuple[int, int, str]:
    """POST ``body`` (with a content-length) while reading the response at the same time, as
    an echo needs (httpx sends the whole body first). Returns (status, size, sha256)."""
    conn = h11.Connection(h11.CLIENT)
    status = 0
    size = 0
    digest = hashlib.sha256()

    async def send() -> None:
        await stream.send_all(conn.send(h11.Request(
            method="POST", target=target,
            headers=[("host", "mesh"), ("content-length", str(len(body)))])) or b"")
        for i in range(0, len(body), chunk):
            await stream.send_all(conn.send(h11.Data(data=body[i:i + chunk])) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    async def receive() -> None:
        nonlocal status, size
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    return status, size, digest.hexdigest()


@dataclass
class ResettingPeer:
    """A fake meshd inbound listener for ``service``: completes the mTLS handshake as that
    service, reads the request, then drops the connection without a word (a peer that crashes
    or resets mid-request)."""

    ca: MiniCA
    directory: Path
    service: str = "payments"
    port: int = 0
    requests: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        self.ca.write_identity(self.directory, self.service)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.ca.pem.decode())
        ctx.load_cert_chain(str(self.directory / f"{self.service}.crt"),
                            str(self.directory / f"{self.service}.key"))
        self._ctx = ctx
        listener = await _listen()
        self.port = _port(listener)
        task_status.started()
        await trio.serve_listeners(self._connection, [listener])

    async def _connection(self, stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, self._ctx, server_side=True)
        try:
            await tls.do_handshake()
            if await tls.receive_some(65536):
                self.requests += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def eventually(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait (polling) until ``predicate()`` holds, for what happens off the request path."""
    for _ in range(int(limit / 0.01)):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not met in time")
