"""The operator context: a small JSON file in which ``meshd up`` tells the operator's own
commands, like a kubeconfig, where the mesh it runs is and which credentials reach it (the
registry URL, the file holding the operator's registry ACL token, every meshd's admin address,
the operator certificate). It lives at a per-user well-known path, mode 0600, and is removed
when that ``meshd up`` exits.

Only operator commands read it (``meshd routes``, ``meshd tui``), and only for the registry it
names: a meshd never does, it sends its own token and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd.fileio import write_atomic

log = logging.getLogger(__name__)

CONTEXT_VERSION = 1
CONTEXT_FILE = "context.json"


@dataclass(frozen=True)
class OperatorCredentials:
    """An operator certificate from the mesh CA (``meshd ca issue --operator NAME``)."""

    name: str
    cert: Path
    key: Path
    ca_bundle: Path


@dataclass(frozen=True)
class OperatorContext:
    registry: str                 # the registry's base URL, http://HOST:PORT
    token_file: Path              # the operator's registry ACL token, alone in a 0600 file
    admin: tuple[str, ...]        # every meshd's admin API, HOST:PORT
    operator: OperatorCredentials | None
    run_dir: Path
    pid: int                      # the meshd up that wrote it

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            "version": CONTEXT_VERSION, "registry": self.registry,
            "registry_token_file": str(self.token_file), "admin": list(self.admin),
            "run_dir": str(self.run_dir), "pid": self.pid,
        }
        if self.operator is not None:
            data["operator"] = {"name": self.operator.name, "cert": str(self.operator.cert),
                                "key": str(self.operator.key),
                                "ca": str(self.operator.ca_bundle)}
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> OperatorContext:
        """ValueError when ``raw`` is not a context of this version."""
        try:
            data = json.loads(raw)
            if not isinstance(data, Mapping) or data.get("version") != CONTEXT_VERSION:
                raise ValueError(f"not a version {CONTEXT_VERSION} context")
            op = data.get("operator")
            operator = None if op is None else OperatorCredentials(
                str(op["name"]), Path(op["cert"]), Path(op["key"]), Path(op["ca"]))
            return cls(registry=str(data["registry"]),
                       token_file=Path(data["registry_token_file"]),
                       admin=tuple(str(a) for a in data["admin"]), operator=operator,
                       run_dir=Path(data["run_dir"]), pid=int(data["pid"]))
        except (LookupError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed operator context: {exc}") from exc


def context_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_RUNTIME_DIR/meshd/context.json`` (a per-user, per-login directory that
    disappears at log-out), else ``~/.local/state/meshd/context.json``."""
    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime and Path(runtime).is_absolute():
        return Path(runtime) / "meshd" / CONTEXT_FILE
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".local" / "state" / "meshd" / CONTEXT_FILE


def write_context(context: OperatorContext, path: Path | None = None) -> Path:
    """Write (or replace) the context file, 0600 in a 0700 directory. Raises OSError."""
    target = path or context_path()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(target, context.to_json(), 0o600)
    return target


def load_context(path: Path | None = None) -> OperatorContext | None:
    """The context in force, or None: no file, an unreadable or malformed one (logged), or one
    whose ``meshd up`` is gone (killed before it could remove it)."""
    target = path or context_path()
    try:
        context = OperatorContext.from_json(target.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the operator context %s: %s", target, exc)
        return None
    return context if _alive(context.pid) else None


def remove_context(path: Path, pid: int) -> None:
    """Remove the context file if the process ``pid`` wrote it (another run may have replaced
    it since)."""
    try:
        if OperatorContext.from_json(path.read_bytes()).pid == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True
