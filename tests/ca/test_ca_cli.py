"""``meshd ca ...`` end to end, as child processes."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from cryptography import x509
from net_testing import free_port

from meshd.ca.store import load_ca
from meshd.cli.ca import parse_duration
from meshd.identity import ca_client as client


def meshd(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "meshd", *map(str, args)],
        capture_output=True, text=True, timeout=30,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.e2e
def test_init_token_issue(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    init = meshd("ca", "init", "--dir", ca_dir, "--trust-domain", "mesh.test")
    fingerprint = init.stdout.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)  # stdout: for scripts
    # stderr: for the operator, where it goes
    assert ("put it in each host's meshd.toml as\n  [ca]\n  fingerprint = "
            f'"{fingerprint}"\n') in init.stderr
    assert fingerprint == load_ca(ca_dir).fingerprint
    assert mode(ca_dir) == 0o700 and mode(ca_dir / "root.key") == 0o600

    again = meshd("ca", "init", "--dir", ca_dir, "--trust-domain", "mesh.test", check=False)
    assert again.returncode == 1
    assert again.stdout == ""
    assert "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert load_ca(ca_dir).fingerprint == fingerprint

    token = meshd("ca", "token", "--dir", ca_dir, "--node", "n1", "--services", "web,cart",
                  "--ttl", "10m", "--uses", "2")
    assert re.fullmatch(r"[0-9a-f]{8}\.[A-Za-z0-9_-]{43}\n", token.stdout)
    assert token.stdout.strip().split(".")[1] not in token.stderr
    assert mode(ca_dir / "tokens.json") == 0o600

    out = tmp_path / "out"
    meshd("ca", "issue", "--dir", ca_dir, "--service", "web", "--out", out, "--ttl", "2h")
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "web.crt", "web.key"]
    assert mode(out / "web.key") == 0o600 and mode(out) == 0o700
    cert = x509.load_pem_x509_certificate((out / "web.crt").read_bytes())
    root = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(root)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == parse_duration("2h1m")

    forced = meshd("ca", "init", "--dir", ca_dir, "--trust-domain", "mesh.test", "--force")
    assert forced.stdout.strip() != fingerprint


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args",
    [
        ("ca", "token", "--node", "n1", "--services", "web", "--ttl", "1 hour"),
        ("ca", "token", "--node", "n1", "--services", "a/b"),
        ("ca", "token", "--node", "n1", "--services", "web", "--uses", "0"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = meshd(*args, "--dir", tmp_path, check=False)
    assert result.returncode == 2 and result.stdout == ""


@pytest.mark.e2e
def test_commands_need_an_initialised_ca(tmp_path: Path) -> None:
    result = meshd("ca", "token", "--dir", tmp_path / "none", "--node", "n1", "--services", "web",
                   check=False)
    assert result.returncode == 1 and "meshd ca init" in result.stderr


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("1h", 3600), ("24h", 86400), ("1h30m", 5400), ("1.5h", 5400),
     ("500ms", 0.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "1d", "-1h", "0s", "1h 30m", "1.h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.e2e
async def test_serve_joins_and_stops_on_sigterm(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    fingerprint = meshd("ca", "init", "--dir", ca_dir, "--trust-domain", "mesh.test").stdout
    token = meshd("ca", "token", "--dir", ca_dir, "--node", "n1", "--services", "web").stdout

    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "meshd", "ca", "serve", "--dir", str(ca_dir),
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(15):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "meshd ca serve exited before listening"
                line += chunk
        match = re.fullmatch(r"listening on (https://127\.0\.0\.1:\d+)\n", line.decode())
        assert match, line
        url = match.group(1)

        with trio.fail_after(10):
            result = await client.join(url, token=token.strip(), node="n1", services=["web"],
                                       fingerprint=fingerprint.strip())
        assert result.identities["web"].spiffe_id == "spiffe://mesh.test/svc/web"

        # a second CA on the same port: one clear line, exit 1
        port = url.rsplit(":", 1)[1]
        taken = await trio.to_thread.run_sync(
            lambda: meshd("ca", "serve", "--dir", ca_dir, "--listen", f"127.0.0.1:{port}",
                          check=False)
        )
        assert taken.returncode == 1
        assert taken.stderr.strip().splitlines() == [
            f"meshd: cannot listen on 127.0.0.1:{port}: Address already in use"
        ]

        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.e2e
def test_serve_exits_zero_on_sigint(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    meshd("ca", "init", "--dir", ca_dir, "--trust-domain", "mesh.test")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshd", "ca", "serve", "--dir", str(ca_dir),
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"listening on https://127.0.0.1:{port}\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
