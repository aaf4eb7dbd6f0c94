"""Fuzzing the request reader (hypothesis): random bytes, mutated valid heads and chunked
bodies, fed whole and in random pieces. Whatever comes in, the reader returns events or raises
``ProtocolError`` with a status a server can answer (4xx, or 501 for what it cannot do): no
other exception, no hang. A few mutated requests also go through a real listener, which must
answer each with a status line or close, promptly."""

from __future__ import annotations

import random
import re

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxy_mesh_testing import Mesh
from proxy_testing import read_until_eof

from meshd.proxy.core.http1 import END, Data, ProtocolError, RequestHead, RequestReader

VALID = [
    b"GET /version?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
    b"POST /sha HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /sha HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
]
TOKENS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"Content-Length: 3\r\n",
          b"Transfer-Encoding: chunked\r\n", b"Content-Length: -1\r\n", b"\x00", b"\xff",
          b"ffffffffffffffffff\r\n", b"0\r\n\r\n", b"Host: b\r\n", b" folded\r\n",
          b"Transfer-Encoding: gzip, chunked\r\n", b"HTTP/1.1", b"HTTP/2.0", b"%00", b"*"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "byte"]))
        if kind == "insert":
            data[where:where] = draw(st.sampled_from(TOKENS))
        elif kind == "delete":
            del data[where:where + draw(st.integers(1, 8))]
        elif kind == "replace" and data:
            data[min(where, len(data) - 1)] = draw(st.integers(0, 255))
        else:
            data[where:where] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@st.composite
def chunked(draw: st.DrawFn) -> bytes:
    body = b""
    for chunk in draw(st.lists(st.binary(max_size=40), max_size=5)):
        size = draw(st.one_of(st.just(b"%x" % len(chunk)), st.binary(max_size=6)))
        end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"x\r\n"]))
        body += size + b"\r\n" + chunk + end
    body += draw(st.sampled_from([b"0\r\n\r\n", b"0\r\n", b"", b"0\r\nX: y\r\n\r\n"]))
    return (b"POST /sha HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)


def _feed_all(data: bytes, cuts: list[int]) -> list[object]:
    """Feed ``data`` in pieces cut at ``cuts``, then EOF; the events, or the error status."""
    reader = RequestReader()
    events: list[object] = []
    start = 0
    try:
        for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
            events += reader.feed(data[start:cut])
            start = max(start, cut)
        events += reader.feed_eof()
    except ProtocolError as exc:
        assert 400 <= exc.status < 500 or exc.status == 501, exc
        return [exc.status]
    for event in events:
        assert isinstance(event, RequestHead | Data) or event is END
    return events


SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6))
def test_random_bytes(data: bytes, cuts: list[int]) -> None:
    _feed_all(data, cuts)


@SETTINGS
@given(st.one_of(mutated(), chunked()), st.lists(st.integers(0, 400), max_size=6))
def test_mutated_requests_whole_and_in_pieces(data: bytes, cuts: list[int]) -> None:
    whole = _feed_all(data, [])
    pieces = _feed_all(data, cuts)
    if isinstance(whole[-1], int) or isinstance(pieces[-1], int):
        return  # refused either way (how far it got may differ)
    assert _joined(whole) == _joined(pieces)  # cutting never changes what was read


@SETTINGS
@given(st.one_of(mutated(), chunked()))
def test_byte_at_a_time_agrees(data: bytes) -> None:
    whole = _feed_all(data, [])
    bytewise = _feed_all(data, list(range(len(data))))
    if not isinstance(whole[-1], int) and not isinstance(bytewise[-1], int):
        assert _joined(whole) == _joined(bytewise)
    else:
        assert isinstance(whole[-1], int) and isinstance(bytewise[-1], int)


def _joined(events: list[object]) -> list[object]:
    out: list[object] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], bytes):
            out[-1] += event.data
        else:
            out.append(event.data if isinstance(event, Data) else event)
    return out


async def test_mutated_requests_through_a_real_listener(mesh: Mesh) -> None:
    """Sixty seeded mutations sent to a's outbound listener: each gets an answer (a status
    line: 4xx for refusals) or a close, within the head deadline; the proxy survives."""
    mesh.set_payments((("v1", 100), ("v2", 0)))
    rng = random.Random(5)
    host, port = mesh.a.proxy.outbound_address("web", "payments")
    for i in range(60):
        data = bytearray(rng.choice(VALID[:3]))
        for _ in range(rng.randint(1, 4)):
            where = rng.randint(0, len(data))
            data[where:where] = rng.choice(TOKENS)
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(bytes(data) + b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close"
                              b"\r\n\r\n")
        with trio.fail_after(15):
            answer = await read_until_eof(stream, limit=15)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 "), (i, bytes(data), answer)
        statuses = [int(s) for s in re.findall(rb"(?m)^HTTP/1\.1 (\d{3}) ", answer)]
        assert all(s < 500 for s in statuses), (i, bytes(data), answer)
    # and it still serves
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(b"GET /version HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (await read_until_eof(stream)).startswith(b"HTTP/1.1 200 ")
