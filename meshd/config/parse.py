"""The config parsers under their historical import path: ``meshd.toml`` is parsed in
``meshd.config.host``, ``routes.toml`` in ``meshd.config.routes``, both with the
``meshd.config.reader`` toolkit."""

from __future__ import annotations

from meshd.config.host import (
    FINGERPRINT_RE,
    HOST_KEYS,
    SERVICE_KEYS,
    parse_host_config,
)
from meshd.config.reader import TRUST_DOMAIN_RE
from meshd.config.routes import DESTINATION_KEYS, parse_routes, routes_to_data
from meshd.names import NAME_RE

__all__ = [
    "DESTINATION_KEYS",
    "FINGERPRINT_RE",
    "HOST_KEYS",
    "NAME_RE",
    "SERVICE_KEYS",
    "TRUST_DOMAIN_RE",
    "parse_host_config",
    "parse_routes",
    "routes_to_data",
]
