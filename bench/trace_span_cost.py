"""What one hop's span costs: meshd's span record against the OpenTelemetry SDK, in one run.

Both sides do what a hop does for a sampled request: read the incoming ``traceparent``, make
this hop's span id and the ``traceparent`` it sends on, and, once the response is in, record the
span with the same attributes; then the batches are encoded as OTLP protobuf for export.

  meshd   ``meshd.proxy.core.trace.identify`` (parent-based sampler) + ``Tracer.finish`` (a
          record appended to a bounded list); at export, ``meshd.tracing.spans.encode`` per
          batch of 512, in the exporter task
  sdk     ``TraceContextTextMapPropagator.extract`` + ``Tracer.start_span`` (with the
          attributes) + ``inject`` + ``set_attribute``/``set_status`` + ``Span.end`` through
          a ``BatchSpanProcessor`` (its own thread); its exporter encodes each batch with the
          SDK's own OTLP encoder and sends nothing (so both sides pay encoding, neither a POST)

Printed per span: the request path's time (what a request waits for, in the calling thread)
and all CPU of the process (the SDK's thread included), as the median of ``--rounds``.

    .venv/bin/python bench/trace_span_cost.py [--spans 20000] [--rounds 5] [--json]

Needs ``opentelemetry-sdk`` and ``opentelemetry-exporter-otlp-proto-common`` for the sdk side
(not meshd dependencies: ``pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http``);
without them only meshd's figures are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from statistics import median
from typing import Any

from meshd.proxy.core.trace import identify
from meshd.tracing.settings import TracingSettings
from meshd.tracing.spans import CLIENT, HostResource, encode
from meshd.tracing.tracer import BATCH_SIZE, Tracer

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
HEADERS = ((b"host", b"payments"), (b"traceparent", TRACEPARENT), (b"x-request-id", b"req-1"))
ATTRIBUTES = {"meshd.source": "web", "meshd.destination": "payments",
              "meshd.peer.identity": "spiffe://bench.mesh/svc/payments",
              "meshd.request_id": "req-1", "meshd.subset": "v1", "meshd.route": "default",
              "meshd.endpoint": "b/payments-v1", "http.request.method": "GET",
              "url.path": "/pay"}


def measure(run: Callable[[int], Callable[[], None]], spans: int) -> tuple[float, float]:
    """(request-path µs per span, process CPU µs per span): ``run(n)`` does the request path
    of ``n`` spans and returns what finishes the export."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    flush = run(spans)
    wall1 = time.perf_counter()
    flush()
    cpu1 = time.process_time()
    return (wall1 - wall0) * 1e6 / spans, (cpu1 - cpu0) * 1e6 / spans


def meshd_run(spans: int) -> Callable[[], None]:
    tracer = Tracer(TracingSettings("http://127.0.0.1:9/v1/traces", "parentbased_always_on"),
                    HostResource("node-a", "bench.mesh"), queue_limit=spans)
    sample = tracer.sample
    for _ in range(spans):
        ids = identify(HEADERS, sample=sample)
        tracer.finish(CLIENT, ids, 0.0012, service="web", peer="payments",
                      destination="payments", method=b"GET", target=b"/pay", status=200,
                      subset="v1", route="default", endpoint="b/payments-v1", tries=1)

    def export() -> None:  # what the exporter task does, batch by batch
        queued = tracer._queue
        for at in range(0, len(queued), BATCH_SIZE):
            encode(queued[at:at + BATCH_SIZE], tracer.host)
        queued.clear()

    return export


def sdk_run_factory() -> Callable[[int], Callable[[], None]] | None:
    try:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None

    class EncodeOnly(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    def run(spans: int) -> Callable[[], None]:
        provider = TracerProvider(sampler=ParentBased(ALWAYS_ON),
                                  resource=Resource.create({"service.name": "web"}))
        processor = BatchSpanProcessor(EncodeOnly(), max_queue_size=max(2048, spans),
                                       max_export_batch_size=BATCH_SIZE)
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("meshd")
        propagator = TraceContextTextMapPropagator()
        incoming = {"traceparent": TRACEPARENT.decode()}
        for _ in range(spans):
            context = propagator.extract(incoming)
            span = tracer.start_span("GET payments", context=context, kind=SpanKind.CLIENT,
                                     attributes=ATTRIBUTES)
            outgoing: dict[str, str] = {}
            propagator.inject(outgoing, context=_with_span(span))
            span.set_attribute("http.response.status_code", 200)
            span.set_attribute("meshd.tries", 1)
            span.set_status(Status(StatusCode.UNSET))
            span.end()

        def flush() -> None:
            processor.force_flush()
            provider.shutdown()

        return flush

    def _with_span(span: Any) -> Any:
        from opentelemetry.trace import set_span_in_context
        return set_span_in_context(span)

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--spans", type=int, default=20000, help="spans per round (default 20000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per side (default 5)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sides: dict[str, Callable[[int], Callable[[], None]]] = {"meshd": meshd_run}
    sdk = sdk_run_factory()
    if sdk is not None:
        sides["sdk"] = sdk
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for run in sides.values():
        measure(run, min(args.spans, 2000))  # warm-up: imports, caches
    for _ in range(args.rounds):  # interleaved
        for name, run in sides.items():
            results[name].append(measure(run, args.spans))
    summary = {name: {"request_path_us": median(r[0] for r in rows),
                      "cpu_us": median(r[1] for r in rows)} for name, rows in results.items()}
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
        return 0
    print(f"per span, median of {args.rounds} rounds of {args.spans} spans "
          "(request path: time in the calling thread; cpu: the whole process, export included)")
    for name, row in summary.items():
        print(f"  {name:6} request path {row['request_path_us']:6.1f} µs   "
              f"cpu {row['cpu_us']:6.1f} µs")
    if "sdk" in summary:
        m, s = summary["meshd"], summary["sdk"]
        print(f"  sdk / meshd: request path x{s['request_path_us'] / m['request_path_us']:.1f}, "
              f"cpu x{s['cpu_us'] / m['cpu_us']:.1f}")
    else:
        print("  (sdk: opentelemetry-sdk not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
