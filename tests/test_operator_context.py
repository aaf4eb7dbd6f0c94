"""The operator context file: where it lives, its mode, what is ignored, who removes it, and
``meshd context`` reading it."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshd.cli.context import run as context_command
from meshd.cli.main import build_parser
from meshd.errors import MeshError
from meshd.operator_context import (
    OperatorContext,
    OperatorCredentials,
    context_path,
    load_context,
    remove_context,
    write_context,
)


def _context(tmp_path: Path, pid: int | None = None) -> OperatorContext:
    op = tmp_path / "operator"
    return OperatorContext(
        registry="http://127.0.0.1:8500", token_file=op / "registry-token",
        admin=("127.0.0.2:15000", "127.0.0.3:15000"),
        operator=OperatorCredentials("dev", op / "dev.crt", op / "dev.key", op / "ca.crt"),
        run_dir=tmp_path, pid=os.getpid() if pid is None else pid)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_context_path_per_user() -> None:
    assert context_path({"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/ana"}) == \
        Path("/run/user/1000/meshd/context.json")
    assert context_path({"HOME": "/home/ana"}) == \
        Path("/home/ana/.local/state/meshd/context.json")
    assert context_path({"XDG_RUNTIME_DIR": "relative", "HOME": "/home/ana"}) == \
        Path("/home/ana/.local/state/meshd/context.json")


def test_written_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "runtime" / "meshd" / "context.json"
    context = _context(tmp_path)
    assert write_context(context, path) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_context(path) == context


def test_absent_malformed_or_orphaned_contexts_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "context.json"
    assert load_context(path) is None
    path.write_text('{"version": 1, "registry": "http://x"}')
    assert load_context(path) is None
    path.write_text("not json")
    assert load_context(path) is None
    write_context(_context(tmp_path, pid=_dead_pid()), path)   # meshd up was killed -9
    assert load_context(path) is None


def test_removed_only_by_the_run_that_wrote_it(tmp_path: Path) -> None:
    path = tmp_path / "context.json"
    write_context(_context(tmp_path, pid=os.getpid() + 1), path)
    remove_context(path, os.getpid())
    assert path.exists()       # a later meshd up replaced ours: not ours to remove
    write_context(_context(tmp_path), path)
    remove_context(path, os.getpid())
    assert not path.exists()
    remove_context(path, os.getpid())   # already gone: nothing to do


def test_meshd_context_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    parser = build_parser()
    with pytest.raises(MeshError, match=r"no operator context at .*: is `meshd up` running"):
        context_command(parser.parse_args(["context"]))
    context = _context(tmp_path)
    write_context(context)
    context.token_file.parent.mkdir()
    context.token_file.write_text("0e1c-secret\n")
    out = io.StringIO()
    assert context_command(parser.parse_args(["context", "--token"]), out) == 0
    assert out.getvalue() == "0e1c-secret\n"
    out = io.StringIO()
    assert context_command(parser.parse_args(["context"]), out) == 0
    text = out.getvalue()
    assert "registry    http://127.0.0.1:8500" in text
    assert f"token file  {context.token_file}" in text and "0e1c-secret" not in text
    assert "admin       127.0.0.2:15000 127.0.0.3:15000" in text
    assert f"operator    dev: cert {tmp_path / 'operator' / 'dev.crt'}" in text
