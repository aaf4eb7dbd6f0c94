"""What the benchmark measures, started as supervised child processes.

The processes run under ``meshd up``'s own ``Supervisor`` (own session per child, a log per child,
ordered stop, a final psutil sweep) and the mesh is brought up by ``meshd up``'s own
``bring_up``: the embedded registry, ``meshd ca init``/``token``/``serve`` and one ``meshd run``
per host with a generated ``meshd.toml``, waited for until every meshd is ready and sees the
backend. nginx and haproxy are further children of the same supervisor.

The backend service of the bench's mesh.toml is ``mtls = "permissive"`` (the single-hop path);
``start_mesh`` checks that the meshd.toml ``meshd up``'s generator wrote for host B says so.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_configs import (
    BODY,
    ROUTES_FILE,
    Layout,
    TLSFiles,
    haproxy_h2_conf,
    haproxy_h2_hop_a_conf,
    haproxy_h2_hop_b_conf,
    haproxy_hop_a_conf,
    haproxy_hop_b_conf,
    haproxy_l7_conf,
    mesh_toml,
    nghttpd_argv,
    nginx_conf,
    routes_toml,
)

from meshd.config.load import load_host_config, load_routes
from meshd.config.mesh_schema import MeshConfig, MeshHost, PortClaim, port_claims
from meshd.config.schema import MTLSMode
from meshd.dev import probes
from meshd.dev.console import Console
from meshd.dev.runner import (
    APP_GROUP,
    MESHD_GROUP,
    Launch,
    RunDir,
    bring_up,
    load_mesh,
)
from meshd.dev.supervisor import Child, ChildSpec, Supervisor
from meshd.errors import MeshError

READY_TIMEOUT = 20.0
HOP_A, HOP_B = "hop-a", "hop-b"
# program -> the Debian package that provides it
PACKAGES = {"haproxy": "haproxy", "wrk": "wrk", "nginx": "nginx-light",
            "h2load": "nghttp2-client", "nghttpd": "nghttp2-server"}
# what serves h2c to the HTTP/2 paths (``--h2-backend``)
NGHTTPD, NGINX = "nghttpd", "nginx"
# the workers rows (``--workers N``, default 2: the names keep "2" whatever N is)
MESH_1HOP_W, MESH_2HOP_W = "meshd-1hop-w2", "meshd-2hop-w2"
HAPROXY_T, HAPROXY_2HOP_T = "haproxy-t2", "haproxy-2hop-t2"
WRK, H2LOAD = "wrk", "h2load"   # the load generators: HTTP/1.1 and HTTP/2 (h2c)
# nginx and haproxy live in /usr/sbin, which a user's PATH may lack
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin",
                               "/sbin"])


@dataclass(frozen=True)
class Tools:
    """Absolute paths of the external programs."""

    nginx: str
    haproxy: str
    wrk: str
    h2load: str
    nghttpd: str


def find_tools(needed: tuple[str, ...]) -> tuple[Tools | None, list[str]]:
    """The tools, or None and the programs of ``needed`` that are missing."""
    found = {name: shutil.which(name, path=SEARCH_PATH) for name in PACKAGES}
    missing = [name for name in needed if found[name] is None]
    if missing:
        return None, missing
    return Tools(nginx=found["nginx"] or "nginx", haproxy=found["haproxy"] or "haproxy",
                 wrk=found["wrk"] or "wrk", h2load=found["h2load"] or "h2load",
                 nghttpd=found["nghttpd"] or "nghttpd"), []


@dataclass(frozen=True)
class Target:
    """One path under test: where the load generator (``tool``: wrk for HTTP/1.1, h2load for
    h2c) sends its requests, and whose CPU is the proxy's."""

    name: str
    url: str
    description: str
    proxies: tuple[Child, ...] = ()
    tool: str = WRK


def write_mesh_file(layout: Layout, run_dir: RunDir,
                    workers: int = 0) -> tuple[Path, MeshConfig]:
    """Write the benchmark's mesh.toml (and its route table) into the run dir and parse it as
    ``meshd up`` does; with ``workers`` > 0 it has the workers rows' hosts C and D."""
    (run_dir.root / ROUTES_FILE).write_text(routes_toml(workers=workers > 0))
    path = run_dir.root / "mesh.toml"
    path.write_text(mesh_toml(layout, workers=workers))
    return path, load_mesh(path)


def all_claims(layout: Layout, mesh: MeshConfig) -> list[PortClaim]:
    """Every address:port of the run, each once (the mesh declares nginx's port too)."""
    seen: set[tuple[str, int]] = set()
    claims: list[PortClaim] = []
    for claim in [*port_claims(mesh), *layout.bench_claims()]:
        if (claim.address, claim.port) not in seen:
            seen.add((claim.address, claim.port))
            claims.append(claim)
    return claims


class Stack:
    """Starts each path's processes under ``supervisor`` and says how to reach them."""

    def __init__(self, tools: Tools, layout: Layout, run_dir: RunDir, mesh_file: Path,
                 mesh: MeshConfig, supervisor: Supervisor, console: Console,
                 meshd_log_level: str, h2_backend: str = NGHTTPD, workers: int = 2) -> None:
        self.tools = tools
        self.workers = workers   # of the workers rows' meshds, and haproxy's nbthread beside
        self.layout = layout
        self.run_dir = run_dir
        self.supervisor = supervisor
        self.console = console
        self.h2_backend = h2_backend
        self.h2c = f"{h2_backend} (h2c)"   # in the HTTP/2 paths' descriptions
        self.work = run_dir.root / "bench"
        self.work.mkdir(parents=True, exist_ok=True)
        self._tls: TLSFiles | None = None
        # the route table bring_up writes to the registry (default_policy = "allow")
        routes = load_routes(mesh.routes) if mesh.routes is not None else None
        self.launch = Launch(mesh=mesh, mesh_file=mesh_file, routes=routes, run_dir=run_dir,
                             python=sys.executable, log_level=meshd_log_level, keep=True)

    async def start_backend(self, client: httpx.AsyncClient) -> tuple[Target, Target]:
        """nginx (HTTP/1.1) and the h2c backend: nghttpd, or a second port of the same
        nginx (``h2_backend``). The two direct paths."""
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.work / kind).mkdir(exist_ok=True)
        conf = self._write("nginx.conf", nginx_conf(self.layout, self.work,
                                                    h2c=self.h2_backend == NGINX))
        url = f"http://{self.layout.backend}/"
        argv = (self.tools.nginx, "-e", "stderr", "-p", str(self.work), "-c", str(conf))
        server = await self._start_ready(client, "nginx", argv, url, APP_GROUP)
        if self.h2_backend == NGHTTPD:
            docroot = self.work / "htdocs"
            docroot.mkdir(exist_ok=True)
            (docroot / "index.html").write_text(BODY)
            server = await self.supervisor.start(self._spec(
                "nghttpd", nghttpd_argv(self.tools.nghttpd, self.layout, docroot), APP_GROUP))
        h2_url = f"http://{self.layout.backend_h2}/"
        await self._wait_h2(h2_url, self.h2c, server)
        return (Target("direct", url, "wrk -> nginx"),
                Target("h2-direct", h2_url, f"h2load -> {self.h2c}", tool=H2LOAD))

    async def start_haproxy(self, client: httpx.AsyncClient) -> Target:
        conf = self._write("haproxy.cfg", haproxy_l7_conf(self.layout))
        url = f"http://{self.layout.haproxy}/"
        child = await self._start_ready(client, "haproxy", self._haproxy_argv(conf), url,
                                        MESHD_GROUP)
        return Target("haproxy", url, "wrk -> haproxy (HTTP, keep-alive) -> nginx", (child,))

    async def start_haproxy_threads(self, client: httpx.AsyncClient) -> Target:
        """The workers rows' baseline: one haproxy with ``nbthread N``."""
        n = self.workers
        conf = self._write(f"haproxy-t{n}.cfg", haproxy_l7_conf(self.layout, threads=n))
        url = f"http://{self.layout.haproxy_threads}/"
        child = await self._start_ready(client, f"haproxy t{n}", self._haproxy_argv(conf), url,
                                        MESHD_GROUP)
        return Target(HAPROXY_T, url,
                      f"wrk -> haproxy (HTTP, keep-alive, nbthread {n}) -> nginx", (child,))

    async def start_haproxy_h2(self) -> Target:
        conf = self._write("haproxy-h2.cfg", haproxy_h2_conf(self.layout))
        child = await self.supervisor.start(self._spec("haproxy h2", self._haproxy_argv(conf),
                                                       MESHD_GROUP))
        url = f"http://{self.layout.h2_haproxy}/"
        await self._wait_h2(url, "haproxy h2", child)
        return Target("h2-haproxy", url, f"h2load -> haproxy (proto h2) -> {self.h2c}",
                      (child,), H2LOAD)

    async def start_mesh(self, client: httpx.AsyncClient) -> tuple[Target, ...]:
        """``meshd up``'s bring_up: registry, CA, two ``meshd run``; ready when host A sees B,
        host B's inbound listener answers plaintext HTTP and host A's h2 outbound port answers
        h2c. The single-hop, the two-hop and the HTTP/2 two-hop path; with the workers hosts
        in the mesh.toml, the two workers rows too."""
        await bring_up(self.launch, self.console, self.supervisor)
        host_a, host_b = self.mesh_host("host-a"), self.mesh_host("host-b")
        self._check_permissive(host_b)
        meshd_a, meshd_b = self.child(f"meshd {host_a.name}"), self.child(f"meshd {host_b.name}")
        single_url = f"http://{host_b.inbound}/"
        await probes.wait_ready(probes.http_ok(client, single_url),
                                what="meshd host-b's inbound listener (plaintext)",
                                how=f"GET {single_url}", give_up_after=READY_TIMEOUT,
                                child=meshd_b)
        single = Target("meshd-1hop", single_url,
                        "wrk -> meshd B inbound (plaintext, permissive) -> nginx", (meshd_b,))
        two = Target("meshd-2hop", f"http://{self.layout.mesh_outbound}/",
                     "wrk -> meshd A outbound -> mTLS -> meshd B inbound -> nginx",
                     (meshd_a, meshd_b))
        h2_url = f"http://{self.layout.mesh_outbound_h2}/"
        await self._wait_h2(h2_url, "meshd host-a's outbound listener (h2c)", meshd_a)
        h2 = Target("h2-meshd-2hop", h2_url,
                    "h2load -> meshd A outbound (h2c) -> h2 over mTLS -> meshd B inbound -> "
                    f"{self.h2c}", (meshd_a, meshd_b), H2LOAD)
        if not any(h.name == "host-d" for h in self.launch.mesh.hosts):
            return single, two, h2
        # a client of their own, closed when ready: a kept-alive probe connection would sit on
        # one worker and show in the spread of the load's connections over the workers
        async with probes.http_client() as own:
            rows = await self._workers_rows(own)
        return single, two, h2, *rows

    async def _workers_rows(self, client: httpx.AsyncClient) -> tuple[Target, Target]:
        """Hosts C and D (``workers = N`` each): ready when D's inbound listener answers
        plaintext and C's outbound listener answers through both."""
        host_c, host_d = self.mesh_host("host-c"), self.mesh_host("host-d")
        meshd_c, meshd_d = self.child(f"meshd {host_c.name}"), self.child(f"meshd {host_d.name}")
        n = self.workers
        single_url = f"http://{host_d.inbound}/"
        await probes.wait_ready(probes.http_ok(client, single_url),
                                what="meshd host-d's inbound listener (plaintext)",
                                how=f"GET {single_url}", give_up_after=READY_TIMEOUT,
                                child=meshd_d)
        two_url = f"http://{self.layout.mesh_outbound_w}/"
        await probes.wait_ready(probes.http_ok(client, two_url),
                                what="meshd host-c's outbound listener", how=f"GET {two_url}",
                                give_up_after=READY_TIMEOUT, child=meshd_c)
        return (Target(MESH_1HOP_W, single_url,
                       f"wrk -> meshd D inbound ({n} workers, plaintext) -> nginx", (meshd_d,)),
                Target(MESH_2HOP_W, two_url,
                       f"wrk -> meshd C outbound -> mTLS -> meshd D inbound ({n} workers each) "
                       "-> nginx", (meshd_c, meshd_d)))

    def mesh_host(self, name: str) -> MeshHost:
        for host in self.launch.mesh.hosts:
            if host.name == name:
                return host
        raise MeshError(f"the bench's mesh.toml has no host {name!r}")

    async def start_haproxy_two_hop(self, client: httpx.AsyncClient) -> Target:
        """Two haproxy processes with TLS between them, certificates from ``meshd ca issue``
        (needs the mesh's CA: call after ``start_mesh``)."""
        tls = await self._certificates()
        conf_b = self._write("haproxy-hop-b.cfg", haproxy_hop_b_conf(self.layout, tls))
        conf_a = self._write("haproxy-hop-a.cfg", haproxy_hop_a_conf(self.layout, tls))
        hop_b = await self.supervisor.start(self._spec("haproxy hop B",
                                                       self._haproxy_argv(conf_b), MESHD_GROUP))
        url = f"http://{self.layout.hop_a}/"
        hop_a = await self._start_ready(client, "haproxy hop A", self._haproxy_argv(conf_a), url,
                                        MESHD_GROUP)
        return Target("haproxy-2hop", url,
                      "wrk -> haproxy A -> TLS 1.3, client certs -> haproxy B -> nginx",
                      (hop_a, hop_b))

    async def start_haproxy_two_hop_threads(self, client: httpx.AsyncClient) -> Target:
        """The two-hop pair with ``nbthread N`` each, on its own addresses."""
        tls = await self._certificates()
        n = self.workers
        conf_b = self._write(f"haproxy-hop-b-t{n}.cfg",
                             haproxy_hop_b_conf(self.layout, tls, threads=n))
        conf_a = self._write(f"haproxy-hop-a-t{n}.cfg",
                             haproxy_hop_a_conf(self.layout, tls, threads=n))
        hop_b = await self.supervisor.start(self._spec(f"haproxy hop B t{n}",
                                                       self._haproxy_argv(conf_b), MESHD_GROUP))
        url = f"http://{self.layout.hop_a_threads}/"
        hop_a = await self._start_ready(client, f"haproxy hop A t{n}",
                                        self._haproxy_argv(conf_a), url, MESHD_GROUP)
        return Target(HAPROXY_2HOP_T, url,
                      f"wrk -> haproxy A -> TLS 1.3, client certs -> haproxy B -> nginx "
                      f"(nbthread {n} each)", (hop_a, hop_b))

    async def start_haproxy_h2_two_hop(self) -> Target:
        """The HTTP/2 pair: h2c into hop A, h2 over TLS 1.3 (ALPN h2, client certificates)
        between the hops, h2c to nginx (needs the mesh's CA: call after ``start_mesh``)."""
        tls = await self._certificates()
        conf_b = self._write("haproxy-h2-hop-b.cfg", haproxy_h2_hop_b_conf(self.layout, tls))
        conf_a = self._write("haproxy-h2-hop-a.cfg", haproxy_h2_hop_a_conf(self.layout, tls))
        hop_b = await self.supervisor.start(self._spec("haproxy h2 hop B",
                                                       self._haproxy_argv(conf_b), MESHD_GROUP))
        hop_a = await self.supervisor.start(self._spec("haproxy h2 hop A",
                                                       self._haproxy_argv(conf_a), MESHD_GROUP))
        url = f"http://{self.layout.h2_hop_a}/"
        await self._wait_h2(url, "haproxy h2 hop A", hop_a)
        return Target("h2-haproxy-2hop", url,
                      "h2load -> haproxy A (h2c) -> h2 over TLS 1.3, client certs -> haproxy B "
                      f"-> {self.h2c}", (hop_a, hop_b), H2LOAD)

    def child(self, label: str) -> Child:
        for child in self.supervisor.children:
            if child.label == label:
                return child
        raise MeshError(f"no child process labelled {label!r}")

    # ----------------------------------------------------------------------------------------

    def _check_permissive(self, host: MeshHost) -> None:
        path = self.run_dir.host(host.name) / "meshd.toml"
        config = load_host_config(path)
        if not any(s.mtls is MTLSMode.PERMISSIVE for s in config.services):
            raise MeshError(f"{path} has no permissive service: the single-hop path needs "
                            f"mtls = \"permissive\" on {host.name}'s backend")

    async def _certificates(self) -> TLSFiles:
        """The haproxy pairs' certificates, issued once per run."""
        if self._tls is None:
            self._tls = await self._issue_certificates()
        return self._tls

    async def _issue_certificates(self) -> TLSFiles:
        out = self.work / "certs"
        for service in (HOP_A, HOP_B):
            await probes.run_command(
                self.launch.meshd_argv("ca", "issue", "--dir", str(self.run_dir.ca),
                                       "--service", service, "--out", str(out)),
                what=f"meshd ca issue --service {service}", env=self.launch.env)
            pem = (out / f"{service}.crt").read_bytes() + (out / f"{service}.key").read_bytes()
            (out / f"{service}.pem").write_bytes(pem)
            (out / f"{service}.pem").chmod(0o600)
        return TLSFiles(ca_bundle=out / "ca.crt", hop_a_pem=out / f"{HOP_A}.pem",
                        hop_b_pem=out / f"{HOP_B}.pem")

    async def _start_ready(self, client: httpx.AsyncClient, label: str, argv: tuple[str, ...],
                           url: str, stop_group: int) -> Child:
        child = await self.supervisor.start(self._spec(label, argv, stop_group))
        await probes.wait_ready(probes.http_ok(client, url), what=label, how=f"GET {url}",
                                give_up_after=READY_TIMEOUT, child=child)
        return child

    async def _wait_h2(self, url: str, what: str, child: Child) -> None:
        """Until ``url`` answers 200 to a GET over h2c with prior knowledge."""
        async with httpx.AsyncClient(http1=False, http2=True, trust_env=False,
                                     timeout=probes.PROBE_TIMEOUT) as h2:
            await probes.wait_ready(probes.http_ok(h2, url), what=what,
                                    how=f"GET {url} over h2c (prior knowledge)",
                                    give_up_after=READY_TIMEOUT, child=child)

    def _haproxy_argv(self, conf: Path) -> tuple[str, ...]:
        return (self.tools.haproxy, "-db", "-f", str(conf))   # -db: in the foreground

    def _spec(self, label: str, argv: tuple[str, ...], stop_group: int) -> ChildSpec:
        return ChildSpec(label, argv, self.run_dir.log(label), stop_group, cwd=self.work)

    def _write(self, name: str, text: str) -> Path:
        path = self.work / name
        path.write_text(text)
        return path
