"""``accept_loop`` over real loopback sockets: caps at accept, the waiting room for connections
that have not spoken yet, and the metrics of refusals."""

from __future__ import annotations

import socket

import trio

from meshd.config.schema import ListenerLimits
from meshd.conns.guard import ConnectionGuard, accept_loop
from meshd.metrics import Metrics


async def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    await trio.to_thread.run_sync(sock.connect, ("127.0.0.1", port))
    return sock


async def _recv(sock: socket.socket) -> bytes:
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(sock)
    return sock.recv(100)


async def _closed_by_server(sock: socket.socket) -> bool:
    with trio.move_on_after(5):
        await trio.lowlevel.wait_readable(sock)
    try:
        return sock.recv(16, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def test_caps_waiting_room_and_service() -> None:
    metrics = Metrics()
    guard = ConnectionGuard(100, metrics=metrics)
    listener_guard = guard.listener("test", ListenerLimits(4, 2))
    served: list[bytes] = []
    silent: list[str] = []

    async def serve(stream: trio.SocketStream, source: str) -> None:
        data = await stream.receive_some(100)
        served.append(data)
        await stream.send_all(b"echo " + data)
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: accept_loop(listeners[0], listener_guard, serve, nursery,
                                               first_byte_timeout=0.5,
                                               on_silent=silent.append))
        quiet = await _connect(port)               # never speaks: closed after 0.5 s
        talker = await _connect(port)              # speaks: served
        over = await _connect(port)                # a third from 127.0.0.1: over the cap
        assert await _closed_by_server(over)
        other = await _connect(port, "127.0.0.2")  # another source: admitted
        leaver = await _connect(port, "127.0.0.2")  # goes away before a byte
        leaver.close()
        talker.sendall(b"hi")
        other.sendall(b"there")
        assert await _recv(talker) == b"echo hi"
        assert await _recv(other) == b"echo there"
        assert await _closed_by_server(quiet)
        assert silent == ["127.0.0.1"]  # the leaver is not reported as silent
        with trio.fail_after(5):
            while listener_guard.open:  # noqa: ASYNC110 - the server side closes them
                await trio.sleep(0.01)
        for sock in (quiet, talker, over, other):
            sock.close()
        nursery.cancel_scope.cancel()
    assert sorted(served) == [b"hi", b"there"]
    refused = metrics.registry.get_sample_value(
        "meshd_connections_refused_total", {"listener": "test", "reason": "source_limit"})
    assert refused == 1
    assert metrics.registry.get_sample_value("meshd_connections_open", {"listener": "test"}) == 0
    for lst in listeners:
        lst.socket.close()


async def test_a_connection_still_waiting_when_accepting_stops_is_still_served() -> None:
    """A drain stops accepting; a client accepted just before, whose first bytes are still on
    the way, is served like any other."""
    guard = ConnectionGuard(100)
    listener_guard = guard.listener("test", ListenerLimits(10))

    async def serve(stream: trio.SocketStream, source: str) -> None:
        await stream.send_all(b"echo " + await stream.receive_some(100))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(lambda: accept_loop(listeners[0], listener_guard, serve,
                                                     connections, first_byte_timeout=30))
            late = await _connect(port)
            with trio.fail_after(5):
                while not listener_guard.open:  # noqa: ASYNC110 - accepted by the loop
                    await trio.sleep(0.01)
            accepting.cancel_scope.cancel()  # the drain: the accept loop and its room stop
        connections.cancel_scope.deadline = trio.current_time() + 5
        late.sendall(b"late")
        assert await _recv(late) == b"echo late"
        late.close()
        with trio.fail_after(5):
            while listener_guard.open:  # noqa: ASYNC110 - released when served
                await trio.sleep(0.01)
        connections.cancel_scope.cancel()
    for lst in listeners:
        lst.socket.close()
