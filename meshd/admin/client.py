"""The one client of meshd's admin API: ``meshd status``, ``meshd explain`` and the console read
``/v1/state`` and ``/metrics`` through it.

Plain HTTP on loopback, or mutual TLS with an operator certificate when the admin API is exposed
(``[admin] tls = true``): the client trusts only the mesh CA and presents the certificate that
``meshd ca issue --operator NAME`` writes. Every failure is raised as ``AdminError`` with its
reason in an operator's words (a refusal with the admin API's own reason, a certificate that does
not verify, a handshake broken off for want of an operator certificate), naming the caller's own
options for the TLS files. Async over httpx, so it runs under trio (the CLI) and asyncio (the
console) alike.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Iterable
from typing import Any

import httpx

from meshd.errors import MeshError
from meshd.httpd import parse_hostport

DEFAULT_ADMIN_PORT = 15000
DEFAULT_ADMIN = f"127.0.0.1:{DEFAULT_ADMIN_PORT}"
TLS_OPTIONS = ("--ca", "--cert", "--key")  # the CLI's names of the CA, certificate and key


def admin_ssl_context(ca: str | None, cert: str | None, key: str | None,
                      options: tuple[str, str, str] = TLS_OPTIONS) -> ssl.SSLContext:
    """A client context for admin APIs over mutual TLS: trust only the mesh CA ``ca``, present
    the operator certificate ``cert``/``key``. The admin API presents its node's certificate,
    whose name is a SPIFFE ID, not a host name: the chain is verified, the host name is not.
    ``options``: the command's names for the three, for its messages."""
    ca_opt, cert_opt, key_opt = options
    if not ca:
        raise MeshError(f"{ca_opt} FILE is needed over TLS: the mesh CA bundle (the ca.crt "
                        f"that `meshd ca issue --operator NAME` writes)")
    if key and not cert:
        raise MeshError(f"{key_opt} without {cert_opt}")
    try:
        context = ssl.create_default_context(cafile=ca)
        context.check_hostname = False
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise MeshError(f"cannot load the admin TLS files: {exc}") from exc
    return context


def admin_url(raw: str, tls: bool) -> tuple[str, bool]:
    """``(base URL, over TLS)`` of ``HOST:PORT``, ``http://HOST:PORT`` or ``https://HOST:PORT``;
    without a scheme, HTTPS when TLS files were given."""
    scheme, _, rest = raw.rpartition("://")
    if scheme and scheme not in ("http", "https"):
        raise ValueError(f"unknown scheme {scheme}:// (http or https)")
    host, port = parse_hostport(rest.rstrip("/"))
    https = scheme == "https" if scheme else tls
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if https else 'http'}://{shown}:{port}", https


class Failure(enum.Enum):
    TIMEOUT = "no answer in time"
    CONNECT = "no connection: nothing listens, or the address is unreachable"
    REFUSED = "the admin API refused this client (403) and said why"
    HTTP = "an HTTP error status"
    TLS = "the TLS handshake failed or was broken off"
    CLOSED = "the connection closed without an answer"
    ANSWER = "an answer that is not what was asked for"


class AdminError(MeshError):
    """An admin API could not be read: ``reason`` says why, ``failure`` what kind of failure."""

    def __init__(self, url: str, failure: Failure, reason: str) -> None:
        self.url = url
        self.failure = failure
        self.reason = reason
        super().__init__(f"cannot read {url}: {reason}")


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    for _ in range(8):  # the chain httpx -> httpcore -> anyio -> ssl is short
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def describe(exc: httpx.HTTPError, *, tls: bool, client_cert: bool,
             options: tuple[str, str, str] = TLS_OPTIONS) -> tuple[Failure, str]:
    """What kind of failure ``exc`` is, and why in an operator's words."""
    ca_opt, cert_opt, key_opt = options
    if isinstance(exc, httpx.TimeoutException):
        return Failure.TIMEOUT, "timed out"
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        try:
            body = exc.response.json()
        except ValueError:
            body = None
        if code == 403 and isinstance(body, dict) and body.get("error"):
            return Failure.REFUSED, f"refused: {body.get('reason') or body['error']}"
        return Failure.HTTP, f"HTTP {code}"
    failure = _ssl_error(exc)
    if isinstance(failure, ssl.SSLCertVerificationError):
        return Failure.TLS, (f"TLS: cannot verify the admin API's certificate "
                             f"({failure.verify_message}): is {ca_opt} this mesh's ca.crt?")
    if failure is not None:
        return Failure.TLS, f"TLS: {failure.reason or failure}"
    if isinstance(exc, httpx.ConnectError):
        return Failure.CONNECT, "connection refused or unreachable"
    if isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError | httpx.WriteError):
        if not tls:
            return Failure.CLOSED, (f"closed without an answer: is the admin API over TLS? "
                                    f"then give {ca_opt}, {cert_opt}, {key_opt}")
        if not client_cert:
            return Failure.TLS, (f"TLS handshake broken off: an operator certificate is "
                                 f"required ({cert_opt}, {key_opt})")
        return Failure.TLS, ("TLS handshake broken off: is the certificate an operator's from "
                             "this mesh's CA, and still valid?")
    return Failure.ANSWER, str(exc) or type(exc).__name__


class AdminClient:
    """Reads admin APIs at base URLs (``http(s)://HOST:PORT``, see ``admin_url``): over TLS
    with ``tls`` (``admin_ssl_context``), which holds an operator certificate if
    ``client_cert``. ``options``: the caller's names of its TLS options, for its messages."""

    def __init__(self, tls: ssl.SSLContext | None = None, *, client_cert: bool = False,
                 timeout: float = 3.0, options: tuple[str, str, str] = TLS_OPTIONS,
                 max_keepalive: int = 8) -> None:
        self.tls = tls
        self.client_cert = client_cert
        self.options = options
        # trust_env=False: the admin API is on loopback or the mesh's own network; an
        # HTTP(S)_PROXY meant for the outside world must not see it
        self._http = httpx.AsyncClient(
            trust_env=False, verify=tls if tls is not None else True,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_keepalive_connections=max_keepalive))

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def base_url(self, address: str) -> str:
        """The base URL of the admin API at ``HOST:PORT``, in this client's scheme."""
        return f"{self.scheme}://{address}"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _get(self, url: str) -> httpx.Response:
        try:
            response = await self._http.get(url)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            failure, reason = describe(exc, tls=self.tls is not None,
                                       client_cert=self.client_cert, options=self.options)
            raise AdminError(url, failure, reason) from exc
        return response

    async def state(self, base: str, *, required: Iterable[str] = ()) -> dict[str, Any]:
        """``/v1/state``: the daemon's state document, a JSON object with every key in
        ``required``."""
        url = f"{base}/v1/state"
        response = await self._get(url)
        try:
            state = response.json()
        except ValueError as exc:
            raise AdminError(url, Failure.ANSWER, str(exc) or "not JSON") from exc
        if not isinstance(state, dict) or any(key not in state for key in required):
            what = "the answer is not a meshd state document" if required else \
                "/v1/state is not a JSON object"
            raise AdminError(url, Failure.ANSWER, what)
        return state

    async def metrics(self, base: str) -> str:
        """``/metrics``: the Prometheus text exposition."""
        return (await self._get(f"{base}/metrics")).text
