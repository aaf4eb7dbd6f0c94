"""Real processes for the console's tests: the shop demo (`meshd up`) and an embedded registry.

The demo runs from a copy of examples/shop/mesh.toml moved to a loopback block of its own
(127.X.Y.0/24 instead of 127.0.0.0/24, apps and routes from examples/shop), so these tests never
collide with another `meshd up` on the same machine (the default demo, tests/e2e, benchmarks)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import tomlkit
from proc_testing import Output

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"
READY_WITHIN = 90.0


def _listening(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((address, port)) == 0


def free_block() -> str:
    """A 127.X.Y prefix nothing listens on (registry, CA, web ports checked)."""
    rng = random.Random()
    for _ in range(50):
        prefix = f"127.{rng.randint(100, 250)}.{rng.randint(1, 254)}"
        if not any(_listening(f"{prefix}.{h}", p) for h in (1, 2) for p in (8500, 8080, 15000)):
            return prefix
    raise RuntimeError("no free loopback block found")


@dataclass(frozen=True)
class ShopAddresses:
    prefix: str

    @property
    def registry(self) -> str:
        return f"http://{self.prefix}.1:8500"

    @property
    def front_door(self) -> tuple[str, int]:
        return (f"{self.prefix}.1", 8080)


def derive_shop_mesh(directory: Path) -> tuple[Path, ShopAddresses]:
    """examples/shop/mesh.toml on a loopback block of its own; returns the file written."""
    prefix = free_block()
    text = (SHOP / "mesh.toml").read_text().replace("127.0.0.", f"{prefix}.")
    text = text.replace("{here}", str(SHOP))
    doc = tomlkit.parse(text)
    # the routes too: the external bank's address moves to the block with the bank
    routes = directory / "routes.toml"
    routes.write_text((SHOP / "routes.toml").read_text().replace("127.0.0.", f"{prefix}."))
    doc["routes"] = str(routes)
    for host in doc["hosts"]:  # type: ignore[union-attr]
        host["outbound_address"] = f"{prefix}.1"
    path = directory / "mesh.toml"
    path.write_text(tomlkit.dumps(doc))
    return path, ShopAddresses(prefix)


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    output: Output

    def stop(self) -> None:
        tree: list[psutil.Process] = []
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            pass
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for proc in tree:  # only what this runner started
            try:
                proc.kill()
            except psutil.Error:
                pass


def start(argv: list[str], ready: str, within: float = READY_WITHIN,
          env: Mapping[str, str] | None = None) -> Running:
    """``meshd ARGV`` in its own session; ``env`` is added to this process's environment."""
    process = subprocess.Popen(
        [sys.executable, "-m", "meshd", *argv], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )
    assert process.stdout is not None
    running = Running(process, Output(process.stdout))  # type: ignore[arg-type]
    if ready and not running.output.wait_for(ready, within):
        running.stop()
        raise RuntimeError(f"`meshd {' '.join(argv)}` did not print {ready!r} within "
                           f"{within:g}s; its output:\n{running.output.tail()}")
    return running


def start_registry(data_dir: Path) -> tuple[Running, str]:
    """An embedded registry (`meshd registry serve`) on a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    running = start(["registry", "serve", "--http", f"127.0.0.1:{port}",
                     "--data-dir", str(data_dir)], ready="")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not _listening("127.0.0.1", port):
        if time.monotonic() > deadline or running.process.poll() is not None:
            running.stop()
            raise RuntimeError(f"registry did not listen on {url}:\n{running.output.tail()}")
        time.sleep(0.05)
    return running, url
