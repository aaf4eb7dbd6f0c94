"""The ingress gateway next to haproxy terminating TLS, in one run and side by side (issue 16):

  direct         wrk -> nginx (plain HTTP): the floor
  haproxy-tls    wrk (HTTPS) -> haproxy terminating TLS (one thread) -> nginx
  gateway-https  wrk (HTTPS) -> meshd host-g's gateway -> mTLS -> meshd host-b inbound -> nginx
  gateway-http   wrk (HTTP)  -> the same gateway's plain listener -> mTLS -> ... -> nginx

For each path: req/s at a fixed concurrency over keep-alive connections, latency p50/p99 at
concurrency 1, the proxies' CPU time per request (haproxy; the gateway's meshd and host-b's,
each and together), non-2xx answers and socket errors; then each gateway path's ratios to
direct and to haproxy-tls. haproxy and the gateway serve the same ECDSA P-256 certificate. The
mesh is started as ``meshd up`` starts one (``bench_stack``), with routes that deny by default
and let the gateway call the backend. Everything listens on loopback and every process started
is stopped at the end (also on Ctrl-C or failure), which is checked.

    .venv/bin/python bench/gateway_bench.py [--duration 5] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO

import httpx
import psutil
import trio
from bench_configs import Layout
from bench_gateway import (
    BACKEND_HOST,
    DEFAULT_PREFIX,
    GATEWAY_HOST,
    GatewayLayout,
    GatewayStack,
    make_server_certificate,
    mesh_toml,
    routes_toml,
    tls_handshake,
)
from bench_gateway_report import (
    GATEWAY_PATHS,
    PathResult,
    TLSNote,
    format_details,
    format_summary,
    to_json,
)
from bench_measure import LoadSettings, Measurement, Sample, measure_round, warm_up
from bench_observe import MeshObserver
from bench_stack import PACKAGES, Target, Tools, find_tools
from bench_wrk import WRK_GRACE, WrkError
from proxy_bench import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISSING_TOOLS,
    EXIT_OK,
    Outcome,
    ProcessId,
    process_trees,
    supervisor_trouble,
    survivors,
)

from meshd.config.mesh_schema import MeshConfig, PortClaim, port_claims
from meshd.dev import probes
from meshd.dev.console import Console
from meshd.dev.ports import ports_in_use
from meshd.dev.runner import RunDir, load_mesh, prepare_run_dir
from meshd.dev.supervisor import Supervisor
from meshd.errors import MeshError

PATHS = ("direct", "haproxy-tls", *GATEWAY_PATHS)
TLS_PATHS = ("haproxy-tls", "gateway-https")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="direct vs haproxy terminating TLS vs meshd's ingress gateway (https and "
        "http, then mTLS to the backend's meshd), measured with wrk against an nginx backend "
        "on loopback: req/s, CPU per request, p50/p99, errors, ratios.")
    p.add_argument("--duration", type=_positive, default=5, metavar="S",
                   help="seconds of each throughput run (default 5)")
    p.add_argument("--latency-duration", type=_positive, default=None, metavar="S",
                   help="seconds of each c=1 latency run (default: half of --duration)")
    p.add_argument("--warmup", type=int, default=2, metavar="S",
                   help="seconds of load before a path's first round (default 2)")
    p.add_argument("--rounds", type=_positive, default=2,
                   help="rounds per path, interleaved across paths; medians are reported "
                   "(default 2)")
    p.add_argument("--connections", "-c", type=_positive, default=16,
                   help="wrk connections of the throughput run, kept alive (default 16)")
    p.add_argument("--threads", "-t", type=_positive, default=1,
                   help="wrk threads (default 1, as proxy_bench.py)")
    p.add_argument("--paths", type=_paths, default=PATHS, metavar="LIST",
                   help=f"comma-separated subset of {','.join(PATHS)} (default: all)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, metavar="A.B.C",
                   help=f"the loopback /24 everything listens in (default {DEFAULT_PREFIX})")
    p.add_argument("--meshd-log-level", default="warning",
                   choices=["debug", "info", "warning", "error"],
                   help="log level of the registry, CA and meshds (default warning; info adds "
                   "an access-log line per request and hop)")
    p.add_argument("--timeout", type=_positive, default=None, metavar="S",
                   help="give up after S seconds in all (default: from the durations)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--keep", action="store_true",
                   help="keep the run dir (configs, certificates, logs) after exit")
    return p.parse_args(argv)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _paths(text: str) -> tuple[str, ...]:
    chosen = {p.strip() for p in text.split(",") if p.strip()}
    unknown = sorted(chosen - set(PATHS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {','.join(PATHS)}, got {text!r}")
    return tuple(p for p in PATHS if p in chosen)


def needed_tools(paths: tuple[str, ...]) -> tuple[str, ...]:
    return ("nginx", "wrk", *(("haproxy",) if "haproxy-tls" in paths else ()))


def say(text: str) -> None:
    print(f"gateway_bench: {text}", file=sys.stderr, flush=True)


@dataclass
class GatewayOutcome(Outcome):
    """``proxy_bench``'s outcome, with the failures by kind and what the TLS listeners
    served."""

    results: list[PathResult] = field(default_factory=list)
    tls: list[TLSNote] = field(default_factory=list)


# -- the run, inside trio ------------------------------------------------------------------------

async def run_guarded(stack: GatewayStack, settings: LoadSettings, paths: tuple[str, ...],
                      time_limit: float) -> GatewayOutcome:
    """Start, measure and stop everything; the first SIGINT/SIGTERM (or ``time_limit``) cancels
    the run and stops the children in order, a second one kills them at once."""
    outcome = GatewayOutcome()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            work = trio.CancelScope(deadline=trio.current_time() + time_limit)
            nursery.start_soon(_watch_signals, signals, work, stack.supervisor, outcome)
            # inside the supervisor's block, so that cancelling the work leaves the supervisor
            # running to stop its children in order
            async with stack.supervisor.running():
                with work:
                    try:
                        await bring_up_and_measure(stack, settings, paths, outcome)
                    except (MeshError, WrkError, OSError) as exc:
                        outcome.error = str(exc)
                outcome.started |= process_trees(c.pid for c in stack.supervisor.children)
            if work.cancelled_caught and not outcome.interrupted:
                outcome.error = f"the run did not finish within {time_limit:g}s"
            nursery.cancel_scope.cancel()
    return outcome


async def _watch_signals(signals: AsyncIterator[int], work: trio.CancelScope,
                         supervisor: Supervisor, outcome: Outcome) -> None:
    async for signum in signals:
        if not outcome.interrupted:
            say(f"{signal.Signals(signum).name}: stopping everything (once more to kill it)")
            outcome.interrupted = True
            work.cancel()
        else:
            supervisor.hurry()


async def bring_up_and_measure(stack: GatewayStack, settings: LoadSettings,
                               paths: tuple[str, ...], outcome: GatewayOutcome) -> None:
    """Start the paths, look at what the TLS listeners serve, then measure round by round,
    interleaved; ``outcome`` is brought up to date after each round, so an interrupted run
    still reports."""
    async with probes.http_client() as client:
        targets = await start_targets(stack, client, paths)
        outcome.tls = [await tls_note(name, targets[name], stack) for name in TLS_PATHS
                       if name in targets]
        for note in outcome.tls:
            say(f"  {note.path} serves {note.version} {note.cipher}")
        observer = mesh_observer(stack) if any(p in GATEWAY_PATHS for p in paths) else None
        before = await observer.snapshot(client) if observer else None
        samples: dict[str, list[Sample]] = {name: [] for name in paths}
        for n in range(1, settings.rounds + 1):
            for name in paths:
                target = targets[name]
                if n == 1:
                    await warm_up(target, settings)
                say(f"round {n}/{settings.rounds}, {name}: {target.description}")
                sample = await measure_round(target, settings)
                samples[name].append(sample)
                p50 = sample.latency.percentile(50.0)
                failures = sum(r.non_2xx + r.socket_errors
                               for r in (sample.load, sample.latency))
                say(f"  {sample.load.requests_per_second:,.0f} req/s; at c=1 p50 "
                    + (f"{p50:.3f} ms" if p50 is not None else "?")
                    + (f"; {failures} non-2xx/socket errors" if failures else ""))
            outcome.measurements = [Measurement.of(targets[name], samples[name])
                                    for name in paths]
            outcome.results = [PathResult.of(m, samples[m.name])
                               for m in outcome.measurements]
        if observer is not None and before is not None:
            outcome.notes += observer.notes(before, await observer.snapshot(client))


async def start_targets(stack: GatewayStack, client: httpx.AsyncClient,
                        paths: tuple[str, ...]) -> dict[str, Target]:
    steps: list[tuple[str, bool, Callable[[], Awaitable[Target | tuple[Target, ...]]]]] = [
        ("nginx", True, lambda: stack.start_backend(client)),
        ("haproxy terminating TLS", "haproxy-tls" in paths,
         lambda: stack.start_haproxy_tls(client)),
        (f"the mesh (registry, CA, meshd {GATEWAY_HOST} with the gateway, meshd "
         f"{BACKEND_HOST})", any(p in GATEWAY_PATHS for p in paths),
         lambda: stack.start_gateway_mesh(client)),
    ]
    targets: dict[str, Target] = {}
    for what, wanted, start in steps:
        if not wanted:
            continue
        say(f"starting {what}")
        started = await start()
        for target in (started,) if isinstance(started, Target) else started:
            targets[target.name] = target
    return targets


async def tls_note(name: str, target: Target, stack: GatewayStack) -> TLSNote:
    address = (stack.gateway_layout.haproxy_tls if name == "haproxy-tls"
               else stack.gateway_layout.gateway_https)
    seen = await tls_handshake(address, stack.certificate.ca)
    fingerprint = hashlib.sha256(seen.certificate).hexdigest()
    expected = hashlib.sha256(stack.certificate.der()).hexdigest()
    if fingerprint != expected:
        raise MeshError(f"{target.name} at {address} serves another certificate than the "
                        f"bench's {stack.certificate.cert}")
    return TLSNote(name, seen.version, seen.cipher, fingerprint)


def mesh_observer(stack: GatewayStack) -> MeshObserver:
    hosts = stack.launch.mesh.hosts
    meshds = [c for c in stack.supervisor.children if c.label.startswith("meshd ")]
    return MeshObserver(meshds, {f"meshd {h.name}": f"http://{h.admin}" for h in hosts})


# -- main --------------------------------------------------------------------------------------

def settings_of(args: argparse.Namespace, tools: Tools) -> LoadSettings:
    return LoadSettings(wrk=tools.wrk, connections=args.connections, threads=args.threads,
                        seconds=args.duration,
                        latency_seconds=args.latency_duration or max(1, args.duration // 2),
                        warmup_seconds=args.warmup, rounds=args.rounds)


def default_timeout(settings: LoadSettings, paths: tuple[str, ...]) -> float:
    per_round = settings.seconds + settings.latency_seconds + 2 * WRK_GRACE
    per_path = settings.warmup_seconds + WRK_GRACE + per_round * settings.rounds
    return 180.0 + per_path * len(paths)


def print_results(outcome: GatewayOutcome, settings: LoadSettings, as_json: bool,
                  stream: TextIO) -> None:
    if as_json:
        document = to_json(outcome.results, settings, outcome.notes, outcome.tls)
        document["process_notes"] = outcome.process_notes
        document["machine"] = {"cpus": psutil.cpu_count(), "load_before": outcome.load_before,
                               "load_after": outcome.load_after}
        json.dump(document, stream, indent=2)
        stream.write("\n")
        return
    parts = [format_details(outcome.results, outcome.notes, outcome.tls)]
    if outcome.process_notes:
        parts.append("processes (from the supervisor):\n" + "\n".join(
            f"  {line}" for line in outcome.process_notes))
    parts.append(outcome.machine_line())
    parts.append(format_summary(outcome.results, settings))   # the last lines
    stream.write("\n\n".join(p for p in parts if p) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools, missing = find_tools(needed_tools(args.paths))
    if tools is None:
        packages = " ".join(sorted({PACKAGES[m] for m in missing}))
        say(f"missing: {', '.join(missing)}; install with: apt-get install -y {packages}")
        return EXIT_MISSING_TOOLS
    try:
        layout = GatewayLayout(Layout(args.prefix))
    except ValueError as exc:
        say(str(exc))
        return EXIT_FAILED
    settings = settings_of(args, tools)
    run_dir, _ = prepare_run_dir(None)
    keep = True   # kept if run() itself raises
    try:
        code, keep_for_debugging = run(args, tools, layout, run_dir, settings)
        keep = args.keep or keep_for_debugging
        return code
    finally:
        if keep:
            say(f"run dir kept: {run_dir.root}")
        else:
            shutil.rmtree(run_dir.root, ignore_errors=True)


def run(args: argparse.Namespace, tools: Tools, layout: GatewayLayout, run_dir: RunDir,
        settings: LoadSettings) -> tuple[int, bool]:
    """The exit code, and whether to keep the run dir for debugging."""
    certificate = make_server_certificate(run_dir.root / "bench" / "outside-tls")
    (run_dir.root / "routes.toml").write_text(routes_toml())
    mesh_file = run_dir.root / "mesh.toml"
    mesh_file.write_text(mesh_toml(layout, certificate))
    mesh = load_mesh(mesh_file)
    busy = ports_in_use(_claims(layout, mesh))
    if busy:
        for line in busy:
            say(line)
        say("nothing was started; try another --prefix")
        return EXIT_FAILED, False
    console_log = run_dir.log("meshd-up-console")
    console_log.parent.mkdir(parents=True, exist_ok=True)
    with console_log.open("w") as console_stream:
        console = Console(console_stream, color=False)
        supervisor = Supervisor(console, stop_timeout=5.0, sweep_all_descendants=True)
        stack = GatewayStack(tools, layout, run_dir, mesh_file, mesh, supervisor, console,
                             args.meshd_log_level, certificate)
        timeout = args.timeout or default_timeout(settings, args.paths)
        load_before = psutil.getloadavg()[0]
        try:
            outcome = trio.run(run_guarded, stack, settings, args.paths, timeout)
        finally:
            stack.close_held()
        outcome.load_before, outcome.load_after = load_before, psutil.getloadavg()[0]
    outcome.process_notes = supervisor_trouble(console_log)
    clean = verify_cleanup(outcome.started)
    if outcome.results:
        print_results(outcome, settings, args.json, sys.stdout)
    if outcome.interrupted:
        return EXIT_INTERRUPTED, False
    if outcome.error is not None:
        say(f"failed: {outcome.error}")
        say(f"logs: {run_dir.root / 'logs'}")
        return EXIT_FAILED, True
    return (EXIT_OK if clean else EXIT_FAILED), not clean


def verify_cleanup(started: set[ProcessId]) -> bool:
    left = survivors(started)
    if not left:
        say(f"cleanup: all {len(started)} processes started are gone")
        return True
    for proc in left:
        say(f"cleanup: pid {proc.pid} ({proc.name()}) outlived the run; killing it")
        try:
            proc.kill()
        except psutil.Error:
            pass
    return False


def _claims(layout: GatewayLayout, mesh: MeshConfig) -> list[PortClaim]:
    """Every address:port of the run, each once (the mesh declares nginx's port too)."""
    claims: dict[tuple[str, int], PortClaim] = {}
    for claim in [*port_claims(mesh), *layout.bench_claims()]:
        claims.setdefault((claim.address, claim.port), claim)
    return list(claims.values())


if __name__ == "__main__":
    sys.exit(main())
