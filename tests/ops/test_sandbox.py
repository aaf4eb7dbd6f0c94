"""``hardened_exec.py`` puts the meshd children of the other ops tests under their unit's
``NoNewPrivileges=``, ``MemoryDenyWriteExecute=`` and ``RestrictAddressFamilies=``: check that
those rules are really in force in the child, or the other tests would prove nothing about them."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from ops_testing import hardened

PROBE = """
import mmap, socket
print("nnp", [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0])
socket.socket(socket.AF_INET6).close()
socket.socketpair()
for name in ("AF_NETLINK", "AF_PACKET"):
    try:
        socket.socket(getattr(socket, name), socket.SOCK_RAW, 0)
        print(name, "allowed")
    except OSError as exc:
        print(name, "refused", exc.errno)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("wx allowed")
except OSError as exc:
    print("wx refused", exc.errno)
"""


def run_probe(unit: str) -> list[str]:
    result = subprocess.run(hardened(unit, [sys.executable, "-c", PROBE]), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def mdwe_kernel() -> bool:
    """PR_SET_MDWE came with Linux 6.3; before it hardened_exec skips that rule."""
    major, minor = platform.release().split(".")[:2]
    return (int(major), int(minor)) >= (6, 3)


@pytest.mark.parametrize(("unit", "netlink"), [
    ("meshd.service", "refused 97"),
    ("meshd-registry.service", "refused 97"),
    ("meshd-ca.service", "allowed"),
])
def test_the_units_rules_hold_in_the_child(unit: str, netlink: str) -> None:
    lines = run_probe(unit)
    assert lines[:3] == ["nnp 1", f"AF_NETLINK {netlink}", "AF_PACKET refused 97"]
    if mdwe_kernel():
        assert lines[3] == "wx refused 13"
