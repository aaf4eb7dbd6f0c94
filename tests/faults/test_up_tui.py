"""`meshd up --tui` in a real terminal (tmux): once the mesh is ready the console owns the
terminal, the processes' output goes only to their logs, and quitting the console (`q`) stops
the mesh: `meshd up: stopped`, and no process of the tree is left.

The mesh is a small one (web on 127.0.0.2, payments on 127.0.0.3) on free ports, so it never
collides with a `meshd up` of the shop demo running on this machine.
"""

from __future__ import annotations

import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from net_testing import free_port
from tmux_testing import Tmux, tmux_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"


def _free_on_all(addresses: list[str]) -> int:
    for _ in range(50):
        port: int = free_port(addresses[0])
        try:
            for address in addresses[1:]:
                with socket.socket() as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


def _mesh_toml(directory: Path) -> Path:
    a, b = "127.0.0.2", "127.0.0.3"
    admin = _free_on_all([a, b])
    inbound = _free_on_all([a, b])
    web, payments, upstream = free_port(a), free_port(b), free_port()
    text = f"""\
trust_domain = "tui.mesh"
registry = "127.0.0.1:{free_port()}"
ca = "127.0.0.1:{free_port()}"
routes = "{SHOP / 'routes.toml'}"

[[hosts]]
name = "host-a"
address = "{a}"
admin_port = {admin}
inbound_port = {inbound}

[[hosts.services]]
name = "web"
port = {web}
health = {{ http = "/healthz", interval = "1s" }}
upstreams = [{{ name = "payments", local_port = {upstream} }}]
command = ["{{python}}", "{SHOP / 'web.py'}", "--address", "{{address}}", "--port", "{{port}}",
           "--upstream", "http://127.0.0.1:{upstream}"]

[[hosts]]
name = "host-b"
address = "{b}"
admin_port = {admin}
inbound_port = {inbound}

[[hosts.services]]
name = "payments"
port = {payments}
version = "v1"
health = {{ http = "/healthz", interval = "1s" }}
command = ["{{python}}", "{SHOP / 'payments.py'}", "--address", "{{address}}", "--port",
           "{{port}}", "--version", "{{version}}", "--node", "{{host}}"]
"""
    path = directory / "mesh.toml"
    path.write_text(text)
    return path


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    with tmux_server() as t:
        yield t


def test_up_tui_opens_the_console_and_q_stops_the_mesh(tmux: Tmux, tmp_path: Path) -> None:
    mesh = _mesh_toml(tmp_path)
    run_dir = tmp_path / "run"
    up = shlex.join([sys.executable, "-m", "meshd", "up", str(mesh), "--tui",
                     "--run-dir", str(run_dir)])
    # the shell stays after the runner exits, so its last lines can be read from the pane
    tmux("new-session", "-d", "-s", "up", "-x", "120", "-y", "40",
         f"cd {shlex.quote(str(REPO))} && NO_COLOR=1 {up}; echo \"up exited $?\"; sleep 120")
    shell = int(tmux("display-message", "-p", "-t", "up", "#{pane_pid}").strip())

    screen = tmux.wait_for("1 Topology", "up", 120)   # the console's tab bar
    tree = psutil.Process(shell).children(recursive=True)
    labels = " ".join(" ".join(p.cmdline()) for p in tree)
    assert "registry serve" in labels and "tui" in labels and "payments.py" in labels, labels
    # the console owns the terminal: no child output behind it
    assert "[registry]" not in screen and "[meshd host-a]" not in screen, screen
    tmux.wait_for("hosts 2/2", "up", 30)   # it found both meshds through the registry

    tmux("send-keys", "-t", "up", "q")
    screen = tmux.wait_for("up exited", "up", 60)
    assert "up exited 0" in screen, screen
    assert "meshd up: stopped" in screen, screen
    assert "killed a process left behind" not in screen, screen
    mine = [p for p in tree if p.pid != shell]   # taken while the runner ran: no `sleep`
    _, alive = psutil.wait_procs(mine, timeout=10)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [f"{p.pid} {p.cmdline()}" for p in alive]
    logs = run_dir / "logs"
    assert (logs / "registry.log").read_text().strip(), "the children's output went to the logs"


def test_up_in_a_terminal_keeps_a_status_line_and_no_access_lines(
    tmux: Tmux, tmp_path: Path
) -> None:
    mesh = _mesh_toml(tmp_path)
    web = next(line for line in mesh.read_text().splitlines() if line.startswith("port = "))
    front_door = ("127.0.0.2", int(web.split("=")[1]))   # web on host-a's address
    up = shlex.join([sys.executable, "-m", "meshd", "up", str(mesh),
                     "--run-dir", str(tmp_path / "run")])
    tmux("new-session", "-d", "-s", "up", "-x", "160", "-y", "40",
         f"cd {shlex.quote(str(REPO))} && NO_COLOR=1 {up}; echo \"up exited $?\"; sleep 120")
    tmux.wait_for("meshd up: ready", "up", 120)
    for _ in range(5):
        with socket.create_connection(front_door, timeout=10) as conn:
            conn.sendall(b"GET /checkout HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            # answered by web (whether payments answered it too is not the point here)
            assert conn.makefile("rb").readline().startswith(b"HTTP/1.")
    screen = tmux.wait_for("5 requests, ", "up", 20)
    assert "· 6/6 processes running" in screen, screen   # registry, ca, 2 apps, 2 meshds
    assert "meshd.access" not in screen, screen
    access = (tmp_path / "run" / "logs" / "access-host-a.log").read_text()
    assert access.count("meshd.access: outbound web -> payments") == 5, access
    tmux("send-keys", "-t", "up", "C-c")
    screen = tmux.wait_for("up exited", "up", 60)
    assert "up exited 0" in screen and "meshd up: stopped" in screen, screen
    assert "req/s" not in screen.split("meshd up: SIGINT")[1], screen


def test_muted_console_drops_child_lines_and_holds_its_own() -> None:
    import io

    from meshd.dev.console import Console

    out = io.StringIO()
    console = Console(out, color=False)
    console.register("registry")
    console.mute()
    console.child_line("registry", "listening")   # its log has it; the terminal is the TUI's
    console.error("registry exited (exit code 1); restarting it in 0.5s")
    assert out.getvalue() == ""
    console.unmute()
    console.child_line("registry", "back")
    assert out.getvalue().splitlines() == [
        "meshd up: registry exited (exit code 1); restarting it in 0.5s", "[registry] back"]
