"""Run a command under the parts of a unit's sandbox that a process can apply to itself.

    python hardened_exec.py FAMILIES COMMAND [ARG...]

FAMILIES is a unit's ``RestrictAddressFamilies=`` value (``AF_UNIX AF_INET AF_INET6``). Before
``execve`` this sets, as systemd does for the unit:
- ``NoNewPrivileges=yes``: ``prctl(PR_SET_NO_NEW_PRIVS)``;
- ``MemoryDenyWriteExecute=yes``: ``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`` (Linux 6.3+;
  the same rule systemd enforces with seccomp: no mapping both writable and executable, none made
  executable later), skipped on older kernels;
- ``RestrictAddressFamilies=``: a seccomp filter that makes ``socket(2)`` with any other family
  fail with EAFNOSUPPORT (``socketpair`` stays allowed, as under systemd).
All three survive ``execve``, so the meshd process the tests then talk to runs under them. Exits
with a message if a rule cannot be applied (the filter is written for x86-64 and arm64).
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_MDWE = 38, 22, 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
# (audit arch, socket syscall number)
ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


def _filter(families: list[int], arch: int, socket_nr: int) -> bytes:
    """Classic BPF over ``struct seccomp_data`` (nr at 0, arch at 4, args[0] at 16)."""
    allow = 6 + len(families)  # index of the final "allow"; the refusal is just before it
    prog = [
        (LD_W_ABS, 0, 0, 4),
        (JEQ_K, 0, allow - 2, arch),           # another ABI: not ours to judge
        (LD_W_ABS, 0, 0, 0),
        (JEQ_K, 0, allow - 4, socket_nr),      # not socket(): allow
        (LD_W_ABS, 0, 0, 16),                  # the family (low 32 bits of args[0])
    ]
    for i, family in enumerate(families):
        here = 5 + i
        prog.append((JEQ_K, allow - here - 1, 0, family))
    prog.append((RET_K, 0, 0, SECCOMP_RET_ERRNO | 97))  # EAFNOSUPPORT
    prog.append((RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return b"".join(struct.pack("HBBI", *insn) for insn in prog)


def main(argv: list[str]) -> int:
    names, command = argv[1].split(), argv[2:]
    families = [int(getattr(socket, name)) for name in names]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_ulong]

    def prctl(option: int, arg: int, ptr: int | None = None) -> None:
        if libc.prctl(option, arg, ptr, 0, 0) != 0:
            err = ctypes.get_errno()
            if option == PR_SET_MDWE and err == 22:  # EINVAL: a kernel before 6.3
                return
            sys.exit(f"hardened_exec: prctl({option}): {os.strerror(err)}")

    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)
    if platform.machine() not in ARCHES:
        sys.exit(f"hardened_exec: no seccomp filter for {platform.machine()}")
    arch, socket_nr = ARCHES[platform.machine()]
    program = _filter(families, arch, socket_nr)
    code = ctypes.create_string_buffer(program, len(program))
    count = len(program) // 8

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(count, ctypes.addressof(code))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
