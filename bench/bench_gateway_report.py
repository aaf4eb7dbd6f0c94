"""The gateway bench's results: the table, the CPU split, TLS's share, the ratios of each gateway
path to direct and to haproxy-tls, and the JSON. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench_measure import LoadSettings, Measurement, Sample
from bench_report import Ratio

GATEWAY_PATHS = ("gateway-https", "gateway-http")
BASELINES = ("direct", "haproxy-tls")
GATEWAY_PROCESS = "meshd host-g"


@dataclass(frozen=True)
class PathResult:
    """A path's medians (``measurement``) and its failures by kind, summed over all runs
    (throughput and latency)."""

    measurement: Measurement
    non_2xx: int          # answers wrk counts as errors (status >= 400)
    socket_errors: int    # connect + read + write + timeout

    @classmethod
    def of(cls, measurement: Measurement, samples: Sequence[Sample]) -> PathResult:
        runs = [r for s in samples for r in (s.load, s.latency)]
        return cls(measurement, sum(r.non_2xx for r in runs),
                   sum(r.socket_errors for r in runs))


@dataclass(frozen=True)
class TLSNote:
    """What a client was served by one TLS listener."""

    path: str
    version: str
    cipher: str
    fingerprint: str     # SHA-256 of the certificate, hex


def ratios(results: Sequence[PathResult]) -> list[Ratio]:
    """Each gateway path against each baseline: req/s as a fraction, latency and CPU as
    multiples (CPU: none for direct, which has no proxy)."""
    by_name = {r.measurement.name: r.measurement for r in results}
    out: list[Ratio] = []
    for name in GATEWAY_PATHS:
        mesh = by_name.get(name)
        if mesh is None:
            continue
        out += [Ratio(name, b, _div(mesh.requests_per_second, base.requests_per_second),
                      _div(mesh.p50_ms, base.p50_ms), _div(mesh.p99_ms, base.p99_ms),
                      _div(mesh.proxy_cpu_us, base.proxy_cpu_us))
                for b in BASELINES if (base := by_name.get(b)) is not None]
    return out


def tls_share(results: Sequence[PathResult]) -> str | None:
    """What terminating TLS adds at the gateway: gateway-https against gateway-http."""
    by_name = {r.measurement.name: r.measurement for r in results}
    https, http = by_name.get("gateway-https"), by_name.get("gateway-http")
    if https is None or http is None:
        return None
    parts = []
    for label in https.cpu_us_per_request:
        if label in http.cpu_us_per_request:
            delta = https.cpu_us_per_request[label] - http.cpu_us_per_request[label]
            parts.append(f"{label} {delta:+.0f} µs/req")
    rps = _div(https.requests_per_second, http.requests_per_second)
    return ("TLS's share at the gateway (gateway-https - gateway-http): "
            + ", ".join(parts) + (f"; req/s x{rps:.2f}" if rps is not None else ""))


def format_details(results: Sequence[PathResult], notes: Sequence[str],
                   tls: Sequence[TLSNote]) -> str:
    """CPU per proxy process, TLS's share, what the TLS listeners served, what meshd counted
    and logged under load."""
    lines: list[str] = []
    split = [r.measurement for r in results if len(r.measurement.cpu_us_per_request) > 1]
    if split:
        lines += ["proxy CPU per process (µs/req):",
                  *(f"  {m.name}: " + " + ".join(f"{label} {us:.0f}"
                                                 for label, us in m.cpu_us_per_request.items())
                    for m in split)]
        share = tls_share(results)
        lines += [share, ""] if share else [""]
    if tls:
        same = len({t.fingerprint for t in tls}) == 1
        lines += ["TLS served to a client (one handshake with each, before the rounds):",
                  *(f"  {t.path}: {t.version} {t.cipher}, certificate sha256 "
                    f"{t.fingerprint[:16]}..." for t in tls),
                  *(["  the same certificate (ECDSA P-256, made by the bench) on both"]
                    if same and len(tls) > 1 else []), ""]
    if any(r.measurement.name in GATEWAY_PATHS for r in results):
        lines += ["meshd under load:", *(f"  {n}" for n in notes or ["nothing notable"])]
    return "\n".join(lines).rstrip("\n")


def format_summary(results: Sequence[PathResult], settings: LoadSettings) -> str:
    """The table (req/s, CPU, p50, p99, failures per path) and the ratios."""
    header = ("path", f"req/s c={settings.connections}", "proxy CPU µs/req", "p50 c=1",
              "p99 c=1", "non-2xx", "socket errors")
    rows = [header] + [
        (m.name, f"{m.requests_per_second:,.0f}", _number(m.proxy_cpu_us, "{:.0f}"),
         _number(m.p50_ms, "{:.3f} ms"), _number(m.p99_ms, "{:.3f} ms"), str(r.non_2xx),
         str(r.socket_errors))
        for r in results for m in (r.measurement,)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join([row[0].ljust(widths[0]),
                        *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", *(f"  {r.measurement.name}: {r.measurement.description}" for r in results),
              f"  wrk -t{settings.threads} -c{settings.connections} -d{settings.seconds}s "
              f"(keep-alive) for req/s and CPU, -t1 -c1 -d{settings.latency_seconds}s for "
              f"p50/p99; medians of {settings.rounds} round(s) per path, interleaved; non-2xx "
              "and socket errors: every run, summed"]
    found = ratios(results)
    if found:
        lines += ["", "gateway paths relative to each baseline (req/s as a fraction; latency "
                  "and CPU as multiples):", *(_ratio_line(r) for r in found)]
    return "\n".join(lines)


def to_json(results: Sequence[PathResult], settings: LoadSettings, notes: Sequence[str],
            tls: Sequence[TLSNote]) -> dict[str, Any]:
    return {
        "settings": {"connections": settings.connections, "threads": settings.threads,
                     "seconds": settings.seconds, "latency_seconds": settings.latency_seconds,
                     "warmup_seconds": settings.warmup_seconds, "rounds": settings.rounds},
        "paths": [_path_json(r) for r in results],
        "ratios": [{k: v if isinstance(v, str) else _round(v, 4) for k, v in vars(r).items()}
                   for r in ratios(results)],
        "tls": [vars(t) for t in tls],
        "meshd_notes": list(notes),
    }


def _path_json(r: PathResult) -> dict[str, Any]:
    m = r.measurement
    return {
        "name": m.name, "description": m.description, "rounds": m.rounds,
        "requests_per_second": round(m.requests_per_second), "requests": m.requests,
        "non_2xx": r.non_2xx, "socket_errors": r.socket_errors,
        "p50_ms": _round(m.p50_ms, 3), "p99_ms": _round(m.p99_ms, 3),
        "proxy_cpu_us_per_request": _round(m.proxy_cpu_us, 1),
        "cpu_us_per_request_by_process": {k: round(v, 1)
                                          for k, v in m.cpu_us_per_request.items()},
    }


def _ratio_line(r: Ratio) -> str:
    pair = f"{r.mesh} / {r.baseline}"
    return (f"  {pair:<27} req/s {_number(r.requests_per_second, '{:.2f}'):>5}   "
            f"p50 {_number(r.p50, '{:.1f}x'):>6}   p99 {_number(r.p99, '{:.1f}x'):>6}   "
            f"CPU/req {_number(r.cpu, '{:.1f}x'):>6}")


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
