"""Hostile HTTP/2 input against both kinds of listener (h2spec-style cases): an app's outbound
listener (h2c with prior knowledge) and the inbound mTLS listener (ALPN h2, a client
certificate of the mesh CA). Frames are written raw with ``hyperframe`` and ``hpack`` (no
client-side validation), read back with a deadline on every read.

Each case checks what the peer is told (GOAWAY or RST_STREAM and its error code, as RFC 9113
asks; a connection error where a stream error is asked for is allowed by its section 5.4),
that the connection is then closed, and that the listener still serves a normal request.
Cases about memory measure the process's Python allocations with ``tracemalloc`` (the whole
mesh runs in this process): the peak above the start of the case.
"""

from __future__ import annotations

import ssl
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import hpack
import pytest
import trio
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from proxy_mesh_testing import Mesh
from proxy_testing import client_context, eventually, read_until_eof

from meshd.config.routes import parse_routes
from meshd.proxy import h2conn
from meshd.proxy.core import h2 as core

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x6
CANCEL, ENHANCE_YOUR_CALM = 0x8, 0xB
READ_LIMIT = 5.0  # every read of a case is bounded by this

Header = tuple[bytes, bytes]
GET: list[Header] = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/version"),
                     (b":authority", b"payments")]
POST: list[Header] = [(b":method", b"POST"), *GET[1:]]


def frame_bytes(kind: int, flags: int, stream_id: int, payload: bytes,
                length: int | None = None) -> bytes:
    """A frame as it goes on the wire, whatever its contents (no validation at all; its
    header may announce another ``length``)."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream_id) + payload


class Peer:
    """A hostile HTTP/2 client on one connection: writes what it is given, reads frames."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self._buf = bytearray()
        self.eof = False

    async def send(self, *parts: Frame | bytes) -> None:
        await self.stream.send_all(b"".join(p if isinstance(p, bytes) else p.serialize()
                                            for p in parts))

    async def preface(self, **settings: int) -> None:
        await self.send(PREFACE, SettingsFrame(0, settings={
            getattr(SettingsFrame, name.upper()): v for name, v in settings.items()}))

    def headers(self, stream_id: int, fields: Sequence[Header], *, end: bool = True,
                end_headers: bool = True) -> HeadersFrame:
        flags = ["END_STREAM"] if end else []
        if end_headers:
            flags.append("END_HEADERS")
        return HeadersFrame(stream_id, self.encoder.encode(list(fields)), flags=flags)

    async def next_frame(self) -> Frame | None:
        """The next frame; None at the end of the connection."""
        with trio.fail_after(READ_LIMIT):
            while True:
                if len(self._buf) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(self._buf[:9]))
                    if len(self._buf) >= 9 + length:
                        frame.parse_body(memoryview(bytes(self._buf[9:9 + length])))
                        del self._buf[:9 + length]
                        return frame
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self.eof = True
                    return None
                self._buf += data

    async def until(self, *kinds: type[Frame]) -> Frame | None:
        """Read past frames of other kinds (settings, pings' acks, window updates...) to the
        first of ``kinds``; None at the end of the connection."""
        while True:
            frame = await self.next_frame()
            if frame is None or isinstance(frame, kinds):
                return frame

    async def goaway(self) -> GoAwayFrame:
        frame = await self.until(GoAwayFrame)
        assert isinstance(frame, GoAwayFrame), "connection closed without a GOAWAY"
        return frame

    async def closed(self) -> None:
        """The connection ends (after a GOAWAY, the server must close it)."""
        while await self.next_frame() is not None:
            pass

    async def response(self, stream_id: int) -> tuple[int, bytes]:
        """The status and body of ``stream_id``'s response (frames of other streams skipped);
        the body's credit given back so that any size comes through."""
        status, body = 0, bytearray()
        while True:
            frame = await self.until(HeadersFrame, DataFrame, RstStreamFrame, GoAwayFrame)
            assert frame is not None, "connection closed before the response ended"
            assert not isinstance(frame, GoAwayFrame) or frame.error_code == NO_ERROR, frame
            if isinstance(frame, GoAwayFrame) or frame.stream_id != stream_id:
                continue
            assert not isinstance(frame, RstStreamFrame), frame
            if isinstance(frame, HeadersFrame):
                fields = dict(self.decoder.decode(frame.data, raw=True))
                status = status or int(fields.get(b":status", b"0"))
            else:
                body += frame.data
                if frame.flow_controlled_length:
                    await self.send(WindowUpdateFrame(0, frame.flow_controlled_length),
                                    WindowUpdateFrame(stream_id, frame.flow_controlled_length))
            if "END_STREAM" in frame.flags:
                return status, bytes(body)


@dataclass(frozen=True)
class Connect:
    """Opens a connection to the listener under test (``kind``: outbound or inbound)."""

    kind: str
    open: Callable[[], Awaitable[Peer]]

    async def __call__(self) -> Peer:
        return await self.open()


@pytest.fixture(params=["outbound", "inbound"])
async def connect(request: pytest.FixtureRequest, mesh: Mesh, tmp_path: Path
                  ) -> AsyncIterator[Connect]:
    """Opens a connection to the listener under test: host a's outbound listener for
    payments (h2c), or host b's inbound listener (mTLS as service ``web``, ALPN h2)."""
    mesh.set_payments((("v1", 100), ("v2", 0)))
    peers: list[Peer] = []
    ctx: ssl.SSLContext | None = None
    if request.param == "inbound":
        cert, key = mesh.ca.files(tmp_path / "client", "spiffe://mesh.test/svc/web")
        ctx = client_context(mesh.ca, cert, key)
        ctx.set_alpn_protocols(["h2"])

    async def open_peer() -> Peer:
        if ctx is None:
            host, port = mesh.a.proxy.outbound_address("web", "payments")
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        else:
            transport = await trio.open_tcp_stream("127.0.0.1", mesh.b.port)
            tls = trio.SSLStream(transport, ctx, server_hostname="payments")
            with trio.fail_after(READ_LIMIT):
                await tls.do_handshake()
            assert tls.selected_alpn_protocol() == "h2"
            stream = tls
        peers.append(Peer(stream))
        return peers[-1]

    try:
        yield Connect(request.param, open_peer)
    finally:
        for peer in peers:
            await trio.aclose_forcefully(peer.stream)


async def flood(peer: Peer, batches: Iterable[Sequence[Frame | bytes]]
                ) -> tuple[int, GoAwayFrame]:
    """Send ``batches`` (for ``READ_LIMIT`` at most) while reading, until the server's GOAWAY;
    returns how many batches went out and the GOAWAY, after which the connection closes."""
    sent = 0

    async def send() -> None:
        nonlocal sent
        with trio.move_on_after(READ_LIMIT):
            for batch in batches:
                try:
                    await peer.send(*batch)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the server closed first
                sent += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        goaway = await peer.goaway()
        await peer.closed()
        nursery.cancel_scope.cancel()
    return sent, goaway


def requests_seen(mesh: Mesh) -> int:
    return mesh.v1.requests + mesh.v2.requests


async def still_serves(connect: Connect) -> None:
    """A well-behaved client gets its answer on a new connection."""
    peer = await connect()
    await peer.preface()
    await peer.send(peer.headers(1, GET))
    status, body = await peer.response(1)
    assert status == 200 and b'"version": "v1"' in body


async def expect_goaway(peer: Peer, code: int) -> GoAwayFrame:
    goaway = await peer.goaway()
    assert goaway.error_code == code, (goaway.error_code, goaway.additional_data)
    await peer.closed()
    return goaway


# -- preface ----------------------------------------------------------------------------------

async def test_garbage_instead_of_the_preface(connect: Connect, mesh: Mesh) -> None:
    peer = await connect()
    await peer.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + b"garbage " * 8)
    if connect.kind == "outbound":
        # not the preface: taken for HTTP/1.1, whose parser refuses it and closes
        answer = await read_until_eof(peer.stream)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        host, port = mesh.a.proxy.outbound_address("web", "payments")
        plain = await trio.open_tcp_stream(host, port)
        await plain.send_all(b"GET /version HTTP/1.1\r\nHost: payments\r\n"
                             b"Connection: close\r\n\r\n")
        assert (await read_until_eof(plain)).startswith(b"HTTP/1.1 200 OK")
        await plain.aclose()
    else:  # ALPN said h2: the preface is checked by the HTTP/2 session
        await expect_goaway(peer, PROTOCOL_ERROR)
    await still_serves(connect)
    assert requests_seen(mesh) == (2 if connect.kind == "outbound" else 1)


async def test_preface_then_garbage(connect: Connect, mesh: Mesh) -> None:
    peer = await connect()
    await peer.send(PREFACE + b"this is not a SETTINGS frame at all\r\n")
    await expect_goaway(peer, PROTOCOL_ERROR)
    await still_serves(connect)


# -- invalid frames -----------------------------------------------------------------------------

INVALID_FRAMES: dict[str, tuple[Callable[[Peer], list[Frame | bytes]], int]] = {
    # RFC 9113 6.1: DATA on stream 0 is a connection error PROTOCOL_ERROR
    "data-on-stream-0": (lambda p: [frame_bytes(0x0, 0x1, 0, b"hello")], PROTOCOL_ERROR),
    # 5.1.1: a client's streams are odd
    "headers-on-even-stream": (lambda p: [p.headers(2, GET)], PROTOCOL_ERROR),
    # 4.2: larger than our SETTINGS_MAX_FRAME_SIZE (16 KiB)
    "frame-too-large": (lambda p: [p.headers(1, POST, end=False),
                                   frame_bytes(0x0, 0x0, 1, b"x" * (16 * 1024 + 1))],
                        FRAME_SIZE_ERROR),
    # the same announced in a header (16 MiB) and never sent: refused at the header, not
    # waited for
    "frame-length-16mib": (lambda p: [frame_bytes(0x0, 0x0, 1, b"x" * 1000,
                                                  length=2**24 - 1)], FRAME_SIZE_ERROR),
    # 6.9: an increment of 0 on the connection is a connection error
    "window-update-0": (lambda p: [frame_bytes(0x8, 0x0, 0, struct.pack(">I", 0))],
                        PROTOCOL_ERROR),
    # 6.5: a SETTINGS payload not a multiple of 6 octets
    "settings-bad-length": (lambda p: [frame_bytes(0x4, 0x0, 0, b"\x00\x03\x00\x00\x00")],
                            FRAME_SIZE_ERROR),
    # 6.5: SETTINGS on a stream
    "settings-on-a-stream": (lambda p: [frame_bytes(0x4, 0x0, 1, b"")], PROTOCOL_ERROR),
    # 5.3.1: a stream depending on itself (a stream error; we end the connection)
    "priority-self-dependency": (lambda p: [PriorityFrame(3, depends_on=3, stream_weight=16)],
                                 PROTOCOL_ERROR),
    # 5.1.1: stream ids only grow
    "stream-id-backwards": (lambda p: [p.headers(5, GET), p.headers(3, GET)], PROTOCOL_ERROR),
    # 6.4 / 5.1: RST_STREAM on an idle stream
    "rst-on-idle-stream": (lambda p: [RstStreamFrame(7, error_code=CANCEL)], PROTOCOL_ERROR),
    # 6.10: CONTINUATION with no HEADERS before it
    "naked-continuation": (lambda p: [frame_bytes(0x9, 0x4, 1, b"")], PROTOCOL_ERROR),
    # 6.7: a PING payload is 8 octets
    "ping-bad-length": (lambda p: [frame_bytes(0x6, 0x0, 0, b"1234567")], FRAME_SIZE_ERROR),
}


@pytest.mark.parametrize("case", list(INVALID_FRAMES))
async def test_invalid_frames_end_the_connection(connect: Connect, case: str) -> None:
    make, code = INVALID_FRAMES[case]
    peer = await connect()
    await peer.preface()
    await peer.send(*make(peer))
    await expect_goaway(peer, code)
    await still_serves(connect)


async def test_a_connection_error_closes_the_connection_with_requests_in_flight(
        connect: Connect) -> None:
    # 5.4.1: after the GOAWAY of a connection error the connection is closed, at once: not
    # when the requests in flight (here one the app answers in 30 s) are done
    peer = await connect()
    await peer.preface()
    await peer.send(peer.headers(1, [*GET[:2], (b":path", b"/slow?delay=30"), GET[3]]))
    await trio.sleep(0.2)  # the request is on its way to the app
    await peer.send(frame_bytes(0x0, 0x1, 0, b"hello"))
    goaway = await expect_goaway(peer, PROTOCOL_ERROR)  # closed within READ_LIMIT
    assert goaway.last_stream_id == 1
    await still_serves(connect)


async def test_unknown_frame_types_are_ignored(connect: Connect) -> None:
    peer = await connect()
    await peer.preface()
    await peer.send(frame_bytes(0xFA, 0xFF, 0, b"extension"),
                    frame_bytes(0x77, 0x00, 1, b"on a stream"),
                    peer.headers(1, GET))
    status, body = await peer.response(1)
    assert status == 200 and b'"version": "v1"' in body


# -- invalid headers ----------------------------------------------------------------------------

INVALID_HEADERS: dict[str, list[Header]] = {
    "uppercase-name": [*GET, (b"X-Upper", b"1")],
    "connection-specific": [*GET, (b"connection", b"keep-alive")],
    "transfer-encoding": [*GET, (b"transfer-encoding", b"chunked")],
    "te-not-trailers": [*GET, (b"te", b"gzip")],
    "missing-path": [h for h in GET if h[0] != b":path"],
    "missing-method": [h for h in GET if h[0] != b":method"],
    "duplicate-path": [*GET[:3], (b":path", b"/other"), *GET[3:]],
    "pseudo-after-regular": [*GET[:3], (b"x-a", b"1"), *GET[3:]],
    "unknown-pseudo": [*GET, (b":protocol2", b"x")],
    "response-pseudo-in-request": [*GET, (b":status", b"200")],
    "connect-with-path": [(b":method", b"CONNECT"), (b":authority", b"payments:80"),
                          (b":path", b"/"), (b":scheme", b"http")],
}


@pytest.mark.parametrize("case", list(INVALID_HEADERS))
async def test_malformed_requests_are_refused(connect: Connect, mesh: Mesh, case: str) -> None:
    # RFC 9113 8.1.1: a malformed request is a stream error PROTOCOL_ERROR; the h2 library
    # makes it a connection error, which 5.4 allows (and which only ends this client's
    # connection: meshd never passes a malformed request on to a shared one)
    peer = await connect()
    await peer.preface()
    await peer.send(peer.headers(1, INVALID_HEADERS[case]))
    await expect_goaway(peer, PROTOCOL_ERROR)
    await still_serves(connect)
    assert requests_seen(mesh) == 1  # only still_serves's


async def test_connect_is_not_proxied(connect: Connect, mesh: Mesh) -> None:
    # a well-formed CONNECT (8.5): meshd does not tunnel; the stream is refused, the
    # connection carries on
    peer = await connect()
    await peer.preface()
    await peer.send(peer.headers(1, [(b":method", b"CONNECT"), (b":authority", b"x:443")]),
                    peer.headers(3, GET))
    rst = await peer.until(RstStreamFrame)
    assert rst is not None and rst.stream_id == 1 and rst.error_code == PROTOCOL_ERROR
    status, _ = await peer.response(3)
    assert status == 200
    assert requests_seen(mesh) == 1


# -- flow control -------------------------------------------------------------------------------

@pytest.mark.parametrize("connect", ["outbound"], indirect=True)
async def test_data_beyond_the_window_is_a_flow_control_error(connect: Connect,
                                                              mesh: Mesh) -> None:
    # 6.9.1: the stream window is 256 KiB; this sends 512 KiB in one go, never waiting. The
    # request waits (a fault delay) before its body is read: no credit comes back meanwhile.
    # (Outbound only: the inbound listener has no such wait, and credit given back as the
    # app reads could make the 512 KiB legal; tests/proxy/core covers the session alone.)
    mesh.view.set_routes(parse_routes({"default_policy": "allow", "destinations": {
        "payments": {"subsets": {"v1": {"version": "v1"}}, "split": {"v1": 100},
                     "routes": [{"name": "held", "match": {"path": {"prefix": "/held"}},
                                 "fault": {"delay": "3s"}}]}}}))
    peer = await connect()
    await peer.preface()
    chunk = b"x" * 16384
    await peer.send(peer.headers(1, [*POST[:2], (b":path", b"/held"), POST[3]], end=False))
    _, goaway = await flood(peer, [[DataFrame(1, chunk) for _ in range(32)]])
    assert goaway.error_code == FLOW_CONTROL_ERROR
    await still_serves(connect)


@pytest.mark.parametrize("stream_id", [0, 1])
async def test_window_update_beyond_2_31_is_a_flow_control_error(connect: Connect,
                                                                 stream_id: int) -> None:
    # 6.9.1: a window above 2^31-1: on the connection a connection error, on a stream a
    # stream error
    peer = await connect()
    await peer.preface()
    if stream_id:
        await peer.send(peer.headers(1, POST, end=False))
    await peer.send(WindowUpdateFrame(stream_id, 2**31 - 1))
    if stream_id:
        rst = await peer.until(RstStreamFrame, GoAwayFrame)
        assert isinstance(rst, RstStreamFrame), rst
        assert rst.stream_id == 1 and rst.error_code == FLOW_CONTROL_ERROR
        await peer.send(peer.headers(3, GET))  # the connection carries on
        status, _ = await peer.response(3)
        assert status == 200
    else:
        await expect_goaway(peer, FLOW_CONTROL_ERROR)
    await still_serves(connect)


async def test_a_client_that_never_reads_is_reset_and_costs_bounded_memory(
        connect: Connect, mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 streams asking 4 MiB each with no window to send them in: meshd holds at most the
    # windows' worth, resets each stream after the stall timeout (CANCEL), and serves others
    monkeypatch.setattr(h2conn, "STALL_TIMEOUT", 1.0)
    peer = await connect()
    await peer.preface(initial_window_size=0)
    streams = list(range(1, 33, 2))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for s in streams:
            await peer.send(peer.headers(s, [*GET[:2], (b":path", b"/big?n=4194304"),
                                             GET[3]]))
        await still_serves(connect)  # meanwhile, on another connection
        reset: set[int] = set()
        while len(reset) < len(streams):
            frame = await peer.until(RstStreamFrame, DataFrame, GoAwayFrame)
            assert isinstance(frame, RstStreamFrame), frame  # no DATA: there is no window
            assert frame.error_code == CANCEL
            reset.add(frame.stream_id)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert reset == set(streams)
    print(f"never-reading client: {len(streams)} x 4 MiB asked, peak "
          f"{peak / 2**20:.1f} MiB traced")
    assert peak < 16 * 2**20  # 64 MiB asked
    await peer.send(peer.headers(41, GET))  # the connection itself is still good
    await peer.send(WindowUpdateFrame(41, 65535))
    status, _ = await peer.response(41)
    assert status == 200


@pytest.mark.parametrize("connect", ["outbound"], indirect=True)
async def test_calls_cancelled_in_flight_leave_no_stream_on_the_pooled_connection(
        connect: Connect, mesh: Mesh) -> None:
    # a client resetting its calls while the app works on them (gRPC cancellations and
    # deadlines): each upstream stream on meshd's pooled connection to the peer is freed, or
    # the connection would fill up with dead slots and never idle out
    peer = await connect()
    await peer.preface()
    ids = [1 + 2 * i for i in range(20)]
    await peer.send(*(peer.headers(s, [*GET[:2], (b":path", b"/slow?delay=1"), GET[3]])
                      for s in ids))
    await eventually(lambda: mesh.v1.requests == len(ids))
    await peer.send(*(RstStreamFrame(s, error_code=CANCEL) for s in ids))
    clients = [c for each in mesh.a.proxy.h2_pool._clients.values() for c in each]
    await eventually(lambda: all(not c.conn.streams and not c.conn.session.open_streams
                                 for c in clients))
    await still_serves(connect)


# -- header lists ---------------------------------------------------------------------------------

async def test_a_huge_header_table_allowance_is_not_taken(connect: Connect) -> None:
    # a client may allow a 2 GiB HPACK table (SETTINGS_HEADER_TABLE_SIZE); meshd's encoder
    # would then keep every distinct response field it ever sent on the connection: it keeps
    # to 4 KiB (RFC 7541 4.2 lets an encoder use less than allowed)
    peer = await connect()
    peer.decoder.max_allowed_table_size = 2**31 - 1
    await peer.preface(header_table_size=2**31 - 1)
    for i in range(3):  # responses of distinct lengths: distinct content-length fields
        await peer.send(peer.headers(1 + 2 * i, [*GET, (b"x-pad", b"p" * 100 * i)]))
        status, _ = await peer.response(1 + 2 * i)
        assert status == 200
    assert peer.decoder.header_table.maxsize <= 4096


async def test_hpack_bomb_is_refused_with_bounded_memory(connect: Connect, mesh: Mesh) -> None:
    # one 4 KiB field put in the dynamic table, then referenced 4000 times (one octet each):
    # 4 KiB of HPACK that decodes to 16 MiB, far over the 64 KiB header list limit
    peer = await connect()
    await peer.preface()
    big = hpack.Encoder()
    block = big.encode([*GET, (b"x-bomb", b"b" * 4000)])
    # the field is the newest dynamic entry: index 62, "indexed header field" 0x80|62
    bomb = block + bytes([0x80 | 62]) * 4000
    first = HeadersFrame(1, bomb[:16000])
    rest = [ContinuationFrame(1, bomb[i:i + 16000]) for i in range(16000, len(bomb), 16000)]
    (rest[-1] if rest else first).flags.add("END_HEADERS")
    first.flags.add("END_STREAM")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        await peer.send(first, *rest)
        goaway = await peer.goaway()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert goaway.error_code == ENHANCE_YOUR_CALM
    await peer.closed()
    print(f"HPACK bomb: {len(bomb)} octets decoding to 16 MiB, peak {peak / 2**20:.2f} MiB")
    assert peak < 2 * 2**20
    await still_serves(connect)
    assert requests_seen(mesh) == 1


async def test_continuation_flood_is_a_connection_error_with_bounded_memory(
        connect: Connect, mesh: Mesh) -> None:
    # HEADERS without END_HEADERS, then CONTINUATION frames of 16 KiB that never end
    peer = await connect()
    await peer.preface()
    first = peer.headers(1, GET, end_headers=False)
    filler = b"\x00\x0ax-continue" + b"\x7f\x81\x7f" + b"y" * 16000  # literal fields' bytes
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        await peer.send(first)
        _, goaway = await flood(peer, ([ContinuationFrame(1, filler[:16384])]
                                       for _ in range(1000)))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert goaway.error_code in (PROTOCOL_ERROR, ENHANCE_YOUR_CALM)
    print(f"CONTINUATION flood: error {goaway.error_code}, peak {peak / 2**20:.2f} MiB")
    assert peak < 4 * 2**20
    await still_serves(connect)
    assert requests_seen(mesh) == 1


# -- floods -------------------------------------------------------------------------------------

async def test_rapid_reset_is_calmed_and_the_app_sees_few_requests(connect: Connect,
                                                                   mesh: Mesh) -> None:
    peer = await connect()
    await peer.preface()

    def batches() -> Iterable[list[Frame]]:  # 50 x 100 streams opened and cancelled at once
        for batch in range(50):
            frames: list[Frame] = []
            for i in range(100):
                stream_id = 1 + 2 * (batch * 100 + i)
                frames += [peer.headers(stream_id, GET), RstStreamFrame(stream_id, CANCEL)]
            yield frames

    sent, goaway = await flood(peer, batches())
    assert goaway.error_code == ENHANCE_YOUR_CALM
    print(f"rapid reset: {sent * 100} streams sent, the app saw {requests_seen(mesh)}")
    assert requests_seen(mesh) <= core.DEFAULT_LIMITS.max_concurrent_streams
    await still_serves(connect)


FLOODS: dict[str, Callable[[Peer, int], Frame | bytes]] = {
    "ping": lambda p, i: PingFrame(0, opaque_data=struct.pack(">Q", i)),
    "settings": lambda p, i: SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS:
                                                        100}),
    "empty-data": lambda p, i: DataFrame(1, b""),
}


@pytest.mark.parametrize("kind", list(FLOODS))
async def test_control_frame_floods_are_calmed(connect: Connect, kind: str) -> None:
    peer = await connect()
    await peer.preface()
    if kind == "empty-data":
        await peer.send(peer.headers(1, POST, end=False))
    count = core.DEFAULT_LIMITS.max_control + 100
    _, goaway = await flood(peer, ([FLOODS[kind](peer, i) for i in range(start, start + 100)]
                                   for start in range(0, count, 100)))
    assert goaway.error_code == ENHANCE_YOUR_CALM
    await still_serves(connect)


async def test_streams_beyond_the_concurrency_limit_are_refused(connect: Connect,
                                                                mesh: Mesh) -> None:
    # 5.1.2: HEADERS beyond SETTINGS_MAX_CONCURRENT_STREAMS is a stream error
    # PROTOCOL_ERROR or REFUSED_STREAM; the h2 library makes it a connection error
    # PROTOCOL_ERROR (5.4 allows it), and the streams it had taken stop with the connection
    peer = await connect()
    await peer.preface()
    limit = core.DEFAULT_LIMITS.max_concurrent_streams
    await peer.send(*(peer.headers(1 + 2 * i, POST, end=False) for i in range(limit + 1)))
    goaway = await expect_goaway(peer, PROTOCOL_ERROR)
    assert goaway.last_stream_id == 1 + 2 * (limit - 1)  # the last one it took
    await still_serves(connect)


# -- slowloris ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sent", ["preface", "half-a-frame"])
async def test_a_silent_client_is_closed_after_the_first_request_timeout(
        connect: Connect, monkeypatch: pytest.MonkeyPatch, sent: str) -> None:
    monkeypatch.setattr(h2conn, "FIRST_REQUEST_TIMEOUT", 1.0)
    peer = await connect()
    await peer.preface()
    if sent == "half-a-frame":
        await peer.send(peer.headers(1, GET).serialize()[:12])
    with trio.fail_after(3):  # 1 s and a margin: not the 10 s default
        await expect_goaway(peer, NO_ERROR)
    await still_serves(connect)
