"""External services and the egress mode in ``routes.toml``: parse, validate, and back. Pure.

A destination outside the mesh is declared with ``external``::

    [destinations.bank]
    external = { hosts = ["bank.example"], port = 443, tls = "originate" }
    # or: external = { addresses = ["127.0.0.1:9443"], tls = "originate", sni = "bank.example",
    #                  ca_file = "/etc/meshd/bank-ca.pem" }

Exactly one of ``hosts`` (DNS names, resolved by the system resolver off the request path,
with ``port``) or ``addresses`` (``IP:PORT`` literals, used as given). ``tls`` is
``originate`` (the default: meshd speaks TLS to it and verifies its certificate against
``ca_file``, else the system roots, for the name ``sni``, else the host) or ``none`` (plain
TCP). Routes, timeouts, retries and ``policy`` apply as to any destination; ``subsets``,
``split``, ``mirror`` and ``authorization`` do not (no versions, no inbound side to check).

``egress = "registered-only" | "allow-any"`` (top level) is what the host's egress proxy
listener does with a destination no ``external`` declares: refuse it (the default: the mesh
fails closed) or pass it through.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from meshd.config.hostport import parse_hostport
from meshd.config.reader import Reader
from meshd.config.schema import DestinationRoutes, EgressMode, ExternalService, ExternalTLS

EXTERNAL_KEYS = {"hosts", "addresses", "port", "tls", "ca_file", "sni"}
# what an external destination cannot have, and why
NOT_FOR_EXTERNAL = {
    "subsets": "an external service has no versions to split among",
    "split": "an external service has no subsets",
    "mirror": "mirroring goes to a subset; an external service has none",
    "authorization": "authorization is checked by a destination's inbound meshd; an external "
                     "service has none",
}
MAX_HOSTS = 16

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def is_hostname(text: str) -> bool:
    """A DNS name in lower case (labels of letters, digits and inner ``-``)."""
    return _HOSTNAME_RE.fullmatch(text) is not None


def parse_egress(r: Reader, data: Mapping[str, Any]) -> EgressMode:
    mode = r.choice(data, "egress", "", EgressMode, [m.value for m in EgressMode],
                    EgressMode.REGISTERED_ONLY)
    return mode or EgressMode.REGISTERED_ONLY


def parse_external(r: Reader, raw: Mapping[str, Any], path: str) -> ExternalService | None:
    """The ``external`` table of the destination at ``path`` (None: absent, or wrong), and
    the destination keys that make no sense beside it."""
    if "external" not in raw:
        return None
    epath = f"{path}.external"
    table = r.get(raw, "external", path, dict)
    if table is None:
        return None
    for key, why in NOT_FOR_EXTERNAL.items():
        if key in raw:
            r.problem(f"{path}.{key}", f"not allowed with external: {why}")
    before = len(r.problems)
    r.unknown_keys(table, epath, EXTERNAL_KEYS)
    tls = r.choice(table, "tls", epath, ExternalTLS, [t.value for t in ExternalTLS],
                   ExternalTLS.ORIGINATE)
    hosts: tuple[str, ...] = ()
    addresses: tuple[tuple[str, int], ...] = ()
    port: int | None = None
    if ("hosts" in table) == ("addresses" in table):
        r.problem(epath, "expected exactly one of hosts (DNS names, with port) or addresses "
                  '("IP:PORT")')
    elif "hosts" in table:
        hosts = _hosts(r, table, epath)
        port = r.port(table, "port", epath)
    else:
        addresses = _addresses(r, table, epath)
        if "port" in table:
            r.problem(f"{epath}.port", 'addresses carry their own port ("IP:PORT")')
    sni = r.get(table, "sni", epath, str, None)
    if sni is not None and not is_hostname(sni):
        r.problem(f"{epath}.sni", f"expected a DNS name in lower case, got {sni!r}")
    ca_file = r.get(table, "ca_file", epath, str, None)
    if ca_file is not None and not ca_file.startswith("/"):
        r.problem(f"{epath}.ca_file",
                  f"expected an absolute path (the table is mesh-wide: each host reads this "
                  f"file), got {ca_file!r}")
    if tls is ExternalTLS.NONE:
        for key in ("sni", "ca_file"):
            if key in table:
                r.problem(f"{epath}.{key}", 'only with tls = "originate"')
    elif addresses and sni is None:
        r.problem(f"{epath}.sni", "required with addresses and tls = \"originate\": the name "
                  "the server's certificate must carry")
    if len(r.problems) != before or tls is None:
        return None
    return ExternalService(hosts=hosts, addresses=addresses, port=port, tls=tls, sni=sni,
                           ca_file=ca_file)


def check_external_names(r: Reader, dests: list[DestinationRoutes]) -> None:
    """A host name is declared by one external destination at most: the egress proxy must
    know which destination's policy a request to it follows."""
    owner: dict[str, str] = {}
    for dest in dests:
        if dest.external is None:
            continue
        for name in dest.external.names:
            if name in owner:
                r.problem(f"destinations.{dest.service}.external",
                          f"host {name!r} is also declared by destinations.{owner[name]}")
            owner.setdefault(name, dest.service)


def _hosts(r: Reader, table: Mapping[str, Any], path: str) -> tuple[str, ...]:
    listed = r.get(table, "hosts", path, list)
    if listed is None:
        return ()
    hpath = f"{path}.hosts"
    if not listed:
        r.problem(hpath, "empty: name at least one host")
    if len(listed) > MAX_HOSTS:
        r.problem(hpath, f"at most {MAX_HOSTS} hosts")
    out: list[str] = []
    for i, host in enumerate(listed):
        if not isinstance(host, str) or not is_hostname(host):
            r.problem(f"{hpath}[{i}]", f"expected a DNS name in lower case, got {host!r}")
        elif _is_ip(host):
            r.problem(f"{hpath}[{i}]", f"{host!r} is an IP address: use addresses")
        elif host in out:
            r.problem(f"{hpath}[{i}]", f"host {host!r} listed twice")
        else:
            out.append(host)
    return tuple(out)


def _addresses(r: Reader, table: Mapping[str, Any], path: str) -> tuple[tuple[str, int], ...]:
    listed = r.get(table, "addresses", path, list)
    if listed is None:
        return ()
    apath = f"{path}.addresses"
    if not listed:
        r.problem(apath, "empty: give at least one \"IP:PORT\"")
    out: list[tuple[str, int]] = []
    for i, item in enumerate(listed):
        if not isinstance(item, str):
            r.problem(f"{apath}[{i}]", f'expected "IP:PORT", got {item!r}')
            continue
        try:
            pair = parse_hostport(item)
        except ValueError as exc:
            r.problem(f"{apath}[{i}]", str(exc))
            continue
        if pair in out:
            r.problem(f"{apath}[{i}]", f"address {item!r} listed twice")
        else:
            out.append(pair)
    return tuple(out)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def external_data(external: ExternalService) -> dict[str, Any]:
    """The canonical mapping of ``external`` (``parse_external`` reads it back)."""
    data: dict[str, Any] = {"tls": external.tls.value}
    if external.hosts:
        data["hosts"] = list(external.hosts)
        data["port"] = external.port
    else:
        data["addresses"] = [_hostport(host, port) for host, port in external.addresses]
    if external.sni is not None:
        data["sni"] = external.sni
    if external.ca_file is not None:
        data["ca_file"] = external.ca_file
    return data


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
