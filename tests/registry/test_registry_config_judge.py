"""What a meshd makes of the stored route table (``judge_stored``), as a table: only a valid
table with destinations, or one an operator cleared on purpose, signed by an operator of the mesh
CA and newer than the one in force, replaces the table in force."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from operator_testing import bundle_from, issue_operator, signed_routes

from meshd.ca.store import init_ca
from meshd.config.routes import parse_routes, routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.errors import ConfigError
from meshd.registry.config_store import Accepted, Refused, Trust, judge_stored
from meshd.registry.operator_key import OperatorKey

TABLE = {"destinations": {"payments": {"subsets": {"v1": {"version": "v1"}},
                                       "split": {"v1": 100}}}}
TD = "judge.test"


@pytest.fixture(scope="module")
def operators(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trust, OperatorKey, OperatorKey]:
    """The mesh's trust, an operator of its CA, and one of another CA."""
    tmp = tmp_path_factory.mktemp("judge")
    now = datetime.now(UTC)
    init_ca(tmp / "ca", TD, now=now - timedelta(hours=1))
    init_ca(tmp / "other", TD, now=now - timedelta(hours=1))
    ours = issue_operator(tmp / "ca", tmp / "ours")
    theirs = issue_operator(tmp / "other", tmp / "theirs")
    trust = Trust(bundle_from(tmp / "ours" / "ca.crt", TD), frozenset(), now)
    return trust, ours, theirs


def judge(raw: bytes | None, trust: Trust, **changes: object) -> Accepted | Refused:
    return judge_stored(raw, Trust(**{**trust.__dict__, "now": datetime.now(UTC), **changes}))


@pytest.mark.parametrize(("raw", "code"), [
    (None, "missing"),
    (b"", "invalid"),
    (b"{not json", "invalid"),
    (b"[]", "invalid"),
    (b"{}", "unsigned"),
    (json.dumps(TABLE).encode(), "unsigned"),
])
def test_what_is_not_even_a_signed_document(
        raw: bytes | None, code: str, operators: tuple[Trust, OperatorKey, OperatorKey]) -> None:
    judged = judge(raw, operators[0])
    assert isinstance(judged, Refused) and judged.code == code, judged


@pytest.mark.parametrize(("data", "code"), [
    ({}, "empty"),
    ({"destinations": {}}, "empty"),
    ({"default_policy": "allow"}, "empty"),
    ({"destinations": {"payments": {"split": {"v9": 100}}}}, "invalid"),
    ({"destinations": {}, "clear": "yes"}, "invalid"),
    ([], "invalid"),
])
def test_what_never_replaces_the_table_in_force_even_signed(
        data: object, code: str, operators: tuple[Trust, OperatorKey, OperatorKey]) -> None:
    trust, ours, _ = operators
    judged = judge(signed_routes(data, ours), trust)
    assert isinstance(judged, Refused) and judged.code == code, judged


def test_signatures_that_never_replace_the_table_in_force(
        operators: tuple[Trust, OperatorKey, OperatorKey], tmp_path: Path) -> None:
    trust, ours, theirs = operators
    foreign = judge(signed_routes(TABLE, theirs), trust)
    assert isinstance(foreign, Refused) and foreign.code == "unknown_signer", foreign
    accepted = judge(signed_routes(TABLE, ours), trust)
    assert isinstance(accepted, Accepted) and accepted.signed.signer == "ops"
    older = signed_routes(TABLE, ours, version=accepted.signed.version - 1)
    judged = judge(older, trust, in_force=accepted.signed)
    assert isinstance(judged, Refused) and judged.code == "replay", judged
    assert "the route table in force stays" in judged.reason
    again = judge(accepted.raw, trust, in_force=accepted.signed)  # the same value read again
    assert isinstance(again, Accepted)
    revoked = judge(signed_routes(TABLE, ours), trust, denied=frozenset({accepted.signed.serial}))
    assert isinstance(revoked, Refused) and revoked.code == "revoked", revoked


@pytest.mark.parametrize("data", [
    TABLE,
    {**TABLE, "default_policy": "allow"},
    {"destinations": {}, "clear": True},
    {"destinations": {}, "clear": True, "default_policy": "allow"},
])
def test_what_is_applied(data: dict[str, object],
                         operators: tuple[Trust, OperatorKey, OperatorKey]) -> None:
    trust, ours, _ = operators
    judged = judge(signed_routes(data, ours), trust)
    assert isinstance(judged, Accepted)
    assert routes_to_data(judged.table) == data
    assert judge(judged.raw, trust) == judged


def test_clear_takes_no_destinations() -> None:
    with pytest.raises(ConfigError) as info:
        parse_routes({**TABLE, "clear": True}, "routes.toml")
    assert [str(p) for p in info.value.problems] == [
        "routes.toml: clear: clear = true empties the table: it takes no destinations"]
    assert parse_routes({"destinations": {}, "clear": True}) == RouteTable(cleared=True)
    assert parse_routes({}).default_policy is DefaultPolicy.DENY
