"""``meshd up``: a whole mesh as child processes of one runner, on one machine.

Start order: registry (ACLs on) -> ready -> registry tokens -> CA init, join tokens and the
operator certificate -> CA serve -> ready -> the stand-ins for external services (their demo
certificates made first) -> ready -> routes into the registry's KV (with the operator token)
-> the operator context -> the apps -> one meshd per simulated host -> every ``/readyz``
answers 200. Then the runner prints what runs where and ``meshd up: ready``, and waits for SIGINT
or SIGTERM. Meanwhile the terminal shows events, not the children's every line (``console.py``):
their logs are in ``<run dir>/logs/``, the meshds' access logs in ``logs/access-<host>.log``.
The first signal cancels whatever step is under way and the supervisor stops everything in
order; a second one kills what is left at once. Either way the exit path is the same, including
after a failed start: nothing this runner started outlives it, and the operator context is
removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TextIO

import httpx
import trio

import meshd
from meshd.config.load import load_host_config, load_routes, read_toml
from meshd.config.mesh import parse_mesh
from meshd.config.mesh_schema import HostPort, MeshConfig, MeshHost, MeshService, port_claims
from meshd.config.parse import FINGERPRINT_RE
from meshd.config.routes import routes_to_data
from meshd.config.schema import RouteTable
from meshd.dev import access, childlog, gateway_certs, probes, statusline
from meshd.dev.console import Console
from meshd.dev.external import TLSFiles, expand_external_command, make_tls_files, with_ca_files
from meshd.dev.generate import expand_command, host_config_data, render_toml
from meshd.dev.ports import ports_in_use
from meshd.dev.report import Row, format_table
from meshd.dev.supervisor import Child, ChildSpec, Supervisor
from meshd.errors import MeshError
from meshd.listen_fds import bind_listener, host_listen_addresses
from meshd.operator_context import OperatorContext, context_path, remove_context, write_context
from meshd.registry.config_store import ROUTES_KEY
from meshd.registry.operator_key import OperatorKey

# stop groups: the meshds go first so they deregister while the registry still answers
MESHD_GROUP, APP_GROUP, CA_GROUP, REGISTRY_GROUP = range(4)
REGISTRY_TIMEOUT = 30.0
CA_TIMEOUT = 30.0
MESHD_TIMEOUT = 60.0
EXTERNAL_TIMEOUT = 30.0
TOKEN_TTL = "24h"
RUN_DIR_MARKER = ".meshd-up"


def load_mesh(path: Path) -> MeshConfig:
    return parse_mesh(read_toml(path), str(path), path.parent)


@dataclass(frozen=True)
class RunDir:
    """Where one run keeps its generated configs, CA, registry data and logs."""

    root: Path

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    def host(self, name: str) -> Path:
        return self.root / "hosts" / name

    @property
    def operator(self) -> Path:
        """The operator's registry token and certificate (a 0700 directory)."""
        return self.root / "operator"

    def external(self, name: str) -> Path:
        """The CA, certificate and key ``meshd up`` made for an external stand-in."""
        return self.root / "external" / name

    def log(self, label: str) -> Path:
        return self.root / "logs" / (re.sub(r"[^A-Za-z0-9_.-]+", "-", label) + ".log")

    def access_log(self, host: str) -> Path:
        """The access log lines of a host's meshd (``meshd.access``)."""
        return self.log(f"access {host}")


def prepare_run_dir(path: Path | None) -> tuple[RunDir, bool]:
    """The run directory, and whether it is a fresh temporary one. A given directory must be
    empty, new, or one an earlier ``meshd up`` used (whose generated content is replaced)."""
    try:
        if path is None:
            root = Path(tempfile.mkdtemp(prefix="meshd-up-"))
            (root / RUN_DIR_MARKER).write_text("meshd up run directory\n")
            return RunDir(root), True
        root = path.expanduser().resolve()
        if root.exists():
            if not root.is_dir():
                raise MeshError(f"run dir {root} is not a directory")
            if any(root.iterdir()) and not (root / RUN_DIR_MARKER).exists():
                raise MeshError(f"run dir {root} is not empty and was not made by meshd up; "
                                "give an empty or new directory")
        run_dir = RunDir(root)
        for old in (run_dir.registry, run_dir.ca, root / "hosts", root / "logs",
                    run_dir.operator, root / "external"):
            shutil.rmtree(old, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        (root / RUN_DIR_MARKER).write_text("meshd up run directory\n")
        return run_dir, False
    except OSError as exc:
        raise MeshError(f"cannot prepare the run dir {path or 'in the temp dir'}: "
                        f"{exc.strerror or exc}") from exc


@dataclass(frozen=True)
class Launch:
    """Everything ``bring_up`` needs, decided before anything starts."""

    mesh: MeshConfig
    mesh_file: Path
    routes: RouteTable | None
    run_dir: RunDir
    python: str
    log_level: str
    keep: bool
    # where the operator context goes (removed on exit); None: no context (the benchmarks)
    context_file: Path | None = None
    log_format: str = "text"  # the children's (``--log-format``); ``childlog`` reads both

    def meshd_argv(self, *args: str) -> tuple[str, ...]:
        # `python -m meshd`, so a venv without the console script on PATH works too
        return (self.python, "-m", "meshd", "--log-level", self.log_level,
                "--log-format", self.log_format, *args)

    @property
    def env(self) -> dict[str, str]:
        source_root = str(Path(meshd.__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        return {"PYTHONUNBUFFERED": "1",
                "PYTHONPATH": source_root + (os.pathsep + path if path else "")}


def app_labels(mesh: MeshConfig) -> dict[tuple[str, str], str]:
    """(host, service) -> ``"web v1"``; with the host added where that alone is ambiguous."""
    plain: dict[str, int] = {}
    for host in mesh.hosts:
        for ms in host.services:
            key = f"{ms.service.name} {ms.service.version}"
            plain[key] = plain.get(key, 0) + 1
    labels: dict[tuple[str, str], str] = {}
    for host in mesh.hosts:
        for ms in host.services:
            key = f"{ms.service.name} {ms.service.version}"
            labels[(host.name, ms.service.name)] = key if plain[key] == 1 else f"{key} @{host.name}"
    return labels


def main(file: Path, *, keep: bool = False, run_dir: Path | None = None,
         log_level: str = "info", stream: TextIO | None = None, tui: bool = False,
         verbose: bool = False, log_format: str = "text") -> int:
    console = Console(stream or sys.stdout, verbose=verbose)
    if tui and not (sys.stdin.isatty() and sys.stdout.isatty()):
        console.error("--tui needs a terminal (stdin and stdout); nothing was started")
        return 1
    # one line per probe request is noise among the children's output
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mesh = load_mesh(file)
    routes = load_routes(mesh.routes) if mesh.routes is not None else None
    busy = ports_in_use(port_claims(mesh))
    if busy:
        for line in busy:
            console.error(line)
        console.error("nothing was started")
        return 1
    rd, temporary = prepare_run_dir(run_dir or mesh.run_dir)
    launch = Launch(mesh=mesh, mesh_file=file.resolve(), routes=routes, run_dir=rd,
                    python=sys.executable, log_level=log_level, keep=keep or not temporary,
                    context_file=context_path(), log_format=log_format)
    supervisor = Supervisor(console, sweep_all_descendants=True)
    foreground = partial(run_console, launch, console) if tui else None
    held: list[socket.socket] = []  # every meshd's listening sockets, for the whole run
    try:
        return trio.run(supervise_until_signal, console, supervisor,
                        partial(bring_up, launch, console, held=held), foreground)
    finally:
        for sock in held:
            sock.close()
        if launch.context_file is not None:
            remove_context(launch.context_file, os.getpid())
        if not launch.keep:
            shutil.rmtree(rd.root, ignore_errors=True)


async def supervise_until_signal(
    console: Console, supervisor: Supervisor,
    bring_up: Callable[[Supervisor], Awaitable[None]],
    foreground: Callable[[], Awaitable[int]] | None = None,
) -> int:
    """Run ``bring_up`` under ``supervisor``, then wait for SIGINT, SIGTERM or SIGHUP (or, with
    ``foreground``, until it returns: the console of ``--tui``); stop everything and return 0,
    or 1 if ``bring_up`` or ``foreground`` failed."""
    code = 0
    # SIGHUP too: closing the terminal must not orphan the children
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            startup = trio.CancelScope()
            nursery.start_soon(_watch_signals, signals, startup, supervisor, console)
            async with supervisor.running():
                with startup:
                    try:
                        await bring_up(supervisor)
                    except MeshError as exc:
                        console.start_failed()
                        console.error(str(exc))
                        console.error("stopping everything")
                        code = 1
                    else:
                        if foreground is None:
                            await show_status(console, supervisor)
                        else:
                            code = await foreground()
                console.clear_status()
            nursery.cancel_scope.cancel()
    console.say("stopped")
    return code


async def show_status(console: Console, supervisor: Supervisor) -> None:
    """Redraw the status line (on a terminal) until cancelled."""
    if not console.live:
        await trio.sleep_forever()
    before = statusline.Counts(time.monotonic(), console.requests, console.failed)
    while True:
        await trio.sleep(statusline.INTERVAL)
        now = statusline.Counts(time.monotonic(), console.requests, console.failed)
        console.status(statusline.status_text(
            [(c.label, c.state.value) for c in supervisor.children], before, now))
        before = now


async def run_console(launch: Launch, console: Console) -> int:
    """``meshd tui`` against the mesh's registry, in the foreground of this terminal; the
    children's output goes only to their logs meanwhile. 0 when the operator quit it."""
    ports = sorted({h.admin_port for h in launch.mesh.hosts})
    argv = launch.meshd_argv("tui", "--registry", f"http://{launch.mesh.registry}",
                             "--admin-port", str(ports[0]))
    if len(ports) > 1:
        console.error(f"the hosts' admin ports differ ({', '.join(map(str, ports))}); the "
                      f"console reads each meshd at port {ports[0]}")
    console.say("opening the console (quit it to stop the mesh)")
    console.mute()
    try:
        # stdin (stdin=None: inherited, not trio's default of an empty pipe), stdout and
        # stderr are the terminal's; a cancel (SIGTERM to the runner) terminates it
        result = await trio.run_process(
            list(argv), check=False, stdin=None,
            env={**os.environ, **launch.env,
                 "CONSUL_HTTP_TOKEN_FILE": str(launch.run_dir.operator / access.TOKEN_FILE)})
    except OSError as exc:
        console.unmute()
        console.error(f"cannot start the console ({argv[0]}): {exc.strerror or exc}")
        return 1
    finally:
        console.unmute()
    if result.returncode != 0:
        console.error(f"the console exited with code {result.returncode}; stopping the mesh")
        return 1
    console.say("console closed: stopping")
    return 0


async def _watch_signals(signals: AsyncIterator[int], startup: trio.CancelScope,
                         supervisor: Supervisor, console: Console) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not startup.cancel_called:
            console.say(f"{name}: stopping (once more to kill everything at once)")
            startup.cancel()
        else:
            console.say(f"{name}: killing what is left")
            supervisor.hurry()


async def bring_up(launch: Launch, console: Console, supervisor: Supervisor,
                   held: list[socket.socket] | None = None) -> None:
    """Start everything, in order (the module's header). ``held`` receives the listening
    sockets bound for the meshds, which the caller closes once everything has stopped (None:
    the meshds bind their own, and a restart of one refuses connections meanwhile)."""
    mesh, rd = launch.mesh, launch.run_dir
    labels = app_labels(mesh)
    console.say(f"starting {launch.mesh_file} (run dir {rd.root})")
    registry_http = f"http://{mesh.registry}"
    # used here to create the tokens below, and given to no meshd
    management = access.new_secret()
    async with probes.http_client() as client:
        registry = await supervisor.start(ChildSpec(
            "registry", launch.meshd_argv("registry", "serve", "--http", str(mesh.registry),
                                          "--data-dir", str(rd.registry),
                                          *access.registry_acl_args()),
            rd.log("registry"), REGISTRY_GROUP,
            env={**launch.env, access.MANAGEMENT_ENV: management}))
        await probes.wait_ready(
            probes.http_ok(client, f"{registry_http}/v1/status/leader"),
            what="the registry", how=f"GET {registry_http}/v1/status/leader",
            give_up_after=REGISTRY_TIMEOUT, child=registry)
        tokens = await access.create_tokens(registry_http, management, mesh)
        operator_token = rd.operator / access.TOKEN_FILE
        access.write_secret(operator_token, tokens.operator)

        fingerprint = _fingerprint(await probes.run_command(
            launch.meshd_argv("ca", "init", "--dir", str(rd.ca),
                              "--trust-domain", mesh.trust_domain),
            what="meshd ca init", env=launch.env))
        configs: dict[str, Path] = {}
        for host in mesh.hosts:
            if gateway_certs.needs_certificate(host):
                ca_file, cert_file, key_file = gateway_certs.make_certificate(rd.root / "gateway")
                host = gateway_certs.with_certificate(host, cert_file, key_file)
                console.plain(f"gateway certificate (localhost, 127.0.0.1): {cert_file}; "
                              f"clients trust it with --cacert {ca_file}")
            claims = [*(s.service.name for s in host.services), *(g.name for g in host.gateways)]
            token = await probes.run_command(
                launch.meshd_argv("ca", "token", "--dir", str(rd.ca), "--node", host.name,
                                  "--services", ",".join(claims),
                                  "--ttl", TOKEN_TTL),
                what=f"meshd ca token for {host.name}", env=launch.env)
            configs[host.name] = write_host_files(rd, launch, host, fingerprint,
                                                  _last_line(token), tokens.hosts[host.name])
        operator = await access.issue_operator_certificate(rd.ca, rd.operator)
        ca = await supervisor.start(ChildSpec(
            "ca", launch.meshd_argv("ca", "serve", "--dir", str(rd.ca), "--listen", str(mesh.ca)),
            rd.log("ca"), CA_GROUP, env=launch.env))
        # the API itself, not only a TCP connect: a bare connect makes the CA log a failed
        # TLS handshake
        await probes.wait_ready(probes.http_ok(client, f"https://{mesh.ca}/v1/ca/roots"),
                                what="the CA", how=f"GET https://{mesh.ca}/v1/ca/roots",
                                give_up_after=CA_TIMEOUT, child=ca)

        externals = await start_externals(launch, supervisor, client)
        if launch.routes is not None:
            signer = OperatorKey.from_files(operator.cert, operator.key)
            table = with_ca_files(launch.routes, {name: files.ca
                                                  for name, (_, files) in externals.items()
                                                  if files is not None})
            await probes.write_routes(registry_http, table, signer, token=tokens.operator)
            console.say(f"routes from {mesh.routes} written to {ROUTES_KEY}, signed by "
                        f"operator {operator.name}: "
                        + childlog.summarise_routes(routes_to_data(launch.routes)["destinations"]))
        _write_context(launch, console, OperatorContext(
            registry=registry_http, token_file=operator_token,
            admin=tuple(str(h.admin) for h in mesh.hosts), operator=operator,
            run_dir=rd.root, pid=os.getpid()))

        apps: dict[tuple[str, str], Child] = {}
        for host in mesh.hosts:
            for ms in host.services:
                if ms.command:
                    apps[(host.name, ms.service.name)] = await supervisor.start(
                        app_spec(launch, host, ms, labels[(host.name, ms.service.name)]))
        meshds: dict[str, Child] = {}
        for host in mesh.hosts:
            # held for the whole run by the caller; without a list to keep them in (they
            # would be closed when it is dropped) each meshd binds its own
            sockets = hold_listeners(configs[host.name], held) if held is not None else ()
            meshds[host.name] = await supervisor.start(ChildSpec(
                f"meshd {host.name}", launch.meshd_argv("run", "--config",
                                                         str(configs[host.name])),
                rd.log(f"meshd {host.name}"), MESHD_GROUP, cwd=rd.host(host.name),
                env=launch.env, listen_fds=sockets, access_log=rd.access_log(host.name)))
        await probes.wait_meshds_ready(client, mesh, meshds, give_up_after=MESHD_TIMEOUT)

    rows = [Row("registry", registry.pid, f"http://{mesh.registry}"),
            Row("ca", ca.pid, f"https://{mesh.ca}")]
    for host in mesh.hosts:
        ups = [f"{u.name} -> {host.outbound_address}:{u.local_port}"
               for ms in host.services for u in ms.service.upstreams]
        gateways = [f"gateway {g.name} " + " ".join(f"{x.protocol}://{x.address}:{x.port}"
                                                    for x in g.listeners)
                    for g in host.gateways]
        rows.append(Row(f"meshd {host.name}", meshds[host.name].pid,
                        f"inbound {host.inbound}, admin http://{host.admin}"
                        + "".join(f", upstream {u}" for u in ups)
                        + "".join(f", {g}" for g in gateways)))
        for ms in host.services:
            app = apps.get((host.name, ms.service.name))
            where = f"{ms.service.protocol.value}://{ms.service.address}:{ms.service.port}"
            rows.append(Row(labels[(host.name, ms.service.name)],
                            app.pid if app is not None else None,
                            f"{where} on {host.name}"
                            + ("" if app is not None else " (not started by meshd up)")))
    for ext in mesh.externals:
        child, files = externals[ext.name]
        where = f"{'https' if files else 'http'}://{HostPort(ext.address, ext.port)}"
        rows.append(Row(f"external {ext.name}", child.pid, f"{where} outside the mesh"
                        + (f", TLS name {ext.tls_name}, CA {files.ca}" if files else "")))
    console.plain(format_table(rows))
    console.plain("try:")
    for hint in (*mesh.hints, f"curl -s http://{mesh.hosts[0].admin}/v1/state"):
        console.plain(f"  {hint.replace('{run_dir}', str(rd.root))}")
    found = (f" (meshd routes and meshd tui find it through {launch.context_file})"
             if launch.context_file is not None else "")
    console.plain(f"registry ACLs: on; operator token: {rd.operator / access.TOKEN_FILE}{found}")
    console.plain(f"logs: {rd.root / 'logs'} (one per process; the meshds' access logs: "
                  "access-<host>.log)"
                  + ("" if launch.keep else "; the run dir is removed on exit, --keep keeps it"))
    console.ready()


async def start_externals(launch: Launch, supervisor: Supervisor, client: httpx.AsyncClient
                          ) -> dict[str, tuple[Child, TLSFiles | None]]:
    """Start the stand-ins for services outside the mesh (``meshd.dev.external``), each with
    the certificate made for its ``tls_name``, and wait until each answers ``GET /healthz``."""
    out: dict[str, tuple[Child, TLSFiles | None]] = {}
    here = launch.mesh_file.parent
    for ext in launch.mesh.externals:
        files = None
        if ext.tls_name is not None:
            try:
                files = await trio.to_thread.run_sync(
                    make_tls_files, launch.run_dir.external(ext.name), ext.tls_name)
            except OSError as exc:
                raise MeshError(f"cannot write the certificate of external {ext.name}: "
                                f"{exc.strerror or exc}") from exc
        argv = expand_external_command(ext, python=launch.python, here=here, files=files)
        label = f"external {ext.name}"
        child = await supervisor.start(ChildSpec(label, tuple(argv), launch.run_dir.log(label),
                                                 APP_GROUP, cwd=here, env=launch.env))
        url = f"{'https' if files else 'http'}://{HostPort(ext.address, ext.port)}/healthz"
        await probes.wait_ready(probes.http_ok(client, url), what=label, how=f"GET {url}",
                                give_up_after=EXTERNAL_TIMEOUT, child=child)
        out[ext.name] = (child, files)
    return out


def hold_listeners(config_file: Path, held: list[socket.socket]) -> tuple[tuple[str, int], ...]:
    """Bind a meshd's listening sockets (inbound, each outbound listener, admin) here, in the
    runner, as systemd's fd store holds them: the meshd gets them on every start, and while it
    restarts connections wait in the kernel's queue instead of being refused."""
    passed = []
    for address in host_listen_addresses(load_host_config(config_file)):
        try:
            sock = bind_listener(address)
        except OSError as exc:
            raise MeshError(f"cannot listen on {address.host}:{address.port} ({address.name}, "
                            f"for {config_file}): {exc.strerror or exc}") from exc
        held.append(sock)
        passed.append((address.name, sock.fileno()))
    return tuple(passed)


def app_spec(launch: Launch, host: MeshHost, ms: MeshService, label: str) -> ChildSpec:
    here = launch.mesh_file.parent
    argv = expand_command(ms.command, host=host, service=ms.service, python=launch.python,
                          here=here)
    return ChildSpec(label, tuple(argv), launch.run_dir.log(label), APP_GROUP, cwd=here,
                     env=launch.env)


def _write_context(launch: Launch, console: Console, context: OperatorContext) -> None:
    if launch.context_file is None:
        return
    try:
        write_context(context, launch.context_file)
    except OSError as exc:
        console.error(f"cannot write the operator context {launch.context_file}: "
                      f"{exc.strerror or exc}; give meshd routes and meshd tui the operator "
                      f"token: CONSUL_HTTP_TOKEN_FILE={context.token_file}")


def write_host_files(rd: RunDir, launch: Launch, host: MeshHost, fingerprint: str,
                     token: str, registry_token: str) -> Path:
    """Write a host's meshd.toml, join token and registry token; check the daemon's own parser
    accepts them."""
    directory = rd.host(host.name)
    data = host_config_data(launch.mesh, host, fingerprint=fingerprint,
                            registry_token_file=access.TOKEN_FILE)
    header = (f"meshd.toml of {host.name}, generated by `meshd up` from {launch.mesh_file}.\n"
              "Edits are overwritten by the next run.")
    path = directory / "meshd.toml"
    try:
        (directory / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / "join-token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token)
        access.write_secret(directory / access.TOKEN_FILE, registry_token)
        path.write_text(render_toml(data, header))
    except OSError as exc:
        raise MeshError(f"cannot write the configuration of {host.name} to {directory}: "
                        f"{exc.strerror or exc}") from exc
    load_host_config(path)
    return path


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise MeshError("expected a line of output, got none")
    return lines[-1]


def _fingerprint(output: str) -> str:
    for line in reversed(output.splitlines()):
        if FINGERPRINT_RE.match(line.strip()):
            return line.strip()
    raise MeshError(f"meshd ca init printed no sha256:<hex> fingerprint: {output.strip()!r}")
