"""How ``meshd up`` talks to what it started: readiness probes, one-shot ``meshd`` commands, and
the route table it stores in the registry. Foreign errors become ``MeshError`` here."""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence

import httpx
import trio

from meshd.config.mesh_schema import MeshConfig, MeshHost
from meshd.config.schema import RouteTable
from meshd.dev.supervisor import Child, describe_exit
from meshd.errors import MeshError
from meshd.registry.config_store import RouteConfigStore
from meshd.registry.consul import ConsulClient, registry_url
from meshd.registry.operator_key import OperatorKey

POLL_INTERVAL = 0.2
PROBE_TIMEOUT = 2.0


def http_client() -> httpx.AsyncClient:
    # trust_env=False: an HTTP(S)_PROXY in the environment must not see loopback probes
    return httpx.AsyncClient(timeout=PROBE_TIMEOUT, trust_env=False, verify=False)


def http_ok(client: httpx.AsyncClient, url: str) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        try:
            response = await client.get(url)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    return probe


def sees_healthy(
    client: httpx.AsyncClient, admin: str, wanted: Mapping[str, int]
) -> Callable[[], Awaitable[bool]]:
    """A probe that passes once the meshd at ``admin`` sees, in its ``/v1/state``, at least
    ``wanted[destination]`` healthy endpoints of every destination named."""
    async def probe() -> bool:
        try:
            response = await client.get(f"http://{admin}/v1/state")
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        destinations = response.json().get("destinations", {})
        for name, count in wanted.items():
            endpoints = destinations.get(name, {}).get("endpoints", [])
            if sum(1 for e in endpoints if e.get("healthy")) < count:
                return False
        return True

    return probe


async def wait_ready(probe: Callable[[], Awaitable[bool]], *, what: str, how: str,
                     give_up_after: float, child: Child | None = None) -> None:
    """Poll ``probe`` until it passes (another process: there is no event to wait on); after
    ``give_up_after`` seconds raise a MeshError that names ``what``, ``how`` it was checked and,
    for a child, what it said last."""
    with trio.move_on_after(give_up_after):
        while True:
            if await probe():
                return
            await trio.sleep(POLL_INTERVAL)
    raise MeshError(f"{what} did not become ready within {give_up_after:g}s ({how})"
                    + (child_report(child) if child is not None else ""))


def child_report(child: Child) -> str:
    history = ""
    if child.exit_codes:
        exits = ", ".join(describe_exit(c) for c in child.exit_codes[-3:])
        history = f"; it was started {child.starts} times (last exits: {exits})"
    tail = child.tail_text() or "(no output)"
    return (f"{history}\n--- last lines of {child.label} (full log: {child.spec.log_path}):\n"
            f"{tail}\n---")


async def wait_meshds_ready(client: httpx.AsyncClient, mesh: MeshConfig,
                            meshds: Mapping[str, Child], *, give_up_after: float) -> None:
    """Wait until every meshd answers ``/readyz`` and sees every instance of its upstreams;
    one MeshError naming each that did not within ``give_up_after`` seconds."""

    async def ready(host: MeshHost) -> None:
        url = f"http://{host.admin}/readyz"
        await wait_ready(http_ok(client, url), what=f"meshd {host.name}", how=f"GET {url}",
                         give_up_after=give_up_after, child=meshds[host.name])

    await _on_every_host(mesh, ready)

    # Every meshd answering /readyz is not yet a working mesh: a consumer learns that a new
    # instance passes its health check a moment later, through its registry watch. The mesh is
    # ready when every consumer sees every instance the mesh declares of each of its upstreams.
    declared: dict[str, int] = {}
    for host in mesh.hosts:
        for ms in host.services:
            declared[ms.service.name] = declared.get(ms.service.name, 0) + 1

    async def sees_all(host: MeshHost) -> None:
        wanted = {u.name: declared.get(u.name, 0)
                  for ms in host.services for u in ms.service.upstreams}
        if not wanted:
            return
        how = (f"GET http://{host.admin}/v1/state shows healthy endpoints "
               + ", ".join(f"{n} x{c}" for n, c in sorted(wanted.items())))
        await wait_ready(sees_healthy(client, str(host.admin), wanted),
                         what=f"meshd {host.name}'s view of its upstreams",
                         how=how, give_up_after=give_up_after, child=meshds[host.name])

    await _on_every_host(mesh, sees_all)


async def _on_every_host(mesh: MeshConfig,
                         check: Callable[[MeshHost], Awaitable[None]]) -> None:
    """Run ``check`` for every host at once; one MeshError with every host's failure."""
    failures: list[str] = []

    async def one(host: MeshHost) -> None:
        try:
            await check(host)
        except MeshError as exc:
            failures.append(str(exc))

    async with trio.open_nursery() as nursery:
        for host in mesh.hosts:
            nursery.start_soon(one, host)
    if failures:
        raise MeshError("\n".join(failures))


async def run_command(argv: Sequence[str], *, what: str, env: Mapping[str, str],
                      give_up_after: float = 60.0) -> str:
    """Run a one-shot command to completion and return its stdout; MeshError (with its stderr)
    if it fails. It runs in its own session, like the supervised children."""
    try:
        with trio.fail_after(give_up_after):
            result = await trio.run_process(
                list(argv), capture_stdout=True, capture_stderr=True, check=False,
                stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True,
            )
    except OSError as exc:
        raise MeshError(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}") from exc
    except trio.TooSlowError:
        raise MeshError(f"{what} did not finish within {give_up_after:g}s") from None
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        lines = "\n".join(stderr.splitlines()[-15:]) or "(no output)"
        raise MeshError(f"{what} failed ({describe_exit(result.returncode)}):\n{lines}")
    return str(result.stdout.decode(errors="replace"))


async def write_routes(registry: str, table: RouteTable, signer: OperatorKey, *,
                       token: str | None = None) -> None:
    """Store the mesh's route table in the registry's KV, through the one mesh config store (its
    key, its signed encoding, check-and-set), signed by ``signer``, as the holder of
    ``token``."""
    async with ConsulClient(registry_url(registry), token=token) as consul:
        await RouteConfigStore(consul, signer=signer).apply(table)
