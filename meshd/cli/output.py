"""``-o json`` / ``--output json|text`` for the commands that report on the mesh (``meshd
status``, ``meshd explain``, ``meshd routes show``, ``meshd version``).

Every JSON document these commands print is one object on stdout, ending in a newline, whose
``"format"`` names it and its version (``"meshd.status/1"``...): a field is only ever added within
a version, never renamed or removed. The README's Commands section lists each document's fields.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any, TextIO

TEXT, JSON = "text", "json"


def add_output_option(p: argparse.ArgumentParser, *, what: str) -> None:
    p.add_argument("-o", "--output", choices=(TEXT, JSON), default=TEXT,
                   help=f"text for people (default), or json: {what}, one JSON object on "
                   "stdout whose \"format\" names its version")


def wants_json(args: argparse.Namespace) -> bool:
    return getattr(args, "output", TEXT) == JSON


def print_json(document: Mapping[str, Any], stream: TextIO) -> None:
    """One JSON object, keys in the order built, UTF-8 as is, then a newline."""
    print(json.dumps(document, indent=2, ensure_ascii=False, default=str), file=stream)
