"""What a meshd makes of the stored route table (``judge_stored``), as a table: only a valid
table with destinations, or one an operator cleared on purpose, replaces the table in force."""

from __future__ import annotations

import json

import pytest

from meshd.config.routes import parse_routes, routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.errors import ConfigError
from meshd.registry.config_store import Refused, encode_routes, judge_stored

TABLE = {"destinations": {"payments": {"subsets": {"v1": {"version": "v1"}},
                                       "split": {"v1": 100}}}}


@pytest.mark.parametrize(("raw", "code"), [
    (None, "missing"),
    (b"", "invalid"),
    (b"{not json", "invalid"),
    (b"[]", "invalid"),
    (b"{}", "empty"),
    (b'{"destinations": {}}', "empty"),
    (b'{"default_policy": "allow"}', "empty"),
    (b'{"destinations": {"payments": {"split": {"v9": 100}}}}', "invalid"),
    (b'{"destinations": {}, "clear": "yes"}', "invalid"),
])
def test_what_never_replaces_the_table_in_force(raw: bytes | None, code: str) -> None:
    judged = judge_stored(raw)
    assert isinstance(judged, Refused) and judged.code == code, judged


@pytest.mark.parametrize("data", [
    TABLE,
    {**TABLE, "default_policy": "allow"},
    {"destinations": {}, "clear": True},
    {"destinations": {}, "clear": True, "default_policy": "allow"},
])
def test_what_is_applied(data: dict[str, object]) -> None:
    judged = judge_stored(json.dumps(data).encode())
    assert isinstance(judged, RouteTable)
    assert routes_to_data(judged) == data
    assert judge_stored(encode_routes(judged)) == judged


def test_clear_takes_no_destinations() -> None:
    with pytest.raises(ConfigError) as info:
        parse_routes({**TABLE, "clear": True}, "routes.toml")
    assert [str(p) for p in info.value.problems] == [
        "routes.toml: clear: clear = true empties the table: it takes no destinations"]
    assert parse_routes({"destinations": {}, "clear": True}) == RouteTable(cleared=True)
    assert parse_routes({}).default_policy is DefaultPolicy.DENY
