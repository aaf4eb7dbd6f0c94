"""docs/vm-install.md walked end to end, one network namespace per machine: the registry with
ACLs on, the CA, three app hosts (web-1 running web, pay-1 and pay-2 running payments v1 and v2)
and the operator's machine. systemd cannot run here, so each unit is replaced by its ExecStart
line (the guide's env file values filled in); everything else is the guide's own text: its shell
blocks (bootstrap, the policy/token functions, the operator's and each host's policy) run in
bash on the machine the guide names, and each host's meshd.toml is the guide's example with the
addresses and names of this walk. Each host serves its admin API on its address over mutual TLS
("The console across VMs"), and the operator's console, built from that section's `meshd tui`
command, reads every host from the operator's machine. A test that fails here means the guide
is wrong.

Runs under the fixed-ports lock with the fault suite (root, ``ip netns``), in ~10 s.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netns import Topology, sweep_stale

from meshd.config.load import load_host_config
from meshd.dev.generate import render_toml

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "vm-install.md"
SHOP = REPO / "examples" / "shop"
PYTHON = sys.executable
# the guide's machines (its example addresses) -> this walk's namespaces (last octet)
CONSOLE = """# the console's data source from the meshd tui options in argv, polled once: JSON.
import asyncio, json, sys
from meshd.cli.main import build_parser
from meshd.cli.tui import console_source

async def main():
    source = console_source(build_parser().parse_args(sys.argv[1:]))
    try:
        obs = await source.poll()
    finally:
        await source.aclose()
    return {h.node: {"ok": h.ok, "error": h.error, "admin": h.admin,
                     "services": sorted(s["name"] for s in (h.state or {}).get("services", []))}
            for h in obs.hosts}

print(json.dumps(asyncio.run(main())))
"""
MACHINES = {"reg": 4, "ca": 5, "web-1": 11, "pay-1": 12, "pay-2": 13, "ops": 30}
APPS = {"web-1": ("web", "v1"), "pay-1": ("payments", "v1"), "pay-2": ("payments", "v2")}


def guide_blocks(heading: str, lang: str) -> list[str]:
    """The ```lang blocks of the guide's section ``heading`` (up to the next heading)."""
    text = GUIDE.read_text()
    start = text.index(f"\n{heading}\n")
    end = re.search(r"\n#{2,3} ", text[start + len(heading) + 2:])
    section = text[start:start + len(heading) + 2 + (end.start() if end else len(text))]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONUNBUFFERED": "1", "NO_COLOR": "1",
            "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def meshd(*args: str) -> list[str]:
    return [PYTHON, "-m", "meshd", *args]


class Walk:
    def __init__(self, root: Path) -> None:
        self.root = root
        # tagged: the fault suite's own topology may exist in this process at the same time
        self.topo = Topology({f"vg-{m}": octet for m, octet in MACHINES.items()}, root / "logs",
                             tag="guide")
        self.ip = {m: self.topo.hosts[f"vg-{m}"].ip for m in MACHINES}
        self.ca_dir = root / "var-lib-meshd-ca"
        self.secrets = root / "root"          # the registry host's /root
        self.secrets.mkdir(mode=0o700)
        self.bin = root / "bin"               # `meshd` on PATH, as /usr/bin/meshd is
        self.bin.mkdir()
        (self.bin / "meshd").write_text(f"#!/bin/sh\nexec {shlex.quote(PYTHON)} -m meshd \"$@\"\n")
        (self.bin / "meshd").chmod(0o755)

    def subst(self, text: str) -> str:
        """The guide's paths and addresses -> this walk's."""
        for old, new in (("/var/lib/meshd-ca", str(self.ca_dir)), ("/root/", f"{self.secrets}/"),
                         ("10.0.0.4", self.ip["reg"]), ("10.0.0.5", self.ip["ca"]),
                         ("10.0.0.11", self.ip["web-1"]), ("runuser -u meshd-ca -- ", "")):
            text = text.replace(old, new)
        return text

    def sh(self, machine: str, script: str, timeout: float = 30.0, **extra: str) -> str:
        path = os.pathsep.join((str(self.bin), os.environ.get("PATH", "")))
        result = self.topo.exec(f"vg-{machine}", ["bash", "-euo", "pipefail", "-c", script],
                                timeout=timeout, env={**env(), "PATH": path, **extra})
        return result.stdout

    def wait(self, what: str, check: Callable[[], bool], within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.label}\n{p.log_tail(15)}" for p in self.topo.procs)
        raise AssertionError(f"not within {within:g}s: {what}\n{logs}")

    def status(self, host: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """The guide's `meshd status --admin https://...` on ``host`` (in the operator
        certificate's directory: its ca.crt, alice.crt, alice.key)."""
        [line] = re.findall(r"`(meshd status --admin https://10\.0\.0\.11:15000 [^`]*)`",
                            GUIDE.read_text())
        argv = shlex.split(line.replace("10.0.0.11", self.ip[host]))[1:]
        return subprocess.run(self.topo.hosts[f"vg-{host}"].argv(*meshd(*argv, *extra)),
                              cwd=self.ca_dir / "operators" / "alice", capture_output=True,
                              text=True, timeout=30, env={**os.environ, **env()}, check=False)

    def console(self, argv: list[str], operator_env: dict[str, str]) -> dict[str, Any]:
        """``meshd tui ARGV``'s view of the hosts, polled once on the operator's machine."""
        result = self.topo.exec("vg-ops", [PYTHON, "-c", CONSOLE, *argv],
                                env={**env(), **operator_env})
        return dict(json.loads(result.stdout))

    def answers(self, machine: str, url: str) -> bool:
        result = self.topo.exec(f"vg-{machine}", ["curl", "-sf", "-o", "/dev/null", "-m", "2",
                                                   url], check=False)
        return result.returncode == 0


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walk]:
    sweep_stale()
    w = Walk(tmp_path)
    try:
        w.topo.create()
        yield w
    finally:
        problems = w.topo.destroy()
        assert problems == [], problems


def test_the_vm_guide_walked_end_to_end(walk: Walk) -> None:
    w, ip = walk, walk.ip
    # 2. The CA host: `meshd ca init` prints the fingerprint alone on stdout
    init = w.topo.exec("vg-ca", meshd("ca", "init", "--dir", str(w.ca_dir), "--trust-domain",
                                      "shop.mesh"), env=env())
    fingerprint = init.stdout.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint), init.stdout
    assert f'fingerprint = "{fingerprint}"' in init.stderr and "[ca]" in init.stderr
    # meshd-ca.service's ExecStart, with ca.env's MESHD_CA_LISTEN and MESHD_CA_ARGS
    w.topo.spawn("ca", "vg-ca", meshd("ca", "serve", "--dir", str(w.ca_dir), "--listen",
                                     f"{ip['ca']}:8443", "--san", "ca.mesh.internal"), env=env())

    # 3. The registry host: meshd-registry.service's ExecStart with registry.env
    w.topo.spawn("registry", "vg-reg", meshd(
        "registry", "serve", "--http", f"{ip['reg']}:8500", "--data-dir",
        str(w.root / "var-lib-meshd-registry"), "--acl-enabled", "--acl-default-policy", "deny"),
        env=env())
    w.wait("the registry answers",
           lambda: w.answers("reg", f"http://{ip['reg']}:8500/v1/status/leader"))
    bootstrap, functions = guide_blocks("### Bootstrap: the management token", "sh")
    w.sh("reg", w.subst(bootstrap))
    assert (w.secrets / "registry-management-token").read_text().strip()
    [operator_policy] = guide_blocks("### The operator's token", "sh")[:1]
    w.sh("reg", w.subst(functions) + w.subst(operator_policy))
    operator_token = w.secrets / "operator-token"
    assert operator_token.read_text().strip()

    # the operator's certificate, on the CA host
    [issue] = guide_blocks("### The operator's certificate", "sh")[:1]
    w.sh("ca", w.subst(issue))
    alice = w.ca_dir / "operators" / "alice"
    operator_env = {"CONSUL_HTTP_TOKEN_FILE": str(operator_token),
                    "MESHD_OPERATOR_CERT": str(alice / "alice.crt"),
                    "MESHD_OPERATOR_KEY": str(alice / "alice.key")}

    # Load the route table, from the operator's machine
    [load] = guide_blocks("### Load the route table", "sh")
    routes = w.root / "routes.toml"
    routes.write_text((SHOP / "routes.toml").read_text())
    applied = w.sh("ops", f"cd {shlex.quote(str(w.root))}\n" + w.subst(load), **operator_env)
    assert "v1" in applied and "alice" in applied, applied

    # 4. An app host, for each of web-1, pay-1, pay-2
    [mint] = guide_blocks("### Mint a join token (on the CA host)", "sh")
    [host_policy] = guide_blocks("### Create the host's registry token (on the registry host)",
                                 "sh")
    [example] = guide_blocks("### Write /etc/meshd/meshd.toml", "toml")
    [admin_tls] = guide_blocks("## The console across VMs", "toml")
    for host, (service, version) in APPS.items():
        etc = w.root / "hosts" / host
        etc.mkdir(parents=True, mode=0o700)
        token = w.sh("ca", w.subst(mint).replace("web-1", host).replace("--services web",
                                                                       f"--services {service}"))
        (etc / "join-token").write_text(token.strip().splitlines()[-1])
        policy_script = w.subst(host_policy).replace("web-1", host).replace('"web', f'"{service}')
        registry_token = w.sh("reg", w.subst(functions) + policy_script)
        (etc / "registry-token").write_text(registry_token.strip().splitlines()[-1])

        data = tomllib.loads(w.subst(example.replace("10.0.0.11", ip[host]))
                             .replace("/run/credentials/meshd.service", str(etc))
                             .replace("/var/lib/meshd", str(etc / "state")))
        data["node"] = host
        data["admin"].update(tomllib.loads(w.subst(admin_tls.replace("10.0.0.11", ip[host])))
                             ["admin"])
        data["ca"]["fingerprint"] = fingerprint
        [svc] = data["services"]
        svc.update(name=service, version=version, port=8080 if service == "web" else 9001)
        svc["health"]["interval"] = "1s"
        if service != "web":
            del svc["upstreams"]
        config = etc / "meshd.toml"
        config.write_text(render_toml(data, f"{host}: the guide's example"))
        load_host_config(config)
        w.sh(host, f"meshd validate {shlex.quote(str(config))}")

        app = ([PYTHON, str(SHOP / "web.py"), "--address", "127.0.0.1", "--port", "8080",
                "--upstream", "http://127.0.0.1:9191"] if service == "web" else
               [PYTHON, str(SHOP / "payments.py"), "--address", "127.0.0.1", "--port", "9001",
                "--version", version, "--node", host])
        w.topo.spawn(f"{service} {host}", f"vg-{host}", app, env=env())
        # meshd.service's ExecStart (the credentials at the paths meshd.toml names)
        w.topo.spawn(f"meshd {host}", f"vg-{host}", meshd("run", "--config", str(config)),
                     env=env())

    # Start and verify: `meshd status` on a host (its admin API over TLS, with the operator
    # certificate), then a checkout across hosts
    for host in APPS:
        w.wait(f"meshd status on {host} exits 0", lambda h=host: w.status(h).returncode == 0, 60)
    status = w.status("web-1").stdout
    assert "meshd web-1" in status and "READY" in status and "web -> payments" in status, status

    def checkout() -> dict[str, str]:
        out = w.sh("web-1", "curl -sf -m 5 http://127.0.0.1:8080/checkout")
        return dict(json.loads(out))

    def payments_hosts() -> set[str]:
        state = json.loads(w.status("web-1", "-o", "json").stdout)["state"]
        endpoints = state["destinations"].get("payments", {}).get("endpoints", [])
        return {str(e.get("node")) for e in endpoints if e.get("healthy")}

    w.wait("web-1 sees both payments hosts", lambda: payments_hosts() == {"pay-1", "pay-2"})
    answer = checkout()
    assert answer["service"] == "payments" and answer["host"] in ("pay-1", "pay-2"), answer

    # The console across VMs: the section's `meshd tui` on the operator's machine reads each
    # host's admin API at the address it publishes, with the operator certificate
    [tui] = guide_blocks("## The console across VMs", "sh")
    tui_argv = shlex.split(w.subst(tui).replace("\\\n", " ").replace(
        "~/.config/meshd/", f"{w.ca_dir / 'operators' / 'alice'}/"))
    assert tui_argv[:2] == ["meshd", "tui"], tui_argv
    want = {host: {"ok": True, "error": "", "admin": f"{ip[host]}:15000", "services": [svc]}
            for host, (svc, _) in APPS.items()}
    w.wait("the console reads every host", lambda: w.console(tui_argv[1:], operator_env) == want)
    # without the --admin-* files, each host says what is missing
    plain = [a for a, prev in zip(tui_argv, ["", *tui_argv], strict=False) if not (
        a.startswith("--admin-") or prev.startswith("--admin-"))]
    missing = ("admin API over TLS: an operator certificate is required (--admin-ca, "
               "--admin-cert, --admin-key)")
    assert w.console(plain[1:], operator_env) == {
        host: {**seen, "ok": False, "error": missing, "services": []}
        for host, seen in want.items()}

    # Removing a host: its subset's share moved away first (the section's set-split line),
    # then stopped (`systemctl disable --now meshd`: SIGTERM, it deregisters), revoked at the CA
    w.sh("ops", f"meshd routes set-split --registry http://{ip['reg']}:8500 payments "
                "v1=100 v2=0", **operator_env)
    next(p for p in w.topo.procs if p.label == "meshd pay-2").stop()
    [revoke] = [b for b in guide_blocks("## Removing a host", "sh") if "revoke" in b]
    revoked = w.sh("ca", w.subst(revoke).replace("web-1", "pay-2"))
    assert re.search(r"[0-9a-f]{16,}", revoked), revoked
    w.wait("web-1 no longer lists pay-2", lambda: payments_hosts() == {"pay-1"})
    for _ in range(5):
        assert checkout()["host"] == "pay-1"
