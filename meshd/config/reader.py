"""The validation toolkit every meshd config file is read with (``meshd.toml``, ``routes.toml``,
``mesh.toml``): typed getters over a parsed mapping that record each problem with its file, key
path and reason instead of stopping at the first, so one run reports every defect. Pure."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from meshd.config.durations import parse_duration
from meshd.config.hostport import parse_hostport
from meshd.errors import ConfigError, Problem
from meshd.names import NAME_RULE, is_valid_name

T = TypeVar("T")

TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$")
MISSING: Any = object()  # "no default": the key is required


class Reader:
    """Walks a mapping, collecting problems instead of stopping at the first; a problem
    already reported (same key path and reason) is not repeated.

    Each getter takes the mapping, the key and the key path of the mapping (``""`` at the top),
    returns the value (or ``default`` when the key is absent), and returns None after reporting
    a problem.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, path: str, reason: str) -> None:
        found = Problem(self.file, path, reason)
        if found not in self.problems:
            self.problems.append(found)

    def unknown_keys(self, data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                self.problem(_join(path, key),
                             f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def get(
        self, data: Mapping[str, Any], key: str, path: str, kind: type | tuple[type, ...],
        default: Any = MISSING,
    ) -> Any:
        where = _join(path, key)
        if key not in data:
            if default is MISSING:
                self.problem(where, "required key is missing")
                return None
            return default
        value = data[key]
        # bool is an int subclass: never accept it where a number is expected
        if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
            self.problem(where, f"expected {_kind_name(kind)}, got a boolean")
            return None
        if not isinstance(value, kind):
            self.problem(where, f"expected {_kind_name(kind)}, got {type(value).__name__}")
            return None
        return value

    def name(self, data: Mapping[str, Any], key: str, path: str, default: Any = MISSING) -> Any:
        """A service, node, version or subset name (``meshd.names``)."""
        value = self.get(data, key, path, str, default)
        if isinstance(value, str) and value is not default and not is_valid_name(value):
            self.problem(_join(path, key), f"invalid name {value!r}: {NAME_RULE}")
            return None
        return value

    def trust_domain(
        self, data: Mapping[str, Any], key: str, path: str, default: Any = MISSING
    ) -> Any:
        value = self.get(data, key, path, str, default)
        if isinstance(value, str) and not TRUST_DOMAIN_RE.match(value):
            self.problem(_join(path, key), f"invalid trust domain {value!r}")
            return None
        return value

    def port(self, data: Mapping[str, Any], key: str, path: str, default: Any = MISSING) -> Any:
        value = self.get(data, key, path, int, default)
        if isinstance(value, int) and not 1 <= value <= 65535:
            self.problem(_join(path, key), f"port {value} out of range (1-65535)")
            return None
        return value

    def duration(
        self, data: Mapping[str, Any], key: str, path: str, default: Any = MISSING
    ) -> Any:
        """Seconds (a number, or a duration string such as ``"1m30s"``), greater than zero."""
        value = self.get(data, key, path, (str, int, float), default)
        if value is None or value is default:
            return value
        where = _join(path, key)
        if isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                self.problem(where, str(exc))
                return None
        else:
            seconds = float(value)
        if seconds <= 0:
            self.problem(where, "duration must be greater than zero")
            return None
        return seconds

    def choice(
        self, data: Mapping[str, Any], key: str, path: str, enum: Callable[[str], T],
        allowed: list[str], default: Any = MISSING,
    ) -> Any:
        value = self.get(data, key, path, str, default)
        if value is None or value is default:
            return value
        if value not in allowed:
            self.problem(_join(path, key), f"must be one of {', '.join(allowed)}, got {value!r}")
            return None
        return enum(value)

    def ip(self, data: Mapping[str, Any], key: str, path: str, default: Any = MISSING) -> Any:
        value = self.get(data, key, path, str, default)
        if isinstance(value, str):
            try:
                ipaddress.ip_address(value)
            except ValueError:
                self.problem(_join(path, key), f"{value!r} is not an IP address")
                return None
        return value

    def hostport(self, raw: Any, where: str) -> tuple[str, int] | None:
        """``raw`` (the value at key path ``where``) as an ``IP:PORT`` pair."""
        if not isinstance(raw, str):
            self.problem(where, 'expected "HOST:PORT"')
            return None
        try:
            return parse_hostport(raw)
        except ValueError as exc:
            self.problem(where, str(exc))
            return None

    def fail_if_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             dict: "a table", list: "an array"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))
