"""Where everything of the benchmark listens, and the configuration files it writes. Pure.

Every process gets its own loopback address in one /24 of 127.0.0.0/8 (default 127.77.0.0/24),
away from the addresses and ports of the shop demo, so the benchmark can run while someone else
on the machine runs ``meshd up``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from meshd.config.mesh_schema import HostPort, PortClaim

TRUST_DOMAIN = "bench.mesh"
BACKEND_SERVICE = "backend"
BACKEND_H2_SERVICE = "backend-h2"   # the h2c backend (nghttpd or nginx), protocol = "http2"
LOADGEN_SERVICE = "loadgen"
# the workers rows' own pair of hosts (each meshd with ``workers = N``) and services: a second
# "backend" instance would make host A balance between the two pairs
BACKEND_W_SERVICE = "backend-w"
LOADGEN_W_SERVICE = "loadgen-w"
OUTBOUND_PORT = 19191
OUTBOUND_H2_PORT = 19192
ROUTES_FILE = "routes.toml"         # next to the generated mesh.toml
BODY = "ok"   # 2 bytes, as in docs/performance.md ("Prototypes")


@dataclass(frozen=True)
class Layout:
    """The addresses of one benchmark run, all in ``prefix``.0/24."""

    prefix: str = "127.77.0"

    def __post_init__(self) -> None:
        try:
            network = ipaddress.IPv4Network(f"{self.prefix}.0/24")
        except ValueError:
            raise ValueError(f"--prefix {self.prefix!r}: expected three numbers, as 127.77.0") \
                from None
        if not network.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")):
            raise ValueError(f"{self.prefix}.0/24 is not loopback (use 127.x.y)")

    def ip(self, last: int) -> str:
        return f"{self.prefix}.{last}"

    @property
    def registry(self) -> HostPort:
        return HostPort(self.ip(1), 18500)

    @property
    def ca(self) -> HostPort:
        return HostPort(self.ip(1), 18443)

    @property
    def host_a(self) -> str:
        return self.ip(2)

    @property
    def host_b(self) -> str:
        return self.ip(3)

    @property
    def mesh_outbound(self) -> HostPort:
        return HostPort(self.host_a, OUTBOUND_PORT)

    @property
    def host_c(self) -> str:
        """The workers rows' host A (outbound side)."""
        return self.ip(4)

    @property
    def host_d(self) -> str:
        """The workers rows' host B (fronts nginx)."""
        return self.ip(5)

    @property
    def mesh_outbound_w(self) -> HostPort:
        return HostPort(self.host_c, OUTBOUND_PORT)

    @property
    def backend(self) -> HostPort:
        return HostPort(self.ip(10), 18080)

    @property
    def backend_w(self) -> HostPort:
        """A second port of the same nginx: the workers rows' backend service (meshd up wants
        each service instance on its own address:port)."""
        return HostPort(self.ip(10), 18085)

    @property
    def mesh_outbound_h2(self) -> HostPort:
        return HostPort(self.host_a, OUTBOUND_H2_PORT)

    @property
    def backend_h2(self) -> HostPort:
        """The h2c backend's listener (HTTP/2 with prior knowledge only)."""
        return HostPort(self.ip(10), 18090)

    @property
    def haproxy(self) -> HostPort:
        return HostPort(self.ip(20), 18081)

    @property
    def hop_a(self) -> HostPort:
        return HostPort(self.ip(21), 18082)

    @property
    def hop_b(self) -> HostPort:
        return HostPort(self.ip(22), 18443)

    @property
    def h2_haproxy(self) -> HostPort:
        return HostPort(self.ip(24), 18091)

    @property
    def h2_hop_a(self) -> HostPort:
        return HostPort(self.ip(25), 18092)

    @property
    def h2_hop_b(self) -> HostPort:
        return HostPort(self.ip(26), 18444)

    @property
    def haproxy_threads(self) -> HostPort:
        """haproxy with ``nbthread N`` (the workers rows' baseline)."""
        return HostPort(self.ip(27), 18083)

    @property
    def hop_a_threads(self) -> HostPort:
        return HostPort(self.ip(28), 18084)

    @property
    def hop_b_threads(self) -> HostPort:
        return HostPort(self.ip(29), 18445)

    def bench_claims(self) -> list[PortClaim]:
        """The listeners the benchmark starts itself (the mesh's own come from its mesh.toml)."""
        return [
            PortClaim(self.backend.host, self.backend.port, "nginx backend", "--prefix"),
            PortClaim(self.backend_w.host, self.backend_w.port, "nginx backend (workers rows)",
                      "--prefix"),
            PortClaim(self.haproxy.host, self.haproxy.port, "haproxy", "--prefix"),
            PortClaim(self.hop_a.host, self.hop_a.port, "haproxy hop A", "--prefix"),
            PortClaim(self.hop_b.host, self.hop_b.port, "haproxy hop B", "--prefix"),
            PortClaim(self.backend_h2.host, self.backend_h2.port, "h2c backend",
                      "--prefix"),
            PortClaim(self.h2_haproxy.host, self.h2_haproxy.port, "haproxy h2", "--prefix"),
            PortClaim(self.h2_hop_a.host, self.h2_hop_a.port, "haproxy h2 hop A", "--prefix"),
            PortClaim(self.h2_hop_b.host, self.h2_hop_b.port, "haproxy h2 hop B", "--prefix"),
            PortClaim(self.haproxy_threads.host, self.haproxy_threads.port,
                      "haproxy (nbthread N)", "--prefix"),
            PortClaim(self.hop_a_threads.host, self.hop_a_threads.port,
                      "haproxy hop A (nbthread N)", "--prefix"),
            PortClaim(self.hop_b_threads.host, self.hop_b_threads.port,
                      "haproxy hop B (nbthread N)", "--prefix"),
        ]


def mesh_toml(layout: Layout, health_interval: str = "5s", workers: int = 0) -> str:
    """A two-host mesh: host A runs the load generator's side (no app: wrk calls its outbound
    listener), host B fronts the nginx backend. The backend is *permissive*: host B's inbound
    listener also takes plaintext HTTP for it, which is the single-hop path (wrk -> host B's
    inbound listener -> nginx); mTLS from host A is checked as with ``strict``. The HTTP/2
    path has its own service, ``backend-h2`` (the h2c backend, ``protocol = "http2"``), and
    upstream port on host A; the h2c backend takes no HTTP/1.1, so its check is a TCP
    connect. With ``workers`` > 0 a second pair of hosts (C and D, the same roles as A and B,
    services ``loadgen-w`` and ``backend-w``) runs meshds with ``workers = N``: the workers
    rows."""
    return _mesh_toml_base(layout, health_interval) + (
        _workers_hosts(layout, health_interval, workers) if workers > 0 else "")


def _workers_hosts(layout: Layout, health_interval: str, workers: int) -> str:
    return f"""
# the workers rows: the same two roles, each meshd a supervisor and {workers} worker processes
[[hosts]]
name = "host-c"
address = "{layout.host_c}"
outbound_address = "{layout.host_c}"
workers = {workers}

[[hosts.services]]
name = "{LOADGEN_W_SERVICE}"        # wrk; nothing listens here
port = 9000
health = {{ none = true }}
upstreams = [{{ name = "{BACKEND_W_SERVICE}", local_port = {OUTBOUND_PORT} }}]

[[hosts]]
name = "host-d"
address = "{layout.host_d}"
workers = {workers}

[[hosts.services]]
name = "{BACKEND_W_SERVICE}"        # the same nginx, its second port
address = "{layout.backend_w.host}"
port = {layout.backend_w.port}
mtls = "permissive"
health = {{ http = "/healthz", interval = "{health_interval}" }}
"""


def _mesh_toml_base(layout: Layout, health_interval: str) -> str:
    return f"""\
# generated by bench/proxy_bench.py
#   two hops:   client -> host A outbound -> mTLS -> host B inbound -> nginx
#   single hop: client -> host B inbound (plaintext, the backend is permissive) -> nginx
#   HTTP/2:     h2load -> host A outbound (h2c) -> h2 over mTLS -> host B inbound -> h2c backend
trust_domain = "{TRUST_DOMAIN}"
registry = "{layout.registry}"
ca = "{layout.ca}"
routes = "{ROUTES_FILE}"            # default_policy = "allow": no authorization rules to check

[[hosts]]
name = "host-a"
address = "{layout.host_a}"
outbound_address = "{layout.host_a}"

[[hosts.services]]
name = "{LOADGEN_SERVICE}"          # wrk; nothing listens here
port = 9000
health = {{ none = true }}
upstreams = [{{ name = "{BACKEND_SERVICE}", local_port = {OUTBOUND_PORT} }},
             {{ name = "{BACKEND_H2_SERVICE}", local_port = {OUTBOUND_H2_PORT} }}]

[[hosts]]
name = "host-b"
address = "{layout.host_b}"

[[hosts.services]]
name = "{BACKEND_SERVICE}"          # nginx, started by the benchmark
address = "{layout.backend.host}"
port = {layout.backend.port}
mtls = "permissive"                # plaintext on host B's inbound port: the single-hop path
health = {{ http = "/healthz", interval = "{health_interval}" }}

[[hosts.services]]
name = "{BACKEND_H2_SERVICE}"       # nghttpd (or nginx's HTTP/2-only port)
address = "{layout.backend_h2.host}"
port = {layout.backend_h2.port}
protocol = "http2"                 # host B speaks h2c to it
health = {{ tcp = true, interval = "{health_interval}" }}
"""


def routes_toml(workers: bool = False) -> str:
    """The route table ``meshd up`` writes to the registry: without one every service follows
    the default deny (403). ``allow`` and no rules: the paths measure proxying, not rule
    evaluation (as before the default deny), and the single hop's plaintext caller (source
    ``unknown``) is let in. A table names at least one destination; these have no settings."""
    return f"""\
# generated by bench/proxy_bench.py
default_policy = "allow"

[destinations.{BACKEND_SERVICE}]
[destinations.{BACKEND_H2_SERVICE}]
""" + (f"[destinations.{BACKEND_W_SERVICE}]\n" if workers else "")


def nginx_conf(layout: Layout, work_dir: Path, h2c: bool = False) -> str:
    """nginx in the foreground, one worker, no access log, a 2-byte body on every path (on two
    ports: the second is the workers rows' backend); with
    ``h2c`` on a second port too, h2c (HTTP/2 with prior knowledge only: nginx then takes no
    HTTP/1.1 there) for the HTTP/2 paths when nghttpd does not serve them.
    keepalive_requests (for HTTP/2 too: requests per connection) is raised so that no client
    (wrk, h2load, a proxy's pool) is made to reconnect every 1000 requests."""
    temp_paths = "".join(f"    {kind}_temp_path {work_dir / kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    h2c_listen = f"        listen {layout.backend_h2} http2;\n" if h2c else ""
    return f"""\
daemon off;
worker_processes 1;
pid {work_dir / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths}    keepalive_requests 10000000;
    keepalive_timeout 65s;
    default_type text/plain;
    server {{
        listen {layout.backend};
        listen {layout.backend_w};
{h2c_listen}        location / {{ return 200 "{BODY}"; }}
    }}
}}
"""


_HAPROXY_COMMON = """\
global
    nbthread {threads}
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
"""


def _common(threads: int = 1) -> str:
    return _HAPROXY_COMMON.format(threads=threads)


def haproxy_l7_conf(layout: Layout, threads: int = 1) -> str:
    """haproxy in HTTP mode with keep-alive to the backend: one thread, or ``threads`` on
    their own address (the workers rows' baseline)."""
    bind = layout.haproxy if threads == 1 else layout.haproxy_threads
    return _common(threads) + f"""\
frontend bench_l7
    bind {bind}
    default_backend nginx
backend nginx
    server backend {layout.backend}
"""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files issued by ``meshd ca issue``: haproxy wants certificate and key in one file."""

    ca_bundle: Path
    hop_a_pem: Path
    hop_b_pem: Path


def haproxy_hop_a_conf(layout: Layout, tls: TLSFiles, threads: int = 1) -> str:
    """Hop A: plain HTTP in, TLS 1.3 with a client certificate to hop B, connections reused
    (``threads`` > 1: the workers rows' pair, on its own addresses)."""
    hop_a, hop_b = ((layout.hop_a, layout.hop_b) if threads == 1
                    else (layout.hop_a_threads, layout.hop_b_threads))
    return _common(threads) + f"""\
frontend hop_a
    bind {hop_a}
    default_backend hop_b
backend hop_b
    server hop_b {hop_b} ssl crt {tls.hop_a_pem} {_verify_peer(tls)}
"""


def haproxy_hop_b_conf(layout: Layout, tls: TLSFiles, threads: int = 1) -> str:
    """Hop B: TLS 1.3 in, requiring a client certificate from the mesh CA; plain HTTP to nginx."""
    hop_b = layout.hop_b if threads == 1 else layout.hop_b_threads
    return _common(threads) + f"""\
frontend hop_b
    bind {hop_b} ssl crt {tls.hop_b_pem} {_verify_peer(tls)}
    default_backend nginx
backend nginx
    server backend {layout.backend}
"""


def _verify_peer(tls: TLSFiles) -> str:
    """Both sides present a certificate and check the other's against the mesh CA, TLS 1.3 only
    (as meshd). Unlike meshd, haproxy does not check the peer's SPIFFE identity."""
    return f"ca-file {tls.ca_bundle} verify required ssl-min-ver TLSv1.3"


def nghttpd_argv(program: str, layout: Layout, docroot: Path) -> tuple[str, ...]:
    """nghttpd (Debian ``nghttp2-server``) on the h2c port: one worker, no TLS, serving
    ``docroot`` (whose index.html is the 2-byte body: ``/`` answers it)."""
    return (program, "--no-tls", f"--address={layout.backend_h2.host}", "-n", "1",
            "-d", str(docroot), str(layout.backend_h2.port))


def haproxy_h2_conf(layout: Layout) -> str:
    """One haproxy thread, h2c in (``proto h2`` on the bind), h2c to the h2c backend."""
    return _common() + f"""\
frontend bench_h2
    bind {layout.h2_haproxy} proto h2
    default_backend h2c_backend
backend h2c_backend
    server backend {layout.backend_h2} proto h2
"""


def haproxy_h2_hop_a_conf(layout: Layout, tls: TLSFiles) -> str:
    """HTTP/2 hop A: h2c in, h2 over TLS 1.3 (ALPN h2) with a client certificate to hop B."""
    return _common() + f"""\
frontend h2_hop_a
    bind {layout.h2_hop_a} proto h2
    default_backend h2_hop_b
backend h2_hop_b
    server hop_b {layout.h2_hop_b} ssl alpn h2 crt {tls.hop_a_pem} {_verify_peer(tls)}
"""


def haproxy_h2_hop_b_conf(layout: Layout, tls: TLSFiles) -> str:
    """HTTP/2 hop B: h2 over TLS 1.3 in (ALPN h2, a client certificate from the mesh CA
    required); h2c to the h2c backend."""
    return _common() + f"""\
frontend h2_hop_b
    bind {layout.h2_hop_b} ssl alpn h2 crt {tls.hop_b_pem} {_verify_peer(tls)}
    default_backend h2c_backend
backend h2c_backend
    server backend {layout.backend_h2} proto h2
"""
