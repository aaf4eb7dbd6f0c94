"""The results as a table with ratios, or as JSON. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench_measure import LoadSettings, Measurement

MESH = "meshd"
BASELINES = ("direct", "haproxy", "haproxy-2hop")


@dataclass(frozen=True)
class Ratio:
    """meshd relative to a baseline: throughput as a fraction (0.25 = a quarter of the
    baseline's req/s), latency and CPU as multiples (3.0 = three times the baseline's)."""

    baseline: str
    requests_per_second: float | None
    p50: float | None
    p99: float | None
    cpu: float | None


def ratios(measurements: Sequence[Measurement]) -> list[Ratio]:
    by_name = {m.name: m for m in measurements}
    mesh = by_name.get(MESH)
    if mesh is None:
        return []
    return [Ratio(name, _div(mesh.requests_per_second, base.requests_per_second),
                  _div(mesh.p50_ms, base.p50_ms), _div(mesh.p99_ms, base.p99_ms),
                  _div(mesh.proxy_cpu_us, base.proxy_cpu_us))
            for name in BASELINES if (base := by_name.get(name)) is not None]


def format_text(measurements: Sequence[Measurement], settings: LoadSettings,
                notes: Sequence[str]) -> str:
    lines = [_results_table(measurements, settings), ""]
    found = ratios(measurements)
    if found:
        lines += ["meshd relative to each baseline (req/s as a fraction; latency and CPU as "
                  "multiples):", *(_ratio_line(r) for r in found), ""]
    split = [_cpu_split(m) for m in measurements if len(m.cpu_us_per_request) > 1]
    if split:
        lines += ["proxy CPU per process (µs/req):", *split, ""]
    if any(m.name == MESH for m in measurements):
        lines += ["meshd under load:", *(f"  {n}" for n in notes or ["nothing notable"])]
    return "\n".join(lines).rstrip("\n")


def to_json(measurements: Sequence[Measurement], settings: LoadSettings,
            notes: Sequence[str]) -> dict[str, Any]:
    return {
        "settings": {"connections": settings.connections, "threads": settings.threads,
                     "seconds": settings.seconds, "latency_seconds": settings.latency_seconds,
                     "warmup_seconds": settings.warmup_seconds, "rounds": settings.rounds},
        "paths": [_path_json(m) for m in measurements],
        "ratios": [{k: v if isinstance(v, str) else _round(v, 4) for k, v in vars(r).items()}
                   for r in ratios(measurements)],
        "meshd_notes": list(notes),
    }


# ---------------------------------------------------------------------------------------------

def _results_table(measurements: Sequence[Measurement], settings: LoadSettings) -> str:
    header = ("path", f"req/s c={settings.connections}", "proxy CPU µs/req",
              "p50 c=1", "p99 c=1", "errors")
    rows = [header] + [
        (m.name, f"{m.requests_per_second:,.0f}", _number(m.proxy_cpu_us, "{:.0f}"),
         _number(m.p50_ms, "{:.3f} ms"), _number(m.p99_ms, "{:.3f} ms"), str(m.failures))
        for m in measurements
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                          strict=True)]
        out.append("  ".join(cells))
    out.insert(1, "  ".join("-" * w for w in widths))
    out += ["", *(f"  {m.name}: {m.description}" for m in measurements),
            f"  medians of {settings.rounds} round(s) per path, interleaved; errors: non-2xx "
            "answers + socket errors reported by wrk, all runs"]
    return "\n".join(out)


def _ratio_line(r: Ratio) -> str:
    return (f"  meshd / {r.baseline:<13} req/s {_number(r.requests_per_second, '{:.2f}'):>5}   "
            f"p50 {_number(r.p50, '{:.1f}x'):>5}   p99 {_number(r.p99, '{:.1f}x'):>5}   "
            f"CPU/req {_number(r.cpu, '{:.1f}x'):>5}")


def _cpu_split(m: Measurement) -> str:
    parts = " + ".join(f"{label} {us:.0f}" for label, us in m.cpu_us_per_request.items())
    return f"  {m.name}: {parts}"


def _path_json(m: Measurement) -> dict[str, Any]:
    return {
        "name": m.name, "description": m.description, "rounds": m.rounds,
        "requests_per_second": round(m.requests_per_second), "requests": m.requests,
        "failures": m.failures, "p50_ms": _round(m.p50_ms, 3), "p99_ms": _round(m.p99_ms, 3),
        "proxy_cpu_us_per_request": _round(m.proxy_cpu_us, 1),
        "cpu_us_per_request_by_process": {k: round(v, 1)
                                          for k, v in m.cpu_us_per_request.items()},
    }


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
