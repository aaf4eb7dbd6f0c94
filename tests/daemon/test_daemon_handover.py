"""The handover protocol's messages (``meshd.daemon.handover``): what each side accepts, and how
a malformed or unexpected message is refused, fed whole and cut short."""

from __future__ import annotations

import json
import re

import pytest

from meshd.daemon.handover import (
    FINISH,
    FINISHING,
    MAX_MESSAGE,
    REFUSED,
    SOCKETS,
    TAKE,
    HandoverError,
    SocketEntry,
    decode,
    encode,
    socket_entries,
)


def test_messages_round_trip() -> None:
    data = encode(TAKE, node="host-a", pid=12)
    assert json.loads(data) == {"type": "take", "node": "host-a", "pid": 12}
    assert decode(data, (TAKE,)) == {"type": "take", "node": "host-a", "pid": 12}
    assert decode(encode(FINISHING, drain_timeout=30.0), (FINISHING,))["drain_timeout"] == 30


def test_sockets_are_listed_in_the_order_of_their_descriptors() -> None:
    entries = [{"name": "inbound-127.0.0.2-15001", "host": "127.0.0.2", "port": 15001},
               {"name": "admin-127.0.0.2-15000", "host": "127.0.0.2", "port": 15000}]
    message = decode(encode(SOCKETS, pid=7, sockets=entries), (SOCKETS,))
    assert socket_entries(message, 2) == [
        SocketEntry("inbound-127.0.0.2-15001", "127.0.0.2", 15001),
        SocketEntry("admin-127.0.0.2-15000", "127.0.0.2", 15000)]


@pytest.mark.parametrize(("sockets", "fds", "reason"), [
    ([{"name": "a", "host": "127.0.0.1", "port": 1}], 0, "lists 1 socket(s) but 0 descriptor"),
    ([], 1, "lists 0 socket(s) but 1 descriptor"),
    ([{"name": "a", "host": "127.0.0.1", "port": "1"}], 1, "malformed socket entry"),
    ([{"name": "a", "host": "127.0.0.1", "port": True}], 1, "malformed socket entry"),
    ([{"name": "a", "port": 1}], 1, "malformed socket entry"),
    ("a", 1, "sockets must be a list"),
])
def test_a_sockets_message_that_does_not_add_up_is_refused(
        sockets: object, fds: int, reason: str) -> None:
    with pytest.raises(HandoverError, match=re.escape(reason)):
        socket_entries({"type": SOCKETS, "sockets": sockets}, fds)


@pytest.mark.parametrize(("data", "expected", "reason"), [
    (b"", (FINISH,), "closed the handover connection"),
    (b"{not json", (FINISH,), "malformed handover message"),
    (b"[1, 2]", (FINISH,), "malformed handover message"),
    (b'{"type": "reboot"}', (FINISH,), "malformed handover message"),
    (encode(TAKE, node="a"), (FINISH,), "expected a finish message, got take"),
    (encode(REFUSED, reason="a handover to pid 9 is under way"), (SOCKETS,),
     "refused: a handover to pid 9 is under way"),
    (b" " * (MAX_MESSAGE + 1), (FINISH,), "over"),
])
def test_unexpected_input_is_refused_with_a_reason(
        data: bytes, expected: tuple[str, ...], reason: str) -> None:
    with pytest.raises(HandoverError, match=reason):
        decode(data, expected)


def test_every_prefix_of_a_message_is_refused_not_misread() -> None:
    """A datagram is whole or nothing: a cut one never decodes as some other message."""
    data = encode(SOCKETS, pid=7, sockets=[{"name": "a", "host": "127.0.0.1", "port": 1}])
    for end in range(len(data)):
        with pytest.raises(HandoverError):
            decode(data[:end], (SOCKETS,))


def test_unknown_types_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="unknown handover message type"):
        encode("reboot")
