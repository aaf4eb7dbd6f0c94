"""The daemon's log formats (``--log-format``): text as always, JSON one object per line with
exception text and structured fields; access lines written verbatim in both; and what
``meshd up`` reads back from its children's lines in every format (``meshd.dev.childlog``)."""

from __future__ import annotations

import io
import json
import logging
import re

from meshd.cli.main import build_parser
from meshd.dev import childlog
from meshd.logformat import VERBATIM, LogFormat, format_from_env, formatter, rfc3339_ms


def _written(fmt: LogFormat, emit: object) -> list[str]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter(fmt))
    log = logging.getLogger("meshd.test.logformat")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        assert callable(emit)
        emit(log)
    finally:
        log.removeHandler(handler)
    return out.getvalue().splitlines()


def _emit_all(log: logging.Logger) -> None:
    log.info("registered %s", "payments-host-b")
    log.warning("endpoint ejected", extra={"endpoint": "10.0.0.5:15001", "ejections": 2})
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("reload failed")
    log.info("%s", '{"direction":"inbound","status":200}', extra=VERBATIM)


def test_json_lines_carry_level_logger_message_exception_and_fields() -> None:
    lines = _written(LogFormat.JSON, _emit_all)
    assert len(lines) == 4  # a traceback stays inside its line
    first, ejected, failed, access = (json.loads(line) for line in lines)
    assert first["message"] == "registered payments-host-b"
    assert (first["level"], first["logger"]) == ("INFO", "meshd.test.logformat")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["timestamp"])
    assert set(first) == {"timestamp", "level", "logger", "message"}
    assert (ejected["endpoint"], ejected["ejections"], ejected["level"]) == (
        "10.0.0.5:15001", 2, "WARNING")
    assert failed["level"] == "ERROR" and failed["message"] == "reload failed"
    assert failed["exception"].startswith("Traceback") and "ValueError: bad\nthing" in \
        failed["exception"]
    assert access == {"direction": "inbound", "status": 200}  # verbatim: the object alone


def test_text_lines_are_as_before_and_verbatim_lines_alone() -> None:
    lines = _written(LogFormat.TEXT, _emit_all)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO meshd.test.logformat: "
                        r"registered payments-host-b", lines[0])
    assert lines[-1] == '{"direction":"inbound","status":200}'


def test_format_option_and_variable() -> None:
    assert format_from_env({}) is LogFormat.TEXT
    assert format_from_env({"MESHD_LOG_FORMAT": "JSON"}) is LogFormat.JSON
    assert format_from_env({"MESHD_LOG_FORMAT": "yaml"}) is LogFormat.TEXT
    args = build_parser().parse_args(["--log-format", "json", "version"])
    assert args.log_format == "json"
    assert rfc3339_ms(0.5) == "1970-01-01T00:00:00.500Z"


def test_meshd_up_reads_its_childrens_lines_in_every_format() -> None:
    daemon = '{"timestamp":"2026-12-04T00:00:00.000Z","level":"WARNING","logger":"meshd.x",' \
             '"message":"no healthy endpoint"}'
    parsed = childlog.parse(daemon)
    assert parsed == childlog.LogLine("WARNING", "meshd.x", "no healthy endpoint")
    assert parsed.loud and not parsed.is_access

    access_json = '{"timestamp":"2026-12-04T00:00:00.000Z","direction":"outbound","status":503}'
    line = childlog.parse(access_json)
    assert line is not None and line.is_access
    assert childlog.access_request(line.message) == childlog.Request(outbound=True, failed=True)

    # a text access line inside a JSON daemon line
    wrapped = json.dumps({"timestamp": "2026-12-04T00:00:00.000Z", "level": "INFO",
                          "logger": "meshd.access", "message": "outbound web -> payments "
                          "route=- subset=v1 endpoint=b:1 GET / 200 1.0ms id=x"})
    line = childlog.parse(wrapped)
    assert line is not None and line.is_access
    assert childlog.access_request(line.message) == childlog.Request(outbound=True, failed=False)

    envoy = ('[2026-12-04T00:00:00.250Z] "GET / HTTP/1.1" 200 - 0 10 1 - "-" "-" "id" '
             '"payments" "127.0.0.1:8080"')
    line = childlog.parse(envoy)
    assert line is not None and line.is_access
    assert childlog.access_request(line.message) is None  # no direction to count

    assert childlog.parse('{"not": "a log line"}') is None
    assert childlog.parse("{broken") is None
    assert childlog.parse("[1, 2]") is None
