"""Events the console derives by comparing successive observations: config applied or refused,
endpoint changes and ejections, certificate renewals, registry outages, hosts lost and found.
Pure: previous values and the new observation in, events out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tui.observe import HostPoll, Instance, RegistryPoll
from tui.prom import MetricSample, counter_delta

STALE_AFTER = 10.0  # seconds: a meshd whose registry view is older than this is "stale"


@dataclass(frozen=True)
class Event:
    at: float
    kind: str  # config | endpoint | cert | registry | host | console
    severity: str  # info | warn | error
    text: str


def split_text(routes: Mapping[str, Any] | None, destination: str) -> str:
    """``v1=90 v2=10`` for a destination of a canonical route table ("no split" if none)."""
    dest = _destination(routes, destination)
    split = dest.get("split") if dest else None
    if not isinstance(split, dict) or not split:
        return "no split"
    return " ".join(f"{k}={v}" for k, v in split.items())


def _destination(routes: Mapping[str, Any] | None, name: str) -> Mapping[str, Any] | None:
    if not routes:
        return None
    dests = routes.get("destinations")
    if not isinstance(dests, dict):
        return None
    dest = dests.get(name)
    return dest if isinstance(dest, dict) else None


def config_reason(error: str) -> str:
    """A refused table's first problem without the "registry kv <key>: " source prefix."""
    line = _first_line(error, 10_000)
    return line.split(": ", 1)[1] if line.startswith("registry kv ") and ": " in line else line


def _first_line(text: str, limit: int = 120) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- the registry ------------------------------------------------------------------------------


def registry_events(
    previous: RegistryPoll | None, was_reachable: bool, outage_since: float | None,
    new: RegistryPoll,
) -> list[Event]:
    """``previous`` is the last successful answer (None before the first)."""
    at = new.at
    if not new.ok:
        if was_reachable:
            return [Event(at, "registry", "error",
                          f"registry unreachable: {_first_line(new.error)} "
                          "(showing the last known view)")]
        return []
    events: list[Event] = []
    if not was_reachable and outage_since is not None:
        events.append(Event(at, "registry", "info",
                            f"registry reachable again after {at - outage_since:.0f}s"))
    if previous is None:
        services = {i.service for i in new.instances}
        events.append(Event(at, "registry", "info",
                            f"registry: {len(new.instances)} instance(s) of "
                            f"{len(services)} service(s); route table at index "
                            f"{new.routes_index}"))
        return events
    events.extend(_instance_events(previous.instances, new.instances, at))
    if new.routes_index != previous.routes_index:
        changed = [name for name in _dest_names(previous.routes, new.routes)
                   if split_text(previous.routes, name) != split_text(new.routes, name)]
        detail = "; ".join(f"{n} {split_text(previous.routes, n)} → {split_text(new.routes, n)}"
                           for n in changed) or "no split changed"
        events.append(Event(at, "config", "info",
                            f"route table changed in the registry (index "
                            f"{previous.routes_index} → {new.routes_index}): {detail}"))
    return events


def _dest_names(*tables: Mapping[str, Any] | None) -> list[str]:
    names: set[str] = set()
    for table in tables:
        dests = table.get("destinations") if table else None
        if isinstance(dests, dict):
            names.update(dests)
    return sorted(names)


def _instance_events(old: tuple[Instance, ...], new: tuple[Instance, ...],
                     at: float) -> list[Event]:
    before = {(i.service, i.instance_id): i for i in old}
    after = {(i.service, i.instance_id): i for i in new}
    events: list[Event] = []
    for key, inst in sorted(after.items()):
        label = f"{inst.service} {inst.version} on {inst.node}"
        prev = before.get(key)
        if prev is None:
            events.append(Event(at, "endpoint", "info", f"{label} registered ({inst.status})"))
        elif prev.status != inst.status:
            severity = "info" if inst.healthy else "error"
            events.append(Event(at, "endpoint", severity,
                                f"{label}: {prev.status} → {inst.status}"))
    for key, inst in sorted(before.items()):
        if key not in after:
            events.append(Event(at, "endpoint", "warn",
                                f"{inst.service} {inst.version} on {inst.node} deregistered"))
    return events


# -- one meshd -----------------------------------------------------------------------------------


def host_events(
    previous_state: Mapping[str, Any] | None, was_reachable: bool | None, new: HostPoll,
    previous_metrics: MetricSample | None = None,
) -> list[Event]:
    """``previous_state`` is the last state read from this host (None if never), and
    ``previous_metrics`` its last scrape; ``was_reachable`` is None for a host seen for the
    first time."""
    at, node = new.at, new.node
    if not new.ok:
        if was_reachable is None or was_reachable:
            return [Event(at, "host", "error",
                          f"{node} ({new.admin}) unreachable: {_first_line(new.error)}")]
        return []
    assert new.state is not None
    state = new.state
    events: list[Event] = []
    if was_reachable is None:
        events.append(Event(at, "host", "info",
                            f"{node} found at {new.admin}: generation "
                            f"{state.get('generation', '?')}, meshd {state.get('version', '?')}"))
    elif not was_reachable:
        events.append(Event(at, "host", "info", f"{node} reachable again"))
    if previous_state is None:
        if state.get("config_error"):
            reason = _first_line(config_reason(str(state["config_error"])))
            events.append(Event(at, "config", "error",
                                f"{node} refuses the stored route table: {reason}"))
        return events
    events.extend(_config_events(node, previous_state, state, at))
    events.extend(_cert_events(node, previous_state, state, at))
    events.extend(_staleness_events(node, previous_state, state, at))
    events.extend(_local_health_events(node, previous_state, state, at))
    events.extend(_ejection_events(node, previous_state, state, at))
    if previous_metrics is not None and new.metrics is not None:
        events.extend(_ejection_count_events(node, previous_metrics, new.metrics, at))
    return events


def _config_events(node: str, old: Mapping[str, Any], new: Mapping[str, Any],
                   at: float) -> list[Event]:
    events: list[Event] = []
    old_gen, new_gen = old.get("generation"), new.get("generation")
    if isinstance(new_gen, int) and isinstance(old_gen, int) and new_gen > old_gen:
        routes = new.get("routes")
        splits = ", ".join(f"{n} {split_text(routes, n)}" for n in _dest_names(routes))
        events.append(Event(at, "config", "info",
                            f"{node} applied route table generation {new_gen}"
                            + (f": {splits}" if splits else "")))
    error = str(new.get("config_error") or "")
    if error and error != str(old.get("config_error") or ""):
        events.append(Event(at, "config", "error",
                            f"{node} refused a route table (generation {new_gen} stays): "
                            f"{_first_line(config_reason(error))}"))
    return events


def _cert_events(node: str, old: Mapping[str, Any], new: Mapping[str, Any],
                 at: float) -> list[Event]:
    def serials(state: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
        certs = state.get("certificates") or []
        return {str(c.get("service")): c for c in certs if isinstance(c, dict)}

    before, after = serials(old), serials(new)
    events = []
    for service, cert in sorted(after.items()):
        prev = before.get(service)
        if prev is not None and prev.get("serial") != cert.get("serial"):
            events.append(Event(at, "cert", "info",
                                f"{node} renewed the certificate of {service} (expires "
                                f"{cert.get('not_after', '?')})"))
    return events


def _staleness(state: Mapping[str, Any]) -> tuple[float, str]:
    reg = state.get("registry") or {}
    stale = float(reg.get("staleness_seconds") or 0.0)
    errors = [str(w.get("error")) for w in reg.get("watches") or []
              if isinstance(w, dict) and w.get("error")]
    return stale, (errors[0] if errors else "")


def _staleness_events(node: str, old: Mapping[str, Any], new: Mapping[str, Any],
                      at: float) -> list[Event]:
    (was, _), (now, error) = _staleness(old), _staleness(new)
    if now >= STALE_AFTER > was:
        why = f": {_first_line(error)}" if error else ""
        return [Event(at, "registry", "warn",
                      f"{node}'s registry view is stale ({now:.0f}s){why}")]
    if was >= STALE_AFTER > now:
        return [Event(at, "registry", "info", f"{node}'s registry view is fresh again")]
    return []


def _local_health_events(node: str, old: Mapping[str, Any], new: Mapping[str, Any],
                         at: float) -> list[Event]:
    def health(state: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        return {str(s.get("name")): (str(s.get("health")), str(s.get("health_output", "")))
                for s in state.get("services") or [] if isinstance(s, dict)}

    before, after = health(old), health(new)
    events = []
    for name, (status, output) in sorted(after.items()):
        prev = before.get(name)
        if prev is not None and prev[0] != status:
            severity = "info" if status == "passing" else "error"
            events.append(Event(at, "endpoint", severity,
                                f"{node}: local {name} {prev[0]} → {status} "
                                f"({_first_line(output, 60)})"))
    return events


def _ejection_events(node: str, old: Mapping[str, Any], new: Mapping[str, Any],
                     at: float) -> list[Event]:
    """Endpoints this meshd ejected (outlier detection) or let back in."""

    def ejected(state: Mapping[str, Any]) -> dict[tuple[str, str], bool]:
        out: dict[tuple[str, str], bool] = {}
        for dest, view in (state.get("destinations") or {}).items():
            for ep in (view or {}).get("endpoints") or []:
                if isinstance(ep, dict):
                    out[(dest, str(ep.get("instance_id")))] = bool(ep.get("ejected"))
        return out

    before, after = ejected(old), ejected(new)
    events = []
    for (dest, instance), now in sorted(after.items()):
        was = before.get((dest, instance), False)
        if now and not was:
            events.append(Event(at, "endpoint", "error",
                                f"{node} ejected {dest} endpoint {instance}"))
        elif was and not now:
            events.append(Event(at, "endpoint", "info",
                                f"{node} let {dest} endpoint {instance} back in"))
    return events


def _ejection_count_events(node: str, old: MetricSample, new: MetricSample,
                           at: float) -> list[Event]:
    """Ejections counted in ``meshd_outlier_ejections_total`` since the last scrape."""
    events = []
    for (dest, reason), count in sorted(new.ejections.items()):
        n = counter_delta(count, old.ejections.get((dest, reason), 0.0))
        if n > 0:
            events.append(Event(at, "endpoint", "error",
                                f"{node} ejected {n:.0f} endpoint(s) of {dest} ({reason})"))
    return events
