"""Thin file wrappers around the pure parsers: read TOML, attach the file name to every problem."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from meshd.config.parse import parse_host_config, parse_routes
from meshd.config.schema import HostConfig, RouteTable
from meshd.errors import ConfigError, Problem


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "", "file not found")]) from None
    except OSError as exc:
        raise ConfigError([Problem(str(path), "", f"cannot read: {exc.strerror}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), "", f"invalid TOML: {exc}")]) from exc


def load_host_config(path: Path) -> HostConfig:
    """A meshd.toml; with ``registry_token_file``, its ``registry_token`` is that file's
    content (the first line, without surrounding whitespace)."""
    config = parse_host_config(read_toml(path), str(path), path.parent)
    if config.registry_token_file is None:
        return config
    token = read_token_file(config.registry_token_file, str(path), "registry_token_file")
    return dataclasses.replace(config, registry_token=token)


def read_token_file(token_file: Path, file: str = "", key: str = "") -> str:
    """A secret kept alone in a file (a registry ACL token): its first line, stripped.
    ConfigError naming ``file`` and ``key`` when it cannot be read or holds nothing."""
    try:
        text = token_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError([Problem(file, key, f"cannot read {token_file}: {reason}")]) from exc
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError([Problem(file, key, f"{token_file} is empty")])
    return lines[0].strip()


def load_routes(path: Path) -> RouteTable:
    return parse_routes(read_toml(path), str(path))


def file_kind(data: dict[str, Any]) -> str:
    """``routes`` for a routes.toml, ``host`` for a meshd.toml, ``mesh`` for a mesh.toml."""
    if "destinations" in data:
        return "routes"
    if "hosts" in data:
        return "mesh"
    return "host"


def validate_file(path: Path) -> list[Problem]:
    """Every problem in one file (empty when valid); the kind of file is told by its content."""
    try:
        data = read_toml(path)
        kind = file_kind(data)
        if kind == "routes":
            parse_routes(data, str(path))
        elif kind == "mesh":
            from meshd.config.mesh import parse_mesh  # the laptop runner's format

            parse_mesh(data, str(path), path.parent)
        else:
            parse_host_config(data, str(path), path.parent)
    except ConfigError as exc:
        return exc.problems
    return []
