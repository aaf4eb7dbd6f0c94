"""The HTTP/2 session's checks at frame headers, before the ``h2`` library buffers a frame:
the client's preface, SETTINGS first, and announced lengths over SETTINGS_MAX_FRAME_SIZE.
Each input fed whole and one byte at a time. And its flow control: credit comes back only
as bodies are consumed."""

from __future__ import annotations

import struct

import pytest

from meshd.proxy.core import h2 as core


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"",
          length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) \
        + payload


SETTINGS = frame(0x4, 0x0, 0)
PING = frame(0x6, 0x0, 0, b"12345678")

CASES = {
    # name: (bytes from the client, the connection error's code or None)
    "good-preface": (core.PREFACE + SETTINGS + PING, None),
    "largest-frame-allowed": (core.PREFACE + SETTINGS + frame(0xFA, 0, 0, b"x" * 16384), None),
    "wrong-magic": (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + SETTINGS, core.PROTOCOL_ERROR),
    "http1-request": (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", core.PROTOCOL_ERROR),
    "ping-first": (core.PREFACE + PING, core.PROTOCOL_ERROR),
    "settings-ack-first": (core.PREFACE + frame(0x4, 0x1, 0), core.PROTOCOL_ERROR),
    "garbage-after-magic": (core.PREFACE + b"not a frame at all", core.PROTOCOL_ERROR),
    "announced-16-mib": (core.PREFACE + SETTINGS + frame(0x0, 0, 1, b"x", length=2**24 - 1),
                         6),  # FRAME_SIZE_ERROR, without the 16 MiB
    "one-over-the-limit": (core.PREFACE + SETTINGS + frame(0x0, 0, 1, length=16385), 6),
}


def feed(data: bytes, step: int) -> core.Failed | None:
    session = core.Session(client_side=False)
    session.start()
    for i in range(0, len(data), step):
        for event in session.feed(data[i:i + step], 0.0):
            if isinstance(event, core.Failed):
                assert b"\x00\x00\x08\x07" in session.outgoing()  # a GOAWAY frame queued
                return event
    return None


@pytest.mark.parametrize("step", [1 << 20, 1], ids=["whole", "byte-at-a-time"])
@pytest.mark.parametrize("case", list(CASES))
def test_frame_heads(case: str, step: int) -> None:
    data, code = CASES[case]
    failed = feed(data, step)
    if code is None:
        assert failed is None
    else:
        assert failed is not None and failed.code == code, failed


def test_data_beyond_the_stream_window_is_a_flow_control_error() -> None:
    session = core.Session(client_side=False)
    session.start()
    window = core.DEFAULT_LIMITS.stream_window
    headers = frame(0x1, 0x4, 1, bytes([0x83, 0x86, 0x84, 0x41, 0x01, 0x61]))  # POST http / a
    chunk = frame(0x0, 0x0, 1, b"x" * 16384)
    events = session.feed(core.PREFACE + SETTINGS + headers, 0.0)
    assert isinstance(events[-1], core.Opened)
    for _ in range(window // 16384):  # the whole window: allowed
        assert not any(isinstance(e, core.Failed) for e in session.feed(chunk, 0.0))
    (failed,) = session.feed(chunk, 0.0)  # one frame more, with no credit given back
    assert isinstance(failed, core.Failed) and failed.code == 3  # FLOW_CONTROL_ERROR


def test_consumed_bodies_give_credit_back() -> None:
    session = core.Session(client_side=False)
    session.start()
    window = core.DEFAULT_LIMITS.stream_window
    headers = frame(0x1, 0x4, 1, bytes([0x83, 0x86, 0x84, 0x41, 0x01, 0x61]))
    chunk = frame(0x0, 0x0, 1, b"x" * 16384)
    session.feed(core.PREFACE + SETTINGS + headers, 0.0)
    for _ in range(4 * window // 16384):  # four windows' worth, each body consumed
        for event in session.feed(chunk, 0.0):
            assert isinstance(event, core.Body), event
            session.consumed(event.stream_id, event.flow)


def test_sent_header_lists_are_normalized_in_one_pass() -> None:
    """What a session sends: names lowercased, values trimmed, connection-specific fields
    and a ``te`` other than "trailers" left out, credentials and short cookies never
    indexed (a compression side channel cannot reveal them), as the peer decodes it. Strings
    go without Huffman coding (cheaper both ways in pure Python)."""
    from hpack import NeverIndexedHeaderTuple

    client, server = core.Session(client_side=True), core.Session(client_side=False)
    client.start()
    server.start()
    server.feed(client.outgoing(), 0.0)
    client.feed(server.outgoing(), 0.0)
    stream_id = client.next_stream_id()
    client.send_headers(stream_id, [
        (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/"),
        (b"X-Mixed", b"  padded "), (b"Connection", b"close"), (b"keep-alive", b"5"),
        (b"te", b"gzip"), (b"Authorization", b"Bearer secret"), (b"cookie", b"s=1"),
        (b"cookie", b"long-enough-cookie-value=1"), (b"x-last", b"1")], end=True)
    sent = client.outgoing()
    assert b"x-mixed" in sent and b"padded" in sent  # strings without Huffman coding
    opened = [e for e in server.feed(sent, 0.0) if isinstance(e, core.Opened)]
    assert len(opened) == 1
    headers = opened[0].headers
    assert [(bytes(n), bytes(v)) for n, v in headers] == [
        (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/"),
        (b"x-mixed", b"padded"), (b"authorization", b"Bearer secret"), (b"x-last", b"1"),
        (b"cookie", b"s=1; long-enough-cookie-value=1")]  # joined by the receiver
    never = {bytes(h[0]) for h in headers if isinstance(h, NeverIndexedHeaderTuple)}
    assert b"authorization" in never and b"x-mixed" not in never


GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
STATUS = [(b":status", b"200")]
BLOCKS = {
    # name: (the block, its kind, malformed)
    "request": ([*GET, (b"x-a", b"1"), (b"te", b"Trailers"), (b"x-empty", b"")],
                core.REQUEST, False),
    "request-host-only": ([h for h in GET if h[0] != b":authority"] + [(b"host", b"a")],
                          core.REQUEST, False),
    "request-host-matching": ([*GET, (b"host", b"a")], core.REQUEST, False),
    "connect": ([(b":method", b"CONNECT"), (b":authority", b"a:1")], core.REQUEST, False),
    "response": ([*STATUS, (b"content-type", b"text/plain")], core.RESPONSE, False),
    "trailers": ([(b"grpc-status", b"0")], core.TRAILERS, False),
    "uppercase-name": ([*GET, (b"X-A", b"1")], core.REQUEST, True),
    "space-in-name": ([*GET, (b"x a", b"1")], core.REQUEST, True),
    "colon-in-name": ([*GET, (b"x:a", b"1")], core.REQUEST, True),
    "high-octet-in-name": ([*GET, (b"x\xff", b"1")], core.REQUEST, True),
    "empty-name": ([*GET, (b"", b"1")], core.REQUEST, True),
    "nul-in-value": ([*GET, (b"x-a", b"a\x00b")], core.REQUEST, True),
    "lf-in-value": ([*GET, (b"x-a", b"a\nb")], core.REQUEST, True),
    "leading-space": ([*GET, (b"x-a", b" a")], core.REQUEST, True),
    "trailing-tab": ([*GET, (b"x-a", b"a\t")], core.REQUEST, True),
    "connection": ([*GET, (b"connection", b"close")], core.REQUEST, True),
    "upgrade": ([*GET, (b"upgrade", b"h2c")], core.REQUEST, True),
    "te-gzip": ([*GET, (b"te", b"gzip")], core.REQUEST, True),
    "two-hosts": ([*GET, (b"host", b"a"), (b"host", b"a")], core.REQUEST, True),
    "host-differs": ([*GET, (b"host", b"b")], core.REQUEST, True),
    "no-authority-no-host": (GET[:2] + GET[3:], core.REQUEST, True),
    "no-method": (GET[1:], core.REQUEST, True),
    "no-scheme": (GET[:1] + GET[2:], core.REQUEST, True),
    "empty-path": ([*GET[:3], (b":path", b"")], core.REQUEST, True),
    "duplicate-pseudo": ([*GET, (b":path", b"/x")], core.REQUEST, True),
    "pseudo-after-regular": ([*GET[:2], (b"x-a", b"1"), *GET[2:]], core.REQUEST, True),
    "unknown-pseudo": ([*GET, (b":x", b"1")], core.REQUEST, True),
    "status-in-request": (GET + STATUS, core.REQUEST, True),
    "protocol-without-connect": ([*GET, (b":protocol", b"websocket")], core.REQUEST, True),
    "connect-with-path": ([(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")],
                          core.REQUEST, True),
    "response-without-status": ([(b"content-type", b"x")], core.RESPONSE, True),
    "path-in-response": ([*STATUS, (b":path", b"/")], core.RESPONSE, True),
    "pseudo-in-trailers": (STATUS, core.TRAILERS, True),
    "connection-in-trailers": ([(b"keep-alive", b"1")], core.TRAILERS, True),
}


@pytest.mark.parametrize("case", list(BLOCKS))
def test_received_header_blocks_are_checked(case: str) -> None:
    block, kind, malformed = BLOCKS[case]
    error = core.field_error(block, kind)
    assert (error is not None) is malformed, error


def test_a_malformed_request_block_is_a_connection_error() -> None:
    client, server = core.Session(client_side=True), core.Session(client_side=False)
    client.start()
    server.start()
    server.feed(client.outgoing(), 0.0)
    # sent by hand: the client session would drop the field
    block = client._h2.encoder.encode([*GET, (b"x-a", b" padded")])
    headers = frame(0x1, 0x5, 1, block)  # END_STREAM | END_HEADERS
    events = server.feed(headers, 0.0)
    assert len(events) == 1 and isinstance(events[0], core.Failed), events
    assert events[0].code == core.PROTOCOL_ERROR and "malformed" in events[0].reason
