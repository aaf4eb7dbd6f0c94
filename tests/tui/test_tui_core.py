"""The console's pure cores: metrics parsing and arithmetic, the split draft, events derived from
successive observations, rates and propagation from the model, and the topology drawing."""

from __future__ import annotations

import dataclasses

import pytest
from tui_data import NOW, ROUTES, T0, fixed_model, observations

from meshd.errors import ConfigError
from meshd.metrics import Metrics
from tui.events import split_text
from tui.model import MeshModel, process_total
from tui.observe import HostPoll, Observation, RegistryPoll, instances_from_health_connect
from tui.prom import counter_delta, parse_metrics, quantile
from tui.split import SplitDraft, editable_destinations
from tui.topology import draw, draw_graph, draw_list
from tui.views import build_graph, host_rows, propagation, service_detail

# -- metrics -------------------------------------------------------------------------------------


def test_parse_metrics_reads_what_meshd_exports() -> None:
    m = Metrics()
    for _ in range(3):
        m.request_done("outbound", "web", "payments", "v2", 503, 0.01)
    for seconds in (0.003, 0.004, 0.2, 0.003, 0.003, 0.003, 0.003):
        m.request_done("outbound", "web", "payments", "v1", 200, seconds)
    m.request_done("outbound", "web", "payments", "v1", 500, 0.2)  # another code, another series
    m.config_reloads.labels("applied").inc()
    sample = parse_metrics(m.render().decode())
    ejections = getattr(m, "ejections", None)  # outlier detection's counter, when present
    if ejections is not None:
        ejections.labels("payments", "consecutive_5xx").inc(2)
        sample = parse_metrics(m.render().decode())
        assert sample.ejections == {("payments", "consecutive_5xx"): 2.0}
    assert sample.requests[("outbound", "web", "payments", "v2", "503")] == 3
    assert sample.requests[("outbound", "web", "payments", "v1", "200")] == 7
    buckets = sample.latency[("outbound", "payments", "v1")]
    assert buckets[-1] == (float("inf"), 8)  # the latency series of both codes, summed
    assert sample.reloads == {"applied": 1.0, "rejected": 0.0}


@pytest.mark.parametrize(("q", "buckets", "expected"), [
    (0.5, ((0.1, 10.0), (1.0, 20.0), (float("inf"), 20.0)), 0.1),
    (0.75, ((0.1, 10.0), (1.0, 20.0), (float("inf"), 20.0)), 0.55),
    (0.99, ((0.1, 0.0), (1.0, 0.0), (float("inf"), 5.0)), 1.0),  # +Inf: largest bound
    (0.99, ((0.1, 0.0), (float("inf"), 0.0)), None),
    (0.99, (), None),
])
def test_quantile_interpolates_like_promql(
    q: float, buckets: tuple[tuple[float, float], ...], expected: float | None,
) -> None:
    assert quantile(q, buckets) == (pytest.approx(expected) if expected is not None else None)


def test_counter_reset_counts_from_zero() -> None:
    assert counter_delta(15, 10) == 5
    assert counter_delta(4, 10) == 4  # the meshd restarted
    assert counter_delta(4, None) == 4


def test_instances_from_a_consul_health_connect_answer() -> None:
    entry = {
        "Node": {"Node": "agent", "Address": "10.0.0.1"},
        "Service": {"Kind": "connect-proxy", "ID": "payments-host-b-sidecar-proxy",
                    "Address": "10.0.0.12", "Port": 15001,
                    "Meta": {"version": "v2", "meshd-node": "host-b"},
                    "Proxy": {"DestinationServiceID": "payments-host-b"}},
        "Checks": [{"Status": "passing"}, {"Status": "critical"}],
    }
    [inst] = instances_from_health_connect("payments", [entry, "garbage", {"Service": {}}])
    assert (inst.node, inst.address, inst.version, inst.status, inst.instance_id) == (
        "host-b", "10.0.0.12", "v2", "critical", "payments-host-b")


# -- the split draft -----------------------------------------------------------------------------


def draft() -> SplitDraft:
    return SplitDraft.from_routes(ROUTES, "payments")


def test_draft_starts_from_the_stored_split_with_the_heaviest_subset_stable() -> None:
    d = draft()
    assert d.weights == {"v1": 90, "v2": 10} and d.stable == "v1" and not d.changed
    assert d.canary() == "v2"
    assert editable_destinations(ROUTES) == ["payments"]
    with pytest.raises(ValueError, match="no subsets"):
        SplitDraft.from_routes(ROUTES, "cart")


def test_canary_steps_then_rollback() -> None:
    d = draft()
    seen = []
    for _ in range(4):
        d.step()
        seen.append(dict(d.weights))
    assert seen == [{"v1": 75, "v2": 25}, {"v1": 50, "v2": 50}, {"v1": 0, "v2": 100},
                    {"v1": 0, "v2": 100}]
    d.rollback()
    assert d.weights == {"v1": 100, "v2": 0}


def test_typing_and_nudging_weights() -> None:
    d = draft()
    for key in "50":
        d.type_digit(key)
    assert d.weights["v1"] == 50 and d.typed == "50"
    d.type_digit("7")  # 507 > 100: starts again
    assert d.weights["v1"] == 7
    d.backspace()
    assert d.weights["v1"] == 0
    d.move(1)
    d.adjust(+95)
    assert d.weights == {"v1": 0, "v2": 100}
    d.adjust(+1)
    assert d.weights["v2"] == 100  # clamped
    d.set_weight("v2", 30)
    d.balance()
    assert d.weights == {"v1": 70, "v2": 30}


def test_validation_sum_and_health() -> None:
    d = draft()
    d.type_digit("6")
    check = d.validate({"v1": (1, 1), "v2": (1, 1)})
    assert check.errors == ("weights total 16, must total 100 (add 84)",)
    d.balance()
    check = d.validate({"v1": (1, 1), "v2": (0, 2)})
    assert check.ok and check.warnings == (
        "v2 has no healthy endpoint (0/2): its 10% of requests would fail",)
    assert d.validate(None).warnings[0].startswith("v1: endpoint health unknown")
    d.rollback()
    assert d.validate({"v1": (1, 1)}).warnings == ()  # v2 at 0 %: its health does not matter


def test_to_routes_replaces_only_this_split_and_is_what_meshd_accepts() -> None:
    d = draft()
    d.step()
    d.step()
    data = d.to_routes(ROUTES)
    assert data["destinations"]["payments"]["split"] == {"v1": 50, "v2": 50}
    assert data["destinations"]["cart"] == ROUTES["destinations"]["cart"]
    assert ROUTES["destinations"]["payments"]["split"] == {"v1": 90, "v2": 10}  # not mutated
    d.set_weight("v1", 20)
    with pytest.raises(ConfigError, match="sum to 70"):
        d.to_routes(ROUTES)


def test_split_text() -> None:
    assert split_text(ROUTES, "payments") == "v1=90 v2=10"
    assert split_text(ROUTES, "cart") == "no split"


# -- the model and events ------------------------------------------------------------------------


def test_rates_success_and_p99_over_the_window() -> None:
    model = fixed_model()
    traffic = model.traffic()
    v1, v2 = traffic[("web", "payments", "v1")], traffic[("web", "payments", "v2")]
    assert v1.rate == pytest.approx(18.0) and v1.success == 1.0
    assert v2.rate == pytest.approx(2.0)
    assert v2.success == pytest.approx(1 - 2.4 / 10)  # 5 s: 10 requests, 2.4 of them 503
    assert v1.p99 is not None and 0.1 <= v1.p99 <= 0.25


def test_events_derived_from_successive_observations() -> None:
    texts = [e.text for e in fixed_model().events]
    assert any("registry: 5 instance(s) of 4 service(s)" in t for t in texts)
    assert "payments v2 on host-c: passing → critical" in texts
    assert any(t.startswith("host-d refused a route table") for t in texts)
    assert "host-e (10.0.0.15:15000) unreachable: timed out" in texts
    assert any(t.startswith("host-b renewed the certificate of payments") for t in texts)


def test_registry_outage_and_recovery_are_events_and_the_last_view_stays() -> None:
    obs = observations()
    model = MeshModel()
    model.ingest(obs[0])
    model.ingest(Observation(T0 + 1, RegistryPoll(T0 + 1, error="connection refused"),
                             obs[0].hosts))
    assert model.registry is not None and len(model.instances()) == 5
    model.ingest(dataclasses.replace(obs[3], at=T0 + 20,
                                     registry=dataclasses.replace(obs[3].registry, at=T0 + 20)))
    texts = [e.text for e in model.events]
    assert "registry unreachable: connection refused (showing the last known view)" in texts
    assert "registry reachable again after 19s" in texts


def test_an_unreachable_host_keeps_its_last_state_with_its_age() -> None:
    model = fixed_model()
    rows = {r.record.node: r for r in host_rows(model, NOW)}
    host_e = rows["host-e"]
    assert not host_e.record.reachable and host_e.record.state is not None
    assert host_e.age == pytest.approx(NOW - (T0 + 2))
    assert rows["host-a"].cpu_percent == pytest.approx(12.0)
    assert rows["host-d"].on_stored_routes is False and rows["host-d"].config_error
    assert rows["host-e"].cert_expiry == pytest.approx(7200 - (NOW - (T0 + 2)))


def test_propagation_counts_hosts_on_the_target_table() -> None:
    prop = propagation(fixed_model(), ROUTES)
    assert [n for n, _ in prop.applied] == ["host-a", "host-b", "host-c"]
    assert [n for n, _ in prop.refused] == ["host-d"]
    assert prop.unreachable == ("host-e",) and not prop.complete


def test_service_detail_groups_instances_by_subset() -> None:
    detail = service_detail(fixed_model(), "payments", NOW)
    assert [(i.subset, i.node, i.status) for i in detail.instances] == [
        ("v1", "host-b", "passing"), ("v2", "host-c", "critical")]
    assert detail.instances[0].rate == pytest.approx(18 * (1 + 0.3 * 0.5), rel=0.3)
    assert len(detail.instances[0].history) == 5
    assert [c.node for c in detail.certificates] == ["host-b", "host-c"]
    assert [g.generation for g in detail.generations] == [2, 2, 2, 1, 2]
    # from host-a's /v1/state: requests in flight, and its ejection of v2 with the time left
    assert [i.active for i in detail.instances] == [4, 0]
    v2 = detail.instances[1]
    assert v2.ejected_by == ("host-a",) and v2.ejections[0].reason == "consecutive_5xx"
    assert v2.ejections[0].remaining == pytest.approx(29 - (NOW - (T0 + 5)))


def test_active_requests_are_summed_over_the_calling_hosts() -> None:
    obs = observations()
    last = obs[-1]
    hosts = []
    for poll in last.hosts:
        if poll.node == "host-d" and poll.state is not None:  # host-d calls payments too
            state = dict(poll.state)
            state["destinations"] = dict(state["destinations"]) | {"payments": {"endpoints": [
                {"node": "host-b", "instance_id": "payments-host-b", "active_requests": 5,
                 "ejected": True, "ejection_remaining_seconds": 12.0},
                {"node": "host-c", "instance_id": "payments-host-c", "active_requests": 1,
                 "ejected": False, "ejection_remaining_seconds": 0.0}]}}
            poll = dataclasses.replace(poll, state=state)
        hosts.append(dataclasses.replace(poll, at=last.at + 1))
    model = fixed_model()
    model.ingest(dataclasses.replace(last, at=last.at + 1, hosts=tuple(hosts)))
    detail = service_detail(model, "payments", last.at + 1)
    b, c = detail.instances
    assert (b.active, c.active) == (4 + 5, 0 + 1) and not b.active_stale
    assert b.ejected_by == ("host-d",) and b.ejections[0].remaining == pytest.approx(12.0)
    assert c.ejected_by == ("host-a",)
    # a host that stops answering: its last known counts stay, flagged, and its ejection ages
    gone = tuple(dataclasses.replace(p, at=last.at + 11, state=None, metrics=None,
                                     error="timed out") if p.node == "host-d" else
                 dataclasses.replace(p, at=last.at + 11) for p in hosts)
    model.ingest(dataclasses.replace(last, at=last.at + 11, hosts=gone))
    b = service_detail(model, "payments", last.at + 11).instances[0]
    assert b.active == 9 and b.active_stale
    assert b.ejections[0].stale and b.ejections[0].remaining == pytest.approx(2.0)  # 12 - 10


# -- the topology ---------------------------------------------------------------------------------


def test_graph_marks_failing_legs_and_stale_services_by_symbol() -> None:
    nodes, edges = build_graph(fixed_model())
    by_pair = {(e.source, e.destination): e for e in edges}
    legs = {leg.subset: leg for leg in by_pair[("web", "payments")].legs}
    assert legs["v2"].status.value == "fail" and legs["v1"].status.value == "ok"
    assert {n.service: n.status.value for n in nodes}["inventory"] == "stale"
    # host-a ejected v2, which the registry already has critical: not taken out twice
    payments = next(n for n in nodes if n.service == "payments")
    assert (payments.healthy, payments.ejected, payments.total) == (1, 0, 2)
    text = draw_graph(nodes, edges)
    assert text is not None
    plain = text.text.plain
    assert "✘ 0/1" in plain and "? inventory" in plain and "▶" in plain
    assert "v2 2.00/s ✘76.0%" in plain


def test_narrow_terminals_get_the_edge_list() -> None:
    nodes, edges = build_graph(fixed_model())
    wide, narrow = draw(nodes, edges, 200), draw(nodes, edges, 78)
    assert wide.graph and not narrow.graph
    assert "✘ web → payments" in narrow.text.plain
    row = next(i for i, line in enumerate(narrow.text.plain.splitlines())
               if "web → payments" in line)
    assert narrow.service_at(3, row) == "payments"
    assert wide.service_at(wide.hits[0].x0 + 1, wide.hits[0].y0 + 1) == wide.hits[0].service


def test_filter_keeps_matching_services_and_their_edges() -> None:
    nodes, edges = build_graph(fixed_model(), "inv")
    assert {n.service for n in nodes} == {"cart", "inventory"}
    assert [(e.source, e.destination) for e in edges] == [("cart", "inventory")]
    assert draw_list([], []).text.plain.startswith("services")


def test_ejections_counted_by_a_meshd_are_events() -> None:
    obs = observations()
    model = MeshModel()
    model.ingest(obs[0])
    host_a = next(h for h in obs[1].hosts if h.node == "host-a")
    assert host_a.metrics is not None
    ejecting = dataclasses.replace(host_a, metrics=dataclasses.replace(
        host_a.metrics, ejections={("payments", "consecutive_5xx"): 1.0}))
    events = model.ingest(dataclasses.replace(obs[1], hosts=(ejecting,)))
    assert "host-a ejected 1 endpoint(s) of payments (consecutive_5xx)" in [
        e.text for e in events]


def test_an_ejected_endpoint_stands_out_in_graph_and_detail() -> None:
    obs = observations()
    last = obs[-1]
    hosts = []
    for poll in last.hosts:
        if poll.node == "host-a" and poll.state is not None:
            state = dict(poll.state)
            state["destinations"] = {"payments": {"endpoints": [
                {"node": "host-b", "instance_id": "payments-host-b", "address": "10.0.0.12",
                 "port": 15001, "version": "v1", "healthy": True, "ejected": True}]}}
            poll = dataclasses.replace(poll, state=state)
        hosts.append(poll)
    model = fixed_model()
    model.ingest(dataclasses.replace(last, at=last.at + 1, hosts=tuple(hosts)))
    nodes, edges = build_graph(model)
    payments = next(n for n in nodes if n.service == "payments")
    assert payments.ejected == 1 and payments.status.value == "fail"
    assert "⊘1" in draw_graph(nodes, edges).text.plain  # type: ignore[union-attr]
    detail = service_detail(model, "payments", NOW)
    assert detail.instances[0].ejected_by == ("host-a",)


def test_host_poll_without_state_is_unreachable() -> None:
    assert not HostPoll("a:1", "a", T0, error="refused").ok


def test_a_meshd_with_workers_counts_all_its_processes() -> None:
    workers = [{"index": 0, "pid": 11, "cpu_seconds": 3.0, "rss_bytes": 50e6},
               {"index": 1, "pid": 12, "cpu_seconds": 4.0, "rss_bytes": 52e6},
               {"index": 2, "ready": False}]  # not running: nothing to add
    process = {"pid": 10, "cpu_seconds": 1.0, "rss_bytes": 55e6, "workers": workers}
    assert process_total(process, "cpu_seconds") == 8.0
    assert process_total(process, "rss_bytes") == 157e6
    assert process_total({"pid": 10, "cpu_seconds": 1.0}, "cpu_seconds") == 1.0
    assert process_total({}, "rss_bytes") is None
