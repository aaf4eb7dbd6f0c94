"""Table tests for the pure core: decoding, durations, plans, indexes, timers, replay."""

from __future__ import annotations

import re

import httpx
import pytest
import trio
from registry_testing import start_registry

from meshd.durations import parse_go_duration
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.decode import (
    SERVICE_SCHEMA,
    DecodeError,
    decode_body,
    format_duration,
)
from meshd.registry.embedded.store.records import ApiError, Mutation, op_from_json, op_to_json


@pytest.mark.parametrize(("text", "seconds"), [
    ("10s", 10.0), ("1m30s", 90.0), ("100ms", 0.1), ("1h", 3600.0), ("0", 0.0),
    ("1.5s", 1.5), ("2h45m", 9900.0), ("-1s", -1.0), ("300us", 0.0003), ("", None),
    ("10", None), ("s", None), ("1x", None), ("1s ", None),
])
def test_parse_go_duration(text: str, seconds: float | None) -> None:
    result = parse_go_duration(text)
    if seconds is None:
        assert result is None
    else:
        assert result == pytest.approx(seconds)


@pytest.mark.parametrize(("seconds", "text"), [
    (10.0, "10s"), (90.0, "1m30s"), (0.1, "100ms"), (3600.0, "1h0m0s"), (1.5, "1.5s"),
    (0.0, ""),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_decode_is_case_insensitive_with_aliases_and_strict() -> None:
    got = decode_body(SERVICE_SCHEMA, b'{"NAME": "a", "enable_tag_override": true, '
                                      b'"checks": [{"ttl": 5000000000, "args": ["x"]}]}')
    assert got == {"Name": "a", "EnableTagOverride": True,
                   "Checks": [{"TTL": 5.0, "ScriptArgs": ["x"]}]}
    with pytest.raises(DecodeError) as info:
        decode_body(SERVICE_SCHEMA, b'{"Name": "a", "Check": {"Colour": 1}}')
    assert info.value.text == 'Request decode failed: json: unknown field "Colour"'
    with pytest.raises(DecodeError, match=re.escape(
            "cannot unmarshal string into Go struct field structs.ServiceDefinition.Port of "
            "type int")):
        decode_body(SERVICE_SCHEMA, b'{"Port": "80"}')
    with pytest.raises(DecodeError, match="EOF"):
        decode_body(SERVICE_SCHEMA, b" ")


def _booted(**kw: float) -> RegistryState:
    state = RegistryState(**kw)
    state.apply(state.plan_boot(node_name="n", node_id="id", address="10.0.0.1",
                                datacenter="dc1"), now=0.0)
    return state


def _do(state: RegistryState, mutation: Mutation, now: float = 0.0) -> Mutation:
    state.apply(mutation, now)
    return mutation


def test_identical_reregister_does_not_bump_the_index() -> None:
    state = _booted()
    _do(state, state.plan_register_service({"Name": "web", "Port": 80}))
    index = state.service_index("web")
    again = state.plan_register_service({"Name": "web", "Port": 80})
    assert again.ops == () and again.index == 0
    _do(state, state.plan_register_service({"Name": "web", "Port": 81}))
    assert state.service_index("web") > index


def test_per_service_index_and_vanished_names() -> None:
    state = _booted()
    _do(state, state.plan_register_service({"Name": "a"}))
    _do(state, state.plan_register_service({"Name": "b"}))
    a_index = state.service_index("a")
    assert state.service_index("b") > a_index
    unknown_before = state.service_index("ghost")
    _do(state, state.plan_deregister_service("b"))
    assert state.service_index("a") == a_index
    assert state.service_index("ghost") > unknown_before  # a name disappeared
    assert state.service_index("b") == state.service_index("ghost")


def test_ttl_expiry_and_restart() -> None:
    state = _booted()
    _do(state, state.plan_register_service({"Name": "web", "Check": {"TTL": 10.0}}), now=100.0)
    assert state.next_deadline() == 110.0
    _do(state, state.plan_check_update("service:web", "passing", "ok"), now=105.0)
    assert state.next_deadline() == 115.0
    assert state.plan_ttl_expiry(114.0).ops == ()
    expiry = _do(state, state.plan_ttl_expiry(115.0), now=115.0)
    assert state.checks["service:web"].output == (
        "TTL expired (last output before timeout follows): ok")
    assert state.checks["service:web"].status == "critical" and expiry.ops
    assert state.next_deadline() is None
    with pytest.raises(ApiError) as info:
        state.plan_check_update("serfHealth", "passing", "")
    assert info.value.status == 404


def test_reaper_honours_minimum_and_sweep() -> None:
    state = _booted()
    _do(state, state.plan_register_service(
        {"Name": "web", "Check": {"TTL": 5.0, "DeregisterCriticalServiceAfter": 10.0}}), now=0.0)
    _do(state, state.plan_register_service({"Name": "keep", "Check": {"TTL": 5.0}}), now=0.0)
    assert state.plan_reap(59.0).ops == ()  # raised to the 60 s minimum
    reap = state.plan_reap(60.0)
    assert [(op.table, op.key) for op in reap.ops] == [("check", "service:web"),
                                                       ("service", "web")]
    _do(state, reap, now=60.0)
    assert set(state.services) == {"consul", "keep"}
    # passing resets the critical clock
    _do(state, state.plan_register_service(
        {"Name": "web", "Check": {"TTL": 5.0, "DeregisterCriticalServiceAfter": 1.0}}), now=60.0)
    _do(state, state.plan_check_update("service:web", "passing", ""), now=100.0)
    _do(state, state.plan_check_update("service:web", "critical", ""), now=110.0)
    assert state.plan_reap(169.0).ops == ()
    assert state.plan_reap(170.0).ops


def test_kv_prefix_index_includes_tombstones() -> None:
    state = _booted()
    for key in ("a/1", "a/2", "b/1"):
        _do(state, state.plan_kv_put(key, b"x", flags=0, cas=None))
    a2 = state.kv.index_for_prefix("a/")
    _do(state, state.plan_kv_delete("a/1", recurse=False, cas=None))
    assert state.kv.index_for_prefix("a/") > a2
    deleted_at = state.kv.index_for_prefix("a/")
    _do(state, state.plan_kv_put("b/2", b"x", flags=0, cas=None))
    assert state.kv.index_for_prefix("a/") == deleted_at
    assert state.kv.index_for_prefix("zzz/") == state.kv.table_index


def test_replaying_logged_ops_rebuilds_the_same_state() -> None:
    state = _booted()
    log = []
    for plan in (
        lambda s: s.plan_register_service({"Name": "web", "ID": "w1", "Check": {"TTL": 1.0}}),
        lambda s: s.plan_check_update("service:w1", "passing", "fine"),
        lambda s: s.plan_register_check({"Name": "disk", "TTL": 3.0}),
        lambda s: s.plan_kv_put("k", b"\x00\xff", flags=7, cas=None),
        lambda s: s.plan_kv_delete("k", recurse=False, cas=None),
        lambda s: s.plan_deregister_check("disk"),
        lambda s: s.plan_catalog_register({
            "Node": "n2", "Address": "10.0.0.2", "Service": {"Service": "db", "ID": "db-1"},
            "Check": {"CheckID": "db-up", "Name": "db up", "ServiceID": "db-1"}}),
        lambda s: s.plan_session_create({"TTL": "30s"}, "sess-1"),
        lambda s: s.plan_kv_acquire("lock", b"me", flags=0, session="sess-1", now=0.0),
        lambda s: s.plan_service_maintenance("w1", True, "upgrade"),
        lambda s: s.plan_session_destroy("sess-1"),
        lambda s: s.plan_catalog_deregister({"Node": "n2"}),
    ):
        mutation = plan(state)
        state.apply(mutation, 0.0)
        log.append(mutation)
    replica = RegistryState()
    boot = replica.plan_boot(node_name="n", node_id="id", address="10.0.0.1", datacenter="dc1")
    replica.apply(Mutation(index=boot.index, ops=tuple(op_from_json(op_to_json(o))
                                                       for o in boot.ops)))
    for mutation in log:
        ops = tuple(op_from_json(op_to_json(op)) for op in mutation.ops)
        replica.apply(Mutation(index=mutation.index, ops=ops))
    assert replica.indexes() == state.indexes()
    assert replica.services == state.services and replica.checks == state.checks
    assert replica.sessions == state.sessions and replica.nodes == state.nodes
    assert replica.kv.entries == state.kv.entries
    assert "lock" in state.kv.entries and not state.kv.entries["lock"].session
    assert state.kv.lock_delay["lock"] == 15.0  # memory only: the replica has none
    assert replica.kv.lock_delay == {}


@pytest.mark.embedded_only("shortens the reaper's interval and minimum")
async def test_reaper_runs_in_the_server(nursery: trio.Nursery) -> None:
    reg = await start_registry(nursery, reap_interval=0.1, reap_minimum=0.3)
    client: httpx.AsyncClient = reg.client
    async with client:
        await client.put("/v1/agent/service/register", json={
            "Name": "crashed", "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "1ms"}})
        await client.put("/v1/agent/service/register", json={"Name": "fine"})
        await trio.sleep(0.6)
        assert set((await client.get("/v1/agent/services")).json()) == {"fine"}
