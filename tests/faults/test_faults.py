"""The multi-host fault suite: the shop demo over network namespaces (see ``faultmesh``), each
scenario under bounded load from the client host, each reporting its counts (the table at the end
of the run, from ``conftest.record``).

The scenarios share one mesh and run in file order; each one restores what it broke before it
returns, and sets the route table it needs first.

Durations: MESHD_FAULTS_REGISTRY_DOWN (seconds the registry stays down; default 30, the
outage the issue names).
"""

from __future__ import annotations

import math
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from faultmesh import ADMIN, BACKENDS, FaultMesh, LoadRun
from faultsummary import record
from proc_testing import required_program

pytestmark = pytest.mark.faults

REGISTRY_DOWN = float(os.environ.get("MESHD_FAULTS_REGISTRY_DOWN") or 30)
LINK_DOWN = 8.0       # seconds host-b's cable stays unplugged
APP_DOWN = 5.0        # seconds payments v2 stays dead
CA_DOWN_AT_LEAST = 5.0
STEP_REQUESTS = 600   # per canary step


def fault_load(mesh: FaultMesh) -> LoadRun:
    """The load during a fault: 3 keep-alive connections, each at most ~100 requests/s,
    bounded by count and time too; it runs until ``finish``."""
    return mesh.start_load(concurrency=3, pause=0.01, max_requests=60000, max_seconds=150.0)


def split_of(routes: dict[str, Any]) -> dict[str, int]:
    split = routes["destinations"]["payments"].get("split") or {}
    if isinstance(split, list):
        return {leg["subset"]: leg["weight"] for leg in split}
    return {k: int(v) for k, v in split.items()}


def assert_clean(counts: dict[str, Any], what: str) -> None:
    assert counts["total"] > 0, f"{what}: no request was sent: {counts}"
    assert counts["failed"] == 0, f"{what}: {counts['failed']} failed: {counts}"


def finish(mesh: FaultMesh, load: LoadRun, what: str) -> dict[str, Any]:
    counts = load.finish()
    if counts["failed"]:
        print(mesh.logs("meshd host-a", "meshd host-b", "meshd host-c", "web"))
    return counts


def use_routes(mesh: FaultMesh, name: str, split: dict[str, int]) -> None:
    mesh.apply_routes(name)
    mesh.wait(lambda: all(split_of(mesh.routes_in_force(h)) == split for h in ("host-a",)),
              20, f"host-a runs {name}")


# --------------------------------------------------------------------------------------------
# (a) the demo canary across hosts


@pytest.mark.parametrize("v1,v2", [(90, 10), (50, 50), (0, 100)])
def test_a_canary_split_within_tolerance(fault_mesh: FaultMesh, v1: int, v2: int) -> None:
    mesh = fault_mesh
    mesh.set_split(v1, v2)   # `meshd routes set-split`, from the client host
    took = mesh.wait(lambda: split_of(mesh.routes_in_force()) == {"v1": v1, "v2": v2}, 20,
                     f"host-a runs split {v1}/{v2}")
    counts = mesh.load(STEP_REQUESTS)
    n, p = counts["ok"], v2 / 100
    sigma = math.sqrt(n * p * (1 - p))
    got = counts["versions"].get("v2", 0)
    record(f"a canary {v1}/{v2}", counts, expected_v2=f"{n * p:.0f}+-{4 * sigma:.1f}",
           propagation_s=f"{took:.2f}", rate=counts["rate"])
    assert_clean(counts, "canary")
    assert abs(got - n * p) <= 4 * sigma, f"v2 got {got} of {n}, expected {p:.0%}: {counts}"
    assert set(counts["hosts"]) <= {"host-b", "host-c"}


# --------------------------------------------------------------------------------------------
# (b) 100 route changes during load


def test_b_route_churn_under_load(fault_mesh: FaultMesh) -> None:
    mesh = fault_mesh
    before = mesh.state("host-a")["generation"]
    load = fault_load(mesh)
    time.sleep(0.5)
    churn = mesh.agent("client", "set-splits", mesh.registry_url, *mesh.operator_args(),
                       "--count", "100",
                       "--final-v2", "10", "--max-seconds", "60", timeout=90)
    mesh.wait(lambda: split_of(mesh.routes_in_force()) == {"v1": 90, "v2": 10}, 20,
              "host-a back on 90/10")
    time.sleep(0.5)
    counts = finish(mesh, load, "route churn")
    after = mesh.state("host-a")["generation"]
    record("b 100 route changes", counts, changes=churn["changes"],
           cas_conflicts=churn["conflicts"], churn_s=churn["elapsed"],
           host_a_generations=after - before)
    assert churn["changes"] == 100, churn
    assert_clean(counts, "route churn")
    assert after > before


# --------------------------------------------------------------------------------------------
# (c) registry down, then back


def test_c_registry_down_then_back(fault_mesh: FaultMesh) -> None:
    """Known services keep working from the last known view; once the registry is back, a
    route change made then reaches every meshd (their routes watches resync at once) and
    host-a's endpoints watch answers again. That last one takes the watch's backoff plus a
    blocking query's wait (meshd.registry.watch.DEFAULT_WAIT, 60 s): the first query after the
    outage reuses the old index, so it blocks, and /v1/state counts the view as stale until it
    returns (a non-blocking first query after a failure would resync at once)."""
    mesh = fault_mesh
    meshds = ["host-a", *BACKENDS]
    load = fault_load(mesh)
    time.sleep(1.0)
    mesh.procs["registry"].stop(signal.SIGKILL)
    down_at = time.monotonic()
    staleness = 0.0
    while time.monotonic() - down_at < REGISTRY_DOWN:
        staleness = max(staleness, float(mesh.state("host-a")["registry"]["staleness_seconds"]))
        time.sleep(1.0)
    mesh.procs["registry"].start()
    back_at = time.monotonic()
    mesh.wait(lambda: mesh.get("client", f"{mesh.registry_url}/v1/status/leader")["status"]
              == 200, 30, "the registry answers again")
    mesh.set_split(80, 20)   # an operator's change, made once the registry is back

    def watch(host: str, name: str) -> dict[str, Any]:
        watches = mesh.state(host)["registry"]["watches"]
        return next(w for w in watches if w["name"] == name)

    def routes_resynced() -> bool:
        return all(watch(h, "routes")["staleness_seconds"] == 0
                   and split_of(mesh.routes_in_force(h)) == {"v1": 80, "v2": 20}
                   for h in meshds)

    # the watches retry with a capped backoff (meshd.backoff: up to 30 s) while it is down
    routes_resync = mesh.wait(routes_resynced, 45, "every meshd runs the change (routes watch)")

    def all_resynced() -> bool:
        return (all(mesh.state(h)["registry"]["staleness_seconds"] == 0 for h in meshds)
                and all(mesh.healthy_payments().get(h) for h in BACKENDS))

    resync = mesh.wait(all_resynced, 100, "every watch of every meshd answers (staleness 0)", 1.0)
    time.sleep(1.0)   # traffic on the resynced view
    counts = finish(mesh, load, "registry outage")
    mesh.set_split(90, 10)
    record("c registry down", counts, down_s=f"{back_at - down_at:.1f}",
           max_staleness_s=f"{staleness:.1f}",
           routes_resync_s=f"{routes_resync:.1f}", all_watches_resync_s=f"{resync:.1f}")
    assert staleness > 0, "host-a never reported a stale view while the registry was down"
    assert_clean(counts, "registry outage")


# --------------------------------------------------------------------------------------------
# (d) CA down: traffic unaffected, renewal resumes when it returns


def _identity(mesh: FaultMesh, host: str) -> dict[str, Any]:
    identity: dict[str, Any] = mesh.state(host)["identity"]
    return identity


def _serials(identity: dict[str, Any]) -> set[str]:
    return {identity["node"]["serial"],
            *(c["serial"] for c in identity["certificates"].values())}


def test_d_ca_down_traffic_unaffected_renewal_resumes(fault_mesh: FaultMesh) -> None:
    mesh = fault_mesh
    meshds = ["host-a", *BACKENDS]

    def seconds_to_renewal() -> tuple[float, str]:
        now = datetime.now(UTC)
        ahead = [((datetime.fromisoformat(at) - now).total_seconds(), h) for h in meshds
                 if (at := _identity(mesh, h)["renew_at"])]
        return min(ahead, default=(math.inf, ""))

    # take the CA away a few seconds before some host's renewal is due (60 s leaves: <= 42 s)
    mesh.wait(lambda: seconds_to_renewal()[0] <= 4, 50, "a renewal is due within 4 s")
    load = fault_load(mesh)
    mesh.procs["ca"].stop(signal.SIGTERM)
    down_at = time.monotonic()
    failing: list[str] = []

    def renewal_failed() -> bool:
        failing[:] = [h for h in meshds if _identity(mesh, h)["failures"] > 0]
        return bool(failing)

    mesh.wait(renewal_failed, 30, "a host tried to renew and failed while the CA was down")
    before = {h: _serials(_identity(mesh, h)) for h in failing}
    failures = max(_identity(mesh, h)["failures"] for h in failing)
    time.sleep(max(0.0, CA_DOWN_AT_LEAST - (time.monotonic() - down_at)))
    mesh.procs["ca"].start()
    back_at = time.monotonic()

    def renewed() -> bool:
        for h in meshds:
            identity = _identity(mesh, h)
            if identity["failures"] != 0 or identity["node"]["state"] == "expired":
                return False
            if h in before and _serials(identity) & before[h] == _serials(identity):
                return False
        return True

    took = mesh.wait(renewed, 40, "the failing hosts renewed once the CA was back")
    counts = finish(mesh, load, "CA outage")
    record("d CA down", counts, down_s=f"{back_at - down_at:.1f}",
           hosts_failing_renewal="+".join(failing), max_failures=failures,
           renewed_after_s=f"{took:.1f}")
    assert_clean(counts, "CA outage")


# --------------------------------------------------------------------------------------------
# (e) a backend host's link cut, then a backend killed


def _settled(mesh: FaultMesh) -> bool:
    """host-a's view of payments: every backend healthy, out of ejection, and no request on
    its way to it (one still in flight can fail yet and eject its backend)."""
    eps = mesh.state("host-a")["destinations"].get("payments", {}).get("endpoints", [])
    seen = {e["node"]: e for e in eps}
    return all(h in seen and seen[h]["healthy"] and not seen[h]["ejected"]
               and seen[h]["active_requests"] == 0 for h in BACKENDS)


def _post_check(mesh: FaultMesh) -> dict[str, Any]:
    """A short load after a fault: both backends serve again (round robin, no split).

    It starts once the fault's aftermath is over in host-a's view, not when health has
    readmitted the backend: the first tries to it after readmission can still fail (after
    host-b's link cut, three in a row ran into the 1 s per-try timeout in some runs) and eject
    it for ``base_ejection_time`` (3 s) just after the readmission was seen; a 200-request
    check (under a second) inside that ejection never reaches it."""
    mesh.wait(lambda: _settled(mesh), 30,
              "host-a sees both backends healthy, not ejected, nothing in flight")
    counts = mesh.load(200, concurrency=2)
    assert_clean(counts, "after the fault")
    assert counts["hosts"].get("host-b", 0) > 0 and counts["hosts"].get("host-c", 0) > 0, counts
    return counts


def test_e1_backend_link_cut(fault_mesh: FaultMesh) -> None:
    mesh = fault_mesh
    use_routes(mesh, "routes-any.toml", {})
    load = fault_load(mesh)
    time.sleep(1.0)
    mesh.topo.set_link("host-b", up=False)
    cut_at = time.monotonic()
    seen_out = False
    while time.monotonic() - cut_at < LINK_DOWN:
        seen_out = seen_out or not mesh.healthy_payments().get("host-b", False)
        time.sleep(0.5)
    mesh.topo.set_link("host-b", up=True)
    readmit = mesh.wait(lambda: mesh.healthy_payments().get("host-b", False), 40,
                        "host-b healthy and admitted again in host-a's view")
    time.sleep(1.0)
    counts = finish(mesh, load, "link cut")
    after = _post_check(mesh)
    record("e1 link cut host-b", counts, cut_s=LINK_DOWN, taken_out=seen_out,
           readmitted_after_s=f"{readmit:.1f}",
           after=f"b{after['hosts'].get('host-b', 0)}/c{after['hosts'].get('host-c', 0)}")
    assert_clean(counts, "link cut")
    assert seen_out, "host-a never took host-b out (ejection or health) while it was cut off"


def test_e2_backend_killed(fault_mesh: FaultMesh) -> None:
    mesh = fault_mesh
    load = fault_load(mesh)
    time.sleep(1.0)
    mesh.procs["payments v2"].stop(signal.SIGKILL)
    killed_at = time.monotonic()
    seen_out = False
    while time.monotonic() - killed_at < APP_DOWN:
        seen_out = seen_out or not mesh.healthy_payments().get("host-c", False)
        time.sleep(0.5)
    mesh.procs["payments v2"].start()
    readmit = mesh.wait(lambda: mesh.healthy_payments().get("host-c", False), 40,
                        "host-c healthy and admitted again")
    time.sleep(1.0)
    counts = finish(mesh, load, "backend killed")
    after = _post_check(mesh)
    record("e2 payments v2 killed", counts, down_s=APP_DOWN, taken_out=seen_out,
           readmitted_after_s=f"{readmit:.1f}",
           after=f"b{after['hosts'].get('host-b', 0)}/c{after['hosts'].get('host-c', 0)}")
    assert_clean(counts, "backend killed")
    assert seen_out


# --------------------------------------------------------------------------------------------
# (f) meshd SIGTERM under load on a backend host


def test_f_meshd_sigterm_drains(fault_mesh: FaultMesh) -> None:
    mesh = fault_mesh
    load = fault_load(mesh)
    time.sleep(1.0)
    proc = mesh.procs["meshd host-b"]
    proc.send(signal.SIGTERM)
    sent = time.monotonic()
    gone: list[float] = []

    def deregistered() -> bool:
        if not gone and "host-b" not in mesh.healthy_payments():
            gone.append(time.monotonic() - sent)
        return bool(gone)

    assert proc.popen is not None
    code = proc.popen.wait(timeout=30)
    stopped = time.monotonic() - sent
    mesh.wait(deregistered, 15, "host-a no longer routes to host-b")
    time.sleep(1.0)
    mesh.start_meshd("host-b")
    back = mesh.wait(lambda: mesh.healthy_payments().get("host-b", False), 40,
                     "host-b's meshd back and admitted")
    time.sleep(1.0)
    counts = finish(mesh, load, "meshd SIGTERM")
    after = _post_check(mesh)
    record("f meshd host-b SIGTERM", counts, exit_code=code, stopped_s=f"{stopped:.1f}",
           deregistered_s=f"{gone[0]:.1f}", back_s=f"{back:.1f}",
           after=f"b{after['hosts'].get('host-b', 0)}/c{after['hosts'].get('host-c', 0)}")
    assert code == 0, mesh.logs("meshd host-b")
    assert_clean(counts, "meshd SIGTERM")


# --------------------------------------------------------------------------------------------
# (g) a real Prometheus scraping every meshd


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: meshd
    static_configs:
      - targets: ["{admin}"]
        labels: {{host: "{host}"}}
"""


def test_g_prometheus_scrapes_every_meshd(fault_mesh: FaultMesh, tmp_path: Path) -> None:
    """One Prometheus per host namespace, each scraping its meshd's admin API on that host's
    loopback (the admin API is unauthenticated and so never leaves loopback): how a node-local
    Prometheus (or agent) watches meshd on a VM."""
    mesh = fault_mesh
    binary = required_program("prometheus", "prometheus")
    hosts = ["host-a", *BACKENDS]
    procs = []
    for host in hosts:
        directory = tmp_path / host
        (directory / "data").mkdir(parents=True)
        config = directory / "prometheus.yml"
        config.write_text(PROMETHEUS_CONFIG.format(admin=ADMIN, host=host))
        procs.append(mesh.topo.spawn(f"prometheus {host}", host, [
            binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
            "--web.listen-address=127.0.0.1:9090", "--storage.tsdb.retention.time=1h"]))
    try:
        counts = mesh.load(300, concurrency=2)
        assert_clean(counts, "traffic before the query")
        found: dict[str, list[dict[str, Any]]] = {}

        def series(host: str) -> list[dict[str, Any]]:
            answer = mesh.get(host, "http://127.0.0.1:9090/api/v1/query?query="
                              "meshd_requests_total")
            if answer["status"] != 200 or not isinstance(answer["body"], dict):
                return []
            result: list[dict[str, Any]] = answer["body"]["data"]["result"]
            return result

        def all_scraped() -> bool:
            for host in hosts:
                found[host] = series(host)
            a = {(s["metric"].get("direction"), s["metric"].get("subset"))
                 for s in found["host-a"]}
            return (("outbound", "v1") in a and ("outbound", "v2") in a
                    and all(any(s["metric"].get("direction") == "inbound" for s in found[h])
                            for h in BACKENDS))

        took = mesh.wait(all_scraped, 40, "every Prometheus has meshd_requests_total", 0.5)
        total = {h: sum(float(s["value"][1]) for s in found[h]) for h in hosts}
        record("g prometheus", counts, series="+".join(str(len(found[h])) for h in hosts),
               scraped_after_s=f"{took:.1f}",
               requests_total="/".join(f"{h[-1]}:{total[h]:.0f}" for h in hosts))
        for s in found["host-a"]:
            assert s["metric"]["job"] == "meshd" and s["metric"]["host"] == "host-a"
            assert s["metric"]["destination"] == "payments"
        assert total["host-a"] >= counts["ok"]
    finally:
        for proc in procs:
            proc.stop(signal.SIGTERM, timeout=10)
    assert all(p.popen is not None and p.popen.returncode is not None for p in procs)
