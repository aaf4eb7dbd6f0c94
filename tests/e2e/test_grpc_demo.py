"""The gRPC example end to end: `meshd up examples/grpc/mesh.toml` as a real process tree.

The example's client calls greeter on one channel through host-a's outbound listener; its log
shows replies of both versions. A grpcio channel of the test's own, to the same listener
(127.0.0.1:9292), gets a 50/50 split of 200 calls. SIGTERM then stops the tree: exit 0.
Fixed addresses and ports (the example's): run under the fixed-ports lock.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_testing import EXAMPLE, helloworld, version_of
from proc_testing import Output

pytestmark = pytest.mark.e2e

REPO = EXAMPLE.parents[1]
MESH = EXAMPLE / "mesh.toml"
TARGET = "127.0.0.1:9292"
READY_WITHIN = 90.0
CALLS = 200
# 4 sigma of Binomial(200, 0.5): 100 +- 4 * sqrt(200 * 0.25) = 100 +- 28.3
V2_RANGE = range(72, 129)
COUNTS = re.compile(r"client: \d+ calls: ")


def both_versions(line: str) -> bool:
    """Whether a count line of the example's client has replies of v1 and of v2."""
    return all(re.search(rf"\b{v} [1-9]", line) for v in ("v1", "v2"))


class Up:
    def __init__(self, run_dir: Path, runtime_dir: Path) -> None:
        self.run_dir = run_dir
        env = {k: v for k, v in os.environ.items()
               if k not in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_ADDR")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshd", "up", str(MESH), "--run-dir", str(run_dir)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            env={**env, "XDG_RUNTIME_DIR": str(runtime_dir), "NO_COLOR": "1"})
        assert self.process.stdout is not None
        self.output = Output(self.process.stdout)  # type: ignore[arg-type]
        self.tree: dict[int, psutil.Process] = {}

    def record_tree(self) -> None:
        try:
            for proc in psutil.Process(self.process.pid).children(recursive=True):
                self.tree.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL for the runner and anything of its tree left; its exit code
        when it exited on its own."""
        self.record_tree()
        code = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        else:
            code = self.process.returncode
        for proc in self.tree.values():
            try:
                proc.kill()
            except psutil.Error:
                pass
        return code


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    running = Up(tmp_path_factory.mktemp("grpc-run"), tmp_path_factory.mktemp("runtime"))
    try:
        if not running.output.wait_for("meshd up: ready", READY_WITHIN):
            code = running.stop()
            tail = "\n".join(running.output.text().splitlines()[-150:])
            pytest.fail(f"`meshd up` was not ready within {READY_WITHIN:g}s (exit code {code});"
                        f" logs in {running.run_dir / 'logs'}; the last of its output:\n{tail}")
        running.record_tree()
        yield running
    finally:
        running.stop()


def test_one_channel_to_the_outbound_listener_gets_both_versions(up: Up) -> None:
    hw = helloworld()
    versions: Counter[str] = Counter()
    hosts: dict[str, set[str]] = {}
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(TARGET, [("grpc.enable_http_proxy", 0)]) as channel:
        say_hello = hw.say_hello_stub(channel)
        for i in range(CALLS):
            assert time.monotonic() < deadline, f"only {i} calls in 60 s"
            message = say_hello(hw.HelloRequest(name=f"e2e-{i}"), timeout=10).message
            versions[version_of(message)] += 1
            hosts.setdefault(version_of(message), set()).add(message.rsplit(" ", 1)[1])
    assert set(versions) == {"v1", "v2"}
    assert versions["v2"] in V2_RANGE, f"v2 took {versions['v2']} of {CALLS} calls, not ~50%"
    assert hosts == {"v1": {"host-b"}, "v2": {"host-c"}}


def test_the_example_client_sees_both_versions_on_its_one_channel(up: Up) -> None:
    # its lines: "client: 40 calls: v1 19, v2 21" (and " (failed: ...)" while the mesh started)
    log = up.run_dir / "logs" / "client-v1.log"
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        last = next((line for line in reversed(lines) if COUNTS.search(line)), "")
        if both_versions(last):
            break
        time.sleep(0.5)
    assert both_versions(last), (last, log.read_text()[-2000:] if log.exists() else "no log")


def test_sigterm_stops_the_tree(up: Up) -> None:
    up.record_tree()
    assert up.stop() == 0, up.output.text()[-3000:]
    alive = [p for p in up.tree.values() if p.is_running() and p.status() != "zombie"]
    assert alive == [], alive
