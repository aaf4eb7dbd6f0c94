"""The CA API's own TLS: its certificate (issued from the signing root for the names it is
reached by, served with the rotation's cross certificate when there is one), the roots it
verifies client certificates against, and following a rotation made by another process."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path

import psutil
import trio

from meshd.ca import issuer, store
from meshd.ca.store import CAMaterial, load_ca
from meshd.errors import CAError
from meshd.identity import keys
from meshd.identity.files import write_private_file, write_public_file

log = logging.getLogger(__name__)

SERVER_CERT_LIFETIME = timedelta(days=7)
MATERIAL_CHECK_INTERVAL = 1.0   # how often the server looks for a rotation by another process
WILDCARD_HOSTS = ("", "0.0.0.0", "::")

Clock = Callable[[], datetime]


class MaterialCache:
    """The CA material, loaded again whenever ``ca.json`` was replaced (a rotation by
    ``meshd ca rotate`` in another process). ``get`` blocks: call it in a worker thread."""

    def __init__(self, directory: str | os.PathLike[str], material: CAMaterial) -> None:
        self._dir = Path(directory)
        self._material = material
        self._stamp = store.settings_stamp(self._dir)
        self._lock = threading.Lock()

    @property
    def current(self) -> CAMaterial:
        return self._material

    def get(self) -> CAMaterial:
        with self._lock:
            stamp = store.settings_stamp(self._dir)
            if stamp != self._stamp:
                try:
                    self._material = load_ca(self._dir)
                except CAError as exc:  # e.g. caught between a rotation's file operations
                    log.warning("keeping the CA material in force: %s", exc)
                else:
                    self._stamp = stamp
                    log.info("CA material reloaded: signing root %s%s", self._material.fingerprint,
                             f", previous root {self._material.previous_fingerprint} still "
                             "trusted" if self._material.previous is not None else "")
            return self._material


def roots_pem(material: CAMaterial) -> list[str]:
    return [keys.cert_pem(root).decode() for root in material.roots()]


# -- the API's own TLS --------------------------------------------------------------------------

def server_hosts(listen_host: str, extra: Iterable[str], local_names: Iterable[str]) -> list[str]:
    """The names the CA's TLS certificate covers: the listen address (or, for a wildcard,
    ``local_names``), loopback, and ``extra`` (pure)."""
    hosts = list(local_names) if listen_host in WILDCARD_HOSTS else [listen_host]
    hosts += ["localhost", "127.0.0.1", "::1", *extra]
    # (non-ASCII names cannot be DNS SANs as they are; IDNA would be the operator's --san)
    return list(dict.fromkeys(h for h in hosts if h and h.isascii()))


def local_names() -> list[str]:
    """This machine's host names and interface addresses (blocking: call in a thread)."""
    names = [socket.gethostname(), socket.getfqdn()]
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6) and "%" not in addr.address:
                names.append(addr.address)
    return names


class ServerTLS:
    """The listener's TLS: a fixed front context whose SNI callback (run for every handshake,
    SNI or not) hands the connection to the context in force, so a new certificate or a new
    set of trusted roots applies to new connections while open ones keep theirs."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts
        self.front = _base_context()
        self.front.sni_callback = self._select
        self._current: ssl.SSLContext | None = None
        self.built_from: CAMaterial | None = None
        self.built_at: datetime | None = None

    def update(self, material: CAMaterial, now: datetime) -> None:
        """Issue a fresh certificate from ``material`` and put it in force (CPU: key
        generation and signing, about a millisecond)."""
        context = _base_context()
        key = keys.new_private_key()
        cert = issuer.issue_server_cert(material.signer, key.public_key(), hosts=self.hosts,
                                        now=now, lifetime=SERVER_CERT_LIFETIME)
        # ssl only loads certificates from files: use a private temporary directory, gone at once.
        with tempfile.TemporaryDirectory(prefix="meshd-ca-tls-") as tmp:
            key_path, cert_path = Path(tmp, "server.key"), Path(tmp, "server.crt")
            write_private_file(key_path, keys.private_key_pem(key))
            write_public_file(cert_path, issuer.chain_pem(cert, material.signer))
            context.load_cert_chain(os.fspath(cert_path), os.fspath(key_path))
        context.load_verify_locations(cadata="".join(roots_pem(material)))
        self._current = context
        self.built_from, self.built_at = material, now

    def _select(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _ctx: ssl.SSLContext) -> int | None:
        if self._current is not None:
            sslobj.context = self._current
        return None


def _base_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    # Client certificates are asked for, verified against the roots when sent, and optional
    # (joins have none; renewals check for one).
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def server_tls_context(material: CAMaterial, hosts: list[str], now: datetime) -> ssl.SSLContext:
    """A TLS 1.3 server context holding a fresh certificate for ``hosts`` (fixed: what tests
    and tools that need one context take)."""
    tls = ServerTLS(hosts)
    tls.update(material, now)
    return tls.front


async def maintain_tls(tls: ServerTLS, materials: MaterialCache, clock: Clock) -> None:
    """Re-issue the API's certificate at half its lifetime and whenever the CA material changed
    (a rotation started or finished in another process)."""
    while True:
        await trio.sleep(MATERIAL_CHECK_INTERVAL)
        material = await trio.to_thread.run_sync(materials.get)
        now = clock()
        stale = tls.built_at is None or now - tls.built_at >= SERVER_CERT_LIFETIME / 2
        if material is not tls.built_from or stale:
            await trio.to_thread.run_sync(tls.update, material, now)
            log.info("the CA API's TLS certificate was issued again (signing root %s)",
                     material.fingerprint)
