"""How an HTTP/2 connection writes: what the streams ready at one time queue goes out in one
write (one system call, one TLS record on the mesh), not one write per frame."""

from __future__ import annotations

import socket

import trio

from meshd.proxy import h2conn
from meshd.proxy.core import h2 as core
from meshd.proxy.core.http1 import RequestHead
from meshd.proxy.sockio import SocketConnection

STREAMS = 20


class CountingStream(trio.abc.Stream):
    """meshd's socket stream (it writes without yielding when the socket takes the bytes),
    counting its writes."""

    def __init__(self, inner: SocketConnection) -> None:
        self.inner = inner
        self.writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def answer(head: RequestHead, request: h2conn.H2Request) -> None:
    await request.send_head(200, [(b"content-type", b"text/plain")])
    await request.send_data(head.target)
    await request.end()


async def test_frames_of_ready_streams_go_out_in_few_writes() -> None:
    a, b = socket.socketpair()
    server_side = CountingStream(SocketConnection(a))
    client_side = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    client = core.Session(client_side=True)
    client.start()
    for i in range(STREAMS):
        client.send_headers(client.next_stream_id(), [
            (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"),
            (b":path", b"/%d" % i)], end=True)
    bodies: dict[int, bytes] = {}
    ended: set[int] = set()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h2conn.serve_h2, server_side, answer, 5.0)
            await client_side.send_all(client.outgoing())  # the preface and 20 requests
            while len(ended) < STREAMS:
                data = await client_side.receive_some(65536)
                assert data, "the server closed the connection"
                for event in client.feed(data, trio.current_time()):
                    if isinstance(event, core.Body):
                        bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                        client.consumed(event.stream_id, event.flow)
                    elif isinstance(event, core.Ended):
                        ended.add(event.stream_id)
                await client_side.send_all(client.outgoing())
            nursery.cancel_scope.cancel()
    assert sorted(bodies.values()) == sorted(b"/%d" % i for i in range(STREAMS))
    # 60 frames of answers (a head, a body and an end each), besides the preface and the
    # settings acknowledgement: a handful of writes, not one per frame
    assert server_side.writes <= 6, server_side.writes
    a.close()
    b.close()
