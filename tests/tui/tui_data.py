"""Fixed data for the console's tests and screenshots: a small shop mesh observed six times, one
second apart, with something wrong in it.

    web (host-a) -> payments v1 (host-b) 90 %, v2 (host-c) 10 %   v2 starts failing; host-a
                                                                    ejects it (outlier detection)
    web (host-a) -> cart (host-d)                                   host-d refuses a route table
    cart (host-d) -> inventory (host-e)                             host-e becomes unreachable
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

from operator_testing import throwaway_operator

from meshd.registry.config_store import RouteConfigStore
from tui.app import MeshConsole
from tui.fmt import utc_clock
from tui.model import MeshModel
from tui.observe import HostPoll, Instance, Observation, RegistryPoll
from tui.prom import MetricSample
from tui.source import FixedSource, MemoryRouteStore

T0 = 1_790_000_000.0  # a fixed wall clock: 2026-09-21 14:13:20 UTC
STEPS = 6
NOW = T0 + STEPS - 1 + 0.4
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, float("inf"))

ROUTES: dict[str, Any] = {"destinations": {
    "payments": {"subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
                 "split": {"v1": 90, "v2": 10}, "timeout": 3.0},
    "cart": {"timeout": 2.0},
}}
ROUTES_INDEX = 42
# the same with a third payments subset at 0 %: a canary declared, not deployed (no instance)
V3_READY: dict[str, Any] = {"destinations": {
    **ROUTES["destinations"],
    "payments": {"subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"},
                             "v3": {"version": "v3"}},
                 "split": {"v1": 90, "v2": 10, "v3": 0}, "timeout": 3.0},
}}
# what host-d has in force: the table before the split was added (it refused the latest)
OLD_ROUTES: dict[str, Any] = {"destinations": {
    "payments": {"subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
                 "split": {"v1": 100, "v2": 0}, "timeout": 3.0},
    "cart": {"timeout": 2.0},
}}

HOSTS = {  # node -> (address, services [(name, version)], upstreams [(service, destination)])
    "host-a": ("10.0.0.11", [("web", "v1")], [("web", "payments"), ("web", "cart")]),
    "host-b": ("10.0.0.12", [("payments", "v1")], []),
    "host-c": ("10.0.0.13", [("payments", "v2")], []),
    "host-d": ("10.0.0.14", [("cart", "v1")], [("cart", "inventory")]),
    "host-e": ("10.0.0.15", [("inventory", "v1")], []),
}


def _buckets(count: float, spread: float) -> tuple[tuple[float, float], ...]:
    """A cumulative histogram of ``count`` observations; ``spread`` moves mass upwards."""
    shares = [0.30, 0.55, 0.80, 0.93, 0.985 - 0.01 * spread, 0.997, 1.0]
    return tuple((le, round(count * s)) for le, s in zip(BOUNDS, shares, strict=True))


def _metrics(node: str, step: int) -> MetricSample:
    t = float(step)
    requests: dict[tuple[str, str, str, str, str], float] = {}
    latency: dict[tuple[str, str, str], tuple[tuple[float, float], ...]] = {}
    if node == "host-a":
        v1, v2 = 18.0 * t, 2.0 * t
        v2_errors = 0.0 if step < 3 else 0.8 * (t - 2)
        requests |= {
            ("outbound", "web", "payments", "v1", "200"): 1000 + v1,
            ("outbound", "web", "payments", "v2", "200"): 100 + v2 - v2_errors,
            ("outbound", "web", "payments", "v2", "503"): v2_errors,
            ("outbound", "web", "cart", "", "200"): 500 + 10.0 * t,
        }
        latency |= {
            ("outbound", "payments", "v1"): _buckets(1000 + v1, 0),
            ("outbound", "payments", "v2"): _buckets(100 + v2, 3),
            ("outbound", "cart", ""): _buckets(500 + 10.0 * t, 1),
        }
    elif node == "host-d":
        requests |= {
            ("outbound", "cart", "inventory", "", "200"): 300 + 3.6 * t,
            ("outbound", "cart", "inventory", "", "502"): 20 + 0.4 * t,
            ("inbound", "web", "cart", "", "200"): 500 + 10.0 * t,
        }
        latency[("outbound", "inventory", "")] = _buckets(320 + 4.0 * t, 2)
    inbound = {"host-b": ("payments", 18.0), "host-c": ("payments", 2.0),
               "host-e": ("inventory", 4.0)}
    if node in inbound:
        service, rate = inbound[node]
        wobble = sum(rate * (1 + 0.3 * math.sin(s)) for s in range(step))
        requests[("inbound", "web" if service == "payments" else "cart", service, "",
                  "200")] = 100 + wobble
    return MetricSample(requests, latency, {}, {"applied": 2.0})


EJECTED_AT = 4  # the step at which host-a's proxy ejects payments v2 (after its 503s)
EJECTION_SECONDS = 30.0
# caller -> destination -> [(endpoint node, requests in flight at step t)]
CALLED: dict[str, dict[str, list[tuple[str, Callable[[int], int]]]]] = {
    "host-a": {"payments": [("host-b", lambda t: 3 + t % 2), ("host-c", lambda t: 0)],
               "cart": [("host-d", lambda t: 1)]},
    "host-d": {"inventory": [("host-e", lambda t: 2)]},
}


def _destinations(node: str, step: int) -> dict[str, Any]:
    """What ``node``'s proxy reports of the endpoints it calls (``/v1/state`` destinations)."""
    out: dict[str, Any] = {}
    for dest, targets in CALLED.get(node, {}).items():
        endpoints = []
        for target, active in targets:
            address, services, _ = HOSTS[target]
            version = dict(services)[dest]
            ejected = node == "host-a" and target == "host-c" and step >= EJECTED_AT
            endpoints.append({
                "node": target, "instance_id": f"{dest}-{target}", "address": address,
                "port": 15001, "version": version,
                "healthy": not (target == "host-c" and step >= 3),
                "ejected": ejected,
                "ejection_remaining_seconds": EJECTION_SECONDS - (step - EJECTED_AT)
                if ejected else 0.0,
                "ejections": 1 if ejected else 0,
                "ejection_reason": "consecutive_5xx" if ejected else "",
                "active_requests": active(step)})
        out[dest] = {"index": ROUTES_INDEX + 7, "age_seconds": 0.2, "endpoints": endpoints}
    return out


def _state(node: str, step: int, routes: dict[str, Any]) -> dict[str, Any]:
    address, services, upstreams = HOSTS[node]
    serial = f"{zlib.crc32(node.encode()):08x}c0ffee" if not (node == "host-b" and step >= 4) \
        else "5e1ec7ed0000"
    expires = 86_400 - 600 * step if serial != "5e1ec7ed0000" else 86_400
    if node == "host-e":
        expires = 2 * 3600  # close to expiry: shown as a warning
    refused = node == "host-d"
    return {
        "node": node, "address": address, "trust_domain": "shop.mesh", "version": "0.1.0",
        "ready": True, "uptime_seconds": 3600.0 + step, "generation": 1 if refused else 2,
        "inbound": {"address": address, "port": 15001},
        "services": [{"name": name, "version": version, "protocol": "http",
                      "address": "127.0.0.1", "port": 8080,
                      "health": "critical" if node == "host-c" and step >= 3 else "passing",
                      "health_output": "HTTP GET /healthz: 200"} for name, version in services],
        "upstreams": [{"service": s, "destination": d, "local_address": "127.0.0.1",
                       "local_port": 9191 + i} for i, (s, d) in enumerate(upstreams)],
        "destinations": _destinations(node, step),
        "routes": OLD_ROUTES if refused else routes,
        "registry": {"url": "http://10.0.0.2:8500",
                     "staleness_seconds": 0.0 if node != "host-d" else 12.0 + max(0, step),
                     "watches": [{"name": "routes", "index": ROUTES_INDEX,
                                  "staleness_seconds": 0.0, "error": ""}]},
        "certificates": [{"service": name, "spiffe_id": f"spiffe://shop.mesh/svc/{name}",
                          "serial": serial, "not_after": "2026-09-22T14:13:20Z",
                          "expires_in_seconds": expires} for name, _ in services],
        "config_error": ("registry kv meshd/config/routes: destinations.payments.split.v3: "
                         "unknown subset 'v3' (declared: v1, v2)") if refused and step >= 2
        else "",
        "process": {"pid": 4000 + int(address.rsplit(".", 1)[1]),
                    "cpu_seconds": 12.0 + step * (0.04 if node != "host-a" else 0.12),
                    "rss_bytes": (48 + len(node)) * 2**20, "open_fds": 20 + step},
        "connections": {"inbound": 3 + step, "outbound": 1 if node == "host-a" else 0},
    }


def _instances(step: int) -> tuple[Instance, ...]:
    out = []
    for node, (address, services, _) in HOSTS.items():
        for name, version in services:
            failing = node == "host-c" and step >= 3
            out.append(Instance(name, f"{name}-{node}", node, address, 15001, version,
                                "critical" if failing else "passing"))
    return tuple(out)


# -- the minutes before: the canary at 10 % for a while, with a burst of 503s from v2 ------------

HISTORY = 300  # seconds of history before T0 the charts' fixed data has (one scrape a second)
Counts = dict[Any, float]


def _shares(spread: float) -> list[float]:
    return [0.30, 0.55, 0.80, 0.93, 0.985 - 0.01 * spread, 0.997, 1.0]


def _history_second(node: str, s: int) -> tuple[Counts, dict[Any, list[float]]]:
    """What ``node``'s counters and latency buckets gain in second ``s`` of the history."""
    wave = 1 + 0.3 * math.sin(2 * math.pi * s / 120)
    requests: Counts = {}
    latency: dict[Any, list[float]] = {}
    if node == "host-a":
        burst = HISTORY * 0.4 <= s < HISTORY * 0.5  # v2 answers 503 to 15 % of requests
        v2 = 2.0 * wave
        requests |= {
            ("outbound", "web", "payments", "v1", "200"): 18.0 * wave,
            ("outbound", "web", "payments", "v2", "200"): v2 * (0.85 if burst else 1.0),
            ("outbound", "web", "payments", "v2", "503"): v2 * 0.15 if burst else 0.0,
            ("outbound", "web", "cart", "", "200"): 10.0,
        }
        latency |= {
            ("outbound", "payments", "v1"): [18.0 * wave * x for x in _shares(wave - 0.7)],
            ("outbound", "payments", "v2"): [v2 * x for x in _shares(4.0 if burst else 1.5)],
            ("outbound", "cart", ""): [10.0 * x for x in _shares(1)],
        }
    elif node == "host-d":
        requests |= {
            ("outbound", "cart", "inventory", "", "200"): 3.6,
            ("outbound", "cart", "inventory", "", "502"): 0.4,
            ("inbound", "web", "cart", "", "200"): 10.0,
        }
        latency[("outbound", "inventory", "")] = [4.0 * x for x in _shares(2)]
    inbound = {"host-b": ("payments", 18.0), "host-c": ("payments", 2.0),
               "host-e": ("inventory", 4.0)}
    if node in inbound:
        service, rate = inbound[node]
        requests[("inbound", "web" if service == "payments" else "cart", service, "",
                  "200")] = rate * wave
    return requests, latency


def _history_metrics(node: str) -> list[MetricSample]:
    """``node``'s scrapes over the history, then the fixed steps shifted to follow on: each
    counter goes on from where the history left it, one second of step 0's rates later."""
    requests: Counts = {}
    buckets: dict[Any, list[float]] = {}
    out = []
    for s in range(HISTORY):
        gained, latency = _history_second(node, s)
        for key, n in gained.items():
            requests[key] = requests.get(key, 0.0) + n
        for key, counts in latency.items():
            have = buckets.setdefault(key, [0.0] * len(BOUNDS))
            buckets[key] = [a + b for a, b in zip(have, counts, strict=True)]
        out.append(MetricSample(dict(requests), {k: tuple(zip(BOUNDS, v, strict=True))
                                                 for k, v in buckets.items()}, {},
                                {"applied": 2.0}))
    first, second = _metrics(node, 0), _metrics(node, 1)
    shift = {k: requests.get(k, 0.0) + second.requests[k] - 2 * v
             for k, v in first.requests.items()}
    shift_le = {k: [have + dict(second.latency[k])[le] - 2 * count for have, (le, count)
                    in zip(buckets.get(k, [0.0] * len(BOUNDS)), v, strict=True)]
                for k, v in first.latency.items()}
    for step in range(STEPS):
        m = _metrics(node, step)
        out.append(MetricSample(
            {k: v + shift[k] for k, v in m.requests.items()},
            {k: tuple((le, c + d) for (le, c), d in zip(v, shift_le[k], strict=True))
             for k, v in m.latency.items()}, {}, {"applied": 2.0}))
    return out


def observations(admin_port: int = 15000, routes: dict[str, Any] = ROUTES,
                 history: bool = False) -> list[Observation]:
    """The fixed steps, one second apart (``history``: after ``HISTORY`` seconds more)."""
    before = HISTORY if history else 0
    metrics = {node: _history_metrics(node) if history else
               [_metrics(node, step) for step in range(STEPS)] for node in HOSTS}
    out = []
    for i in range(before + STEPS):
        step = i - before
        at = T0 + step
        hosts = []
        for node, (address, _, _) in HOSTS.items():
            admin = f"{address}:{admin_port}"
            if node == "host-e" and step >= 3:
                hosts.append(HostPoll(admin, node, at, error="timed out"))
            else:
                hosts.append(HostPoll(admin, node, at, _state(node, step, routes),
                                      metrics[node][i]))
        registry = RegistryPoll(at, "", _instances(step), routes, ROUTES_INDEX)
        out.append(Observation(at, registry, tuple(hosts)))
    return out


def fixed_model(routes: dict[str, Any] = ROUTES, history: bool = False) -> MeshModel:
    model = MeshModel()
    for obs in observations(routes=routes, history=history):
        model.ingest(obs)
    return model


def fixed_app(store: RouteConfigStore | None = None,
              clock: Callable[[], float] = lambda: NOW, routes: dict[str, Any] = ROUTES,
              interval: float = 1.0, history: bool = False) -> MeshConsole:
    """The console on the fixed data, at a fixed time, in UTC: the same pixels every run
    (``history``: with the five minutes before, for the charts)."""
    obs = observations(routes=routes)
    store = store or MemoryRouteStore(routes, ROUTES_INDEX, signer=throwaway_operator())
    source = FixedSource([obs[-1]], store, description="registry http://10.0.0.2:8500")
    return MeshConsole(source, clock=clock, clock_format=utc_clock,
                       model=fixed_model(routes, history), interval=interval)
