"""Start a program with listening sockets passed as systemd passes them (``sd_listen_fds``): the
descriptors moved to 3, 4, ... and ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` set for this
very process, which then becomes the program (``exec``: same pid, so ``LISTEN_PID`` names it).

    python -I listen_exec.py FD[,FD...] NAME[:NAME...] -- PROGRAM ARGS...

``meshd up`` runs each meshd through it (``meshd.dev.supervisor``), with the sockets its runner
holds for the whole run. Run as a script (not ``-m meshd...``): it imports nothing of meshd, so
it costs one interpreter start and nothing more.
"""

from __future__ import annotations

import fcntl
import os
import sys

LISTEN_FDS_START = 3


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: listen_exec.py FD[,FD...] NAME[:NAME...] -- PROGRAM ARGS...")
    fds = [int(fd) for fd in argv[0].split(",") if fd]
    names = argv[1]
    # first above the target range (a source may sit where another goes), then into place
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, LISTEN_FDS_START + len(fds)) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                      LISTEN_FDNAMES=names)
    os.execvp(argv[3], argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
