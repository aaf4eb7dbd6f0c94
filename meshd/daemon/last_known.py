"""The last known endpoints, kept on disk so a meshd started while the registry is unreachable
serves from the first second.

``<state_dir>/endpoints.json`` holds every destination's endpoints as the registry last gave them,
with the trust domain they belong to and when they were saved::

    {"format": "meshd-endpoints/1", "trust_domain": "prod.mesh", "saved_at": 1718000000.5,
     "destinations": {"payments": {"index": 42, "endpoints": [{"node": ..., "instance_id": ...,
                      "address": ..., "port": ..., "version": ..., "healthy": true}]}}}

The route table is kept next to it, signed (``meshd.daemon.route_table``), and the trust bundle
with the certificates (``meshd.identity.files``). Endpoints are not signed: the registry does not
sign them either. What protects a caller is the mTLS handshake, which checks that the peer at an
address holds the destination's certificate; a forged endpoint can deny service, never
impersonate one. A file of another trust domain, another format or that does not parse is not
used (a warning says why) and the meshd waits for the registry as on a first start.

Writes are coalesced: a change marks the file dirty and a writer task writes it (atomically,
``write_atomic`` in a worker thread) at most once per ``MIN_WRITE_INTERVAL``, so a flapping health
check costs one fsync a second at most, never one per change. Encoding and decoding are pure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from meshd.daemon.route_table import RouteTableInForce
from meshd.fileio import write_atomic
from meshd.proxy.core.view import ViewCell
from meshd.registry.model import Endpoint, EndpointSet
from meshd.registry.watch import WatchStatus

log = logging.getLogger(__name__)

FORMAT = "meshd-endpoints/1"
FILE_NAME = "endpoints.json"
MIN_WRITE_INTERVAL = 1.0  # at most one write (one fsync) per second, however often views change
FINAL_WRITE_TIMEOUT = 2.0


class LastKnownError(ValueError):
    """The file is not a usable last known state (the reason says why)."""


@dataclass(frozen=True)
class KnownEndpoints:
    """What the file held: per destination, its endpoints and registry index; when saved (unix
    time)."""

    saved_at: float
    destinations: Mapping[str, tuple[int, tuple[Endpoint, ...]]]


def encode_endpoints(trust_domain: str, sets: Mapping[str, EndpointSet], saved_at: float
                     ) -> bytes:
    """The file's bytes for ``sets``. Pure."""
    return json.dumps({
        "format": FORMAT,
        "trust_domain": trust_domain,
        "saved_at": saved_at,
        "destinations": {
            name: {"index": eps.index, "endpoints": [
                {"node": e.node, "instance_id": e.instance_id, "address": e.address,
                 "port": e.port, "version": e.version, "healthy": e.healthy,
                 "labels": dict(e.labels)}
                for e in eps.endpoints]}
            for name, eps in sorted(sets.items())
        },
    }, sort_keys=True, indent=1).encode()


def decode_endpoints(raw: bytes, trust_domain: str) -> KnownEndpoints:
    """The last known endpoints in ``raw``, if they belong to ``trust_domain``. Pure; raises
    ``LastKnownError`` saying what is wrong."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise LastKnownError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LastKnownError(f"not a {FORMAT} document")
    if data.get("trust_domain") != trust_domain:
        raise LastKnownError(f"it belongs to trust domain {data.get('trust_domain')!r}, this "
                             f"meshd to {trust_domain!r}")
    saved_at, destinations = data.get("saved_at"), data.get("destinations")
    if not isinstance(saved_at, int | float) or not isinstance(destinations, dict):
        raise LastKnownError("saved_at or destinations missing")
    out: dict[str, tuple[int, tuple[Endpoint, ...]]] = {}
    for name, entry in destinations.items():
        try:
            out[str(name)] = (int(entry["index"]), tuple(sorted(
                _endpoint(str(name), e) for e in entry["endpoints"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise LastKnownError(f"destinations.{name}: {exc!r}") from None
    return KnownEndpoints(float(saved_at), out)


def _endpoint(service: str, e: Mapping[str, Any]) -> Endpoint:
    port = e["port"]
    if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(e["address"], str):
        raise ValueError(f"bad address or port in {e!r}")
    labels = e.get("labels", {})  # (a file from before labels has none)
    if not isinstance(labels, dict):
        raise ValueError(f"bad labels in {e!r}")
    return Endpoint(service=service, instance_id=str(e["instance_id"]), node=str(e["node"]),
                    address=e["address"], port=port, version=str(e["version"]),
                    healthy=bool(e["healthy"]),
                    labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())))


def endpoints_file(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def read_known_endpoints(path: Path, trust_domain: str) -> KnownEndpoints | None:
    """The file's content, or None (with a warning when it exists but is not usable)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the last known endpoints %s: %s", path, exc.strerror)
        return None
    try:
        return decode_endpoints(raw, trust_domain)
    except LastKnownError as exc:
        log.warning("the last known endpoints in %s are not used: %s", path, exc)
        return None


class EndpointKeeper:
    """Keeps ``endpoints.json`` in step with the endpoint views, coalescing changes."""

    def __init__(self, path: Path, trust_domain: str,
                 current: Callable[[], Mapping[str, EndpointSet]],
                 wall_clock: Callable[[], float]) -> None:
        self.path = path
        self.trust_domain = trust_domain
        self._current = current
        self._wall_clock = wall_clock
        self._dirty = trio.Event()
        self.writes = 0  # how many times the file was written (for tests and the log)

    def changed(self) -> None:
        """A view from the registry changed: write it soon."""
        self._dirty.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        try:
            while True:
                await self._dirty.wait()
                await self._write()
                await trio.sleep(MIN_WRITE_INTERVAL)
        finally:
            if self._dirty.is_set():  # a change not written yet: write it before leaving
                with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_TIMEOUT):
                    await self._write()

    async def _write(self) -> None:
        self._dirty = trio.Event()
        data = encode_endpoints(self.trust_domain, self._current(), self._wall_clock())
        try:
            await trio.to_thread.run_sync(write_atomic, self.path, data, 0o600)
        except OSError as exc:
            log.warning("cannot keep the last known endpoints in %s: %s", self.path, exc)
            return
        self.writes += 1


def load_last_known(routes: RouteTableInForce, keeper: EndpointKeeper, view: ViewCell,
                    watches: Mapping[str, WatchStatus], destinations: Sequence[str], *,
                    now_monotonic: float, now_wall: float) -> bool:
    """Put the last known route table and endpoints from disk in force (the table only if its
    signature verifies again), and mark the watches they stand for as serving from disk. True
    when every upstream destination has its last known endpoints, so the daemon need not wait
    for the registry to serve."""

    def monotonic(saved_at: float) -> float:
        return now_monotonic - max(0.0, now_wall - saved_at)

    saved = routes.load_from_disk()
    if saved is not None:
        watches["routes"].loaded_from_disk(monotonic(saved), 0)
    known = read_known_endpoints(keeper.path, keeper.trust_domain)
    if known is None:
        return False
    at = monotonic(known.saved_at)
    for dest in destinations:
        if dest in known.destinations:
            index, endpoints = known.destinations[dest]
            view.set_endpoints(EndpointSet(dest, endpoints, index, at))
            watches[f"endpoints/{dest}"].loaded_from_disk(at, index)
    missing = [d for d in destinations if d not in known.destinations]
    if missing:
        log.warning("no last known endpoints for %s in %s: waiting for the registry",
                    ", ".join(missing), keeper.path)
        return False
    log.info("serving from the last known state saved %.0fs ago (route table: %s, endpoints "
             "of %d destination(s)) until the registry answers",
             max(0.0, now_wall - known.saved_at),
             "from disk" if saved is not None else "none usable", len(destinations))
    return True
