"""``HOST:PORT`` as meshd's files and command lines write an address: an IP literal (IPv6 in
brackets, ``[::1]:8500``) and a port. Pure; the callers say where a bad one came from."""

from __future__ import annotations

import ipaddress


def parse_hostport(
    text: str, *, allow_port_zero: bool = False, allow_names: bool = False
) -> tuple[str, int]:
    """``"127.0.0.1:8500"`` -> ``("127.0.0.1", 8500)``; ``"[::1]:80"`` -> ``("::1", 80)``.

    The port is 1-65535; ``allow_port_zero`` also takes 0 (a listener on a port the kernel
    picks). The host is an IP literal; ``allow_names`` also takes a host name (a command-line
    listen address such as ``localhost:8500``, resolved by the listener). Raises ValueError
    with the reason.
    """
    lowest = 0 if allow_port_zero else 1
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if (not sep or not (port.isascii() and port.isdigit())
            or not lowest <= int(port) <= 65535):
        raise ValueError(f"expected HOST:PORT with a port in {lowest}-65535, got {text!r}")
    if allow_names and host:
        return host, int(port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return host, int(port)
