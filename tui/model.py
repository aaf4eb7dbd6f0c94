"""The console's memory: the last known view of the registry and of every meshd (kept, with its
age, while a host or the registry cannot be reached), a short history of metric scrapes to turn
counters into rates, and the event log. Pure: observations in, values for the views out."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tui.events import Event, host_events, registry_events
from tui.observe import HostPoll, Instance, Observation, RegistryPoll
from tui.prom import Buckets, MetricSample, bucket_delta, delta_map, merge_buckets, quantile
from tui.series import MAX_POINTS, HostIncrease, SubsetSeries, is_error

WINDOW = 5.0  # seconds over which rates, success and p99 are measured
HISTORY = 60  # rate samples kept per instance (sparklines)
MAX_EVENTS = 500


def process_total(process: Mapping[str, Any], key: str) -> float | None:
    """``key`` (``cpu_seconds``, ``rss_bytes``) of a meshd as a whole: its own process and,
    with worker processes, theirs too (``/v1/state``'s ``process.workers``). None when the
    host does not report it."""
    own = process.get(key)
    if not isinstance(own, int | float):
        return None
    workers = process.get("workers") or []
    return float(own) + sum(float(w[key]) for w in workers
                            if isinstance(w, dict) and isinstance(w.get(key), int | float))


@dataclass(frozen=True)
class Traffic:
    """Requests of one edge leg (or any slice) over the measuring window."""

    rate: float = 0.0  # requests per second
    requests: float = 0.0
    errors: float = 0.0  # 5xx
    latency: Buckets = ()

    @property
    def success(self) -> float | None:
        return None if self.requests <= 0 else 1.0 - self.errors / self.requests

    @property
    def p99(self) -> float | None:
        return quantile(0.99, self.latency)

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.rate + other.rate, self.requests + other.requests,
                       self.errors + other.errors, merge_buckets([self.latency, other.latency]))


@dataclass
class HostRecord:
    admin: str
    node: str
    state: Mapping[str, Any] | None = None  # the last state read (kept while unreachable)
    state_at: float | None = None
    error: str = ""
    polled_at: float = 0.0
    samples: deque[tuple[float, MetricSample]] = field(default_factory=lambda: deque(maxlen=64))
    cpu_percent: float | None = None
    inbound_history: dict[str, deque[float]] = field(default_factory=dict)
    _cpu: tuple[float, float] | None = None

    @property
    def reachable(self) -> bool:
        return self.state is not None and not self.error

    def age(self, now: float) -> float | None:
        return None if self.state_at is None else max(0.0, now - self.state_at)

    def window(self, seconds: float) -> tuple[float, MetricSample, MetricSample] | None:
        """(elapsed, oldest, newest) scrapes spanning at most ``seconds`` (None if < 2)."""
        if len(self.samples) < 2:
            return None
        newest_at, newest = self.samples[-1]
        oldest_at, oldest = self.samples[-2]
        for at, sample in reversed(self.samples):
            if newest_at - at > seconds + 0.25:
                break
            oldest_at, oldest = at, sample
        elapsed = newest_at - oldest_at
        if elapsed <= 0:
            return None
        return elapsed, oldest, newest


class MeshModel:
    def __init__(self, *, window: float = WINDOW, history: int = HISTORY,
                 chart_points: int = MAX_POINTS) -> None:
        self.window = window
        self.history = history
        self.series = SubsetSeries(chart_points)  # per destination subset, for the charts
        self.registry: RegistryPoll | None = None  # the last successful answer
        self.registry_error = ""
        self.registry_polled_at = 0.0
        self.registry_outage_since: float | None = None
        self.hosts: dict[str, HostRecord] = {}
        self.events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self.last_at = 0.0
        self.observations = 0

    # -- input ---------------------------------------------------------------------------------

    def ingest(self, obs: Observation) -> list[Event]:
        """Take one observation; returns the events it caused (also kept in ``events``). An
        observation not newer than the last one is ignored."""
        if obs.at <= self.last_at:
            return []
        self.last_at = obs.at
        self.observations += 1
        events = registry_events(self.registry, not self.registry_error,
                                 self.registry_outage_since, obs.registry)
        self._take_registry(obs.registry)
        increases: list[HostIncrease] = []
        for poll in obs.hosts:
            record = self.hosts.get(poll.admin)
            was = None if record is None else record.reachable
            last = record.samples[-1] if record is not None and record.samples else None
            events.extend(host_events(None if record is None else record.state, was, poll,
                                      None if last is None else last[1]))
            if poll.ok and poll.metrics is not None and last is not None:
                increases.append(HostIncrease(poll.at - last[0], poll.metrics, last[1]))
            self._take_host(record or self._new_host(poll), poll)
        self.series.add(obs.at, increases)
        self.events.extend(events)
        return events

    def note(self, at: float, kind: str, severity: str, text: str) -> Event:
        """An event of the console's own (a split written, a conflict)."""
        event = Event(at, kind, severity, text)
        self.events.append(event)
        return event

    def _take_registry(self, poll: RegistryPoll) -> None:
        self.registry_polled_at = poll.at
        if poll.ok:
            self.registry = poll
            self.registry_error = ""
            self.registry_outage_since = None
        else:
            if not self.registry_error:
                self.registry_outage_since = poll.at
            self.registry_error = poll.error

    def _new_host(self, poll: HostPoll) -> HostRecord:
        record = HostRecord(poll.admin, poll.node)
        self.hosts[poll.admin] = record
        return record

    def _take_host(self, record: HostRecord, poll: HostPoll) -> None:
        record.polled_at = poll.at
        record.error = poll.error if not poll.ok else ""
        if not poll.ok:
            record.error = record.error or "no answer"
            return
        assert poll.state is not None
        record.node = str(poll.state.get("node") or poll.node)
        record.state, record.state_at = poll.state, poll.at
        cpu = process_total(poll.state.get("process") or {}, "cpu_seconds")
        if cpu is not None:
            if record._cpu is not None and poll.at > record._cpu[0] and cpu >= record._cpu[1]:
                record.cpu_percent = 100.0 * (cpu - record._cpu[1]) / (poll.at - record._cpu[0])
            record._cpu = (poll.at, float(cpu))
        if poll.metrics is not None:
            if record.samples:
                self._record_inbound_rates(record, poll.at, poll.metrics)
            record.samples.append((poll.at, poll.metrics))

    def _record_inbound_rates(self, record: HostRecord, at: float, new: MetricSample) -> None:
        prev_at, prev = record.samples[-1]
        elapsed = at - prev_at
        if elapsed <= 0:
            return
        delta = delta_map(new.requests, prev.requests)
        rates: dict[str, float] = {}
        for (direction, _src, dest, _subset, _code), n in delta.items():
            if direction == "inbound":
                rates[dest] = rates.get(dest, 0.0) + n / elapsed
        services = {str(s.get("name")) for s in (record.state or {}).get("services") or []}
        for service in services | set(rates):
            hist = record.inbound_history.setdefault(service, deque(maxlen=self.history))
            hist.append(rates.get(service, 0.0))

    # -- queries -------------------------------------------------------------------------------

    def sorted_hosts(self) -> list[HostRecord]:
        return sorted(self.hosts.values(), key=lambda h: (h.node, h.admin))

    def health_by_version(self, service: str) -> dict[str, tuple[int, int]] | None:
        """version -> (healthy, all) endpoints of ``service`` in the registry (None: unknown)."""
        if self.registry is None:
            return None
        out: dict[str, tuple[int, int]] = {}
        for inst in self.instances(service):
            healthy, total = out.get(inst.version, (0, 0))
            out[inst.version] = (healthy + inst.healthy, total + 1)
        return out

    def instances(self, service: str | None = None) -> list[Instance]:
        found = self.registry.instances if self.registry else ()
        return sorted((i for i in found if service is None or i.service == service),
                      key=lambda i: (i.service, i.version, i.node))

    def stored_routes(self) -> Mapping[str, Any] | None:
        return self.registry.routes if self.registry else None

    def destination_routes(self, service: str) -> Mapping[str, Any] | None:
        """The route entry of ``service``: as stored in the registry, else as a meshd has it."""
        tables: list[Mapping[str, Any] | None] = [self.stored_routes()]
        tables += [h.state.get("routes") for h in self.sorted_hosts() if h.state]
        for table in tables:
            dests = (table or {}).get("destinations")
            if isinstance(dests, dict) and isinstance(dests.get(service), dict):
                return dict(dests[service])
        return None

    def services(self) -> list[str]:
        names = {i.service for i in self.instances()}
        for host in self.hosts.values():
            state = host.state or {}
            names.update(str(s.get("name")) for s in state.get("services") or [])
            names.update(str(u.get("destination")) for u in state.get("upstreams") or [])
            names.update(self.gateways())
        return sorted(n for n in names if n and n != "None")

    def externals(self) -> dict[str, int]:
        """External destinations (outside the mesh, reached directly) the meshds know, with
        the most addresses any of them resolved."""
        found: dict[str, int] = {}
        for host in self.hosts.values():
            for name, entry in ((host.state or {}).get("destinations") or {}).items():
                if isinstance(entry, dict) and entry.get("external"):
                    found[str(name)] = max(found.get(str(name), 0),
                                           len(entry.get("endpoints") or []))
        return found

    def gateways(self) -> set[str]:
        """The names of the ingress gateways the meshds run (the mesh's entry nodes)."""
        return {str(g.get("name")) for host in self.hosts.values()
                for g in (host.state or {}).get("gateways") or []}

    def calls(self) -> set[tuple[str, str]]:
        """(source, destination) pairs declared as upstreams or seen in traffic."""
        pairs: set[tuple[str, str]] = set()
        for host in self.hosts.values():
            state = host.state or {}
            for up in state.get("upstreams") or []:
                pairs.add((str(up.get("service")), str(up.get("destination"))))
            for gateway in state.get("gateways") or []:
                for route in gateway.get("routes") or []:
                    pairs.add((str(gateway.get("name")), str(route.get("service"))))
            if host.samples:
                for (direction, src, dest, _s, _c) in host.samples[-1][1].requests:
                    if direction == "outbound":
                        pairs.add((src, dest))
        return pairs

    def traffic(self) -> dict[tuple[str, str, str], Traffic]:
        """Outbound traffic over the window by (source, destination, subset), summed over
        every meshd that reports it."""
        out: dict[tuple[str, str, str], Traffic] = {}
        for host in self.hosts.values():
            for key, traffic in host_traffic(host, self.window).items():
                out[key] = out[key] + traffic if key in out else traffic
        return out

    def inbound_traffic(self, host: HostRecord, service: str) -> Traffic:
        win = host.window(self.window)
        if win is None:
            return Traffic()
        elapsed, old, new = win
        total = errors = 0.0
        for key, n in delta_map(new.requests, old.requests).items():
            direction, _src, dest, _subset, code = key
            if direction == "inbound" and dest == service:
                total += n
                errors += n if is_error(code) else 0.0
        latency = merge_buckets(bucket_delta(b, old.latency.get(k)) for k, b in
                                new.latency.items() if k[0] == "inbound" and k[1] == service)
        return Traffic(total / elapsed, total, errors, latency)

    def outbound_counts(self, destination: str) -> dict[str, float]:
        """Requests ever sent to ``destination`` by subset, from the latest scrape of every
        meshd (2xx-5xx alike): the basis of "measured share since"."""
        counts: dict[str, float] = {}
        for host in self.hosts.values():
            if not host.samples:
                continue
            for (direction, _src, dest, subset, _code), n in host.samples[-1][1].requests.items():
                if direction == "outbound" and dest == destination:
                    counts[subset] = counts.get(subset, 0.0) + n
        return counts


def host_traffic(host: HostRecord, window: float) -> dict[tuple[str, str, str], Traffic]:
    win = host.window(window)
    if win is None:
        return {}
    elapsed, old, new = win
    counts: dict[tuple[str, str, str], list[float]] = {}
    for key, n in delta_map(new.requests, old.requests).items():
        direction, src, dest, subset, code = key
        if direction != "outbound":
            continue
        slot = counts.setdefault((src, dest, subset), [0.0, 0.0])
        slot[0] += n
        slot[1] += n if is_error(code) else 0.0
    out: dict[tuple[str, str, str], Traffic] = {}
    for (src, dest, subset), (total, errors) in counts.items():
        # the duration histogram has no source label: a host's latency to a destination
        # subset is shared by the services on it that call that destination
        latency = bucket_delta(new.latency.get(("outbound", dest, subset), ()),
                               old.latency.get(("outbound", dest, subset)))
        out[(src, dest, subset)] = Traffic(total / elapsed, total, errors, latency)
    return out


def sum_traffic(parts: Iterable[Traffic]) -> Traffic:
    total = Traffic()
    for part in parts:
        total = total + part
    return total
