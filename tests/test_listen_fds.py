"""The pure parts of inherited listening sockets (``meshd.listen_fds``): reading the
``sd_listen_fds`` variables, matching a socket to a configured address, and the
``InheritedSockets`` pool over real sockets; plus the fd-store datagrams (``meshd.systemd``) and
the ``LISTEN_FDS`` shim of ``meshd up`` (``meshd/dev/listen_exec.py``) run for real."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshd import systemd
from meshd.config.parse import parse_host_config
from meshd.dev.supervisor import ChildSpec
from meshd.listen_fds import (
    InheritedSockets,
    ListenAddress,
    bind_listener,
    fd_name,
    host_listen_addresses,
    parse_listen_fds,
    same_address,
)

PID = 4242


@pytest.mark.parametrize(("environ", "expected"), [
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "in:out"},
     [(3, "in"), (4, "out")]),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "2"}, [(3, "unknown"), (4, "unknown")]),
    # a name list that does not match the count is ignored, as sd_listen_fds_with_names does
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "in"},
     [(3, "unknown"), (4, "unknown")]),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "1", "LISTEN_FDNAMES": ""}, [(3, "unknown")]),
    ({"LISTEN_PID": "1", "LISTEN_FDS": "2"}, []),  # meant for another process
    ({"LISTEN_FDS": "2"}, []),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "two"}, []),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "-1"}, []),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "0"}, []),
    ({}, []),
])
def test_parse_listen_fds(environ: dict[str, str], expected: list[tuple[int, str]]) -> None:
    assert parse_listen_fds(environ, PID) == expected


@pytest.mark.parametrize(("bound", "host", "port", "same"), [
    (("127.0.0.1", 9191), "127.0.0.1", 9191, True),
    (("127.0.0.1", 9191), "127.0.0.1", 9192, False),
    (("127.0.0.2", 9191), "127.0.0.1", 9191, False),
    (("::1", 15000), "0:0:0:0:0:0:0:1", 15000, True),
    (("::ffff:127.0.0.1", 9191), "127.0.0.1", 9191, False),
    (("127.0.0.1", 40000), "127.0.0.1", 0, False),  # port 0: the kernel picks, never inherited
    (("localhost", 80), "localhost", 80, True),
])
def test_same_address(bound: tuple[str, int], host: str, port: int, same: bool) -> None:
    assert same_address(bound, host, port) is same


def test_fd_names_are_valid_for_systemd() -> None:
    assert fd_name("outbound", "127.0.0.1", 9191) == "outbound-127.0.0.1-9191"
    assert ":" not in fd_name("inbound", "::1", 15001)


def test_host_listen_addresses_name_every_listener() -> None:
    config = parse_host_config({
        "node": "a", "address": "127.0.0.2", "trust_domain": "t.mesh",
        "ca": {"url": "https://127.0.0.1:8443", "fingerprint": "sha256:" + "ab" * 32,
               "token_file": "t"},
        "inbound": {"port": 15001}, "admin": {"address": "127.0.0.2:15000"},
        "services": [{"name": "web", "port": 8080, "upstreams": [
            {"name": "payments", "local_port": 9191}, {"name": "ledger", "local_port": 9192}]}],
    })
    assert host_listen_addresses(config) == [
        ListenAddress("inbound-127.0.0.2-15001", "127.0.0.2", 15001),
        ListenAddress("outbound-127.0.0.1-9191", "127.0.0.1", 9191),
        ListenAddress("outbound-127.0.0.1-9192", "127.0.0.1", 9192),
        ListenAddress("admin-127.0.0.2-15000", "127.0.0.2", 15000),
    ]


def test_inherited_sockets_are_taken_by_address_and_the_rest_closed() -> None:
    a = bind_listener(ListenAddress("a", "127.0.0.1", 0))
    b = bind_listener(ListenAddress("b", "127.0.0.1", 0))
    port_a, port_b = a.getsockname()[1], b.getsockname()[1]
    pool = InheritedSockets([("a", a), ("b", b)], "test")
    assert pool.take("127.0.0.1", port_b + 1 if port_b + 1 != port_a else port_b + 2) is None
    assert pool.take("127.0.0.1", port_a) is a
    assert pool.take("127.0.0.1", port_a) is None  # taken once
    assert pool.close_unclaimed() == ["b"]
    assert b.fileno() == -1 and a.fileno() != -1
    assert len(pool) == 1 and pool.adopted == [("a", a)]
    a.close()


def test_from_environment_reads_and_unsets_the_variables() -> None:
    """Descriptors 3.. of this process are whatever pytest has open, so the pid never matches
    here: the variables are removed all the same (no child of ours may take them)."""
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert len(InheritedSockets.from_environment(env, PID)) == 0
    assert env == {"OTHER": "kept"}


def test_the_shim_passes_sockets_as_systemd_does(tmp_path: Path) -> None:
    """meshd up's shim: descriptors at 3, 4 in the program it becomes, LISTEN_PID its own pid,
    and a program reading them with from_environment finds both by address."""
    socks = [bind_listener(ListenAddress(n, "127.0.0.1", 0)) for n in ("x", "y")]
    ports = [s.getsockname()[1] for s in socks]
    spec = ChildSpec("t", (sys.executable, "-c", (
        "from meshd.listen_fds import InheritedSockets as I; p = I.from_environment(); "
        f"print(p.take('127.0.0.1', {ports[1]}) is not None, "
        f"p.take('127.0.0.1', {ports[0]}) is not None, [n for n, _ in p.adopted])")),
        log_path=tmp_path / "t.log",
        listen_fds=tuple((n, s.fileno()) for n, s in zip(("x", "y"), socks, strict=True)))
    try:
        out = subprocess.run(spec.command(), pass_fds=[s.fileno() for s in socks],
                             capture_output=True, text=True, timeout=30, check=True)
    finally:
        for s in socks:
            s.close()
    assert out.stdout.strip() == "True True ['y', 'x']", out.stderr


def test_fd_store_messages() -> None:
    assert systemd.fd_store_message("inbound-127.0.0.1-15001") == (
        b"FDSTORE=1\nFDNAME=inbound-127.0.0.1-15001\nFDPOLL=0")
    assert systemd.fd_store_message("x", remove=True) == b"FDSTOREREMOVE=1\nFDNAME=x"
    assert systemd.fd_store_size({"NOTIFY_SOCKET": "/run/n", "FDSTORE": "16"}) == 16
    assert systemd.fd_store_size({"FDSTORE": "16"}) == 0  # no notify socket: nowhere to send
    assert systemd.fd_store_size({"NOTIFY_SOCKET": "/run/n"}) == 0  # systemd < 254 or no Max


def test_fds_sent_to_the_notify_socket_arrive_with_their_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What systemd's end receives: the datagram and the descriptor (SCM_RIGHTS)."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(f"\0meshd-fdstore-test-{id(receiver)}")
    monkeypatch.setenv("NOTIFY_SOCKET", f"@meshd-fdstore-test-{id(receiver)}")
    listener = bind_listener(ListenAddress("x", "127.0.0.1", 0))
    try:
        assert systemd.send_fds("outbound-x", [listener.fileno()])
        msg, fds, _flags, _addr = socket.recv_fds(receiver, 1024, 4)
        assert msg == b"FDSTORE=1\nFDNAME=outbound-x\nFDPOLL=0" and len(fds) == 1
        with socket.socket(fileno=fds[0]) as copy:
            assert copy.getsockname() == listener.getsockname()
    finally:
        listener.close()
        receiver.close()
