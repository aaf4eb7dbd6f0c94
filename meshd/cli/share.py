"""Where the files meshd ships beside its code are: the shop demo (``examples/shop``) and the
systemd units (``systemd/``).

The repository keeps one copy of each, at the top of the source tree. The wheel carries the same
files as package data under ``meshd/share/`` (``shop/`` and ``systemd/``; setup.py maps the
packages onto the repository's folders, so nothing is copied in git). A command looks in the
source tree first (a checkout, or an editable install), then in the installed package.
"""

from __future__ import annotations

from pathlib import Path

import meshd

PACKAGE = Path(meshd.__file__).resolve().parent
SOURCE_ROOT = PACKAGE.parent

DEMO = "shop"
# source tree folder -> folder under meshd/share/ in the wheel
LOCATIONS = {DEMO: (SOURCE_ROOT / "examples" / "shop", PACKAGE / "share" / "shop"),
             "systemd": (SOURCE_ROOT / "systemd", PACKAGE / "share" / "systemd")}


def shared_dir(name: str) -> Path | None:
    """The folder ``name`` (``"shop"``, ``"systemd"``) ships in: the source tree's, else the
    installed package's; None when neither exists (an incomplete install)."""
    for candidate in LOCATIONS[name]:
        if candidate.is_dir():
            return candidate
    return None
