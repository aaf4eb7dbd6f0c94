"""Two identity figures, measured on loopback:

  leaves/s      certificates the CA issues per second through ``POST /v1/ca/renew`` (mutual TLS
                with node certificates, keep-alive connections, one batch = the node's
                certificate + N service certificates, each batch one locked transaction on
                disk). The CA runs as ``meshd ca serve`` in its own process; its CPU time per
                leaf is reported too. The clients send pre-built CSRs, so they cost little.
  handshakes/s  full mTLS handshakes (ECDSA P-256, TLS 1.3, client certificate, SPIFFE checks
                both ways) accepted by meshd's inbound listener, which runs in its own process;
                its CPU time per handshake is reported too. Each client connection is opened,
                handshaken, checked and closed.

    .venv/bin/python bench/ca_bench.py [--duration 5] [--concurrency 8] [--services 2] [--json]

Every process started is stopped at the end (also on failure or Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

TD = "bench.mesh"
SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
sys.path.insert(0, str(REPO))

from meshd.ca import issuer, store  # noqa: E402
from meshd.identity import ca_client as client  # noqa: E402
from meshd.identity import files, keys  # noqa: E402
from meshd.identity.certs import Identity, TrustBundle  # noqa: E402
from meshd.identity.spiffe import Kind, spiffe_id_of  # noqa: E402
from meshd.identity.tls import TLSState  # noqa: E402
from meshd.proxy.streams import open_mtls  # noqa: E402


@dataclass
class Figure:
    name: str
    per_second: float
    cpu_us_per_op: float
    operations: int
    failures: int
    seconds: float
    concurrency: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="CA leaves/s and inbound mTLS handshakes/s")
    p.add_argument("--duration", type=float, default=5.0, metavar="S")
    p.add_argument("--concurrency", type=int, default=8, metavar="N",
                   help="concurrent clients (nodes renewing; connections handshaking)")
    p.add_argument("--services", type=int, default=2, metavar="N",
                   help="service certificates per renewal batch (plus the node's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--only", choices=["leaves", "handshakes"], default=None)
    return p.parse_args(argv)


# -- child processes ----------------------------------------------------------------------------

@asynccontextmanager
async def child(argv: list[str], ready: str) -> AsyncIterator[tuple[psutil.Process, str]]:
    """Start ``argv``, wait for a stdout line starting with ``ready``, yield (process, line);
    stop it at the end, whatever happens."""
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                if not chunk:
                    break
                line += chunk
        text = line.decode()
        if not text.startswith(ready):
            raise RuntimeError(f"{' '.join(argv[2:4])} did not start (got {text!r})")
        yield psutil.Process(proc.pid), text.strip()
    finally:
        proc.terminate()
        with trio.move_on_after(10) as waiting:
            await proc.wait()
        if waiting.cancelled_caught:
            proc.kill()
            await proc.wait()


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


# -- leaves per second --------------------------------------------------------------------------

def _csr(kind: Kind, name: str) -> str:
    key = keys.new_private_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName(
               [x509.UniformResourceIdentifier(spiffe_id_of(TD, kind, name))]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(Encoding.PEM).decode()


async def leaves_per_second(tmp: Path, args: argparse.Namespace) -> Figure:
    ca_dir = tmp / "ca"
    store.init_ca(ca_dir, TD, now=datetime.now(UTC), who="bench")
    port = _free_port()
    argv = [sys.executable, "-m", "meshd", "ca", "serve", "--dir", str(ca_dir), "--listen",
            f"127.0.0.1:{port}"]
    services = [f"svc{i}" for i in range(args.services)]
    async with child(argv, "listening on") as (proc, line):
        url = line.removeprefix("listening on ").strip()
        fingerprint = store.load_ca(ca_dir).fingerprint
        clients: list[tuple[httpx.AsyncClient, dict[str, Any]]] = []
        for n in range(args.concurrency):
            node = f"node{n}"
            token, _ = store.TokenStore(ca_dir).mint(node, services, now=datetime.now(UTC),
                                                     ttl=timedelta(hours=1), who="bench")
            result = await client.join(url, token=token, node=node, services=services,
                                       fingerprint=fingerprint)
            d = tmp / node
            files.write_bundle(d, result.bundle)
            files.write_node_identity(d, result.node)
            context = ssl.create_default_context(cafile=d / files.BUNDLE_FILE)
            context.load_cert_chain(*files.node_files(d))
            payload = {"node_csr": _csr(Kind.NODE, node),
                       "csrs": {s: _csr(Kind.SERVICE, s) for s in services}}
            clients.append((httpx.AsyncClient(verify=context, timeout=30), payload))
        ok = failures = 0

        async def renew_loop(http: httpx.AsyncClient, payload: dict[str, Any],
                             until: float) -> None:
            nonlocal ok, failures
            while trio.current_time() < until:
                response = await http.post(f"{url}/v1/ca/renew", json=payload)
                if response.status_code == 200:
                    ok += 1
                else:
                    failures += 1

        for http, payload in clients:  # warm the connections
            await http.post(f"{url}/v1/ca/renew", json=payload)
        cpu0, t0 = cpu_seconds(proc), time.perf_counter()
        async with trio.open_nursery() as nursery:
            until = trio.current_time() + args.duration
            for http, payload in clients:
                nursery.start_soon(renew_loop, http, payload, until)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(proc) - cpu0
        for http, _ in clients:
            await http.aclose()
    leaves = ok * (len(services) + 1)
    return Figure("CA leaves issued", leaves / elapsed, cpu / max(leaves, 1) * 1e6, leaves,
                  failures, elapsed, args.concurrency)


# -- inbound handshakes per second ---------------------------------------------------------------

def write_identities(directory: Path, services: list[str]) -> None:
    key = keys.new_private_key()
    signer = issuer.Signer(key, issuer.build_root(key, TD, datetime.now(UTC)))
    files.write_bundle(directory, TrustBundle.from_pems(TD, [keys.cert_pem(signer.cert)]))
    for service in services:
        leaf_key = keys.new_private_key()
        cert = issuer.issue_leaf(signer, leaf_key.public_key(), service=service,
                                 trust_domain=TD, now=datetime.now(UTC))
        files.write_identity(directory, Identity.from_pem(keys.cert_pem(cert),
                                                          keys.private_key_pem(leaf_key)))


async def serve_inbound(directory: Path) -> None:
    """Child mode: meshd's data plane with one inbound service; prints ``ready PORT``."""
    from meshd.config.schema import CASettings, HostConfig, LocalService
    from meshd.metrics import Metrics
    from meshd.proxy.core.view import ViewCell
    from meshd.proxy.server import Proxy

    config = HostConfig(
        node="bench", address="127.0.0.1", trust_domain=TD, registry_url="http://127.0.0.1:1",
        ca=CASettings("https://127.0.0.1:1", "sha256:" + "0" * 64, directory / "token"),
        inbound_port=0, state_dir=directory, services=(LocalService("payments", 9),))
    proxy = Proxy(config, ViewCell(), TLSState(directory, TD, ["payments"]), Metrics())
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        print(f"ready {proxy.inbound_address[1]}", flush=True)


async def handshakes_per_second(tmp: Path, args: argparse.Namespace) -> Figure:
    certs = tmp / "certs"
    write_identities(certs, ["payments", "web"])
    tls = TLSState(certs, TD, ["web"])
    argv = [sys.executable, str(SCRIPT), "_inbound", str(certs)]
    async with child(argv, "ready") as (proc, line):
        port = int(line.split()[1])
        ok = failures = 0

        async def connect_loop(until: float) -> None:
            nonlocal ok, failures
            while trio.current_time() < until:
                try:
                    stream = await open_mtls("127.0.0.1", port, tls, "web", "payments")
                except Exception:  # counted, whatever it is
                    failures += 1
                    continue
                await trio.aclose_forcefully(stream)
                ok += 1

        await connect_loop(trio.current_time() + 0.5)  # warm up
        ok = failures = 0
        cpu0, t0 = cpu_seconds(proc), time.perf_counter()
        async with trio.open_nursery() as nursery:
            until = trio.current_time() + args.duration
            for _ in range(args.concurrency):
                nursery.start_soon(connect_loop, until)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(proc) - cpu0
    return Figure("inbound mTLS handshakes", ok / elapsed, cpu / max(ok, 1) * 1e6, ok,
                  failures, elapsed, args.concurrency)


# -- main -----------------------------------------------------------------------------------------

def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(args: argparse.Namespace) -> list[Figure]:
    figures = []
    with tempfile.TemporaryDirectory(prefix="meshd-ca-bench-") as tmp:
        if args.only in (None, "leaves"):
            figures.append(await leaves_per_second(Path(tmp), args))
        if args.only in (None, "handshakes"):
            figures.append(await handshakes_per_second(Path(tmp), args))
    return figures


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "_inbound":
        trio.run(serve_inbound, Path(sys.argv[2]))
        return 0
    args = parse_args(argv)
    figures = trio.run(run, args)
    if args.json:
        print(json.dumps([asdict(f) for f in figures], indent=2))
        return 0
    print(f"{os.cpu_count()} CPUs, {args.concurrency} concurrent clients, "
          f"{args.duration:g} s each")
    for f in figures:
        print(f"{f.name:26} {f.per_second:9.0f}/s   {f.cpu_us_per_op:8.0f} µs CPU each "
              f"(server process)   {f.operations} done, {f.failures} failed")
    return 0 if all(f.failures == 0 for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
