"""The HTTP/2 session's checks at frame headers, before the ``h2`` library buffers a frame:
the client's preface, SETTINGS first, and announced lengths over SETTINGS_MAX_FRAME_SIZE.
Each input fed whole and one byte at a time."""

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
