"""Compare, in one run and side by side, the cost of a request through (issue 5):

  direct        wrk -> nginx
  haproxy       wrk -> haproxy (HTTP mode, one thread, keep-alive to the backend) -> nginx
  meshd-1hop    wrk -> meshd host B inbound (plaintext: the backend is permissive) -> nginx
  haproxy-2hop  wrk -> haproxy A -> TLS 1.3 with client certificates -> haproxy B -> nginx
  meshd-2hop    wrk -> meshd host A outbound -> mTLS -> meshd host B inbound -> nginx

the workers rows (issue 18; N = --workers, default 2), in the same interleaved rounds:

  haproxy-t2       as haproxy, with nbthread N
  meshd-1hop-w2    as meshd-1hop, through host D: a meshd with workers = N
  haproxy-2hop-t2  as haproxy-2hop, both with nbthread N
  meshd-2hop-w2    as meshd-2hop, through hosts C and D: meshds with workers = N

and the same over HTTP/2, loaded by h2load (several connections, concurrent streams on each):

  h2-direct        h2load -> nginx (h2c)
  h2-haproxy       h2load -> haproxy (proto h2 in and out) -> nginx (h2c)
  h2-haproxy-2hop  h2load -> haproxy A -> h2 over TLS 1.3, client certs -> haproxy B -> nginx
  h2-meshd-2hop    h2load -> meshd A outbound (h2c) -> h2 over mTLS -> meshd B inbound -> nginx

For each path: req/s at a fixed concurrency, latency p50/p99 at concurrency 1, and the proxies'
CPU time per request; then the meshd paths' ratios to each baseline. After the rounds, 1000 idle
client connections are held open to host A's outbound listener (and then to host C's) and the
RSS of each meshd process is read. The last lines compare the results with issue 5's targets
and issue 18's (met / not met). Everything listens on
loopback and every process started is stopped at the end (also on Ctrl-C or failure), which is
checked.

    .venv/bin/python bench/proxy_bench.py [--duration 10] [--json] [--paths direct,meshd-1hop]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import httpx
import psutil
import trio
from bench_configs import LOADGEN_SERVICE, LOADGEN_W_SERVICE, Layout
from bench_h2load import H2LOAD_GRACE, H2loadError
from bench_idle import (
    IDLE_CONNECTIONS,
    IDLE_TIME_LIMIT,
    SETTLE_SECONDS,
    IdleResult,
    hold_idle_connections,
    raise_fd_limit,
)
from bench_measure import LoadSettings, Measurement, Sample, measure_round, warm_up
from bench_observe import MeshObserver, MeshSnapshot, hop_gaps
from bench_profile import ProfilerMissing, find_py_spy, profiled
from bench_report import (
    H2_MESH_2HOP,
    MESH_1HOP,
    MESH_2HOP,
    TARGETS_18_TITLE,
    checks,
    checks_issue18,
    format_checks,
    format_details,
    format_idle,
    format_summary,
    to_json,
)
from bench_stack import (
    HAPROXY_2HOP_T,
    HAPROXY_T,
    MESH_1HOP_W,
    MESH_2HOP_W,
    NGHTTPD,
    NGINX,
    PACKAGES,
    Stack,
    Target,
    Tools,
    all_claims,
    find_tools,
    write_mesh_file,
)
from bench_wrk import WRK_GRACE, WrkError

from meshd.config.mesh_schema import HostPort
from meshd.dev import probes
from meshd.dev.console import Console
from meshd.dev.ports import ports_in_use
from meshd.dev.runner import RunDir, prepare_run_dir
from meshd.dev.supervisor import Supervisor
from meshd.errors import MeshError

# issue 5's order, then the HTTP/2 paths (issue 15); the rounds are interleaved in this order
HTTP1_PATHS = ("direct", "haproxy", MESH_1HOP, "haproxy-2hop", MESH_2HOP)
# issue 18: N workers beside haproxy with N threads
WORKERS_PATHS = (HAPROXY_T, MESH_1HOP_W, HAPROXY_2HOP_T, MESH_2HOP_W)
H2_PATHS = ("h2-direct", "h2-haproxy", "h2-haproxy-2hop", H2_MESH_2HOP)
PATHS = (*HTTP1_PATHS, *WORKERS_PATHS, *H2_PATHS)
# --paths shorthands: the names of earlier versions, and each protocol's paths
PATH_ALIASES = {"meshd": (MESH_1HOP, MESH_2HOP), "http1": HTTP1_PATHS,
                "workers": WORKERS_PATHS, "h2": H2_PATHS}
# need the mesh (the haproxy pairs: its CA)
MESH_PATHS = (MESH_1HOP, MESH_2HOP, "haproxy-2hop", "h2-haproxy-2hop", H2_MESH_2HOP,
              MESH_1HOP_W, MESH_2HOP_W, HAPROXY_2HOP_T)
MESHD_W_PATHS = (MESH_1HOP_W, MESH_2HOP_W)   # need hosts C and D (meshds with workers)
EXIT_OK, EXIT_FAILED, EXIT_MISSING_TOOLS, EXIT_INTERRUPTED = 0, 1, 2, 130
# lines of the supervisor (in the console log) that say a child misbehaved
SUPERVISOR_TROUBLE = ("exited", "did not stop", "left behind", "restart", "could not be started")

HOST_A, HOST_B = "meshd host-a", "meshd host-b"
HOST_C, HOST_D = "meshd host-c", "meshd host-d"   # the workers rows' meshds
# seconds without load before the counts of the two meshds are compared again
SETTLE_UNFINISHED = 5.0

ProcessId = tuple[int, float]   # (pid, create time): a pid alone may be reused


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="direct vs haproxy vs meshd single hop vs haproxy two-hop TLS vs meshd "
        "two hops (mTLS), measured with wrk against an nginx backend on loopback; the same "
        "with meshds of N workers against haproxy with N threads; and over HTTP/2 (h2c in, h2 "
        "between the hops) with h2load; then meshd's RSS per process with idle connections, "
        "and issue 5's and issue 18's targets on the last lines.")
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
                   help="wrk connections of the throughput run (default 16)")
    p.add_argument("--threads", "-t", type=_positive, default=1,
                   help="wrk threads (default 1)")
    p.add_argument("--h2-connections", type=_positive, default=8, metavar="N",
                   help="h2load connections of the HTTP/2 throughput run (default 8)")
    p.add_argument("--h2-streams", type=_positive, default=16, metavar="N",
                   help="h2load concurrent streams per connection (default 16)")
    p.add_argument("--h2-backend", choices=[NGHTTPD, NGINX], default=NGHTTPD,
                   help="what serves h2c to the HTTP/2 paths: nghttpd (default; the faster "
                   "here) or a second, HTTP/2-only port of the nginx backend")
    p.add_argument("--paths", type=_paths, default=PATHS, metavar="LIST",
                   help=f"comma-separated subset of {','.join(PATHS)} (default: all; "
                   "'meshd' means both HTTP/1.1 meshd paths, 'http1' the five HTTP/1.1 paths "
                   "of one process or thread per proxy, 'workers' the four workers rows, 'h2' "
                   "the HTTP/2 paths)")
    p.add_argument("--workers", type=_positive, default=2, metavar="N",
                   help="worker processes of the workers rows' meshds (meshd-1hop-w2, "
                   "meshd-2hop-w2) and threads of their haproxy baselines (haproxy-t2, "
                   "haproxy-2hop-t2) (default 2; the row names keep '2')")
    p.add_argument("--idle-connections", type=_natural, default=IDLE_CONNECTIONS, metavar="N",
                   help="idle client connections held open to host A's outbound listener "
                   f"while each meshd's RSS is read, after the rounds (default {IDLE_CONNECTIONS}"
                   f"; 0 skips it; only with {MESH_2HOP}); with {MESH_2HOP_W} the same again to "
                   "host C's")
    p.add_argument("--prefix", default="127.77.0", metavar="A.B.C",
                   help="the loopback /24 everything listens in (default 127.77.0)")
    p.add_argument("--meshd-log-level", default="warning",
                   choices=["debug", "info", "warning", "error"],
                   help="log level of the registry, CA and meshds (default warning; info adds "
                   "an access-log line per request and hop)")
    p.add_argument("--timeout", type=_positive, default=None, metavar="S",
                   help="give up after S seconds in all (default: from the durations)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="record each meshd with py-spy (pip install py-spy) during each round "
                   "and write DIR/<path>-round<N>-<meshd>.folded (collapsed stacks) and .txt "
                   "(top functions by self and total share)")
    p.add_argument("--keep", action="store_true",
                   help="keep the run dir (configs, certificates, logs) after exit")
    return p.parse_args(argv)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _natural(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return int(text)


def _paths(text: str) -> tuple[str, ...]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    expanded = {name for p in chosen for name in PATH_ALIASES.get(p, (p,))}
    unknown = [p for p in expanded if p not in PATHS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"choose from {','.join([*PATHS, *PATH_ALIASES])}, got {text!r}")
    return tuple(p for p in PATHS if p in expanded)


def needed_tools(paths: tuple[str, ...], h2_backend: str = NGHTTPD) -> tuple[str, ...]:
    uses_haproxy = any("haproxy" in p for p in paths)
    uses_h2 = any(p in H2_PATHS for p in paths)
    return ("nginx", "wrk", *(("haproxy",) if uses_haproxy else ()),
            *(("h2load",) if uses_h2 else ()),
            *((NGHTTPD,) if uses_h2 and h2_backend == NGHTTPD else ()))


def say(text: str) -> None:
    print(f"proxy_bench: {text}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)           # meshd under load
    idle: IdleResult | None = None                            # RSS with idle connections
    idle_workers: IdleResult | None = None                    # the same, hosts C and D
    process_notes: list[str] = field(default_factory=list)   # the supervisor's complaints
    error: str | None = None
    interrupted: bool = False
    started: set[ProcessId] = field(default_factory=set)
    load_before: float = 0.0   # the machine's 1-minute load average
    load_after: float = 0.0

    def machine_line(self) -> str:
        return (f"machine: {psutil.cpu_count()} CPUs, 1-min load average {self.load_before:.1f} "
                f"before, {self.load_after:.1f} after (the benchmark itself adds about 2)")


# -- the run, inside trio ------------------------------------------------------------------------

async def run_guarded(stack: Stack, settings: LoadSettings, paths: tuple[str, ...],
                      idle_connections: int, time_limit: float,
                      profile: Path | None = None) -> Outcome:
    """Start, measure and stop everything; the first SIGINT/SIGTERM (or ``time_limit``) cancels
    the run and stops the children in order, a second one kills them at once."""
    outcome = Outcome()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            work = trio.CancelScope(deadline=trio.current_time() + time_limit)
            nursery.start_soon(_watch_signals, signals, work, stack.supervisor, outcome)
            # inside the supervisor's block, so that cancelling the work leaves the supervisor
            # running to stop its children in order
            async with stack.supervisor.running():
                with work:
                    try:
                        await bring_up_and_measure(stack, settings, paths, idle_connections,
                                                   outcome, profile)
                    except (MeshError, WrkError, H2loadError, OSError) as exc:
                        outcome.error = str(exc)
                # whatever runs now, before the supervisor stops it, must be gone afterwards
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


async def bring_up_and_measure(stack: Stack, settings: LoadSettings, paths: tuple[str, ...],
                               idle_connections: int, outcome: Outcome,
                               profile: Path | None = None) -> None:
    """Start the paths, then measure them round by round, interleaved; the summary in
    ``outcome`` is brought up to date after each round, so an interrupted run still reports.
    Then, with the two-hop meshd path, the RSS of each meshd with idle connections open.
    With ``profile``, each proxy of a path is recorded by py-spy during its rounds."""
    async with probes.http_client() as client:
        targets = await start_targets(stack, client, paths)
        observer = mesh_observer(stack)
        before = await observer.snapshot(client)
        samples: dict[str, list[Sample]] = {name: [] for name in paths}
        for n in range(1, settings.rounds + 1):
            for name in paths:
                target = targets[name]
                if n == 1:
                    await warm_up(target, settings)
                say(f"round {n}/{settings.rounds}, {name}: {target.description}")
                async with profiled(profile, target.proxies, f"{name}-round{n}"):
                    sample = await measure_round(target, settings)
                samples[name].append(sample)
                p50 = sample.latency.percentile(50.0)
                say(f"  {sample.load.requests_per_second:,.0f} req/s; at c=1 p50 "
                    + (f"{p50:.3f} ms" if p50 is not None else "?"))
            outcome.measurements = [Measurement.of(targets[name], samples[name])
                                    for name in paths]
        if any(p in paths for p in (MESH_1HOP, MESH_2HOP, H2_MESH_2HOP, *MESHD_W_PATHS)):
            # each single-hop listener (host B's, host D's) sees wrk's probe once per run
            single_hop_runs = ((settings.warmup_seconds > 0) + 2 * settings.rounds
                               if MESH_1HOP in paths or MESH_1HOP_W in paths else 0)
            after = await observer.snapshot(client)
            outcome.notes += observer.notes(before, after, single_hop_runs)
            outcome.notes += await unfinished_requests(observer, client, after)
        async def hold(address: HostPort, entry: str, hosts: tuple[str, str]) -> IdleResult:
            say(f"holding {idle_connections} idle connections to {address} ({entry}'s "
                "outbound listener), reading RSS")
            idle = await hold_idle_connections(address, [stack.child(h) for h in hosts],
                                               idle_connections)
            say("  " + format_idle(idle).splitlines()[-1])
            return idle

        if MESH_2HOP in paths and idle_connections > 0:
            outcome.idle = await hold(stack.layout.mesh_outbound, "host A", (HOST_A, HOST_B))
        if MESH_2HOP_W in paths and idle_connections > 0:
            outcome.idle_workers = await hold(stack.layout.mesh_outbound_w, "host C",
                                              (HOST_C, HOST_D))


async def unfinished_requests(observer: MeshObserver, client: httpx.AsyncClient,
                              after: MeshSnapshot) -> list[str]:
    """Requests host B answered (from loadgen, over mTLS) that host A did not count, looked at
    again ``SETTLE_UNFINISHED`` seconds after the load. A load generator stops at its deadline
    with requests in flight (h2load up to -c x -m, wrk up to -c); host A counts none of those
    whose client left before the answer, host B answered them: a gap up to about that many per
    run is expected, more means requests lost or stuck between the hops."""
    pairs = ((HOST_A, HOST_B, LOADGEN_SERVICE), (HOST_C, HOST_D, LOADGEN_W_SERVICE))
    if not any(hop_gaps(after.counters, *pair) for pair in pairs):
        return []
    await trio.sleep(SETTLE_UNFINISHED)
    counters = (await observer.snapshot(client)).counters
    return [f"{inner_host} answered {inner:.0f} requests for {dest} from {source}, "
            f"{outer_host} counted {outer:.0f} ({inner - outer:+.0f}, {SETTLE_UNFINISHED:g} s "
            "after the load): the outer hop does not count requests whose client left before "
            "the answer (each load run ends with some in flight)"
            for outer_host, inner_host, source in pairs
            for dest, (outer, inner) in hop_gaps(counters, outer_host, inner_host,
                                                 source).items()]


async def start_targets(stack: Stack, client: httpx.AsyncClient,
                        paths: tuple[str, ...]) -> dict[str, Target]:
    """Start what the chosen paths need (the two-hop haproxy needs the mesh's CA; the mesh
    gives both meshd paths)."""
    steps: list[tuple[str, bool, Callable[[], Awaitable[Target | tuple[Target, ...]]]]] = [
        ("nginx", True, lambda: stack.start_backend(client)),
        ("haproxy", "haproxy" in paths, lambda: stack.start_haproxy(client)),
        (f"haproxy nbthread {stack.workers}", HAPROXY_T in paths,
         lambda: stack.start_haproxy_threads(client)),
        ("haproxy h2", "h2-haproxy" in paths, stack.start_haproxy_h2),
        ("the mesh (registry, CA, 2 x meshd run"
         + (f", 2 more with {stack.workers} workers each)"
            if any(p in paths for p in MESHD_W_PATHS) else ")"),
         any(p in paths for p in MESH_PATHS), lambda: stack.start_mesh(client)),
        ("haproxy two-hop", "haproxy-2hop" in paths,
         lambda: stack.start_haproxy_two_hop(client)),
        (f"haproxy two-hop, nbthread {stack.workers}", HAPROXY_2HOP_T in paths,
         lambda: stack.start_haproxy_two_hop_threads(client)),
        ("haproxy h2 two-hop", "h2-haproxy-2hop" in paths, stack.start_haproxy_h2_two_hop),
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


def mesh_observer(stack: Stack) -> MeshObserver:
    hosts = stack.launch.mesh.hosts
    meshds = [c for c in stack.supervisor.children if c.label.startswith("meshd ")]
    return MeshObserver(meshds, {f"meshd {h.name}": f"http://{h.admin}" for h in hosts})


# -- processes ---------------------------------------------------------------------------------

def process_trees(pids: Iterable[int | None]) -> set[ProcessId]:
    """Each process of ``pids`` and all its descendants, as they are now."""
    out: set[ProcessId] = set()
    for pid in pids:
        if pid is None:
            continue
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                out.add((proc.pid, proc.create_time()))
        except psutil.Error:
            continue
    return out


def survivors(started: Iterable[ProcessId]) -> list[psutil.Process]:
    """The processes of ``started`` still alive (zombies are dead), plus any child of ours."""
    alive: dict[int, psutil.Process] = {}
    for pid, created in started:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive[pid] = proc
        except psutil.Error:
            continue
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive[proc.pid] = proc
        except psutil.Error:
            continue
    return list(alive.values())


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


def supervisor_trouble(console_log: Path) -> list[str]:
    """What the supervisor said about children exiting, restarting or not stopping in time."""
    try:
        lines = console_log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines
            if line.startswith("meshd up:") and any(w in line for w in SUPERVISOR_TROUBLE)]


# -- main --------------------------------------------------------------------------------------

def settings_of(args: argparse.Namespace, tools: Tools) -> LoadSettings:
    return LoadSettings(wrk=tools.wrk, connections=args.connections, threads=args.threads,
                        seconds=args.duration,
                        latency_seconds=args.latency_duration or max(1, args.duration // 2),
                        warmup_seconds=args.warmup, rounds=args.rounds, h2load=tools.h2load,
                        h2_connections=args.h2_connections, h2_streams=args.h2_streams)


def default_timeout(settings: LoadSettings, paths: tuple[str, ...]) -> float:
    grace = max(WRK_GRACE, H2LOAD_GRACE)
    per_round = settings.seconds + settings.latency_seconds + 2 * grace
    per_path = settings.warmup_seconds + grace + per_round * settings.rounds
    idle = (IDLE_TIME_LIMIT + SETTLE_SECONDS + 30.0) * ((MESH_2HOP in paths)
                                                        + (MESH_2HOP_W in paths))
    return 180.0 + per_path * len(paths) + idle


def print_results(outcome: Outcome, settings: LoadSettings, as_json: bool,
                  stream: TextIO, workers: int = 2) -> None:
    idles = [i for i in (outcome.idle, outcome.idle_workers) if i is not None]
    if as_json:
        document = to_json(outcome.measurements, settings, outcome.notes, outcome.idle,
                           outcome.idle_workers, workers)
        document["process_notes"] = outcome.process_notes
        document["machine"] = {"cpus": psutil.cpu_count(), "load_before": outcome.load_before,
                               "load_after": outcome.load_after}
        json.dump(document, stream, indent=2)
        stream.write("\n")
    else:
        parts = [format_details(outcome.measurements, outcome.notes)]
        if outcome.process_notes:
            parts.append("processes (from the supervisor):\n" + "\n".join(
                f"  {line}" for line in outcome.process_notes))
        parts.append(outcome.machine_line())
        parts += [format_idle(idle) for idle in idles]
        # the last lines: req/s, p50, p99 per path, the ratios, issue 5's targets, issue 18's
        parts.append(format_summary(outcome.measurements, settings))
        parts.append(format_checks(checks(outcome.measurements, outcome.idle)))
        parts.append(format_checks(checks_issue18(outcome.measurements, idles, workers),
                                   TARGETS_18_TITLE))
        stream.write("\n\n".join(p for p in parts if p) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools, missing = find_tools(needed_tools(args.paths, args.h2_backend))
    if tools is None:
        packages = " ".join(sorted({PACKAGES[m] for m in missing}))
        say(f"missing: {', '.join(missing)}; install with: apt-get install -y {packages}")
        return EXIT_MISSING_TOOLS
    try:
        layout = Layout(args.prefix)
    except ValueError as exc:
        say(str(exc))
        return EXIT_FAILED
    settings = settings_of(args, tools)
    if args.profile is not None:
        try:
            find_py_spy()
        except ProfilerMissing as exc:
            say(str(exc))
            return EXIT_MISSING_TOOLS
    if (MESH_2HOP in args.paths or MESH_2HOP_W in args.paths) and args.idle_connections > 0:
        # before anything starts: the meshds inherit the limit and hold as many sockets
        fitting = raise_fd_limit(args.idle_connections)
        if fitting < args.idle_connections:
            say(f"RLIMIT_NOFILE too low: holding {fitting} idle connections, not "
                f"{args.idle_connections}")
            args.idle_connections = fitting
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


def run(args: argparse.Namespace, tools: Tools, layout: Layout, run_dir: RunDir,
        settings: LoadSettings) -> tuple[int, bool]:
    """The exit code, and whether to keep the run dir for debugging."""
    with_workers = any(p in args.paths for p in MESHD_W_PATHS)
    mesh_file, mesh = write_mesh_file(layout, run_dir, args.workers if with_workers else 0)
    busy = ports_in_use(all_claims(layout, mesh))
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
        stack = Stack(tools, layout, run_dir, mesh_file, mesh, supervisor, console,
                      args.meshd_log_level, args.h2_backend, args.workers)
        settings = replace(settings, scratch=stack.work)   # h2load's per-request logs
        timeout = args.timeout or default_timeout(settings, args.paths)
        load_before = psutil.getloadavg()[0]
        outcome = trio.run(run_guarded, stack, settings, args.paths, args.idle_connections,
                           timeout, args.profile)
        outcome.load_before, outcome.load_after = load_before, psutil.getloadavg()[0]
    outcome.process_notes = supervisor_trouble(console_log)
    clean = verify_cleanup(outcome.started)
    if outcome.measurements:
        print_results(outcome, settings, args.json, sys.stdout, args.workers)
    if outcome.interrupted:
        return EXIT_INTERRUPTED, False
    if outcome.error is not None:
        say(f"failed: {outcome.error}")
        say(f"logs: {run_dir.root / 'logs'}")
        return EXIT_FAILED, True
    return (EXIT_OK if clean else EXIT_FAILED), not clean


if __name__ == "__main__":
    sys.exit(main())
