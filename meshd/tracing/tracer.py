"""The tracer of one meshd: span records handed off by the proxy, exported by one trio task.

    Tracer.finish   (request path, synchronous)  a sampled request's SpanRecord into a
                                                 bounded list; full: the span is dropped and
                                                 counted, the request never waits
    Tracer.run      (the daemon's nursery)       every second, or as soon as a batch is full,
                                                 encodes up to BATCH_SIZE spans and POSTs them
                                                 to the OTLP/HTTP endpoint under a timeout

A failed export (no answer in time, refused, not 2xx) drops its batch, counts it, and holds
the next export back with exponential backoff; spans keep queueing up to the bound meanwhile,
so an unreachable collector costs a bounded amount of memory and no request time.

Why not the OpenTelemetry SDK: its BatchSpanProcessor runs its own thread and takes a lock per
span, and its span objects cost several times this record on the request path (``bench/
trace_span_cost.py`` measures both); this keeps the request path to one append and leaves all
encoding to the exporter task, with the official protobuf messages (``meshd.tracing.spans``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import trio

from meshd.backoff import backoff_delay
from meshd.config.schema import HostConfig
from meshd.metrics import Metrics
from meshd.proxy.core.trace import RequestIdentity, Sampler
from meshd.tracing.sampling import make_sampler
from meshd.tracing.settings import TracingSettings, resolve
from meshd.tracing.spans import HostResource, SpanRecord, encode

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

QUEUE_LIMIT = 2048  # spans waiting for export; more are dropped
BATCH_SIZE = 512  # spans per export request
EXPORT_INTERVAL = 1.0  # seconds between exports when no batch fills up
FLUSH_ON_STOP = 2.0  # seconds a stopping exporter spends sending what is left
BACKOFF_BASE, BACKOFF_CAP = 1.0, 30.0  # after a failed export
CONTENT_TYPE = "application/x-protobuf"


class Tracer:
    """``sample`` is None when tracing is off: then ``finish`` returns at once and
    ``identify`` leaves the received sampled flag as it is."""

    def __init__(self, settings: TracingSettings | None, host: HostResource,
                 metrics: Metrics | None = None, *, queue_limit: int = QUEUE_LIMIT,
                 batch_size: int = BATCH_SIZE, interval: float = EXPORT_INTERVAL,
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.host = host
        self.sample: Sampler | None = (
            make_sampler(settings.sampler, settings.ratio) if settings is not None else None)
        self.queue_limit = queue_limit
        self.batch_size = batch_size
        self.interval = interval
        self._rand = rand
        self._queue: list[SpanRecord] = []
        self._batch_full = trio.Event()
        self.exported = self.dropped = self.failures = 0
        if metrics is not None:
            self._count_dropped: Callable[[str, int], None] = (
                lambda reason, n: metrics.trace_spans_dropped.labels(reason).inc(n))
            self._count_exported: Callable[[int], None] = metrics.trace_spans_exported.inc
            self._count_failure: Callable[[], None] = metrics.trace_export_failures.inc
        else:
            self._count_dropped = lambda reason, n: None
            self._count_exported = lambda n: None
            self._count_failure = lambda: None

    @classmethod
    def off(cls) -> Tracer:
        return cls(None, HostResource("", ""))

    @classmethod
    def for_host(cls, config: HostConfig, environ: Mapping[str, str],
                 metrics: Metrics | None = None) -> Tracer:
        """The tracer ``config``'s ``[tracing]`` and the ``OTEL_*`` variables of ``environ``
        ask for (``ConfigError`` for a value meshd cannot use)."""
        settings = resolve(config.tracing, environ, config.source or "meshd.toml")
        service_name = settings.service_name if settings is not None else ""
        return cls(settings, HostResource(config.node, config.trust_domain, service_name),
                   metrics)

    @property
    def enabled(self) -> bool:
        return self.sample is not None

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the request path ----------------------------------------------------------------------

    def finish(self, kind: int, ids: RequestIdentity, duration: float, *, service: str,
               peer: str, destination: str, method: bytes, target: bytes, status: int,
               subset: str = "", route: str = "", endpoint: str = "", tries: int = 0,
               error: str = "", detail: str = "", grpc_status: int | None = None) -> None:
        """One hop of a request ended ``duration`` seconds after it started: keep its span
        if the request is sampled and there is room."""
        if self.sample is None or not ids.sampled:
            return
        if len(self._queue) >= self.queue_limit:
            self.dropped += 1
            self._count_dropped("queue_full", 1)
            return
        self._queue.append(SpanRecord(
            kind, service, peer, ids.traceparent, ids.parent_span_id, time.time_ns(), duration,
            method, target, status, destination, subset, route, endpoint, ids.request_id,
            tries, error, detail, grpc_status))
        if len(self._queue) >= self.batch_size:
            self._batch_full.set()

    # -- the exporter task ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Export until cancelled, then send what is left (bounded by ``FLUSH_ON_STOP``).
        Tracing off: returns at once."""
        settings = self.settings
        if settings is None:
            task_status.started()
            return
        # the HTTP client comes with tracing: a worker process that exports nothing never
        # loads it (docs/performance.md, "A smaller process")
        import httpx

        headers = {**dict(settings.headers), "content-type": CONTENT_TYPE}
        async with httpx.AsyncClient(headers=headers, timeout=None) as client:
            log.info("exporting spans to %s (sampler %s%s)", settings.endpoint, settings.sampler,
                     f", ratio {settings.ratio:g}" if "ratio" in settings.sampler else "")
            task_status.started()
            try:
                await self._export_loop(client, settings)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_ON_STOP):
                    while self._queue and await self._export_batch(client, settings):
                        pass

    async def _export_loop(self, client: httpx.AsyncClient, settings: TracingSettings) -> None:
        failed_in_a_row = 0
        while True:
            with trio.move_on_after(self.interval):
                await self._batch_full.wait()
            self._batch_full = trio.Event()
            while self._queue:
                if await self._export_batch(client, settings):
                    if failed_in_a_row:
                        log.info("exporting spans to %s again", settings.endpoint)
                    failed_in_a_row = 0
                    continue
                failed_in_a_row += 1
                await trio.sleep(backoff_delay(failed_in_a_row - 1, self._rand(),
                                               base=BACKOFF_BASE, cap=BACKOFF_CAP))
                break

    async def _export_batch(self, client: httpx.AsyncClient, settings: TracingSettings) -> bool:
        """Send the oldest batch; False (and the batch dropped, counted) if it failed."""
        import httpx  # loaded by ``run`` already: a lookup

        batch = self._queue[:self.batch_size]
        del self._queue[:self.batch_size]
        body = encode(batch, self.host)
        problem = ""
        try:
            with trio.fail_after(settings.timeout):
                response = await client.post(settings.endpoint, content=body)
            if 200 <= response.status_code < 300:
                self.exported += len(batch)
                self._count_exported(len(batch))
                return True
            problem = f"HTTP {response.status_code}"
        except trio.TooSlowError:
            problem = f"no answer within {settings.timeout:g}s"
        except httpx.HTTPError as exc:
            problem = str(exc) or type(exc).__name__
        self.failures += 1
        self.dropped += len(batch)
        self._count_failure()
        self._count_dropped("export_failed", len(batch))
        log.warning("cannot export %d span(s) to %s: %s; dropped", len(batch),
                    settings.endpoint, problem)
        return False
