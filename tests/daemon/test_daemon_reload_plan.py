"""plan_reload compares every key: what is live-reloadable is applied, everything else is
reported as needing a restart (secrets without their values), never silently ignored."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from meshd.config.host import parse_host_config
from meshd.daemon.reload import plan_reload

BASE: dict[str, Any] = {
    "node": "host-b", "address": "127.0.0.3", "trust_domain": "shop.mesh",
    "registry_token": "s3cret-token",
    "ca": {"url": "https://127.0.0.1:8443", "fingerprint": "sha256:" + "ab" * 32,
           "token_file": "join-token"},
    "admin": {"address": "127.0.0.3:15000"},
    "services": [{"name": "payments", "port": 9001, "version": "v1",
                  "health": {"http": "/healthz", "interval": "1s"}}],
}


def _plan(change: dict[str, Any], tmp: Path) -> tuple[list[str], list[str], str]:
    new = copy.deepcopy(BASE)
    for key, value in change.items():
        if key.startswith("services."):
            new["services"][0][key.split(".", 1)[1]] = value
        elif "." in key:
            table, sub = key.split(".")
            new[table][sub] = value
        else:
            new[key] = value
    plan = plan_reload(parse_host_config(BASE, "m.toml", tmp),
                       parse_host_config(new, "m.toml", tmp))
    text = " ".join(str(c) for c in plan.needs_restart)
    return ([c.key for c in plan.applied], [c.key for c in plan.needs_restart], text)


def test_health_applies_live(tmp_path: Path) -> None:
    applied, restart, _ = _plan({"services.health": {"http": "/ready", "interval": "2s"}},
                                tmp_path)
    assert restart == [] and applied


def test_keys_added_later_are_reported_not_ignored(tmp_path: Path) -> None:
    _, restart, _ = _plan({"services.mtls": "permissive"}, tmp_path)
    assert restart == ["services.payments.mtls"]
    _, restart, _ = _plan({"admin.address": "127.0.0.3:15009"}, tmp_path)
    assert restart == ["admin.address"]


def test_a_changed_secret_is_reported_without_its_value(tmp_path: Path) -> None:
    _, restart, text = _plan({"registry_token": "other-token"}, tmp_path)
    assert restart == ["registry_token"]
    assert "s3cret-token" not in text and "other-token" not in text


def test_drain_timeout_applies_live(tmp_path: Path) -> None:
    """The next stop reads it: nothing to restart for a new drain deadline."""
    new = copy.deepcopy(BASE) | {"drain_timeout": "45s"}
    plan = plan_reload(parse_host_config(BASE, "m.toml", tmp_path),
                       parse_host_config(new, "m.toml", tmp_path))
    assert [str(c) for c in plan.applied] == ["drain_timeout: 10s -> 45s"]
    assert plan.needs_restart == () and plan.config.drain_timeout == 45


def test_an_access_log_format_change_is_reported_as_needing_a_restart(tmp_path: Path) -> None:
    _, restart, text = _plan({"access_log": {"format": "json"}}, tmp_path)
    assert restart == ["access_log.format"] and text == "access_log.format: text -> json"


def test_a_workers_change_is_reported_as_needing_a_restart(tmp_path: Path) -> None:
    _, restart, text = _plan({"workers": 4}, tmp_path)
    assert restart == ["workers"] and text == "workers: auto -> 4"
