"""The wheel as a user gets it: built from the source tree, installed into a fresh virtual
environment, then ``meshd --version`` and ``meshd up`` with no argument, which must find the
shop demo inside the installed package (no checkout around), come up ready, answer the
operator's commands (``status``, ``explain``, ``routes show`` with ``-o json``; a bare ``meshd
status`` names the demo's admin addresses), and stop cleanly on SIGTERM.

Offline and quick: the wheel is built without build isolation (setuptools comes with the test
extra) and installed with ``--no-deps``; the fresh environment reaches the dependencies already
installed for the suite through a ``.pth`` line, added after the install so pip never sees the
suite's own (editable) meshd. ``meshd up`` binds the demo's fixed addresses: this module runs
under the fixed-ports lock, like tests/e2e.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from proc_testing import Output

import meshd

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
READY_WITHIN = 90.0
DEMO_ADMIN = ("127.0.0.2:15000", "127.0.0.3:15000", "127.0.0.4:15000")
SOURCES = ("meshd", "tui", "examples/shop", "systemd", "pyproject.toml", "setup.py",
           "README.md", "LICENSE")


@dataclass
class Installed:
    venv: Path
    wheel: Path
    env: dict[str, str]
    home: Path  # a working directory with no examples/ in it

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def meshd(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.bin("meshd"), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.home, env=self.env)

    @property
    def package(self) -> Path:
        purelib = sysconfig.get_path("purelib", vars={"base": str(self.venv),
                                                      "platbase": str(self.venv)})
        return Path(purelib) / "meshd"


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("meshd-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "-q", str(wheel)])
    # the dependencies: the suite's environment, after the fresh one's own site-packages
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                      "'purelib'))"]).stdout.strip())
    suite_paths = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "suite-dependencies.pth").write_text("\n".join(suite_paths) + "\n")

    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE",
                        "CONSUL_HTTP_ADDR", "MESHD_OPERATOR_CERT", "MESHD_OPERATOR_KEY")}
    env |= {"XDG_RUNTIME_DIR": str(tmp / "runtime"), "NO_COLOR": "1", "HOME": str(home)}
    return Installed(venv, wheel, env, home)


def test_the_wheel_carries_the_demo_the_units_and_the_license(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    demo = {p.name for p in (REPO / "examples" / "shop").iterdir() if p.is_file()}
    units = {p.name for p in (REPO / "systemd").glob("*.service")}
    assert {f"meshd/share/shop/{n}" for n in demo} <= names
    assert {f"meshd/share/systemd/{n}" for n in units} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "tui/console.tcss" in names
    text = metadata.decode()
    assert "License-Expression: Apache-2.0" in text
    for version in ("3.11", "3.12", "3.13"):
        assert f"Classifier: Programming Language :: Python :: {version}" in text
    assert "Requires-Python: >=3.11" in text


def test_the_installed_meshd_reports_its_version_and_units(installed: Installed) -> None:
    version = installed.meshd("--version")
    assert (version.returncode, version.stdout) == (0, f"meshd {meshd.__version__}\n")
    about = json.loads(installed.meshd("version", "-o", "json").stdout)
    assert Path(about["package"]) == installed.package  # the wheel's, not the checkout's
    listed = installed.meshd("systemd-units").stdout.splitlines()
    assert sorted(listed) == sorted(str(installed.package / "share" / "systemd" / p.name)
                                    for p in (REPO / "systemd").glob("*.service"))
    for path in map(Path, listed):
        assert path.read_text() == (REPO / "systemd" / path.name).read_text()


# py-consul (and requests, which it brings) are the test extra's: the compatibility oracle
SECOND_CLIENT = ("py-consul", "requests")
IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
import meshd, tui
for package in (meshd, tui):
    for found in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not found.name.endswith(".__main__"):
            importlib.import_module(found.name)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("consul", "requests")))
"""


def test_the_wheel_needs_no_second_http_client(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        metadata = wheel.read(next(n for n in wheel.namelist()
                                   if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    for name in SECOND_CLIENT:
        mentions = [r for r in requires if r.startswith(name)]
        assert all('extra == "test"' in r for r in mentions), mentions
    assert any(r.startswith("py-consul") for r in requires)  # still there, for the tests
    # every module of the installed meshd and tui imports, and none of them pulls them in
    # (this environment can reach them: the suite's dependencies are on its path)
    probe = subprocess.run([installed.bin("python"), "-c", IMPORT_EVERYTHING],
                           capture_output=True, text=True, timeout=120, cwd=installed.home,
                           env=installed.env)
    assert (probe.returncode, probe.stdout) == (0, "[]\n"), probe.stderr


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    output: Output
    tree: dict[int, psutil.Process] = field(default_factory=dict)

    def record_tree(self) -> None:
        try:
            for proc in psutil.Process(self.process.pid).children(recursive=True):
                self.tree.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> int | None:
        """SIGTERM, as a user's Ctrl-C would, then make sure nothing it started is left."""
        self.record_tree()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        code = self.process.returncode
        for proc in self.tree.values():
            try:
                proc.kill()
            except psutil.Error:
                pass
        return code


@pytest.fixture
def up(installed: Installed) -> Iterator[Up]:
    process = subprocess.Popen([installed.bin("meshd"), "up"], cwd=installed.home,
                               env=installed.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    assert process.stdout is not None
    running = Up(process, Output(process.stdout))  # type: ignore[arg-type]
    try:
        yield running
    finally:
        running.stop()


def test_meshd_up_from_the_wheel_runs_the_demo_it_carries(installed: Installed,
                                                          up: Up) -> None:
    if not up.output.wait_for("meshd up: ready", READY_WITHIN):
        up.stop()
        pytest.fail(f"`meshd up` from the wheel was not ready within {READY_WITHIN:g}s "
                    f"(exit {up.process.poll()}):\n{up.output.text()}")
    up.record_tree()
    mesh_file = installed.package / "share" / "shop" / "mesh.toml"
    assert any(f"starting {mesh_file} " in line for line in up.output.lines), \
        up.output.tail()

    conn = http.client.HTTPConnection("127.0.0.1", 8080, timeout=15)
    try:
        conn.request("GET", "/checkout")
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200 and answer["service"] == "payments"

    # a bare `meshd status` looks at 127.0.0.1:15000, where no demo host is: it says where
    bare = installed.meshd("status")
    assert (bare.returncode, bare.stdout) == (3, "")
    assert bare.stderr.splitlines()[-1] == (
        f"meshd status: `meshd up` (pid {up.process.pid}) runs meshds with admin APIs at "
        f"{', '.join(DEMO_ADMIN)}: try `meshd status --admin {DEMO_ADMIN[0]}`")

    status = installed.meshd("status", "--admin", DEMO_ADMIN[0], "-o", "json")
    document = json.loads(status.stdout)
    assert (status.returncode, document["ready"], document["exit_code"]) == (0, True, 0)
    assert document["state"]["node"] == "host-a"
    assert [s["name"] for s in document["state"]["services"]] == ["web"]

    explained = installed.meshd("explain", "payments", "--admin", DEMO_ADMIN[0], "-o", "json")
    found = json.loads(explained.stdout)
    assert (explained.returncode, found["exit_code"], found["reaches_app"]) == (0, 0, True)
    assert [(s["name"], s["weight"]) for s in found["subsets"]] == [("v1", 90), ("v2", 10)]
    assert found["authorization"]["verdict"] == {"allowed": True, "rule": "web-calls-payments"}

    shown = installed.meshd("routes", "show", "-o", "json")  # registry and token: the context
    table = json.loads(shown.stdout)
    assert shown.returncode == 0, shown.stderr
    assert table["registry"] == "http://127.0.0.1:8500"
    assert table["routes"]["destinations"]["payments"]["split"] == {"v1": 90, "v2": 10}
    assert table["signed"]["signer"] == "dev"

    assert up.stop() == 0, up.output.tail()
    assert "meshd up: stopped" in up.output.text()
    assert not [p for p in up.tree.values() if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
