"""HTTP/1.1 on the way out: header rewriting, head serialisation, body encoding. Pure.

Heads are rebuilt rather than copied: hop-by-hop headers (and those the ``Connection`` header
names) are dropped, and body framing headers are written from the framing decided in
``http1``, never passed through, so what a peer reads always matches how we send the body.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

from meshd.proxy.core.http1 import Framing, Header, RequestHead, header_values
from meshd.proxy.core.trace import REQUEST_ID, TRACEPARENT, RequestIdentity

# RFC 9110 7.6.1 plus the classic hop-by-hop set; headers named in Connection are added per message.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})


_HOP_BY_HOP_AND_LENGTH = HOP_BY_HOP | {b"content-length"}


def _tokens(values: Iterable[bytes]) -> set[bytes]:
    return {t.strip().lower() for v in values for t in v.split(b",") if t.strip()}


def end_to_end(headers: Iterable[Header], *, keep_length: bool = False,
               drop: Iterable[bytes] = ()) -> list[Header]:
    """``headers`` without hop-by-hop ones (including those named in ``Connection``), without
    ``Content-Length`` unless ``keep_length`` (the writer sets framing itself), and without the
    lower-case names in ``drop``."""
    # one pass (this runs on every request and every response head): the fixed set and
    # ``drop`` (a few names: a tuple is searched faster than a set is built), the names a
    # Connection header lists (rare) in a second pass over what is left
    removed = HOP_BY_HOP if keep_length else _HOP_BY_HOP_AND_LENGTH
    drop = drop if isinstance(drop, tuple) else tuple(drop)
    kept: list[Header] = []
    named: list[bytes] = []
    for header in headers:
        lower = header[0].lower()
        if lower in removed:
            if lower == b"connection":
                named.append(header[1])
        elif lower not in drop:
            kept.append(header)
    # ``Connection: keep-alive`` (nginx's on every response, HTTP/1.0 clients') names a header
    # dropped already: no second pass for it
    if named and not (len(named) == 1 and named[0].strip().lower() == b"keep-alive"):
        more = _tokens(named)
        kept = [h for h in kept if h[0].lower() not in more]
    return kept


def append_forwarded_for(headers: list[Header], client: str) -> list[Header]:
    """Append ``client`` to ``X-Forwarded-For`` (one header, values comma-joined)."""
    previous = header_values(headers, b"x-forwarded-for")
    if not previous:
        return [*headers, (b"x-forwarded-for", client.encode("ascii"))]
    value = b", ".join([*previous, client.encode("ascii")])
    return [*(h for h in headers if h[0].lower() != b"x-forwarded-for"),
            (b"x-forwarded-for", value)]


def _framing_line(framing: Framing, length: int | None) -> bytes:
    """The head line that says how the body is framed (none for ``NONE`` and ``CLOSE``)."""
    if framing is Framing.LENGTH:
        return b"content-length: %d\r\n" % (length or 0)
    if framing is Framing.CHUNKED:
        return b"transfer-encoding: chunked\r\n"
    return b""


def serialize_request(method: bytes, target: bytes, headers: Iterable[Header],
                      framing: Framing, length: int | None = None) -> bytes:
    """An HTTP/1.1 request head; ``headers`` must be free of framing and hop-by-hop ones."""
    lines = [b"%s: %s\r\n" % header for header in headers]
    framing_line = _framing_line(framing, length)
    if framing_line:
        lines.append(framing_line)
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, b"".join(lines))


def upstream_request_head(request: RequestHead, *, forwarded_for: str, default_host: str,
                          drop: tuple[bytes, ...] = (), extra: tuple[Header, ...] = (),
                          ids: RequestIdentity | None = None) -> bytes:
    """The head sent upstream (``upstream_request_fields``), always HTTP/1.1 (upstream
    connections are kept alive whatever the client wants for its own), with the same body
    framing. An upgrade request keeps its ``Upgrade``."""
    headers = upstream_request_fields(request, forwarded_for=forwarded_for,
                                      default_host=default_host, drop=drop, extra=extra, ids=ids)
    if request.upgrade:
        upgrade = b", ".join(v for n, v in request.headers if n.lower() == b"upgrade")
        headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    return serialize_request(request.method, request.target, headers, request.framing,
                             request.content_length)


def upstream_request_fields(request: RequestHead, *, forwarded_for: str, default_host: str,
                            drop: tuple[bytes, ...] = (), extra: tuple[Header, ...] = (),
                            ids: RequestIdentity | None = None) -> list[Header]:
    """The fields of the request sent upstream: end-to-end headers only (minus ``drop``), a
    ``Host`` (``default_host`` when the client sent none), the client appended to
    ``X-Forwarded-For``, this hop's ``X-Request-Id`` and ``traceparent`` (``ids``), ``extra``
    added."""
    if ids is not None:
        drop = (*drop, REQUEST_ID, TRACEPARENT)
    headers = end_to_end(request.headers, drop=drop)
    has_host = forwarded = False
    for name, _ in headers:
        lower = name.lower()
        if lower == b"host":
            has_host = True
        elif lower == b"x-forwarded-for":
            forwarded = True
    if not has_host:
        headers.insert(0, (b"host", default_host.encode("ascii")))
    if forwarded:
        headers = append_forwarded_for(headers, forwarded_for)
    else:  # the usual case, without a second scan
        headers.append((b"x-forwarded-for", forwarded_for.encode("ascii")))
    if ids is not None:
        headers.extend(ids.headers)
    headers.extend(extra)
    return headers


def serialize_response(status: int, reason: bytes, headers: Iterable[Header],
                       framing: Framing, length: int | None = None,
                       connection: bytes | None = None) -> bytes:
    """An HTTP/1.1 response head; ``connection`` (``close``/``keep-alive``) is added when given."""
    lines = [b"%s: %s\r\n" % header for header in headers]
    framing_line = _framing_line(framing, length)
    if framing_line:
        lines.append(framing_line)
    if connection is not None:
        lines.append(b"connection: %s\r\n" % connection)
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason or _phrase(status), b"".join(lines))


def encode_data(framing: Framing, data: bytes) -> bytes:
    if framing is Framing.CHUNKED:
        return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
    return data


def encode_end(framing: Framing) -> bytes:
    return b"0\r\n\r\n" if framing is Framing.CHUNKED else b""


def simple_response(status: int, text: str, *, close: bool,
                    headers: Iterable[Header] = ()) -> bytes:
    """A complete short plain-text response that meshd itself answers with."""
    body = (text.rstrip("\n") + "\n").encode("utf-8", "replace")
    head = serialize_response(
        status, _phrase(status),
        [(b"content-type", b"text/plain; charset=utf-8"), *headers],
        Framing.LENGTH, len(body), b"close" if close else None)
    return head + body


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
