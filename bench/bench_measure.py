"""One path under test: warm it up, load it at a fixed concurrency while sampling the proxies'
CPU time, then measure latency at concurrency 1. Several rounds are summarised by their medians
(the rounds of all paths are interleaved by the caller, so a slow spell of the machine touches
every path alike)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import median

from bench_observe import cpu_seconds
from bench_stack import Target
from bench_wrk import WrkReport, run_wrk


@dataclass(frozen=True)
class LoadSettings:
    wrk: str              # path of the wrk program
    connections: int      # concurrency of the throughput run
    threads: int
    seconds: int          # duration of one throughput run
    latency_seconds: int  # duration of one c=1 run
    warmup_seconds: int   # before a path's first round: fills the proxies' connection pools
    rounds: int           # throughput + latency runs per path


@dataclass(frozen=True)
class Sample:
    """One round of one path."""

    load: WrkReport                        # at LoadSettings.connections
    latency: WrkReport                     # at c=1
    cpu_us_per_request: dict[str, float]   # proxy process label -> CPU µs per request


@dataclass(frozen=True)
class Measurement:
    """A path's rounds summarised: medians, and failures summed over all runs."""

    name: str
    description: str
    requests_per_second: float
    p50_ms: float | None
    p99_ms: float | None
    cpu_us_per_request: dict[str, float]
    requests: int          # in all throughput runs
    failures: int          # non-2xx answers + socket errors, all runs
    rounds: int

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
            cpu_us_per_request={label: median(s.cpu_us_per_request[label] for s in samples)
                                for label in labels},
            requests=sum(s.load.requests for s in samples),
            failures=sum(r.non_2xx + r.socket_errors
                         for s in samples for r in (s.load, s.latency)),
            rounds=len(samples),
        )


async def warm_up(target: Target, settings: LoadSettings) -> None:
    if settings.warmup_seconds > 0:
        await run_wrk(settings.wrk, target.url, connections=settings.connections,
                      threads=settings.threads, seconds=settings.warmup_seconds)


async def measure_round(target: Target, settings: LoadSettings) -> Sample:
    cpu_before = cpu_seconds(target.proxies)
    load = await run_wrk(settings.wrk, target.url, connections=settings.connections,
                         threads=settings.threads, seconds=settings.seconds)
    cpu_after = cpu_seconds(target.proxies)
    latency = await run_wrk(settings.wrk, target.url, connections=1, threads=1,
                            seconds=settings.latency_seconds, latency=True)
    per_request = {
        label: (cpu_after[label] - cpu_before[label]) * 1e6 / max(load.requests, 1)
        for label in cpu_after if label in cpu_before
    }
    return Sample(load, latency, per_request)


def _median_of(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None
