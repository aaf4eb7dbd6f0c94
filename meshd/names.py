"""The one rule for service, node, version and subset names across the mesh. Pure.

A name is a DNS label in lower case (letters, digits, ``-`` inside, at most 63 characters), so
the same string works as a SPIFFE path segment, a Consul service name, a file name and a host
name label. The config parser and the CA both check it here.
"""

from __future__ import annotations

import re

MAX_NAME = 63
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME_RULE = "use lowercase letters, digits and '-' (max 63)"


def is_valid_name(name: str) -> bool:
    """Whether ``name`` follows the rule (a trailing newline does not slip through)."""
    return NAME_RE.fullmatch(name) is not None
