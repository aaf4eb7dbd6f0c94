"""meshd's own probe of each local app, reported to the registry through TTL checks (the way a
Consul agent runs a check, but done by meshd so the same code works against any registry)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
import trio

from meshd.config.schema import LocalService
from meshd.errors import RegistryError, RegistryNotFound
from meshd.registry.consul import ConsulClient
from meshd.registry.model import CRITICAL, PASSING, ProbeResult

log = logging.getLogger(__name__)

async def probe(svc: LocalService, http: httpx.AsyncClient) -> ProbeResult:
    """Check the app once: an HTTP GET that must answer 2xx, or a TCP connect."""
    check = svc.health
    host = f"[{svc.address}]" if ":" in svc.address else svc.address
    if check.kind == "none":
        return ProbeResult(PASSING, "no check configured")
    if check.kind == "http":
        url = f"http://{host}:{svc.port}{check.path}"
        try:
            with trio.fail_after(check.timeout):
                response = await http.get(url)
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            return ProbeResult(CRITICAL, f"HTTP GET {url}: {type(exc).__name__}: {exc}")
        if 200 <= response.status_code < 300:
            return ProbeResult(PASSING, f"HTTP GET {url}: {response.status_code}")
        return ProbeResult(CRITICAL, f"HTTP GET {url}: {response.status_code}")
    try:
        with trio.fail_after(check.timeout):
            stream = await trio.open_tcp_stream(svc.address, svc.port)
        await stream.aclose()
    except (OSError, trio.TooSlowError) as exc:
        return ProbeResult(CRITICAL, f"TCP connect {svc.address}:{svc.port}: {exc}")
    return ProbeResult(PASSING, f"TCP connect {svc.address}:{svc.port}: ok")


def probe_client(timeout: float = 10.0) -> httpx.AsyncClient:
    """An HTTP client for loopback probes: an HTTP(S)_PROXY from the environment must not see
    them (it would mark a healthy local app critical)."""
    return httpx.AsyncClient(timeout=timeout, trust_env=False)


async def report_health(
    svc: LocalService,
    consul: ConsulClient,
    check_ids: tuple[str, ...],
    on_result: Callable[[ProbeResult], None],
    reregister: Callable[[ProbeResult], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe every ``interval`` and push the result to each TTL check (which also refreshes the
    TTL). If the registry no longer knows a check (reaped after a long outage of the app, or a
    registry that lost its state), register the service again: anti-entropy, as Consul's own
    agent does. ``task_status.started()`` after the first report."""
    started = False
    last_status: str | None = None
    async with probe_client(svc.health.timeout) as http:
        while True:
            result = await probe(svc, http)
            result.at = trio.current_time()
            if result.status != last_status:
                log.log(logging.INFO if result.status == PASSING else logging.WARNING,
                        "local service %s is %s: %s", svc.name, result.status, result.output)
                last_status = result.status
            on_result(result)
            for cid in check_ids:
                try:
                    await consul.update_ttl(cid, result.status, result.output)
                except RegistryNotFound:
                    log.warning("the registry lost check %s of %s; registering %s again",
                                cid, svc.name, svc.name)
                    try:
                        await reregister(result)
                    except RegistryError as exc:
                        log.warning("registering %s again failed: %s", svc.name, exc)
                    break
                except RegistryError as exc:
                    log.warning("could not report health of %s: %s", svc.name, exc)
            if not started:
                task_status.started()
                started = True
            await trio.sleep(svc.health.interval)
