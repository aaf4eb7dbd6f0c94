"""The packages of the wheel (everything else is in pyproject.toml).

Besides ``meshd*`` and ``tui*``, the wheel carries the shop demo and the systemd units as package
data under ``meshd/share/`` (``meshd.cli.share`` finds them there), mapped from their one copy in
the repository, ``examples/shop/`` and ``systemd/``, so nothing is duplicated in git.
"""

from setuptools import find_packages, setup

SHARED = {"meshd.share.shop": "examples/shop", "meshd.share.systemd": "systemd"}

setup(packages=[*find_packages(include=["meshd*", "tui*"]), *SHARED], package_dir=SHARED)
