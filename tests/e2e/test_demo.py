"""The shop demo end to end: `meshd up examples/shop/mesh.toml` as a real process tree.

One mesh for the module; the tests run in file order and the last one stops it:
1. 1000 checkouts through web -> meshd (host-a) -> mTLS -> payments v1/v2, split 90/10;
2. host-b's inbound listener refuses plain TCP and a certificate from another CA, while a
   certificate from the mesh's own CA gets through (so the refusal is about the certificate);
3. the registry's ACLs: no token cannot write the mesh config, a meshd's own token cannot
   write it nor register another host's service or another node, the operator's can, and
   `meshd routes` finds the operator token through the context with no token argument;
4. host-a's meshd SIGTERMed, then SIGKILLed, at 50 req/s through web's /checkout: `meshd up`
   restarts it on the listening sockets it holds, and no checkout fails;
5. SIGTERM stops everything: exit 0, no process of the tree is left, the context is removed.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from proc_testing import Output

from meshd.registry.config_store import ROUTES_KEY

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop" / "mesh.toml"
FRONT_DOOR = ("127.0.0.1", 8080)
HOST_B_INBOUND = ("127.0.0.3", 15001)
READY_WITHIN = 90.0
REQUESTS = 1000
REGISTRY = ("127.0.0.1", 8500)
# 4 sigma of Binomial(1000, 0.1): 100 +- 4 * sqrt(1000 * 0.1 * 0.9) = 100 +- 37.9
V2_RANGE = range(57, 144)


@dataclass
class Mesh:
    process: subprocess.Popen[bytes]
    output: Output
    run_dir: Path
    runtime_dir: Path   # $XDG_RUNTIME_DIR of the runner: the operator context is there
    tree: dict[int, psutil.Process] = field(default_factory=dict)

    def record_tree(self) -> None:
        """Remember every process under the runner now (restarted children get new pids)."""
        try:
            for proc in psutil.Process(self.process.pid).children(recursive=True):
                self.tree.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass


def _stop(mesh: Mesh) -> None:
    if mesh.process.poll() is None:
        mesh.process.send_signal(signal.SIGTERM)
        try:
            mesh.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            mesh.process.kill()
            mesh.process.wait()
    for proc in mesh.tree.values():
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    run_dir = tmp_path_factory.mktemp("shop-run")
    runtime_dir = tmp_path_factory.mktemp("runtime")
    process = subprocess.Popen(
        [sys.executable, "-m", "meshd", "up", str(SHOP), "--run-dir", str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env={**_operator_env(runtime_dir), "NO_COLOR": "1"},
    )
    assert process.stdout is not None
    running = Mesh(process, Output(process.stdout), run_dir,  # type: ignore[arg-type]
                   runtime_dir)
    try:
        if not running.output.wait_for("meshd up: ready", READY_WITHIN):
            running.record_tree()
            _stop(running)
            tail = "\n".join(running.output.text().splitlines()[-150:])
            pytest.fail(f"`meshd up` was not ready within {READY_WITHIN:g}s (exit code "
                        f"{process.poll()}); logs in {run_dir / 'logs'}; the last of its "
                        f"output:\n{tail}")
        running.record_tree()
        yield running
    finally:
        _stop(running)


# --------------------------------------------------------------------------------------------
# 1. traffic


def test_checkouts_reach_payments_split_90_10(mesh: Mesh) -> None:
    versions: Counter[str] = Counter()
    hosts: dict[str, set[str]] = {}
    failures: list[str] = []
    deadline = time.monotonic() + 120
    conn = http.client.HTTPConnection(*FRONT_DOOR, timeout=10)
    try:
        for i in range(REQUESTS):
            assert time.monotonic() < deadline, f"only {i} checkouts in 120 s"
            conn.request("GET", "/checkout")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                failures.append(f"#{i}: {response.status} {body[:200]!r}")
                continue
            answer = json.loads(body)
            if answer.get("service") != "payments":
                failures.append(f"#{i}: not from payments: {answer}")
                continue
            if answer.get("bank", {}).get("approved") is not True:  # charged outside the mesh
                failures.append(f"#{i}: no charge from the bank: {answer}")
                continue
            versions[answer["version"]] += 1
            hosts.setdefault(answer["version"], set()).add(answer["host"])
    finally:
        conn.close()
    assert failures == [], f"{len(failures)} failed checkouts, first: {failures[:5]}"
    assert set(versions) <= {"v1", "v2"}
    assert versions["v2"] in V2_RANGE, f"v2 share {versions['v2']}/{REQUESTS} is not ~10%"
    assert hosts == {"v1": {"host-b"}, "v2": {"host-c"}}
    mesh.record_tree()


def test_outside_clients_come_in_through_the_gateway_over_http_and_https(mesh: Mesh) -> None:
    """gateway edge (host-a) -> mTLS as edge -> web -> payments, on the demo's front doors."""
    conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=10)
    try:
        conn.request("GET", "/checkout")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["service"] == "payments"
    finally:
        conn.close()
    ca_file = mesh.run_dir / "gateway" / "ca.crt"
    assert str(ca_file) in mesh.output.text()  # meshd up says where the CA to trust is
    context = ssl.create_default_context(cafile=str(ca_file))
    secure = http.client.HTTPSConnection("localhost", 8001, timeout=10, context=context)
    try:
        secure.request("GET", "/checkout")
        response = secure.getresponse()
        assert response.status == 200 and json.loads(response.read())["service"] == "payments"
    finally:
        secure.close()


def test_payments_charge_the_bank_outside_the_mesh_over_verified_tls(mesh: Mesh) -> None:
    # host-b's meshd reaches the bank (an external destination) with the CA meshd up made
    with socket.create_connection(("127.0.0.3", 15000), timeout=10) as sock:
        sock.sendall(b"GET /v1/state HTTP/1.1\r\nHost: 127.0.0.3\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    state = json.loads(raw.partition(b"\r\n\r\n")[2])
    bank = state["destinations"]["bank"]
    assert [(e["address"], e["port"], e["node"]) for e in bank["endpoints"]] == [
        ("127.0.0.1", 9443, "bank.shop.example")]
    assert bank["external"]["ca_file"] == str(mesh.run_dir / "external" / "bank" / "ca.pem")
    assert bank["external"]["tls"] == "originate"
    explained = _meshd(mesh, "explain", "bank", "--admin", "127.0.0.3:15000")
    assert explained.returncode == 0, explained.stderr
    assert "TLS originated by meshd" in explained.stdout
    assert "must name bank.shop.example" in explained.stdout
    # (a certificate from another CA, or for another name, refused: tests/proxy)
    access = (mesh.run_dir / "logs" / "access-host-b.log").read_text()
    assert "outbound payments -> bank " in access


def test_the_terminal_shows_events_and_the_access_logs_are_in_files(mesh: Mesh) -> None:
    # after the checkouts above: every one is in host-a's access log (outbound) and in host-b's
    # or host-c's (inbound), and none on the terminal, which a pipe gets without a status line
    logs = mesh.run_dir / "logs"
    outbound = (logs / "access-host-a.log").read_text().count(" INFO meshd.access: outbound ")
    inbound = sum((logs / f"access-{h}.log").read_text().count(" INFO meshd.access: inbound ")
                  for h in ("host-b", "host-c"))
    assert outbound >= REQUESTS and inbound >= REQUESTS, (outbound, inbound)
    assert "meshd.access" not in (logs / "meshd-host-a.log").read_text()
    text = mesh.output.text()
    assert "meshd.access" not in text and "req/s" not in text and "\r" not in text
    assert "logs/access-" not in text and "access-<host>.log" in text
    assert "meshd up: started registry (pid " in text
    # the route table in one line; the whole of it only in the meshd's own log
    assert ("signed by operator dev: bank: external 127.0.0.1:9443; payments: v1 90% / v2 10% "
            "(+1 match route)") in text
    assert "outlier_detection" not in text
    assert "'outlier_detection'" in (logs / "meshd-host-a.log").read_text()
    assert " INFO " not in text, [line for line in text.splitlines() if " INFO " in line][:3]


# --------------------------------------------------------------------------------------------
# 2. the inbound listener refuses strangers


def _http_over(sock: socket.socket | ssl.SSLSocket) -> bytes:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _tls_request(cert: Path, key: Path) -> bytes:
    """An HTTP request over TLS to host-b's inbound listener, presenting ``cert``; what came
    back. The server's certificate is not checked: the server's judgement is under test."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(cert), str(key))
    with socket.create_connection(HOST_B_INBOUND, timeout=15) as raw, \
            context.wrap_socket(raw, server_hostname="payments") as tls:
        return _http_over(tls)


def _foreign_identity(directory: Path) -> tuple[Path, Path]:
    """A certificate claiming to be web (spiffe://shop.mesh/svc/web), issued by another CA."""
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the mesh CA")])
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
            .issuer_name(root.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://shop.mesh/svc/web")]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(root_key, hashes.SHA256()))
    cert_path, key_path = directory / "foreign.crt", directory / "foreign.key"
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                          + root.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_inbound_refuses_plain_tcp(mesh: Mesh) -> None:
    try:
        with socket.create_connection(HOST_B_INBOUND, timeout=15) as sock:
            answer = _http_over(sock)
    except ConnectionError:
        return   # reset: refused
    assert not answer.startswith(b"HTTP/"), f"plaintext got an HTTP answer: {answer[:200]!r}"


def test_inbound_refuses_a_certificate_from_another_ca(mesh: Mesh, tmp_path: Path) -> None:
    cert, key = _foreign_identity(tmp_path)
    try:
        answer = _tls_request(cert, key)
    except (ssl.SSLError, ConnectionError):
        return   # the handshake or the first read failed: refused
    assert not answer.startswith(b"HTTP/"), f"a foreign CA's client got: {answer[:200]!r}"


def test_inbound_accepts_a_certificate_from_the_mesh_ca(mesh: Mesh, tmp_path: Path) -> None:
    # the control for the test above: the same request with a certificate the mesh's CA issued
    subprocess.run(
        [sys.executable, "-m", "meshd", "ca", "issue", "--dir", str(mesh.run_dir / "ca"),
         "--service", "web", "--out", str(tmp_path / "web")],
        check=True, capture_output=True, timeout=30, cwd=REPO,
    )
    answer = _tls_request(tmp_path / "web" / "web.crt", tmp_path / "web" / "web.key")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


# --------------------------------------------------------------------------------------------
# 3. registry ACLs


def _operator_env(runtime_dir: Path) -> dict[str, str]:
    """A newcomer's environment: no registry token of their own, the runner's runtime dir."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_ADDR")}
    return {**env, "XDG_RUNTIME_DIR": str(runtime_dir)}


def _registry(method: str, path: str, body: bytes = b"",
              token: str = "") -> tuple[int, str]:
    conn = http.client.HTTPConnection(*REGISTRY, timeout=15)
    try:
        conn.request(method, path, body=body,
                     headers={"X-Consul-Token": token} if token else {})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def _host_token(mesh: Mesh, host: str) -> str:
    return (mesh.run_dir / "hosts" / host / "registry-token").read_text().strip()


def test_an_unauthenticated_config_write_is_refused(mesh: Mesh) -> None:
    status, text = _registry("PUT", f"/v1/kv/{ROUTES_KEY}", b'{"destinations": {}}')
    assert status == 403, text
    assert "anonymous token lacks permission 'key:write'" in text
    status, text = _registry("PUT", f"/v1/kv/{ROUTES_KEY}", b"{}", token="guessed")
    assert (status, text) == (403, "ACL not found")
    status, text = _registry("PUT", "/v1/agent/service/register",
                             json.dumps({"Name": "payments", "Port": 1}).encode())
    assert status == 403, text


def test_a_host_token_cannot_write_the_config_nor_register_others(mesh: Mesh) -> None:
    token = _host_token(mesh, "host-a")
    # what host-a's meshd needs works with it
    status, _ = _registry("GET", f"/v1/kv/{ROUTES_KEY}", token=token)
    assert status == 200
    status, text = _registry("GET", "/v1/health/connect/payments?passing", token=token)
    assert status == 200 and len(json.loads(text)) == 2, text
    # and nothing more
    status, text = _registry("PUT", f"/v1/kv/{ROUTES_KEY}", b'{"destinations": {}}', token)
    assert status == 403 and "lacks permission 'key:write'" in text, text
    status, text = _registry("PUT", "/v1/agent/service/register", json.dumps(
        {"ID": "payments-host-a", "Name": "payments", "Address": "127.0.0.2",
         "Port": 9001}).encode(), token)
    assert status == 403 and "lacks permission 'service:write' on \"payments\"" in text, text
    status, text = _registry("PUT", "/v1/catalog/register", json.dumps(
        {"Node": "host-z", "Address": "127.0.0.9",
         "Service": {"Service": "web", "Port": 8080}}).encode(), token)
    assert status == 403 and "lacks permission 'node:write' on \"host-z\"" in text, text
    status, text = _registry("PUT", "/v1/agent/service/deregister/payments-host-b", token=token)
    assert status == 403, text


def test_meshd_tokens_are_private_and_the_management_token_is_nobodys(mesh: Mesh) -> None:
    for host in ("host-a", "host-b", "host-c"):
        directory = mesh.run_dir / "hosts" / host
        assert stat.S_IMODE((directory / "registry-token").stat().st_mode) == 0o600
        assert 'registry_token_file = "registry-token"' in (directory / "meshd.toml").read_text()
    mesh.record_tree()
    meshds = [p for p in mesh.tree.values() if "run" in p.cmdline() and p.is_running()]
    assert len(meshds) == 3, meshds
    for proc in meshds:
        assert "MESHD_REGISTRY_ACL_INITIAL_MANAGEMENT" not in proc.environ()
    registry = next(p for p in mesh.tree.values() if "registry" in p.cmdline())
    assert "--acl-enabled" in registry.cmdline()
    management = registry.environ()["MESHD_REGISTRY_ACL_INITIAL_MANAGEMENT"]
    assert management not in " ".join(registry.cmdline())
    for path in mesh.run_dir.rglob("*"):   # configs, tokens, logs (the registry's own data
        if path.is_file() and mesh.run_dir / "registry" not in path.parents:  # holds it)
            assert management not in path.read_text(errors="replace"), path


def _meshd(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd", *args], capture_output=True,
                          text=True, timeout=30, cwd=REPO, env=_operator_env(mesh.runtime_dir))


def test_routes_work_with_the_operator_token_from_the_context(mesh: Mesh) -> None:
    context = mesh.runtime_dir / "meshd" / "context.json"
    assert stat.S_IMODE(context.stat().st_mode) == 0o600
    recorded = json.loads(context.read_text())
    token_file = mesh.run_dir / "operator" / "registry-token"
    assert recorded["registry"] == "http://127.0.0.1:8500"
    assert recorded["registry_token_file"] == str(token_file)
    assert recorded["operator"]["cert"] == str(mesh.run_dir / "operator" / "dev.crt")
    assert f"operator token: {token_file}" in mesh.output.text(0.0)

    shown = _meshd(mesh, "routes", "show")
    assert shown.returncode == 0, shown.stderr
    assert "[destinations.payments]" in shown.stdout and "v1 = 90" in shown.stdout
    # meshd up wrote the table signed with its operator certificate, and so do these commands
    assert "/operator/dev (certificate " in shown.stdout, shown.stdout
    changed = _meshd(mesh, "routes", "set-split", "payments", "v1=90", "v2=10")
    assert changed.returncode == 0, changed.stderr
    assert "v1=90, v2=10 -> v1=90, v2=10" in changed.stdout
    printed = _meshd(mesh, "context", "--token")
    assert printed.stdout.strip() == token_file.read_text().strip()
    # the operator token writes under meshd/config/, and only there
    status, text = _registry("PUT", "/v1/kv/meshd/config/e2e-probe", b"1", printed.stdout.strip())
    assert (status, text.strip()) == (200, "true")
    assert _registry("DELETE", "/v1/kv/meshd/config/e2e-probe",
                     token=printed.stdout.strip())[0] == 200
    assert _registry("PUT", "/v1/kv/elsewhere", b"1", printed.stdout.strip())[0] == 403
    # and the demo still answers behind it
    conn = http.client.HTTPConnection(*FRONT_DOOR, timeout=10)
    try:
        conn.request("GET", "/checkout")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["service"] == "payments"
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# 4. host-a's meshd stopped (SIGTERM) or killed (SIGKILL) under load: `meshd up` holds its
#    listening sockets, restarts it on them, and no checkout fails


RESTART_LOAD = 300  # 6 s at 50 req/s
RESTART_RATE = 50.0


def _checkout(i: int, failures: list[str]) -> None:
    """One checkout on a new connection to web (web's own pooled connections to host-a's
    outbound listener are what the restart tests)."""
    conn = http.client.HTTPConnection(*FRONT_DOOR, timeout=30)
    try:
        conn.request("GET", "/checkout", headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            failures.append(f"#{i}: {response.status} {body[:200]!r}")
    except (OSError, http.client.HTTPException) as exc:
        failures.append(f"#{i}: {type(exc).__name__} {exc}")
    finally:
        conn.close()


def _host_a_meshd(mesh: Mesh) -> psutil.Process:
    config = str(mesh.run_dir / "hosts" / "host-a" / "meshd.toml")
    for proc in psutil.Process(mesh.process.pid).children(recursive=True):
        try:
            if config in proc.cmdline() and "run" in proc.cmdline():
                return proc
        except psutil.Error:
            continue
    raise AssertionError("no meshd of host-a under the runner")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_host_a_meshd_stopped_under_load_fails_no_checkout(mesh: Mesh, sig: int) -> None:
    log = mesh.run_dir / "logs" / "meshd-host-a.log"
    listening = "outbound listener web->payments on"
    victim = _host_a_meshd(mesh)
    before = log.read_text(errors="replace").count(listening)
    failures: list[str] = []
    window = -1.0
    with ThreadPoolExecutor(max_workers=64) as pool:
        start = time.monotonic()
        for i in range(RESTART_LOAD):
            time.sleep(max(0.0, start + i / RESTART_RATE - time.monotonic()))
            pool.submit(_checkout, i, failures)
            if i == int(1.5 * RESTART_RATE):
                signalled = time.monotonic()
                victim.send_signal(sig)
            if window < 0 and i > 1.5 * RESTART_RATE \
                    and log.read_text(errors="replace").count(listening) > before:
                window = time.monotonic() - signalled
    mesh.record_tree()
    successor = _host_a_meshd(mesh)
    print(f"\nmeshd up, {signal.Signals(sig).name} to host-a's meshd at {RESTART_RATE:g} "
          f"req/s: {len(failures)}/{RESTART_LOAD} failed; restart window (signal until the "
          f"new process accepts) {window:.2f}s")
    assert successor.pid != victim.pid
    assert window > 0, "the restarted meshd did not accept within the load"
    assert failures == [], f"{len(failures)}/{RESTART_LOAD} failed: {failures[:5]}"


# --------------------------------------------------------------------------------------------
# 5. shutdown (last: it stops the module's mesh)


def test_sigterm_stops_everything_and_leaves_no_process(mesh: Mesh) -> None:
    mesh.record_tree()
    assert len(mesh.tree) >= 8, mesh.tree   # registry, ca, 3 apps, 3 meshds
    mesh.process.send_signal(signal.SIGTERM)
    try:
        code = mesh.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("meshd up did not exit within 20 s of SIGTERM:\n" + mesh.output.text())
    text = mesh.output.text()
    assert code == 0, text
    assert text.rstrip().endswith("meshd up: stopped"), text[-2000:]
    assert "killed a process left behind" not in text
    assert not (mesh.runtime_dir / "meshd" / "context.json").exists()
    _, alive = psutil.wait_procs(list(mesh.tree.values()), timeout=5)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [f"{p.pid} {p.cmdline()}" for p in alive]
