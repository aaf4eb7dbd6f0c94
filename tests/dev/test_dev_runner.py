"""The runner: run dirs, labels, the port preflight through `meshd up`, and a runner process
that is sent SIGTERM / SIGINT leaving no process behind."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from proc_testing import Output

from meshd.cli.main import main as cli_main
from meshd.config.mesh import parse_mesh
from meshd.config.mesh_schema import PortClaim
from meshd.dev.ports import ports_in_use
from meshd.dev.report import Row, format_table
from meshd.dev.runner import RUN_DIR_MARKER, app_labels, main, prepare_run_dir
from meshd.errors import MeshError

HERE = Path(__file__).resolve().parent
SHOP = HERE.parents[1] / "examples" / "shop" / "mesh.toml"


def listening_socket(address: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((address, 0))
    sock.listen()
    return sock


# --------------------------------------------------------------------------------------------
# ports


def test_a_port_in_use_is_named_with_who_wanted_it() -> None:
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        claim = PortClaim("127.0.0.1", port, "app web v1", "hosts[0].services[0].port")
        [problem] = ports_in_use([claim])
    assert f"127.0.0.1:{port} is already in use" in problem
    assert f"by pid {os.getpid()}" in problem
    assert problem.endswith("(wanted by app web v1, hosts[0].services[0].port)")


def test_free_ports_pass_and_foreign_addresses_are_explained() -> None:
    with listening_socket() as sock:
        port = sock.getsockname()[1]
    assert ports_in_use([PortClaim("127.0.0.5", port, "x", "y")]) == []
    [problem] = ports_in_use([PortClaim("192.0.2.1", 9, "meshd host-z admin", "k")])
    assert "address 192.0.2.1 is not configured on this machine" in problem


def test_meshd_up_refuses_to_start_when_a_port_is_taken(tmp_path: Path) -> None:
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        mesh = tmp_path / "mesh.toml"
        mesh.write_text(SHOP.read_text().replace('"127.0.0.1:8500"', f'"127.0.0.1:{port}"')
                        .replace('routes = "routes.toml"', ""))
        out = io.StringIO()
        code = main(mesh, run_dir=tmp_path / "run", stream=out)
    assert code == 1
    assert f"meshd up: 127.0.0.1:{port} is already in use" in out.getvalue()
    assert "(wanted by registry, registry)" in out.getvalue()
    assert "nothing was started" in out.getvalue()
    assert not (tmp_path / "run").exists()


def test_meshd_up_reports_an_invalid_mesh_file(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    mesh = tmp_path / "mesh.toml"
    mesh.write_text('trust_domain = "shop.mesh"\n[[hosts]]\nname = "a"\n')
    assert cli_main(["up", str(mesh)]) == 1
    err = capsys.readouterr().err
    assert "hosts[0].address: required key is missing" in err
    assert "hosts[0].services: declare at least one service" in err


def test_up_help_documents_mesh_toml(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["up", "--help"])
    text = capsys.readouterr().out
    assert "[[hosts.services]]" in text and "{python}" in text and "--keep" in text


# --------------------------------------------------------------------------------------------
# run dir, labels, table


def test_prepare_run_dir(tmp_path: Path) -> None:
    fresh, temporary = prepare_run_dir(None)
    try:
        assert temporary and (fresh.root / RUN_DIR_MARKER).exists()
    finally:
        shutil.rmtree(fresh.root)

    given, temporary = prepare_run_dir(tmp_path / "run")
    assert not temporary and (given.root / RUN_DIR_MARKER).exists()
    (given.root / "logs").mkdir()
    (given.root / "logs" / "old.log").write_text("old")
    again, _ = prepare_run_dir(tmp_path / "run")   # an earlier run's dir: cleaned
    assert not (again.root / "logs").exists()

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(MeshError, match="not empty and was not made by meshd up"):
        prepare_run_dir(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").exists()


def test_run_dir_log_names() -> None:
    rd, _ = prepare_run_dir(None)
    try:
        assert rd.log("meshd host-a").name == "meshd-host-a.log"
        assert rd.log("payments v2 @host-c").name == "payments-v2-host-c.log"
    finally:
        shutil.rmtree(rd.root)


def test_app_labels_add_the_host_only_when_needed() -> None:
    data = {"trust_domain": "t.mesh", "hosts": [
        {"name": f"h{i}", "address": f"127.0.0.{i + 2}",
         "services": [{"name": "pay", "port": 9001, "version": v}]}
        for i, v in enumerate(["v1", "v1", "v2"])]}
    assert app_labels(parse_mesh(data)) == {
        ("h0", "pay"): "pay v1 @h0", ("h1", "pay"): "pay v1 @h1", ("h2", "pay"): "pay v2"}


def test_format_table() -> None:
    text = format_table([Row("registry", 12, "http://127.0.0.1:8500"),
                         Row("payments v1", None, "http://127.0.0.3:9001 on host-b")])
    assert text.splitlines() == [
        "  PROCESS          PID  LISTENS ON",
        "  registry          12  http://127.0.0.1:8500",
        "  payments v1        -  http://127.0.0.3:9001 on host-b",
    ]


# --------------------------------------------------------------------------------------------
# the runner process


def start_sleepy(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Output]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "sleepy_runner.py"), str(tmp_path / "logs"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parents[1])},
    )
    assert proc.stdout is not None
    return proc, Output(proc.stdout)  # type: ignore[arg-type]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signalled_runner_stops_everything_and_leaves_nothing(
    tmp_path: Path, sig: signal.Signals
) -> None:
    proc, out = start_sleepy(tmp_path)
    try:
        assert out.wait_for("meshd up: ready", 30), out.text(5.0)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 4, tree   # three children and a grandchild
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.text(5.0)
    assert f"meshd up: {sig.name}: stopping" in text
    # meshd first, then the apps (the stubborn one is killed after 1s), then the registry
    assert text.index("[meshd host-a]") < text.index("web v1 did not stop within 1s")
    assert text.rstrip().endswith("meshd up: stopped")
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []


def test_a_failed_start_exits_1_and_leaves_nothing(tmp_path: Path) -> None:
    proc, out = start_sleepy(tmp_path, "--fail")
    try:
        assert out.wait_for("did not become ready", 30), out.text(5.0)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert proc.wait(timeout=20) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "meshd up: stopping everything" in out.text(5.0)
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []
