"""gRPC's semantics over HTTP/2: table tests of the pure core (status codes, grpc-timeout,
grpc-message, meshd's own answers as gRPC errors)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.config.schema import GRPC_RETRY_CONDITIONS
from meshd.proxy.core.attempt import FAULT_CODE, NO_ENDPOINT_CODE, Finish, error_code
from meshd.proxy.core.grpc import (
    RETRY_NAMES,
    Status,
    decode_grpc_message,
    effective_timeout,
    encode_grpc_message,
    format_grpc_timeout,
    grpc_request,
    grpc_status_of,
    http_equivalent,
    is_grpc,
    parse_grpc_timeout,
    retries_on,
    status_for_http,
    status_for_meshd_error,
    trailers_only,
)

# -- status codes --------------------------------------------------------------------------------


def test_codes_and_names_are_grpcs_own() -> None:
    # grpcio's StatusCode enum holds (number, "lower case name") for each canonical code
    assert {code.value[0]: code.name for code in grpc.StatusCode} == {
        s.value: s.name for s in Status}
    assert [s.value for s in Status] == list(range(17))


def test_retry_names_are_the_kebab_case_names_of_their_codes() -> None:
    assert RETRY_NAMES == {
        "cancelled": Status.CANCELLED, "deadline-exceeded": Status.DEADLINE_EXCEEDED,
        "internal": Status.INTERNAL, "resource-exhausted": Status.RESOURCE_EXHAUSTED,
        "unavailable": Status.UNAVAILABLE}
    assert tuple(RETRY_NAMES) == GRPC_RETRY_CONDITIONS
    assert all(code.retry_name == name for name, code in RETRY_NAMES.items())


@pytest.mark.parametrize(("retry_on", "status", "expected"), [
    (("unavailable",), 14, True),
    (("unavailable",), Status.UNAVAILABLE, True),
    (("unavailable",), 13, False),
    (("connect-failure", "reset", "internal"), 13, True),
    (frozenset({"resource-exhausted", "cancelled"}), 8, True),
    (frozenset({"resource-exhausted", "cancelled"}), 1, True),
    (("deadline-exceeded",), 4, True),
    (("5xx", "gateway-error", "503"), 14, False),  # HTTP conditions say nothing of grpc-status
    (("unavailable",), 0, False),  # OK is never retried
    ((), 14, False),
])
def test_retries_on(retry_on: tuple[str, ...] | frozenset[str], status: int,
                         expected: bool) -> None:
    assert retries_on(retry_on, status) is expected


@pytest.mark.parametrize(("http", "expected"), [
    (400, Status.INTERNAL), (401, Status.UNAUTHENTICATED),
    (403, Status.PERMISSION_DENIED), (404, Status.UNIMPLEMENTED),
    (429, Status.UNAVAILABLE), (502, Status.UNAVAILABLE),
    (503, Status.UNAVAILABLE), (504, Status.UNAVAILABLE),
    (200, Status.UNKNOWN), (301, Status.UNKNOWN), (405, Status.UNKNOWN),
    (413, Status.UNKNOWN), (500, Status.UNKNOWN),
])
def test_status_for_http_follows_the_grpc_mapping(http: int, expected: Status) -> None:
    assert status_for_http(http) is expected


# every code meshd answers with (``x-meshd-error``), by how it comes about
_CONNECT = [error_code(Finish.CONNECT_FAILED, r) for r in
            ("connect_failed", "connect_timeout", "wrong_identity", "no_identity",
             "app_connect_failed", "app_connect_timeout")]


@pytest.mark.parametrize(("grpc_status", "http"), [
    (0, 200), (1, 499), (2, 500), (3, 400), (4, 504), (5, 404), (6, 409), (7, 403), (8, 429),
    (9, 400), (10, 409), (11, 400), (12, 501), (13, 500), (14, 503), (15, 500), (16, 401),
    (17, 500), (999, 500),
])
def test_http_equivalent(grpc_status: int, http: int) -> None:
    assert http_equivalent(grpc_status) == http


def test_http_and_grpc_statuses_agree_where_both_map() -> None:
    for http in (401, 403, 503):  # 404 is UNIMPLEMENTED, which is 501
        assert http_equivalent(status_for_http(http)) == http


@pytest.mark.parametrize(("status", "code", "expected"), [
    (504, error_code(Finish.GATEWAY_TIMEOUT), Status.DEADLINE_EXCEEDED),
    (504, error_code(Finish.TRY_TIMEOUT), Status.DEADLINE_EXCEEDED),
    (503, error_code(Finish.REJECTED), Status.UNAVAILABLE),
    (503, NO_ENDPOINT_CODE, Status.UNAVAILABLE),
    *[(503, code, Status.UNAVAILABLE) for code in _CONNECT],
    (502, error_code(Finish.BAD_GATEWAY), Status.UNAVAILABLE),
    (502, error_code(Finish.BAD_GATEWAY, app=True), Status.UNAVAILABLE),
    (502, error_code(Finish.BAD_GATEWAY, malformed=True), Status.UNAVAILABLE),
    (403, "", Status.PERMISSION_DENIED),  # authorization deny
    (413, "", Status.RESOURCE_EXHAUSTED),  # max_request_bytes
    (429, "", Status.RESOURCE_EXHAUSTED),  # meshd's own limit: not retried by clients
    (500, "", Status.INTERNAL),
    (400, "", Status.INTERNAL),
    # a fault abort answers what its status would mean from an app
    (503, FAULT_CODE, Status.UNAVAILABLE),
    (504, FAULT_CODE, Status.UNAVAILABLE),
    (429, FAULT_CODE, Status.UNAVAILABLE),
    (404, FAULT_CODE, Status.UNIMPLEMENTED),
    (500, FAULT_CODE, Status.UNKNOWN),
])
def test_status_for_meshd_error(status: int, code: str, expected: Status) -> None:
    assert error_code(Finish.CONNECT_FAILED, "") == "connect-failed"
    assert status_for_meshd_error(status, code) is expected


@pytest.mark.parametrize(("headers", "expected"), [
    ([(b"grpc-status", b"0")], 0),
    ([(b"content-type", b"application/grpc"), (b"grpc-status", b"14"),
      (b"grpc-message", b"x")], 14),
    ([(b"Grpc-Status", b"7")], 7),
    ([(b"grpc-status", b" 4 ")], 4),
    ([(b"grpc-status", b"99")], 99),  # unknown codes are the client's to treat as UNKNOWN
    ([], None),
    ([(b"grpc-message", b"14")], None),
    ([(b"grpc-status", b"")], None),
    ([(b"grpc-status", b"-1")], None),
    ([(b"grpc-status", b"abc")], None),
    ([(b"grpc-status", b"123456")], None),
])
def test_grpc_status_of(headers: list[tuple[bytes, bytes]], expected: int | None) -> None:
    assert grpc_status_of(headers) == expected


@pytest.mark.parametrize(("content_type", "expected"), [
    (b"application/grpc", True),
    (b"application/grpc+proto", True),
    (b"application/grpc+json", True),
    (b"application/grpc; charset=utf-8", True),
    (b"Application/GRPC", True),
    (b"application/grpc-web", False),  # gRPC-Web: plain HTTP to meshd
    (b"application/grpc-web+proto", False),
    (b"application/grpc-web-text", False),
    (b"application/grpcx", False),
    (b"application/json", False),
    (b"", False),
    (None, False),
])
def test_is_grpc(content_type: bytes | None, expected: bool) -> None:
    assert is_grpc(content_type) is expected
    headers = [(b":path", b"/x.Y/Z")]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    assert grpc_request(headers) is expected


# -- deadlines -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    (b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"250m", 0.25), (b"1500u", 0.0015),
    (b"100n", 100e-9), (b"99999999S", 99999999.0), (b"00000001m", 0.001), (b"0n", 0.0),
    (b"0S", 0.0),
])
def test_parse_grpc_timeout(value: bytes, seconds: float) -> None:
    parsed = parse_grpc_timeout(value)
    assert parsed == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize("value", [
    b"", b"S", b"1", b"10", b"123456789S",  # no unit, no digits, nine digits
    b"1s", b"1h", b"1x", b"1 S", b" 1S", b"1S ", b"-1S", b"+1S", b"1.5S", b"1e3m",
    b"\xd9\xa1S",  # a digit, but not an ASCII one
    b"1SS", b"1mS",
])
def test_parse_grpc_timeout_refuses_anything_else(value: bytes) -> None:
    assert parse_grpc_timeout(value) is None


def test_no_grpc_timeout_is_no_deadline() -> None:
    assert parse_grpc_timeout(None) is None


@given(st.binary(max_size=12))
def test_parse_grpc_timeout_never_raises(value: bytes) -> None:
    parsed = parse_grpc_timeout(value)
    assert parsed is None or parsed >= 0


@pytest.mark.parametrize(("seconds", "value"), [
    (0.05, b"50000000n"), (0.1, b"100000u"), (1.0, b"1000000u"), (2.5, b"2500000u"),
    (30.0, b"30000000u"), (100.0, b"100000m"), (99999.999, b"99999999m"),
    (100000.0, b"100000S"), (1e8, b"1666667M"), (1e10, b"2777778H"),
    (1e-9, b"1n"), (1.5e-9, b"2n"),  # rounded up: never a shorter deadline
    (0.0, b"0n"), (-3.0, b"0n"), (float("nan"), b"0n"), (1e20, b"99999999H"),
])
def test_format_grpc_timeout(seconds: float, value: bytes) -> None:
    assert format_grpc_timeout(seconds) == value


@given(st.floats(min_value=1e-9, max_value=99999999 * 3600))
def test_formatted_timeouts_parse_back_no_shorter(seconds: float) -> None:
    value = format_grpc_timeout(seconds)
    parsed = parse_grpc_timeout(value)
    assert parsed is not None
    assert parsed >= seconds * (1 - 1e-9)
    # the most precise unit that fits 8 digits: the next finer one (1000 times finer at most)
    # would need 9, so the count is at least 10^5, and one unit is at most 10^-5 of it (or 1 ns)
    assert parsed - seconds <= max(seconds * 1e-5, 1e-9) * 1.01


@pytest.mark.parametrize(("route", "client", "expected"), [
    (None, None, None), (3.0, None, 3.0), (None, 0.5, 0.5),
    (3.0, 0.5, 0.5),  # the client asks for less: its deadline
    (3.0, 60.0, 3.0),  # the client asks for more: the route caps it
    (3.0, 0.0, 0.0),
])
def test_effective_timeout(route: float | None, client: float | None,
                           expected: float | None) -> None:
    assert effective_timeout(route, client) == expected


# -- grpc-message and meshd's own answers --------------------------------------------------------


@pytest.mark.parametrize(("text", "encoded"), [
    ("", b""),
    ("no healthy endpoint", b"no healthy endpoint"),
    ("100% done", b"100%25 done"),
    ("line\nbreak\ttab", b"line%0Abreak%09tab"),
    ("caf\u00e9", b"caf%C3%A9"),
    ("\u2603", b"%E2%98%83"),
    ("~ !\x7f", b"~ !%7F"),
])
def test_grpc_message_encoding(text: str, encoded: bytes) -> None:
    assert encode_grpc_message(text) == encoded
    assert decode_grpc_message(encoded) == text


@pytest.mark.parametrize(("value", "text"), [
    (b"50%", "50%"), (b"%4", "%4"), (b"%zz ok", "%zz ok"), (b"%e2%98%83", "\u2603"),
    (b"%FF", "\ufffd"),  # not UTF-8: a replacement character, never an error
])
def test_grpc_message_decoding_is_lenient(value: bytes, text: str) -> None:
    assert decode_grpc_message(value) == text


@given(st.text(max_size=40))
def test_grpc_message_round_trips_in_printable_ascii(text: str) -> None:
    encoded = encode_grpc_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert decode_grpc_message(encoded) == text.encode("utf-8", "surrogatepass").decode(
        "utf-8", "replace")


def test_trailers_only_answer() -> None:
    extra = [(b"x-meshd-error", b"no-healthy-endpoint")]
    assert trailers_only(Status.UNAVAILABLE, "no healthy endpoint: 0 of 2", extra) == [
        (b":status", b"200"), (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"), (b"grpc-message", b"no healthy endpoint: 0 of 2"),
        (b"x-meshd-error", b"no-healthy-endpoint")]
    assert trailers_only(0, "") == [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                     (b"grpc-status", b"0")]


def test_meshd_answers_a_call_with_a_trailers_only_grpc_error() -> None:
    # what the shells send for meshd's own 504 (x-meshd-error: timeout) to a gRPC call
    extra = [(b"x-meshd-error", b"timeout"), (b"x-meshd-reason", b"no response within 1.5s")]
    headers = trailers_only(status_for_meshd_error(504, "timeout"), "no response within 1.5s",
                            extra)
    assert headers == [
        (b":status", b"200"), (b"content-type", b"application/grpc"),
        (b"grpc-status", b"4"), (b"grpc-message", b"no response within 1.5s"), *extra]
    assert grpc_status_of(headers) == Status.DEADLINE_EXCEEDED
    assert grpc_status_of(trailers_only(status_for_meshd_error(403), "denied")) == 7
