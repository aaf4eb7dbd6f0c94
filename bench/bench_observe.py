"""What the proxies said while under load: CPU time, meshd's own counters, log lines, restarts.

``MeshObserver.snapshot`` is taken before and after the meshd paths' load; ``notes`` compares
the two and describes, one line each, what a person should look at: non-200 answers counted by
meshd, connection errors, warnings and errors in a meshd's log, a meshd that was restarted.
Requests are listed by code and source: host B's inbound requests ``from loadgen`` came over
mTLS from host A (two hops), ``from unknown`` as plaintext (the permissive single hop).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from meshd.dev.supervisor import Child

WATCHED_SAMPLES = ("meshd_requests_total", "meshd_connection_errors_total")
NOTABLE_LOG = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|^--- meshd up: started")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")
MAX_LOG_LINES = 8

SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]   # (process, sample name, labels)


WORKER_MODULE = "meshd.workers.worker"   # a meshd worker's command line: python -m ... FD


def process_tree(child: Child) -> list[tuple[str, psutil.Process]]:
    """The processes of one proxy, each with a label: the child itself, and (a meshd with
    ``workers = N``) its worker processes as ``<label> worker <i>`` (oldest first) and any other
    descendant as ``<label> child <i>``; then the child itself is ``<label> supervisor``."""
    if child.pid is None:
        return []
    try:
        root = psutil.Process(child.pid)
        below = sorted(root.children(recursive=True), key=_created)
    except psutil.Error:
        return []
    if not below:
        return [(child.label, root)]
    workers = [p for p in below if _is_worker(p)]
    others = [p for p in below if p not in workers]
    return [(f"{child.label} supervisor", root),
            *((f"{child.label} worker {i}", p) for i, p in enumerate(workers, 1)),
            *((f"{child.label} child {i}", p) for i, p in enumerate(others, 1))]


def _created(proc: psutil.Process) -> float:
    try:
        return float(proc.create_time())
    except psutil.Error:
        return 0.0


def _is_worker(proc: psutil.Process) -> bool:
    try:
        return WORKER_MODULE in proc.cmdline()
    except psutil.Error:
        return False


def _cpu(proc: psutil.Process) -> float | None:
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def cpu_seconds(children: Iterable[Child]) -> dict[str, float]:
    """User + system CPU seconds so far of each child's current process and all its descendants
    (a meshd with workers: the supervisor and every worker; absent if it is not running)."""
    out: dict[str, float] = {}
    for child in children:
        times = [t for _, proc in process_tree(child) if (t := _cpu(proc)) is not None]
        if times:
            out[child.label] = sum(times)
    return out


def cpu_by_process(children: Iterable[Child]) -> dict[str, float]:
    """CPU seconds so far of each process of the children that have more than one (a meshd's
    supervisor and workers, labelled as ``process_tree`` does)."""
    out: dict[str, float] = {}
    for child in children:
        tree = process_tree(child)
        if len(tree) > 1:
            out |= {label: t for label, proc in tree if (t := _cpu(proc)) is not None}
    return out


def accepted_connections(children: Iterable[Child]) -> dict[str, int]:
    """For the children with workers: how many established TCP connections each worker holds
    on one of its own listening sockets (the connections it accepted), now."""
    out: dict[str, int] = {}
    for child in children:
        tree = process_tree(child)
        for label, proc in tree[1:] if len(tree) > 1 else ():
            try:
                conns = proc.net_connections(kind="tcp")
            except psutil.Error:
                continue
            listening = {(c.laddr.ip, c.laddr.port) for c in conns
                         if c.status == psutil.CONN_LISTEN}
            out[label] = sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED
                             and ((c.laddr.ip, c.laddr.port) in listening
                                  or ("0.0.0.0", c.laddr.port) in listening))
    return out


@dataclass(frozen=True)
class MeshSnapshot:
    counters: dict[SampleKey, float]
    log_sizes: dict[str, int]
    starts: dict[str, int]


class MeshObserver:
    """Watches the meshd processes of the mesh path (their admin API, logs and restarts)."""

    def __init__(self, meshds: Sequence[Child], admin_urls: dict[str, str]) -> None:
        self.meshds = meshds
        self.admin_urls = admin_urls    # child label -> http://address:port

    async def snapshot(self, client: httpx.AsyncClient) -> MeshSnapshot:
        counters: dict[SampleKey, float] = {}
        for child in self.meshds:
            counters |= await self._counters(client, child.label)
        return MeshSnapshot(
            counters=counters,
            log_sizes={c.label: _size(c) for c in self.meshds},
            starts={c.label: c.starts for c in self.meshds},
        )

    def notes(self, before: MeshSnapshot, after: MeshSnapshot, probe_connections: int = 0) -> \
            list[str]:
        """``probe_connections``: wrk runs against a permissive inbound listener (the single
        hop). Before each run wrk connects once and closes without sending anything, which
        that listener, having peeked at nothing, takes for TLS and counts as ``handshake_eof``:
        up to that many are expected."""
        notes = [*_counter_notes(before.counters, after.counters, probe_connections)]
        for child in self.meshds:
            if after.starts[child.label] != before.starts[child.label]:
                exits = ", ".join(str(c) for c in child.exit_codes[-3:])
                notes.append(f"{child.label} was restarted under load (exit codes: {exits})")
            notes += _log_notes(child, before.log_sizes[child.label])
        return notes

    async def _counters(self, client: httpx.AsyncClient, label: str) -> dict[SampleKey, float]:
        url = f"{self.admin_urls[label]}/metrics"
        try:
            response = await client.get(url)
        except httpx.HTTPError:
            return {}
        out: dict[SampleKey, float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name in WATCHED_SAMPLES:
                    key = (label, sample.name, tuple(sorted(sample.labels.items())))
                    out[key] = sample.value
        return out


def _counter_notes(before: dict[SampleKey, float], after: dict[SampleKey, float],
                   probe_connections: int = 0) -> list[str]:
    """One line per process and counter: the requests meshd counted by code and source
    (``200 x 9812 from loadgen``), and any connection errors (up to ``probe_connections``
    inbound ``handshake_eof`` are wrk's connect checks, said so and not unusual)."""
    grouped: dict[tuple[str, str], list[str]] = {}
    unusual = False
    for key in sorted(after):
        delta = after[key] - before.get(key, 0.0)
        if delta <= 0:
            continue
        label, name, labels = key
        fields = dict(labels)
        if name == "meshd_requests_total":
            what = f"{label} {fields.get('direction', '?')} requests (warm-ups + all runs)"
            entry = f"{fields.get('code', '?')} x {delta:.0f} from {fields.get('source', '?')}"
            unusual |= fields.get("code") != "200"
        else:
            what = f"{label} connection errors"
            entry = f"{fields.get('direction', '?')}/{fields.get('reason', '?')} x {delta:.0f}"
            if (fields.get("direction"), fields.get("reason")) == ("inbound", "handshake_eof") \
                    and delta <= probe_connections:
                entry += (f" (expected: wrk connects and closes once before each of its "
                          f"{probe_connections} runs against the single hop)")
            else:
                unusual = True
        grouped.setdefault((label, what), []).append(entry)
    lines = [f"{what}: {', '.join(entries)}" for (_, what), entries in grouped.items()]
    if lines and not unusual:
        lines.append("meshd counted only 200s and no unexpected connection errors")
    return lines


def hop_gaps(counters: dict[SampleKey, float], outer: str, inner: str,
             source: str) -> dict[str, tuple[float, float]]:
    """Per destination, the requests the ``outer`` meshd finished outbound (any code) and
    those the ``inner`` meshd answered inbound from ``source``, where they differ. Every request
    of a two-hop path is counted by both once it is over: a gap that stays means requests the
    inner hop answered and the outer one never finished (or never sent)."""
    totals: dict[str, list[float]] = {}
    for (label, name, labels), value in counters.items():
        if name != "meshd_requests_total":
            continue
        fields = dict(labels)
        if label == outer and fields.get("direction") == "outbound":
            totals.setdefault(fields.get("destination", "?"), [0.0, 0.0])[0] += value
        elif (label == inner and fields.get("direction") == "inbound"
              and fields.get("source") == source):
            totals.setdefault(fields.get("destination", "?"), [0.0, 0.0])[1] += value
    return {dest: (a, b) for dest, (a, b) in sorted(totals.items()) if a != b}


def _log_notes(child: Child, offset: int) -> list[str]:
    lines = _read_from(child, offset)
    notable = [line for line in lines if NOTABLE_LOG.search(line)]
    if not notable:
        return []
    distinct: dict[str, int] = {}
    for line in notable:
        message = _TIMESTAMP.sub("", line)
        distinct[message] = distinct.get(message, 0) + 1
    shown = [f"  {n} x {message}" for message, n in list(distinct.items())[:MAX_LOG_LINES]]
    more = len(distinct) - MAX_LOG_LINES
    return [f"{child.label} logged {len(notable)} warning/error line(s) under load "
            f"({child.spec.log_path}):", *shown,
            *([f"  ... and {more} more distinct lines"] if more > 0 else [])]


def _size(child: Child) -> int:
    try:
        return child.spec.log_path.stat().st_size
    except OSError:
        return 0


def _read_from(child: Child, offset: int) -> list[str]:
    try:
        with child.spec.log_path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace").splitlines()
    except OSError:
        return []
