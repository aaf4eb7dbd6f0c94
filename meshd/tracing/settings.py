"""Where spans go and which are kept: meshd.toml's ``[tracing]`` merged with the standard
OpenTelemetry environment variables. Pure: the environment is passed in as a mapping.

A variable that is set wins over the key it stands for (an operator points every component of a
host at a collector the same way, and a unit's ``Environment=`` overrides the file without
editing it); turning tracing off wins over everything: ``[tracing] enabled = false``,
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``.

    endpoint   OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (as is), else OTEL_EXPORTER_OTLP_ENDPOINT with
               ``v1/traces`` appended, else ``[tracing] endpoint`` (as is); none of them and
               ``enabled = true``: http://localhost:4318/v1/traces; none at all: tracing off
    sampler    OTEL_TRACES_SAMPLER, else ``sampler``, else parentbased_always_on
    ratio      OTEL_TRACES_SAMPLER_ARG (read for the *traceidratio samplers), else ``ratio``,
               else 1.0
    service    OTEL_SERVICE_NAME, else ``service_name``, else each local service's own name
    headers    OTEL_EXPORTER_OTLP_TRACES_HEADERS, else OTEL_EXPORTER_OTLP_HEADERS
               (``key=value,key2=value2``, values percent-decoded)
    timeout    OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, else OTEL_EXPORTER_OTLP_TIMEOUT (milliseconds),
               else 10 s

A value meshd cannot use is a ``ConfigError`` naming the variable (or the key), not a silent
default: a typo in a sampler name should not turn a host's tracing into something else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from meshd.config.schema import TRACE_SAMPLERS, TracingConfig
from meshd.errors import ConfigError, Problem

DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
DEFAULT_SAMPLER = "parentbased_always_on"
DEFAULT_TIMEOUT = 10.0
ENVIRONMENT = "environment"  # the "file" of a problem with a variable
RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")


@dataclass(frozen=True)
class TracingSettings:
    endpoint: str  # the URL spans are POSTed to
    sampler: str = DEFAULT_SAMPLER
    ratio: float = 1.0
    service_name: str = ""  # "": each span's local service
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = DEFAULT_TIMEOUT  # seconds, per export request


def resolve(config: TracingConfig, environ: Mapping[str, str],
            source: str = "meshd.toml") -> TracingSettings | None:
    """The settings in force, or None when tracing is off."""
    problems: list[Problem] = []

    def env(name: str) -> str:
        return environ.get(name, "").strip()

    if config.enabled is False or env("OTEL_SDK_DISABLED").lower() == "true" \
            or env("OTEL_TRACES_EXPORTER").lower() == "none":
        return None
    exporter = env("OTEL_TRACES_EXPORTER").lower()
    if exporter and exporter != "otlp":
        problems.append(Problem(ENVIRONMENT, "OTEL_TRACES_EXPORTER",
                                f"meshd exports spans over OTLP only (otlp or none), got "
                                f"{exporter!r}"))
    protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        problems.append(Problem(ENVIRONMENT, "OTEL_EXPORTER_OTLP_PROTOCOL",
                                f"meshd speaks OTLP over HTTP/protobuf only, got {protocol!r}"))

    endpoint = _endpoint(env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
                         env("OTEL_EXPORTER_OTLP_ENDPOINT"), config, problems)
    if not endpoint:
        if not config.enabled:
            _raise(problems)
            return None
        endpoint = DEFAULT_ENDPOINT

    sampler = env("OTEL_TRACES_SAMPLER").lower() or config.sampler or DEFAULT_SAMPLER
    if sampler not in TRACE_SAMPLERS:
        where = "OTEL_TRACES_SAMPLER" if env("OTEL_TRACES_SAMPLER") else "tracing.sampler"
        problems.append(Problem(ENVIRONMENT if where.startswith("OTEL") else source, where,
                                f"must be one of {', '.join(TRACE_SAMPLERS)}, got {sampler!r}"))
    ratio = config.ratio if config.ratio is not None else 1.0
    raw_ratio = env("OTEL_TRACES_SAMPLER_ARG")
    if raw_ratio and sampler in RATIO_SAMPLERS:
        try:
            ratio = float(raw_ratio)
        except ValueError:
            ratio = math.nan
        if not 0.0 <= ratio <= 1.0:
            problems.append(Problem(ENVIRONMENT, "OTEL_TRACES_SAMPLER_ARG",
                                    f"a sampling ratio between 0 and 1, got {raw_ratio!r}"))

    headers = _headers(env("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
                       or env("OTEL_EXPORTER_OTLP_HEADERS"), problems)
    timeout = _timeout(env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                       or env("OTEL_EXPORTER_OTLP_TIMEOUT"), problems)
    _raise(problems)
    return TracingSettings(endpoint=endpoint, sampler=sampler, ratio=ratio,
                           service_name=env("OTEL_SERVICE_NAME") or config.service_name,
                           headers=headers, timeout=timeout)


def _raise(problems: list[Problem]) -> None:
    if problems:
        raise ConfigError(problems)


def _endpoint(traces: str, base: str, config: TracingConfig, problems: list[Problem]) -> str:
    if traces:
        name, url = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces
    elif base:
        # the base URL's path, then v1/traces (http://collector:4318 -> .../v1/traces)
        name, url = "OTEL_EXPORTER_OTLP_ENDPOINT", base.rstrip("/") + "/v1/traces"
    else:
        return config.endpoint  # checked when meshd.toml was read
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(Problem(ENVIRONMENT, name,
                                f"expected an http:// or https:// URL, got {url!r}"))
    return url


def _headers(raw: str, problems: list[Problem]) -> tuple[tuple[str, str], ...]:
    found: list[tuple[str, str]] = []
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), unquote(value.strip())
        if not sep or not key or any(c in key for c in " \t\r\n:") \
                or any(c in value for c in "\r\n"):
            problems.append(Problem(ENVIRONMENT, "OTEL_EXPORTER_OTLP_HEADERS",
                                    f"expected key=value[,key=value...], got {item.strip()!r}"))
            continue
        found.append((key, value))
    return tuple(found)


def _timeout(raw: str, problems: list[Problem]) -> float:
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        millis = int(raw)
    except ValueError:
        millis = 0
    if millis <= 0:
        problems.append(Problem(ENVIRONMENT, "OTEL_EXPORTER_OTLP_TIMEOUT",
                                f"a positive number of milliseconds, got {raw!r}"))
        return DEFAULT_TIMEOUT
    return millis / 1000
