"""The shop demo spread over network namespaces, for the fault scenarios.

    registry 10.77.0.2:8500   `meshd registry serve` (its own host)
    ca       10.77.0.3:8443   `meshd ca serve` (its own host), 60 s leaf certificates
    host-a   10.77.0.11       meshd + web (http://10.77.0.11:8080, the front door)
    host-b   10.77.0.12       meshd + payments v1 (app on host-b's loopback)
    host-c   10.77.0.13       meshd + payments v2 (app on host-c's loopback)
    client   10.77.0.20       the load generator (tests/faults/nsagent.py)

Every meshd.toml is made with meshd's own generator (``meshd.config.mesh_schema.host_data``,
``meshd.dev.generate.render_toml``) and checked with the daemon's own loader. Each admin API stays
on its host's loopback (127.0.0.1:15000): the suite reads it from inside that host's namespace.
A request from the client crosses the bridge twice: client -> web (plain HTTP, host-a) ->
host-a's meshd -> mutual TLS -> host-b or host-c's meshd -> payments.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netns import Proc, Topology, run

from meshd.config.load import load_host_config
from meshd.config.mesh_schema import HostPort, MeshHost, host_data
from meshd.dev.generate import render_toml

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"
AGENT = Path(__file__).resolve().parent / "nsagent.py"
PYTHON = sys.executable
TRUST_DOMAIN = "shop.mesh"
LEAF_TTL = "60s"
ADMIN = "127.0.0.1:15000"
WEB_PORT = 8080
PAYMENTS_PORT = 9001
UPSTREAM_PORT = 9191

OPERATOR = "faults"
HOSTS = {"registry": 2, "ca": 3, "host-a": 11, "host-b": 12, "host-c": 13, "client": 20}
BACKENDS = {"host-b": "v1", "host-c": "v2"}


def env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONUNBUFFERED": "1", "NO_COLOR": "1",
            "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def meshd_argv(*args: str) -> list[str]:
    return [PYTHON, "-m", "meshd", *args]


@dataclass
class LoadRun:
    """A load generator running in the client namespace until its stop file appears."""

    popen: subprocess.Popen[str]
    stop_file: Path

    def abandon(self) -> None:
        """Stop it without reading its counts (a scenario failed half-way)."""
        if self.popen.poll() is None:
            self.stop_file.touch()
            try:
                self.popen.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.communicate()

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        self.stop_file.touch()
        out, err = self.popen.communicate(timeout=timeout)
        if self.popen.returncode != 0 or not out.strip():
            raise RuntimeError(f"load generator failed ({self.popen.returncode}): {err[-2000:]}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


class FaultMesh:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.topo = Topology(HOSTS, root / "logs")
        self.ip = {name: h.ip for name, h in self.topo.hosts.items()}
        self.registry_url = f"http://{self.ip['registry']}:8500"
        self.ca_dir = root / "ca"
        self.operator_dir = root / "operator"
        self.procs: dict[str, Proc] = {}
        self.loads: list[LoadRun] = []

    # -- building -------------------------------------------------------------------------------

    def start(self) -> None:
        self.topo.create()
        self.start_registry()
        self.wait(lambda: self.get("client", f"{self.registry_url}/v1/status/leader")["status"]
                  == 200, 30, "the registry answers")
        init = run(meshd_argv("ca", "init", "--dir", str(self.ca_dir), "--trust-domain",
                              TRUST_DOMAIN, "--leaf-ttl", LEAF_TTL), env={**os.environ, **env()})
        fingerprint = next(line.strip() for line in reversed(init.stdout.splitlines())
                           if re.fullmatch(r"sha256:[0-9a-f]{64}", line.strip()))
        # the operator's certificate: every route table the suite writes is signed with it
        # (valid for the whole suite, unlike the short-lived leaves under test)
        run(meshd_argv("ca", "issue", "--dir", str(self.ca_dir), "--operator", OPERATOR,
                       "--out", str(self.operator_dir), "--ttl", "24h"),
            env={**os.environ, **env()})
        self.start_ca()
        self.wait(lambda: self.get("client", f"https://{self.ip['ca']}:8443/v1/ca/roots",
                                   insecure=True)["status"] == 200, 30, "the CA answers")
        self.apply_routes("routes.toml")
        self.start_app("host-a")
        for host in BACKENDS:
            self.start_app(host)
        for host in ("host-a", *BACKENDS):
            self.write_host_config(host, fingerprint)
            self.start_meshd(host)
        self.wait(self.all_healthy, 90, "every meshd ready and host-a seeing both payments")

    def start_registry(self) -> Proc:
        # ACLs off beyond loopback: the bridge lives in this suite's own namespaces and no one
        # else can reach it; the suite is about faults (ACLs are tested in tests/registry and
        # with `meshd up` in tests/e2e)
        return self._spawn("registry", "registry", meshd_argv(
            "registry", "serve", "--http", f"{self.ip['registry']}:8500",
            "--data-dir", str(self.root / "registry-data"), "--allow-unauthenticated"))

    def start_ca(self) -> Proc:
        return self._spawn("ca", "ca", meshd_argv(
            "ca", "serve", "--dir", str(self.ca_dir), "--listen", f"{self.ip['ca']}:8443"))

    def start_app(self, host: str) -> Proc:
        if host == "host-a":
            argv = [PYTHON, str(SHOP / "web.py"), "--address", self.ip["host-a"], "--port",
                    str(WEB_PORT), "--upstream", f"http://127.0.0.1:{UPSTREAM_PORT}"]
            return self._spawn("web", host, argv)
        version = BACKENDS[host]
        return self._spawn(f"payments {version}", host, [
            PYTHON, str(SHOP / "payments.py"), "--address", "127.0.0.1", "--port",
            str(PAYMENTS_PORT), "--version", version, "--node", host])

    def start_meshd(self, host: str) -> Proc:
        return self._spawn(f"meshd {host}", host, meshd_argv(
            "run", "--config", str(self.root / "hosts" / host / "meshd.toml")))

    def _spawn(self, label: str, host: str, argv: list[str]) -> Proc:
        old = self.procs.get(label)
        if old is not None:
            assert not old.alive(), f"{label} is running"
            proc = old.start()
        else:
            proc = self.procs[label] = self.topo.spawn(label, host, argv, env=env())
        return proc

    def write_host_config(self, host: str, fingerprint: str) -> Path:
        directory = self.root / "hosts" / host
        (directory / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
        services = ["web"] if host == "host-a" else ["payments"]
        token = run(meshd_argv("ca", "token", "--dir", str(self.ca_dir), "--node", host,
                               "--services", ",".join(services), "--ttl", "1h", "--uses", "5"),
                    env={**os.environ, **env()}).stdout.strip().splitlines()[-1]
        fd = os.open(directory / "join-token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token)
        mesh_host = MeshHost(name=host, address=self.ip[host])
        data = host_data(mesh_host, TRUST_DOMAIN, HostPort(self.ip["registry"], 8500),
                         HostPort(self.ip["ca"], 8443), fingerprint)
        data["admin"] = {"address": ADMIN}   # loopback of the host's namespace
        health = {"http": "/healthz", "interval": "1s", "timeout": "1s"}
        if host == "host-a":
            data["services"] = [{
                "name": "web", "port": WEB_PORT, "address": self.ip[host], "protocol": "http",
                "version": "v1", "health": health,
                "upstreams": [{"name": "payments", "local_port": UPSTREAM_PORT}]}]
        else:
            data["services"] = [{
                "name": "payments", "port": PAYMENTS_PORT, "address": "127.0.0.1",
                "protocol": "http", "version": BACKENDS[host], "health": health}]
        path = directory / "meshd.toml"
        path.write_text(render_toml(data, f"meshd.toml of {host} (fault suite)"))
        load_host_config(path)   # the daemon's own loader accepts it
        return path

    # -- looking --------------------------------------------------------------------------------

    def agent(self, host: str, *args: str, timeout: float = 30.0) -> Any:
        result = self.topo.exec(host, [PYTHON, str(AGENT), *args], timeout=timeout, env=env())
        return json.loads(result.stdout.strip().splitlines()[-1])

    def get(self, host: str, url: str, *, insecure: bool = False) -> dict[str, Any]:
        if insecure:   # the CA's roots endpoint: only "does it answer"
            code = self.topo.exec(host, [
                PYTHON, "-c", "import ssl,sys,urllib.request as u;"
                "c=ssl.create_default_context();c.check_hostname=False;c.verify_mode=0;"
                "o=u.build_opener(u.ProxyHandler({}),u.HTTPSHandler(context=c));"
                f"print(o.open({url!r},timeout=3).status)"], check=False, timeout=15)
            return {"status": int(code.stdout.strip() or 0) if code.returncode == 0 else 0}
        answer: dict[str, Any] = self.agent(host, "get", url)
        return answer

    def state(self, host: str) -> dict[str, Any]:
        answer = self.get(host, f"http://{ADMIN}/v1/state")
        if answer["status"] != 200:
            raise RuntimeError(f"{host}: /v1/state answered {answer}")
        state: dict[str, Any] = answer["body"]
        return state

    def healthy_payments(self) -> dict[str, bool]:
        """host-a's view: node -> healthy and not ejected."""
        eps = self.state("host-a")["destinations"].get("payments", {}).get("endpoints", [])
        return {e["node"]: bool(e["healthy"]) and not e.get("ejected") for e in eps}

    def all_healthy(self) -> bool:
        try:
            for host in ("host-a", *BACKENDS):
                if self.get(host, f"http://{ADMIN}/readyz")["status"] != 200:
                    return False
            view = self.healthy_payments()
        except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError):
            return False
        return all(view.get(h) for h in BACKENDS)

    def routes_in_force(self, host: str = "host-a") -> dict[str, Any]:
        routes: dict[str, Any] = self.state(host)["routes"]
        return routes

    @staticmethod
    def wait(predicate: Callable[[], bool], within: float, what: str,
             interval: float = 0.2) -> float:
        """Poll until ``predicate``; seconds it took. AssertionError after ``within``."""
        started = time.monotonic()
        while True:
            if predicate():
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise AssertionError(f"not within {within:g}s: {what}")
            time.sleep(interval)

    # -- acting ---------------------------------------------------------------------------------

    def meshd_cli(self, *args: str) -> str:
        """A `meshd` command run on the client host (the operator's seat)."""
        result = self.topo.exec("client", meshd_argv(*args), env=env())
        return result.stdout

    def operator_args(self) -> tuple[str, ...]:
        """The options that sign what `meshd routes` (or the agent's set-splits) writes."""
        return ("--operator-cert", str(self.operator_dir / f"{OPERATOR}.crt"),
                "--operator-key", str(self.operator_dir / f"{OPERATOR}.key"))

    def apply_routes(self, name: str) -> None:
        self.meshd_cli("routes", "--registry", self.registry_url, *self.operator_args(),
                       "apply", str(Path(__file__).resolve().parent / name))

    def set_split(self, v1: int, v2: int) -> None:
        self.meshd_cli("routes", "--registry", self.registry_url, *self.operator_args(),
                       "set-split", "payments", f"v1={v1}", f"v2={v2}")

    def front_door(self) -> str:
        return f"http://{self.ip['host-a']}:{WEB_PORT}/checkout"

    def start_load(self, *, concurrency: int = 4, max_requests: int = 20000,
                   max_seconds: float = 120.0, pause: float = 0.0) -> LoadRun:
        stop = self.root / f"load-{len(self.loads) + 1}.stop"
        popen = subprocess.Popen(
            self.topo.hosts["client"].argv(
                PYTHON, str(AGENT), "load", self.front_door(), "--concurrency",
                str(concurrency), "--max-requests", str(max_requests), "--max-seconds",
                str(max_seconds), "--stop-file", str(stop), "--pause", str(pause)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **env()})
        load = LoadRun(popen, stop)
        self.loads.append(load)
        return load

    def stop_loads(self) -> None:
        for load in self.loads:
            load.abandon()

    def load(self, requests: int, *, concurrency: int = 4,
             max_seconds: float = 60.0) -> dict[str, Any]:
        answer: dict[str, Any] = self.agent(
            "client", "load", self.front_door(), "--concurrency", str(concurrency),
            "--max-requests", str(requests), "--max-seconds", str(max_seconds),
            timeout=max_seconds + 30)
        return answer

    def logs(self, *labels: str) -> str:
        return "\n".join(f"--- {label} ---\n{self.procs[label].log_tail()}" for label in labels)
