"""The results as a table with ratios, issue 5's targets and issue 18's, or as JSON. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench_idle import IDLE_CONNECTIONS, MB, IdleResult
from bench_measure import LoadSettings, Measurement
from bench_stack import H2LOAD, HAPROXY_2HOP_T, HAPROXY_T, MESH_1HOP_W, MESH_2HOP_W

MESH_1HOP, MESH_2HOP, H2_MESH_2HOP = "meshd-1hop", "meshd-2hop", "h2-meshd-2hop"
# each meshd path -> the baselines it is compared with
BASELINES = {MESH_1HOP: ("direct", "haproxy"),
             MESH_2HOP: ("direct", "haproxy", "haproxy-2hop"),
             MESH_1HOP_W: ("direct", HAPROXY_T, MESH_1HOP),
             MESH_2HOP_W: ("direct", HAPROXY_T, HAPROXY_2HOP_T, MESH_2HOP),
             H2_MESH_2HOP: ("h2-direct", "h2-haproxy", "h2-haproxy-2hop")}
TARGETS_TITLE = "issue 5 targets (measured, target, verdict):"
TARGETS_18_TITLE = "issue 18 targets (measured, target, verdict):"
# issue 18's goals
PER_CORE_RATIO = 0.3       # meshd's req/s over haproxy's: one core each, N workers vs N threads
WORKERS_SCALING = 1.7      # meshd's own N-worker req/s over its 1-worker req/s
ADDED_P50_MS = 0.05        # per hop at one connection
RSS_MB = 40.0              # per process, with the idle connections held


@dataclass(frozen=True)
class Ratio:
    """A meshd path relative to a baseline: throughput as a fraction (0.25 = a quarter of the
    baseline's req/s), latency and CPU as multiples (3.0 = three times the baseline's)."""

    mesh: str
    baseline: str
    requests_per_second: float | None
    p50: float | None
    p99: float | None
    cpu: float | None


@dataclass(frozen=True)
class Check:
    """One of issue 5's targets: ``value`` (None: not measured in this run) against
    ``target``, met when at least it (``at_least``) or at most it. ``short_of``: why the value,
    though measured, does not decide the target (fewer idle connections than it names)."""

    name: str
    what: str            # how the value was computed
    value: float | None
    target: float
    at_least: bool
    unit: str            # "" (a ratio), "ms", "MB", "count"
    short_of: str | None = None

    @property
    def met(self) -> bool | None:
        if self.value is None or self.short_of is not None:
            return None
        return self.value >= self.target if self.at_least else self.value <= self.target

    @property
    def verdict(self) -> str:
        if self.value is not None and self.short_of is not None:
            return f"undecided ({self.short_of})"
        return {True: "met", False: "not met", None: "not measured"}[self.met]


def ratios(measurements: Sequence[Measurement]) -> list[Ratio]:
    by_name = {m.name: m for m in measurements}
    out: list[Ratio] = []
    for mesh_name, baselines in BASELINES.items():
        mesh = by_name.get(mesh_name)
        if mesh is None:
            continue
        out += [Ratio(mesh_name, name, _div(mesh.requests_per_second, base.requests_per_second),
                      _div(mesh.p50_ms, base.p50_ms), _div(mesh.p99_ms, base.p99_ms),
                      _div(mesh.proxy_cpu_us, base.proxy_cpu_us))
                for name in baselines if (base := by_name.get(name)) is not None]
    return out


def checks(measurements: Sequence[Measurement], idle: IdleResult | None) -> list[Check]:
    """Issue 5's targets, in its order: req/s of the single hop and of the two-hop mTLS path
    against haproxy's, the p50 each hop adds at one connection, and RSS with idle
    connections."""
    by_name = {m.name: m for m in measurements}

    def rps_ratio(mesh: str, base: str) -> float | None:
        return _rps_ratio(by_name, mesh, base)

    def added_p50(mesh: str, hops: int) -> float | None:
        return _added_p50(by_name, mesh, hops)

    out = [
        Check("single hop req/s", f"{MESH_1HOP} / haproxy", rps_ratio(MESH_1HOP, "haproxy"),
              0.6, True, ""),
        Check("two-hop mTLS req/s", f"{MESH_2HOP} / haproxy-2hop",
              rps_ratio(MESH_2HOP, "haproxy-2hop"), 0.75, True, ""),
        Check("added p50 per hop, c=1, single hop", f"{MESH_1HOP} p50 - direct p50",
              added_p50(MESH_1HOP, 1), 0.1, False, "ms"),
        Check("added p50 per hop, c=1, two hops", f"({MESH_2HOP} p50 - direct p50) / 2",
              added_p50(MESH_2HOP, 2), 0.1, False, "ms"),
    ]
    if idle is None:
        out.append(Check(f"RSS per meshd, {IDLE_CONNECTIONS} idle connections", "not run",
                         None, 40.0, False, "MB"))
    else:
        short_of = (None if idle.answered >= IDLE_CONNECTIONS else
                    f"{idle.answered} of the {IDLE_CONNECTIONS} connections it names")
        out += [Check(f"RSS, {p.label}", _held(p.label, idle), p.rss_after / MB, 40.0, False,
                      "MB", short_of)
                for p in idle.processes]
    return out


def checks_issue18(measurements: Sequence[Measurement], idles: Sequence[IdleResult],
                   workers: int) -> list[Check]:
    """Issue 18's targets: per core (one meshd process against one haproxy thread) and with
    ``workers`` workers against haproxy ``nbthread workers``, the same ratios; meshd's own
    N-worker over 1-worker req/s; the p50 each hop adds at one connection; RSS per process
    (supervisor and each worker separately) with the idle connections held; 0 errors."""
    by_name = {m.name: m for m in measurements}

    def rps_ratio(mesh: str, base: str) -> float | None:
        return _rps_ratio(by_name, mesh, base)

    def added_p50(mesh: str, hops: int) -> float | None:
        return _added_p50(by_name, mesh, hops)

    w = f"{workers} workers vs nbthread {workers}"
    out = [
        Check("per core: single hop req/s", f"{MESH_1HOP} / haproxy",
              rps_ratio(MESH_1HOP, "haproxy"), PER_CORE_RATIO, True, ""),
        Check("per core: two-hop mTLS req/s", f"{MESH_2HOP} / haproxy-2hop",
              rps_ratio(MESH_2HOP, "haproxy-2hop"), PER_CORE_RATIO, True, ""),
        Check(f"{w}: single hop req/s", f"{MESH_1HOP_W} / {HAPROXY_T}",
              rps_ratio(MESH_1HOP_W, HAPROXY_T), PER_CORE_RATIO, True, ""),
        Check(f"{w}: two-hop mTLS req/s", f"{MESH_2HOP_W} / {HAPROXY_2HOP_T}",
              rps_ratio(MESH_2HOP_W, HAPROXY_2HOP_T), PER_CORE_RATIO, True, ""),
        Check(f"{workers}-worker / 1-worker req/s, single hop", f"{MESH_1HOP_W} / {MESH_1HOP}",
              rps_ratio(MESH_1HOP_W, MESH_1HOP), WORKERS_SCALING, True, ""),
        Check(f"{workers}-worker / 1-worker req/s, two-hop", f"{MESH_2HOP_W} / {MESH_2HOP}",
              rps_ratio(MESH_2HOP_W, MESH_2HOP), WORKERS_SCALING, True, ""),
        Check("added p50 per hop, c=1, single hop", f"{MESH_1HOP} p50 - direct p50",
              added_p50(MESH_1HOP, 1), ADDED_P50_MS, False, "ms"),
        Check("added p50 per hop, c=1, two hops", f"({MESH_2HOP} p50 - direct p50) / 2",
              added_p50(MESH_2HOP, 2), ADDED_P50_MS, False, "ms"),
        Check(f"added p50 per hop, c=1, single hop, {workers} workers",
              f"{MESH_1HOP_W} p50 - direct p50", added_p50(MESH_1HOP_W, 1), ADDED_P50_MS,
              False, "ms"),
        Check(f"added p50 per hop, c=1, two hops, {workers} workers",
              f"({MESH_2HOP_W} p50 - direct p50) / 2", added_p50(MESH_2HOP_W, 2), ADDED_P50_MS,
              False, "ms"),
    ]
    if not idles:
        out.append(Check(f"RSS per process, {IDLE_CONNECTIONS} idle connections", "not run",
                         None, RSS_MB, False, "MB"))
    for idle in idles:
        short_of = (None if idle.answered >= IDLE_CONNECTIONS else
                    f"{idle.answered} of the {IDLE_CONNECTIONS} connections it names")
        out += [Check(f"RSS, {p.label}", _held(p.label, idle), p.rss_after / MB, RSS_MB, False,
                      "MB", short_of)
                for p in idle.processes]
    wrk_paths = [m for m in measurements if m.tool != H2LOAD]
    out.append(Check("errors under load", "non-2xx + socket errors, all HTTP/1.1 runs",
                     float(sum(m.failures for m in wrk_paths)) if wrk_paths else None, 0,
                     False, "count"))
    return out


def format_details(measurements: Sequence[Measurement], notes: Sequence[str]) -> str:
    """CPU per proxy process and what meshd counted and logged under load."""
    lines: list[str] = []
    split = [_cpu_split(m) for m in measurements if len(m.cpu_us_per_request) > 1]
    if split:
        lines += ["proxy CPU per process (µs/req):", *split, ""]
    workers = [m for m in measurements if m.cpu_by_process]
    if workers:
        lines += ["meshd with workers, CPU of each process (µs/req) and the connections each "
                  "worker had accepted halfway through each throughput run:",
                  *(line for m in workers for line in _workers_lines(m)), ""]
    if any(m.name in BASELINES for m in measurements):
        lines += ["meshd under load:", *(f"  {n}" for n in notes or ["nothing notable"]), ""]
    h2 = [m for m in measurements if m.tool == H2LOAD]
    if h2:
        lines += ["h2load's counts (all runs of each path):", *(_h2load_line(m) for m in h2)]
    return "\n".join(lines).rstrip("\n")


def format_summary(measurements: Sequence[Measurement], settings: LoadSettings) -> str:
    """The tables (req/s, CPU, p50, p99 per path; HTTP/1.1 by wrk, HTTP/2 by h2load) and
    meshd's ratios to each baseline."""
    http1 = [m for m in measurements if m.tool != H2LOAD]
    h2 = [m for m in measurements if m.tool == H2LOAD]
    lines = []
    if http1:
        lines += [_results_table(http1, settings), ""]
    if h2:
        lines += [_h2_table(h2, settings), ""]
    found = ratios(measurements)
    if found:
        lines += ["meshd relative to each baseline (req/s as a fraction; latency and CPU as "
                  "multiples):", *(_ratio_line(r) for r in found)]
    return "\n".join(lines).rstrip("\n")


def format_idle(idle: IdleResult) -> str:
    """What the idle-connection phase did, and the RSS line (per process)."""
    rss = ", ".join(f"{_short(p.label)} {p.rss_after / MB:.1f} MB ({p.rss_before / MB:.1f} MB "
                    "before)" for p in idle.processes)
    tcp = ", ".join(f"{_short(p.label)} {_number(p.tcp_after, '{:d}')}"
                    for p in idle.processes)
    lines = [f"idle connections: {idle.opened} of {idle.wanted} opened to {idle.address} "
             f"({idle.entry}'s outbound listener), {idle.answered} answered 2xx to one GET "
             f"each, then held idle {idle.idle_seconds:.1f} s",
             *([f"  first problem: {idle.first_error}"] if idle.first_error else []),
             f"  established TCP connections while held: {tcp}",
             f"RSS per meshd process: {rss}"]
    return "\n".join(lines)


def format_checks(found: Sequence[Check], title: str = TARGETS_TITLE) -> str:
    rows = [(c.name + (f" ({c.what})" if c.what else ""), _value(c), _target(c), c.verdict)
            for c in found]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    body = [f"  {name.ljust(widths[0])}  {value.rjust(widths[1])}  {target.ljust(widths[2])}  "
            f"{verdict}" for name, value, target, verdict in rows]
    return "\n".join([title, *body])


def to_json(measurements: Sequence[Measurement], settings: LoadSettings,
            notes: Sequence[str], idle: IdleResult | None = None,
            idle_workers: IdleResult | None = None, workers: int = 2) -> dict[str, Any]:
    idles = [i for i in (idle, idle_workers) if i is not None]
    return {
        "settings": {"connections": settings.connections, "threads": settings.threads,
                     "h2_connections": settings.h2_connections,
                     "h2_streams": settings.h2_streams,
                     "seconds": settings.seconds, "latency_seconds": settings.latency_seconds,
                     "warmup_seconds": settings.warmup_seconds, "rounds": settings.rounds},
        "paths": [_path_json(m) for m in measurements],
        "ratios": [{k: v if isinstance(v, str) else _round(v, 4) for k, v in vars(r).items()}
                   for r in ratios(measurements)],
        "meshd_notes": list(notes),
        "idle_connections": None if idle is None else _idle_json(idle),
        "idle_connections_workers": None if idle_workers is None else _idle_json(idle_workers),
        "targets": [_check_json(c) for c in checks(measurements, idle)],
        "targets_issue18": [_check_json(c) for c in checks_issue18(measurements, idles, workers)],
    }


def _check_json(c: Check) -> dict[str, Any]:
    return {"name": c.name, "what": c.what, "value": _round(c.value, 4), "unit": c.unit,
            "target": c.target, "comparison": ">=" if c.at_least else "<=", "met": c.met}


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


def _h2_table(measurements: Sequence[Measurement], settings: LoadSettings) -> str:
    """The HTTP/2 paths: req/s and latency under load (``h2load -c C -m M``), CPU per request,
    latency at one connection with one stream, failed requests."""
    load = f"c={settings.h2_connections} m={settings.h2_streams}"
    header = ("HTTP/2 path", f"req/s {load}", "proxy CPU µs/req", "p50 load", "p99 load",
              "p50 c=1", "p99 c=1", "failed")
    rows = [header] + [
        (m.name, f"{m.requests_per_second:,.0f}", _number(m.proxy_cpu_us, "{:.0f}"),
         _number(m.load_p50_ms, "{:.3f} ms"), _number(m.load_p99_ms, "{:.3f} ms"),
         _number(m.p50_ms, "{:.3f} ms"), _number(m.p99_ms, "{:.3f} ms"),
         f"{m.failures}" + (f" +{m.stalled} stalled run(s)" if m.stalled else ""))
        for m in measurements
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    out = ["  ".join([row[0].ljust(widths[0]),
                      *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])
           for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    out += ["", *(f"  {m.name}: {m.description}" for m in measurements),
            f"  h2load -t1 -c{settings.h2_connections} -m{settings.h2_streams} (p50/p99 load: "
            "from its per-request log), then -c1 -m1 (p50/p99 c=1); medians of "
            f"{settings.rounds} round(s) per path, interleaved; failed: requests h2load counted "
            "as failed (status not 2xx/3xx, stream or connection errors), all runs"]
    return "\n".join(out)


def _h2load_line(m: Measurement) -> str:
    verdict = ", ".join([*(["FAILED REQUESTS"] if m.failures else []),
                         *([f"STALLED: {m.stalled} run(s) finished no request"]
                           if m.stalled else [])]) or "none failed"
    return (f"  {m.name}: {m.failures} failed ({m.errored} by stream or connection errors) of "
            f"{m.requests} requests of the throughput runs (+ the c=1 runs), {m.unfinished} in "
            f"flight when the throughput runs ended: {verdict}")


def _ratio_line(r: Ratio) -> str:
    pair = f"{r.mesh} / {r.baseline}"
    return (f"  {pair:<32} req/s {_number(r.requests_per_second, '{:.2f}'):>5}   "
            f"p50 {_number(r.p50, '{:.1f}x'):>5}   p99 {_number(r.p99, '{:.1f}x'):>5}   "
            f"CPU/req {_number(r.cpu, '{:.1f}x'):>5}")


def _workers_lines(m: Measurement) -> list[str]:
    """A path through meshds with workers: CPU per request of each process (supervisor,
    worker i), then each round's accepted connections per worker."""
    parts = " + ".join(f"{_short(label)} {us:.0f}" for label, us in m.cpu_by_process.items())
    lines = [f"  {m.name}: {parts}"]
    for n, spread in enumerate(m.connections, 1):
        counts = ", ".join(f"{_short(label)} {count}" for label, count in spread.items())
        lines.append(f"    round {n}, connections accepted: {counts}")
    return lines


def _cpu_split(m: Measurement) -> str:
    parts = " + ".join(f"{label} {us:.0f}" for label, us in m.cpu_us_per_request.items())
    return f"  {m.name}: {parts}"


def _path_json(m: Measurement) -> dict[str, Any]:
    return {
        "name": m.name, "description": m.description, "tool": m.tool, "rounds": m.rounds,
        "requests_per_second": round(m.requests_per_second), "requests": m.requests,
        "failures": m.failures, "errored": m.errored, "unfinished": m.unfinished,
        "stalled_runs": m.stalled,
        "p50_ms": _round(m.p50_ms, 3), "p99_ms": _round(m.p99_ms, 3),
        "load_p50_ms": _round(m.load_p50_ms, 3), "load_p99_ms": _round(m.load_p99_ms, 3),
        "proxy_cpu_us_per_request": _round(m.proxy_cpu_us, 1),
        "cpu_us_per_request_by_process": {k: round(v, 1)
                                          for k, v in m.cpu_us_per_request.items()},
        "cpu_us_per_request_by_worker": {k: round(v, 1) for k, v in m.cpu_by_process.items()},
        "connections_by_worker": list(m.connections),
    }


def _idle_json(idle: IdleResult) -> dict[str, Any]:
    return {
        "address": idle.address, "wanted": idle.wanted, "opened": idle.opened,
        "answered": idle.answered, "idle_seconds": round(idle.idle_seconds, 2),
        "first_error": idle.first_error,
        "processes": [{"label": p.label, "rss_before_mb": round(p.rss_before / MB, 1),
                       "rss_mb": round(p.rss_after / MB, 1), "tcp_established": p.tcp_after}
                      for p in idle.processes],
    }


def _held(label: str, idle: IdleResult) -> str:
    """What the meshd process ``label`` held: the entry meshd (host A or C) the idle client
    connections, the one behind it only what the entry pooled towards it."""
    tcp = next((p.tcp_after for p in idle.processes if p.label == label), None)
    entry = _short(idle.entry)
    if label == idle.entry:
        return f"{idle.opened} idle client connections open to it"
    if label.startswith(idle.entry + " "):
        return (f"{idle.opened} idle client connections open to {entry}, "
                f"{_number(tcp, '{:d}')} established in this process")
    return f"behind {entry}, {_number(tcp, '{:d}')} TCP connections open"


def _short(label: str) -> str:
    return label.removeprefix("meshd ")


def _value(c: Check) -> str:
    if c.value is None:
        return "-"
    if c.unit == "ms":
        return f"{c.value:.4f} ms"   # wrk resolves 1 µs; halved for two hops
    if c.unit == "MB":
        return f"{c.value:.1f} MB"
    if c.unit == "count":
        return f"{c.value:.0f}"
    return f"{c.value:.2f}"


def _target(c: Check) -> str:
    unit = f" {c.unit}" if c.unit and c.unit != "count" else ""
    return f"{'>=' if c.at_least else '<='} {c.target:g}{unit}"


def _rps_ratio(by_name: dict[str, Measurement], mesh: str, base: str) -> float | None:
    a, b = by_name.get(mesh), by_name.get(base)
    return _div(a.requests_per_second, b.requests_per_second) if a and b else None


def _added_p50(by_name: dict[str, Measurement], mesh: str, hops: int) -> float | None:
    """The p50 at c=1 that each of ``hops`` hops of ``mesh`` adds over the direct path."""
    a, direct = by_name.get(mesh), by_name.get("direct")
    if a is None or direct is None or a.p50_ms is None or direct.p50_ms is None:
        return None
    return (a.p50_ms - direct.p50_ms) / hops


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
