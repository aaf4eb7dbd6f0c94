"""HTTP/1.1 framing tables, every input fed whole and then one byte at a time."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshd.proxy.core.http1 import (
    END,
    Data,
    Event,
    Framing,
    NoResponse,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    downstream_framing,
    response_framing,
)
from meshd.proxy.core.http1_write import (
    append_forwarded_for,
    encode_data,
    encode_end,
    end_to_end,
    serialize_request,
    serialize_response,
    simple_response,
)

Feed = Callable[[bytes], list[Event]]


def _whole(feed: Feed, data: bytes) -> list[Event]:
    return feed(data)


def _bytewise(feed: Feed, data: bytes) -> list[Event]:
    return [e for i in range(len(data)) for e in feed(data[i:i + 1])]


FEEDS = [pytest.param(_whole, id="whole"), pytest.param(_bytewise, id="bytewise")]


def _merge(events: list[Event]) -> list[Event]:
    """Adjacent Data events joined: how bodies are split depends on how bytes arrive."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def _summary(events: list[Event]) -> list[object]:
    """Heads reduced to what the tables pin down."""
    out: list[object] = []
    for e in _merge(events):
        if isinstance(e, RequestHead):
            out.append(("req", e.method, e.target, e.version, e.keep_alive, e.framing,
                        e.content_length, e.upgrade))
        elif isinstance(e, ResponseHead):
            out.append(("resp", e.status, e.keep_alive, e.framing, e.content_length))
        elif isinstance(e, Data):
            out.append(e.data)
        else:
            out.append("END")
    return out


REQUESTS = {
    "get": (b"GET /pay?x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
            [("req", b"GET", b"/pay?x=1", "1.1", True, Framing.NONE, None, False), "END"]),
    "content-length": (
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        [("req", b"POST", b"/p", "1.1", True, Framing.LENGTH, 5, False), b"hello", "END"]),
    "empty-length": (
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        [("req", b"POST", b"/p", "1.1", True, Framing.LENGTH, 0, False), "END"]),
    "chunked-with-trailer": (
        b"PUT /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n",
        [("req", b"PUT", b"/p", "1.1", True, Framing.CHUNKED, None, False), b"hello world",
         "END"]),
    "pipelined": (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close"
        b"\r\n\r\n",
        [("req", b"GET", b"/1", "1.1", True, Framing.NONE, None, False), "END",
         ("req", b"GET", b"/2", "1.1", False, Framing.NONE, None, False), "END"]),
    "http10": (b"GET / HTTP/1.0\r\n\r\n",
               [("req", b"GET", b"/", "1.0", False, Framing.NONE, None, False), "END"]),
    "http10-keep-alive": (
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        [("req", b"GET", b"/", "1.0", True, Framing.NONE, None, False), "END"]),
    # after an upgrade request the bytes are the new protocol's: kept as the reader's tail
    "upgrade-then-bytes": (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n",
        [("req", b"GET", b"/ws", "1.1", True, Framing.NONE, None, True), "END"]),
}


@pytest.mark.parametrize("feed", FEEDS)
def test_bytes_after_an_upgrade_request_are_its_tail(
        feed: Callable[[Feed, bytes], list[Event]]) -> None:
    reader = RequestReader()
    feed(reader.feed, REQUESTS["upgrade-then-bytes"][0])
    assert bytes(reader.tail) == b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    assert reader.feed_eof() == []


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("name", list(REQUESTS))
def test_requests(name: str, feed: Callable[[Feed, bytes], list[Event]]) -> None:
    data, expected = REQUESTS[name]
    reader = RequestReader()
    assert _summary(feed(reader.feed, data)) == expected
    assert reader.feed_eof() == []


def test_request_headers_keep_order_and_case() -> None:
    events = RequestReader().feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.headers == ((b"Host", b"a"), (b"X-A", b"1"), (b"x-a", b"2"))


BAD_REQUESTS = {
    "no-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "te-and-cl": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n", 400),
    "two-lengths": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                    b"Content-Length: 4\r\n\r\nabcd", 400),
    "bad-length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    "not-http": (b"\x16\x03\x01\x02\x00 hello\r\n\r\n", 400),
    "bad-chunk": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    "connect": (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    "upgrade-with-body": (b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade"
                          b"\r\nContent-Length: 3\r\n\r\nabc", 501),
    "huge-header": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
}


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests(name: str, feed: Callable[[Feed, bytes], list[Event]]) -> None:
    data, status = BAD_REQUESTS[name]
    reader = RequestReader()
    with pytest.raises(ProtocolError) as caught:
        # an error after a complete head is reported by the next call (the head is served
        # first): here that is the end of input
        feed(reader.feed, data)
        reader.feed_eof()
    assert caught.value.status == status


def test_good_request_is_served_before_the_garbage_after_it() -> None:
    reader = RequestReader()
    events = reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBLAH BLAH BLAH\r\n\r\n")
    assert _summary(events)[-1] == "END"
    with pytest.raises(ProtocolError):
        reader.feed(b"")
    with pytest.raises(ProtocolError):
        reader.feed_eof()


def test_eof_inside_a_request_is_an_error() -> None:
    reader = RequestReader()
    reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    assert reader.mid_message
    with pytest.raises(ProtocolError, match="middle of a request"):
        reader.feed_eof()


RESPONSES = {
    "length": (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
               [("resp", 200, True, Framing.LENGTH, 3), b"abc", "END"], True),
    "chunked": (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n",
                [("resp", 200, True, Framing.CHUNKED, None), b"abc", "END"], True),
    "close": (b"GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
              [("resp", 200, False, Framing.LENGTH, 2), b"ok", "END"], False),
    "head": (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
             [("resp", 200, True, Framing.NONE, None), "END"], True),
    "no-content": (b"DELETE", b"HTTP/1.1 204 No Content\r\n\r\n",
                   [("resp", 204, True, Framing.NONE, None), "END"], True),
    "not-modified": (b"GET", b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
                     [("resp", 304, True, Framing.NONE, None), "END"], True),
    "continue-then-final": (
        b"POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        [("resp", 100, True, Framing.NONE, None), ("resp", 201, True, Framing.LENGTH, 0),
         "END"], True),
}


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("name", list(RESPONSES))
def test_responses(name: str, feed: Callable[[Feed, bytes], list[Event]]) -> None:
    method, data, expected, keep_alive = RESPONSES[name]
    reader = ResponseReader(method)
    assert _summary(feed(reader.feed, data)) == expected
    assert reader.done and reader.keep_alive is keep_alive and not reader.extra


@pytest.mark.parametrize("feed", FEEDS)
def test_close_delimited_response_ends_at_eof(feed: Callable[[Feed, bytes], list[Event]]) -> None:
    reader = ResponseReader(b"GET")
    events = feed(reader.feed, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
    assert _summary(events) == [("resp", 200, False, Framing.CLOSE, None), b"until close"]
    assert not reader.done
    assert reader.feed_eof() == [END]
    assert reader.done and not reader.keep_alive


def test_bytes_after_the_response_make_the_connection_unusable() -> None:
    for method, data in ((b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxJUNK"),
                         (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")):
        reader = ResponseReader(method)
        assert _summary(reader.feed(data))[-1] == "END"
        assert reader.extra
    reader = ResponseReader(b"GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    reader.feed(b"more")
    assert reader.extra


@pytest.mark.parametrize("name", list(RESPONSES))
def test_a_reader_reset_for_the_next_response_reads_it_like_a_new_one(name: str) -> None:
    """A keep-alive upstream connection keeps its response reader: after a response read to
    its end it is reset for the next one (each response in RESPONSES after a plain 200), and a
    reader that cannot be (HEAD, whose body llhttp still expects; a closing response) makes
    way for a new one."""
    method, data, expected, keep_alive = RESPONSES[name]
    first = ResponseReader(b"GET")
    first.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    reader = first.next_response(method)
    assert reader is first
    assert not reader.done and not reader.received
    assert _summary(reader.feed(data)) == expected
    assert reader.done and reader.keep_alive is keep_alive and not reader.extra
    following = reader.next_response(b"GET")
    assert (following is reader) is (keep_alive and method != b"HEAD")
    events = following.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert _summary(events) == [("resp", 204, True, Framing.NONE, None), "END"]


def test_a_reader_mid_response_is_never_reused() -> None:
    reader = ResponseReader(b"GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert reader.next_response(b"GET") is not reader
    closing = ResponseReader(b"GET")
    closing.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
    assert closing.done and closing.next_response(b"GET") is not closing


def test_response_failures() -> None:
    with pytest.raises(NoResponse):
        ResponseReader(b"GET").feed_eof()
    reader = ResponseReader(b"GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(ProtocolError, match="middle of a response"):
        reader.feed_eof()
    with pytest.raises(ProtocolError, match="switched protocols"):
        ResponseReader(b"GET").feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                                    b"Connection: upgrade\r\n\r\n")
    with pytest.raises(ProtocolError):
        ResponseReader(b"GET").feed(b"HTTP/1.1 OK\r\n\r\n")
    with pytest.raises(ProtocolError):
        ResponseReader(b"GET").feed(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")


def test_response_framing_table() -> None:
    te_gzip = ((b"Transfer-Encoding", b"gzip"),)
    te_chunked = ((b"Transfer-Encoding", b"gzip, chunked"),)
    cl = ((b"Content-Length", b"12"),)
    assert response_framing(200, b"GET", te_gzip) == (Framing.CLOSE, None)
    assert response_framing(200, b"GET", te_chunked) == (Framing.CHUNKED, None)
    assert response_framing(200, b"GET", cl) == (Framing.LENGTH, 12)
    assert response_framing(200, b"HEAD", cl) == (Framing.NONE, None)
    assert response_framing(200, b"GET", ()) == (Framing.CLOSE, None)
    assert response_framing(103, b"GET", cl) == (Framing.NONE, None)


def _head(framing: Framing) -> ResponseHead:
    return ResponseHead(200, b"OK", "1.1", (), True, framing)


def _req(version: str) -> RequestHead:
    return RequestHead(b"GET", b"/", version, (), True, Framing.NONE)


def test_downstream_framing_table() -> None:
    assert downstream_framing(_head(Framing.CLOSE), _req("1.1")) is Framing.CHUNKED
    assert downstream_framing(_head(Framing.CHUNKED), _req("1.0")) is Framing.CLOSE
    assert downstream_framing(_head(Framing.CLOSE), _req("1.0")) is Framing.CLOSE
    assert downstream_framing(_head(Framing.LENGTH), _req("1.0")) is Framing.LENGTH
    assert downstream_framing(_head(Framing.CHUNKED), _req("1.1")) is Framing.CHUNKED


def test_hop_by_hop_headers_are_removed() -> None:
    headers = [(b"Host", b"a"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"),
               (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Upgrade", b"ws"),
               (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3"),
               (b"X-Keep", b"yes"), (b"Proxy-Connection", b"close")]
    assert end_to_end(headers) == [(b"Host", b"a"), (b"X-Keep", b"yes")]
    assert end_to_end(headers, keep_length=True) == [
        (b"Host", b"a"), (b"Content-Length", b"3"), (b"X-Keep", b"yes")]
    assert end_to_end(headers, drop=(b"x-keep",)) == [(b"Host", b"a")]
    # a Connection header naming only keep-alive, or naming another header too (two of them)
    assert end_to_end([(b"Connection", b" Keep-Alive "), (b"X-Keep", b"yes")]) == [
        (b"X-Keep", b"yes")]
    assert end_to_end([(b"Connection", b"keep-alive"), (b"Connection", b"x-secret"),
                       (b"X-Secret", b"1"), (b"X-Keep", b"yes")]) == [(b"X-Keep", b"yes")]


def test_forwarded_for_is_appended() -> None:
    assert append_forwarded_for([(b"Host", b"a")], "10.0.0.1") == [
        (b"Host", b"a"), (b"x-forwarded-for", b"10.0.0.1")]
    assert append_forwarded_for([(b"X-Forwarded-For", b"1.1.1.1"), (b"Host", b"a")],
                                "10.0.0.1") == [
        (b"Host", b"a"), (b"x-forwarded-for", b"1.1.1.1, 10.0.0.1")]


def test_serialising_heads_and_bodies() -> None:
    assert serialize_request(b"POST", b"/p", [(b"Host", b"a")], Framing.LENGTH, 5) == (
        b"POST /p HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\n\r\n")
    assert serialize_request(b"GET", b"/", [(b"Host", b"a")], Framing.NONE) == (
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert serialize_response(200, b"", [(b"X", b"1")], Framing.CHUNKED, None, b"close") == (
        b"HTTP/1.1 200 OK\r\nX: 1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
    assert encode_data(Framing.CHUNKED, b"hello") == b"5\r\nhello\r\n"
    assert encode_data(Framing.CHUNKED, b"") == b""
    assert encode_data(Framing.LENGTH, b"hello") == b"hello"
    assert encode_end(Framing.CHUNKED) == b"0\r\n\r\n"
    assert encode_end(Framing.CLOSE) == b""


def test_serialised_messages_parse_back() -> None:
    reader = ResponseReader(b"GET")
    events = reader.feed(simple_response(503, "no healthy endpoint", close=True,
                                         headers=[(b"x-meshd-reason", b"nope")]))
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.keep_alive) == (503, False)
    assert (b"x-meshd-reason", b"nope") in head.headers
    assert _merge(events[1:]) == [Data(b"no healthy endpoint\n"), END]
    request = serialize_request(b"PUT", b"/x", [(b"Host", b"a")], Framing.CHUNKED)
    body = encode_data(Framing.CHUNKED, b"abc") + encode_end(Framing.CHUNKED)
    assert _summary(RequestReader().feed(request + body)) == [
        ("req", b"PUT", b"/x", "1.1", True, Framing.CHUNKED, None, False), b"abc", "END"]
