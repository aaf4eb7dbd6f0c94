"""One path under test: warm it up, load it at a fixed concurrency while sampling the proxies'
CPU time, then measure latency at concurrency 1. Several rounds are summarised by their medians
(the rounds of all paths are interleaved by the caller, so a slow spell of the machine touches
every path alike)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import trio
from bench_h2load import H2loadReport, run_h2load
from bench_observe import accepted_connections, cpu_by_process, cpu_seconds
from bench_stack import H2LOAD, Target
from bench_wrk import WrkReport, run_wrk

LoadReport = WrkReport | H2loadReport


@dataclass(frozen=True)
class LoadSettings:
    wrk: str              # path of the wrk program
    connections: int      # concurrency of the throughput run
    threads: int
    seconds: int          # duration of one throughput run
    latency_seconds: int  # duration of one c=1 run
    warmup_seconds: int   # before a path's first round: fills the proxies' connection pools
    rounds: int           # throughput + latency runs per path
    h2load: str | None = None   # path of the h2load program (the h2 paths)
    h2_connections: int = 8     # h2load -c of the throughput run
    h2_streams: int = 16        # h2load -m: concurrent streams per connection
    scratch: Path = Path(".")   # where h2load writes its per-request log


@dataclass(frozen=True)
class Sample:
    """One round of one path."""

    load: LoadReport                       # at LoadSettings.connections (h2: c x m streams)
    latency: LoadReport                    # at c=1 (h2: one connection, one stream)
    cpu_us_per_request: dict[str, float]   # proxy label -> CPU µs per request (all its processes)
    # a meshd with workers: each of its processes (supervisor, worker i) -> CPU µs per request
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    # a meshd with workers: each worker -> the connections it had accepted halfway through the
    # throughput run (how the load generator's connections spread)
    connections: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurement:
    """A path's rounds summarised: medians, and failures summed over all runs."""

    name: str
    description: str
    requests_per_second: float
    p50_ms: float | None
    p99_ms: float | None
    load_p50_ms: float | None    # under load: h2load's log (wrk's throughput run has none)
    load_p99_ms: float | None
    cpu_us_per_request: dict[str, float]
    requests: int          # in all throughput runs
    failures: int          # non-2xx answers + socket errors (h2load: failed), all runs
    rounds: int
    tool: str = "wrk"      # the load generator: wrk (HTTP/1.1) or h2load (HTTP/2)
    errored: int = 0       # h2load: failed because the stream or connection failed, all runs
    unfinished: int = 0    # h2load: in flight when the throughput runs ended (at most c x m)
    stalled: int = 0       # h2load: runs (throughput or c=1) that started requests, finished none
    # medians per process of a meshd with workers, and each round's connections per worker
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    connections: tuple[dict[str, int], ...] = ()

    @property
    def proxy_cpu_us(self) -> float | None:
        """All proxy processes of the path together; None for the direct path."""
        return sum(self.cpu_us_per_request.values()) if self.cpu_us_per_request else None

    @classmethod
    def of(cls, target: Target, samples: Sequence[Sample]) -> Measurement:
        labels = [label for label in samples[0].cpu_us_per_request
                  if all(label in s.cpu_us_per_request for s in samples)]
        return cls(
            name=target.name, description=target.description,
            requests_per_second=median(s.load.requests_per_second for s in samples),
            p50_ms=_median_of(s.latency.percentile(50.0) for s in samples),
            p99_ms=_median_of(s.latency.percentile(99.0) for s in samples),
            load_p50_ms=_median_of(s.load.percentile(50.0) for s in samples),
            load_p99_ms=_median_of(s.load.percentile(99.0) for s in samples),
            cpu_us_per_request={label: median(s.cpu_us_per_request[label] for s in samples)
                                for label in labels},
            requests=sum(s.load.requests for s in samples),
            failures=sum(r.failures for s in samples for r in (s.load, s.latency)),
            rounds=len(samples),
            tool=target.tool,
            errored=sum(r.errored for s in samples for r in (s.load, s.latency)
                        if isinstance(r, H2loadReport)),
            unfinished=sum(s.load.started - s.load.requests for s in samples
                           if isinstance(s.load, H2loadReport)),
            stalled=sum(r.stalled for s in samples for r in (s.load, s.latency)
                        if isinstance(r, H2loadReport)),
            cpu_by_process=_medians([s.cpu_by_process for s in samples]),
            connections=tuple(s.connections for s in samples if s.connections),
        )


async def warm_up(target: Target, settings: LoadSettings) -> None:
    if settings.warmup_seconds > 0:
        await _load(target, settings, settings.warmup_seconds)


async def measure_round(target: Target, settings: LoadSettings) -> Sample:
    """The throughput run with the proxies' CPU time around it (and, for a meshd with workers,
    each process's, and each worker's accepted connections halfway through), then the c=1
    run."""
    cpu_before, split_before = cpu_seconds(target.proxies), cpu_by_process(target.proxies)
    connections: dict[str, int] = {}
    loads: list[LoadReport] = []

    async def run_load() -> None:
        loads.append(await _load(target, settings, settings.seconds))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_load)
        if split_before:
            await trio.sleep(settings.seconds / 2)
            connections = accepted_connections(target.proxies)
    load = loads[0]
    cpu_after, split_after = cpu_seconds(target.proxies), cpu_by_process(target.proxies)
    latency = await _load(target, settings, settings.latency_seconds, one_at_a_time=True)
    requests = max(load.requests, 1)
    return Sample(load, latency, _per_request(cpu_before, cpu_after, requests),
                  _per_request(split_before, split_after, requests), connections)


def _per_request(before: dict[str, float], after: dict[str, float],
                 requests: int) -> dict[str, float]:
    return {label: (after[label] - before[label]) * 1e6 / requests
            for label in after if label in before}


def _medians(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per label present in every round, the median over the rounds."""
    labels = [label for label in rounds[0] if all(label in r for r in rounds)] if rounds else []
    return {label: median(r[label] for r in rounds) for label in labels}


async def _load(target: Target, settings: LoadSettings, seconds: int, *,
                one_at_a_time: bool = False) -> LoadReport:
    """One run of the target's load generator: at the settings' concurrency, or with one
    connection and one request at a time (the latency run)."""
    if target.tool == H2LOAD:
        if settings.h2load is None:
            raise ValueError(f"{target.name} needs h2load")
        connections, streams = ((1, 1) if one_at_a_time
                                else (settings.h2_connections, settings.h2_streams))
        return await run_h2load(settings.h2load, target.url, connections=connections,
                                streams=streams, seconds=seconds,
                                log_file=settings.scratch / f"h2load-{target.name}.log")
    if one_at_a_time:
        return await run_wrk(settings.wrk, target.url, connections=1, threads=1,
                             seconds=seconds, latency=True)
    return await run_wrk(settings.wrk, target.url, connections=settings.connections,
                         threads=settings.threads, seconds=seconds)


def _median_of(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None
