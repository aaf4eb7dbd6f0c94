"""What tracing costs a request through meshd, in one run: the same load through one meshd hop
(wrk -> meshd host B's inbound listener, plaintext: the backend is permissive -> nginx) with
tracing off, on and sampling every trace (100 %), and on sampling 1 %.

Each mode brings the bench's mesh up afresh with ``meshd up``'s own code (``bench_stack``, as
``proxy_bench.py`` does: registry, CA, two ``meshd run``), the mode's ``OTEL_*`` variables in
the meshds' environment, spans going to an OTLP/HTTP sink this script serves (it answers 200 and
counts what it got; decoding is the tests' job). ``--two-hop`` also measures the two-hop path
(wrk -> host A outbound -> mTLS -> host B inbound -> nginx: a client and a server span per
request). Printed: req/s at a fixed concurrency, p50/p99 at c=1, meshd CPU µs per request, the
spans exported and dropped (from meshd's /metrics), and each traced mode's ratios to off.

    .venv/bin/python bench/trace_bench.py [--duration 5] [--rounds 2] [--two-hop] [--json]

A mode needs its own meshd processes, so each round brings the mesh up once per mode, the
modes in turn (off, 100 %, 1 %, then again), so that a slow spell of the machine touches every
mode alike; the medians of the rounds are reported. Run it on a quiet machine. Needs wrk and
nginx (``apt-get install -y wrk nginx-light``).
Everything listens in one loopback /24 (``--prefix``, default 127.79.0) and every process
started is stopped at the end, which is checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field

import h11
import psutil
import trio
from bench_configs import Layout
from bench_measure import LoadSettings, Measurement, Sample, measure_round, warm_up
from bench_stack import Stack, Target, all_claims, find_tools, write_mesh_file
from bench_wrk import WrkError
from proxy_bench import ProcessId, process_trees, verify_cleanup

from meshd.config.routes import parse_routes
from meshd.dev import probes
from meshd.dev.console import Console
from meshd.dev.ports import ports_in_use
from meshd.dev.runner import prepare_run_dir
from meshd.dev.supervisor import Supervisor
from meshd.errors import MeshError

SINK_PORT = 14318
OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT",
                  "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED",
                  "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME")


@dataclass(frozen=True)
class Mode:
    name: str
    ratio: float | None  # None: tracing off

    def environment(self, sink: str) -> dict[str, str]:
        if self.ratio is None:
            return {}
        return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink,
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": f"{self.ratio:g}"}


ALLOW_ALL = parse_routes({"default_policy": "allow", "destinations": {"backend": {}}})
MODES = (Mode("off", None), Mode("on, 100%", 1.0), Mode("on, 1%", 0.01))


@dataclass
class ModeResult:
    mode: str
    targets: dict[str, Target] = field(default_factory=dict)
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # per path, one per round
    spans_exported: float = 0.0  # all rounds
    spans_dropped: float = 0.0

    @property
    def paths(self) -> dict[str, Measurement]:
        return {name: Measurement.of(self.targets[name], rows)
                for name, rows in self.samples.items()}


@dataclass
class Sink:
    """OTLP/HTTP receiver that answers every POST with 200 and counts them."""

    host: str
    port: int
    posts: int = 0
    bytes: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1/traces"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Data):
                    self.bytes += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self.posts += 1
                    for out in (h11.Response(status_code=200, headers=[("content-length", "0")]),
                                h11.EndOfMessage()):
                        await stream.send_all(conn.send(out) or b"")
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


def say(text: str) -> None:
    print(f"trace_bench: {text}", file=sys.stderr, flush=True)


async def measure_mode(mode: Mode, args: argparse.Namespace, layout: Layout, sink: Sink,
                       settings: LoadSettings, started: set[ProcessId],
                       result: ModeResult, round_number: int) -> None:
    """Bring the mesh up with ``mode``'s variables, warm up, measure one round, stop it."""
    for name in OTEL_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(mode.environment(sink.url))  # the meshds inherit it
    run_dir, _ = prepare_run_dir(None)
    try:
        mesh_file, mesh = write_mesh_file(layout, run_dir)
        busy = ports_in_use(all_claims(layout, mesh))
        if busy:
            raise MeshError("; ".join(busy) + " (try another --prefix)")
        log = run_dir.log("meshd-up-console")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as console_stream:
            console = Console(console_stream, color=False)
            supervisor = Supervisor(console, stop_timeout=5.0, sweep_all_descendants=True)
            stack = Stack(args.tools, layout, run_dir, mesh_file, mesh, supervisor, console,
                          "warning")
            # a signed route table that lets every caller in (the mesh's default is deny)
            stack.launch = dataclasses.replace(stack.launch, routes=ALLOW_ALL)
            async with supervisor.running():
                try:
                    await _measure(stack, mode, args, settings, result, round_number)
                finally:
                    started |= process_trees(c.pid for c in supervisor.children)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir.root, ignore_errors=True)


async def _measure(stack: Stack, mode: Mode, args: argparse.Namespace,
                   settings: LoadSettings, result: ModeResult, n: int) -> None:
    async with probes.http_client() as client:
        say(f"round {n}, {mode.name}: starting nginx and the mesh")
        await stack.start_backend(client)
        single, two = await stack.start_mesh(client)
        targets: list[Target] = [single, *((two,) if args.two_hop else ())]
        for target in targets:
            await warm_up(target, settings)
        for target in targets:
            sample = await measure_round(target, settings)
            result.targets[target.name] = target
            result.samples.setdefault(target.name, []).append(sample)
            say(f"  round {n}, {mode.name}, {target.name}: "
                f"{sample.load.requests_per_second:,.0f} req/s, "
                f"{sum(sample.cpu_us_per_request.values()):.0f} µs meshd CPU/request")
        for host in ("host-a", "host-b"):
            text = (await client.get(f"http://{stack.mesh_host(host).admin}/metrics")).text
            result.spans_exported += _metric(text, "meshd_trace_spans_exported_total")
            result.spans_dropped += _metric(text, "meshd_trace_spans_dropped_total")


def _metric(text: str, name: str) -> float:
    """The sum of ``name``'s samples in a Prometheus text page (0 if absent)."""
    return sum(float(m.group(1)) for m in re.finditer(
        rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


async def run_all(args: argparse.Namespace, layout: Layout, settings: LoadSettings,
                  started: set[ProcessId]) -> list[ModeResult]:
    sink = Sink(layout.ip(30), SINK_PORT)
    results = [ModeResult(mode.name) for mode in MODES]
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        for n in range(1, settings.rounds + 1):
            for mode, result in zip(MODES, results, strict=True):
                await measure_mode(mode, args, layout, sink, settings, started, result, n)
        say(f"the OTLP sink got {sink.posts} export request(s), {sink.bytes:,} bytes")
        nursery.cancel_scope.cancel()
    return results


def report(results: list[ModeResult], settings: LoadSettings) -> str:
    lines = [f"tracing cost: wrk -c{settings.connections} -d{settings.seconds}s, "
             f"{settings.rounds} round(s) per mode, modes in turn, medians; "
             "CPU = meshd processes on the path",
             f"machine: {psutil.cpu_count()} CPUs, 1-min load average "
             f"{psutil.getloadavg()[0]:.1f} at the end", ""]
    paths = list(results[0].paths)
    header = (f"{'mode':10} {'path':11} {'req/s':>8} {'CPU µs/req':>11} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'req/s vs off':>13} {'CPU vs off':>11}")
    lines.append(header)
    off = results[0].paths
    for r in results:
        measured = r.paths
        for path in paths:
            m, base = measured[path], off[path]
            cpu, base_cpu = m.proxy_cpu_us or 0.0, base.proxy_cpu_us or 0.0
            lines.append(
                f"{r.mode:10} {path:11} {m.requests_per_second:8,.0f} {cpu:11.1f} "
                f"{_ms(m.p50_ms):>7} {_ms(m.p99_ms):>7} "
                f"{m.requests_per_second / base.requests_per_second:13.3f} "
                f"{cpu / base_cpu if base_cpu else 0.0:11.3f}")
    lines.append("")
    for r in results:
        failures = sum(m.failures for m in r.paths.values())
        lines.append(f"{r.mode:10} spans exported {r.spans_exported:,.0f}, dropped "
                     f"{r.spans_dropped:,.0f}; failed requests {failures}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--duration", type=int, default=5, help="seconds per throughput run")
    p.add_argument("--rounds", type=int, default=2, help="rounds per mode (medians)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of load before measuring")
    p.add_argument("--connections", "-c", type=int, default=16)
    p.add_argument("--two-hop", action="store_true", help="also measure the two-hop path")
    p.add_argument("--prefix", default="127.79.0", help="loopback /24 (default 127.79.0)")
    p.add_argument("--keep", action="store_true", help="keep each mode's run dir")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tools, missing = find_tools(("nginx", "wrk"))
    if tools is None:
        say(f"missing: {', '.join(missing)}; apt-get install -y wrk nginx-light")
        return 2
    args.tools = tools
    layout = Layout(args.prefix)
    settings = LoadSettings(wrk=tools.wrk, connections=args.connections, threads=1,
                            seconds=args.duration, latency_seconds=max(1, args.duration // 2),
                            warmup_seconds=args.warmup, rounds=args.rounds)
    started: set[ProcessId] = set()
    try:
        results = trio.run(run_all, args, layout, settings, started)
    except (MeshError, WrkError, OSError) as exc:
        say(f"failed: {exc}")
        verify_cleanup(started)
        return 1
    clean = verify_cleanup(started)
    if args.json:
        json.dump([{"mode": r.mode, "spans_exported": r.spans_exported,
                    "spans_dropped": r.spans_dropped,
                    "paths": {name: {"requests_per_second": m.requests_per_second,
                                     "cpu_us_per_request": m.proxy_cpu_us,
                                     "p50_ms": m.p50_ms, "p99_ms": m.p99_ms,
                                     "failures": m.failures}
                              for name, m in r.paths.items()}} for r in results],
                  sys.stdout, indent=2)
        print()
    else:
        print(report(results, settings))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
