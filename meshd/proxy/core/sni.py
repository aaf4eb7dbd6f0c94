"""The server name a TLS client asks for, read from its ClientHello without taking part in the
handshake (TLS passthrough routes on it). Pure.

``client_hello_sni(data)`` reads the first TLS record(s) of a connection: ``NEED_MORE`` while
the ClientHello is incomplete, the name (lower case), ``""`` for a ClientHello without SNI, or
raises ``NotTLS`` for anything that is not a TLS handshake. A ClientHello spread over several
records is put together, up to ``MAX_HELLO`` bytes.
"""

from __future__ import annotations

MAX_HELLO = 16 * 1024
NEED_MORE = None
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000


class NotTLS(ValueError):
    """The bytes are not the start of a TLS handshake with a well-formed ClientHello."""


def client_hello_sni(data: bytes) -> str | None:
    hello = _handshake_bytes(data)
    if hello is None:
        return NEED_MORE
    if hello[0] != _CLIENT_HELLO:
        raise NotTLS("the first handshake message is not a ClientHello")
    length = int.from_bytes(hello[1:4], "big")
    if length > MAX_HELLO:
        raise NotTLS(f"ClientHello of {length} bytes is longer than {MAX_HELLO}")
    if len(hello) < 4 + length:
        return NEED_MORE
    return _sni(hello[4:4 + length])


def _handshake_bytes(data: bytes) -> bytes | None:
    """The handshake layer's bytes from the records in ``data`` (None: not one whole record
    yet, or not enough for the ClientHello's own header)."""
    out = bytearray()
    at = 0
    while at + 5 <= len(data):
        if data[at] != _HANDSHAKE:
            raise NotTLS(f"record type {data[at]:#x} is not a handshake")
        if data[at + 1] != 0x03:
            raise NotTLS("not a TLS record (version)")
        size = int.from_bytes(data[at + 3:at + 5], "big")
        if size == 0 or size > 16384 + 2048:
            raise NotTLS(f"record length {size}")
        if at + 5 + size > len(data):
            break
        out += data[at + 5:at + 5 + size]
        at += 5 + size
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            break
    if len(out) < 4:
        if len(data) > MAX_HELLO + 5:
            raise NotTLS("no ClientHello within the first records")
        return None
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise NotTLS("ClientHello truncated")
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))


def _sni(body: bytes) -> str:
    r = _Reader(body)
    r.take(2 + 32)  # legacy version, random
    r.vector(1)  # session id
    r.vector(2)  # cipher suites
    r.vector(1)  # compression methods
    if r.at == len(body):
        return ""  # no extensions
    extensions = _Reader(r.vector(2))
    while extensions.at < len(extensions.data):
        kind = extensions.number(2)
        content = extensions.vector(2)
        if kind != _SERVER_NAME:
            continue
        names = _Reader(_Reader(content).vector(2))
        while names.at < len(names.data):
            name_type = names.number(1)
            name = names.vector(2)
            if name_type == 0:
                try:
                    return name.decode("ascii").lower()
                except UnicodeDecodeError:
                    raise NotTLS("server name is not ASCII") from None
        return ""
    return ""
