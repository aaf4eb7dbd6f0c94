"""One path under test: warm it up, load it at a fixed concurrency while sampling the proxies'
CPU time, then measure latency at concurrency 1. Several rounds are summarised by their medians
(the rounds of all paths are interleaved by the caller, so a slow spell of the machine touches
every path alike)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from bench_h2load import H2loadReport, run_h2load
from bench_observe import cpu_seconds
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
    cpu_us_per_request: dict[str, float]   # proxy process label -> CPU µs per request


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
        )


async def warm_up(target: Target, settings: LoadSettings) -> None:
    if settings.warmup_seconds > 0:
        await _load(target, settings, settings.warmup_seconds)


async def measure_round(target: Target, settings: LoadSettings) -> Sample:
    cpu_before = cpu_seconds(target.proxies)
    load = await _load(target, settings, settings.seconds)
    cpu_after = cpu_seconds(target.proxies)
    latency = await _load(target, settings, settings.latency_seconds, one_at_a_time=True)
    per_request = {
        label: (cpu_after[label] - cpu_before[label]) * 1e6 / max(load.requests, 1)
        for label in cpu_after if label in cpu_before
    }
    return Sample(load, latency, per_request)


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
