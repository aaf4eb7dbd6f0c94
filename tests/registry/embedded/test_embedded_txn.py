"""``PUT /v1/txn`` with KV operations: all or nothing, Consul's result and error shapes."""

from __future__ import annotations

import base64
from typing import Any

import httpx


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kv(verb: str, key: str, **fields: Any) -> dict[str, Any]:
    return {"KV": {"Verb": verb, "Key": key, **fields}}


async def txn(client: httpx.AsyncClient, ops: list[dict[str, Any]]) -> httpx.Response:
    return await client.put("/v1/txn", json=ops)


async def test_txn_writes_atomically_and_reports_results(client: httpx.AsyncClient) -> None:
    r = await txn(client, [kv("set", "app/a", Value=b64(b"1"), Flags=3),
                           kv("set", "app/b", Value=b64(b"2")),
                           kv("get", "app/a")])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["Errors"] is None and len(body["Results"]) == 3
    set_a, set_b, get_a = (res["KV"] for res in body["Results"])
    assert set_a["Value"] is None and set_a["Flags"] == 3  # set results carry no value
    assert get_a["Value"] == b64(b"1")  # a later op sees an earlier one
    assert set_a["ModifyIndex"] == set_b["ModifyIndex"] == get_a["ModifyIndex"]  # one index
    [stored] = (await client.get("/v1/kv/app/a")).json()
    assert stored["ModifyIndex"] == set_a["ModifyIndex"]

    index = stored["ModifyIndex"]
    r = await txn(client, [kv("cas", "app/a", Value=b64(b"3"), Index=index),
                           kv("delete", "app/b"),
                           kv("check-not-exists", "app/b")])
    assert r.status_code == 200, r.text
    assert (await client.get("/v1/kv/app/b")).status_code == 404

    tree = await txn(client, [kv("get-tree", "app/")])
    assert [res["KV"]["Key"] for res in tree.json()["Results"]] == ["app/a"]
    assert tree.headers["X-Consul-KnownLeader"] == "true"  # a read-only transaction


async def test_txn_rolls_back_everything_with_409(client: httpx.AsyncClient) -> None:
    await client.put("/v1/kv/app/a", content=b"keep")
    [before] = (await client.get("/v1/kv/app/a")).json()
    r = await txn(client, [kv("set", "app/new", Value=b64(b"x")),
                           kv("cas", "app/a", Value=b64(b"y"), Index=before["ModifyIndex"] + 99),
                           kv("get", "app/missing"),
                           kv("delete-tree", "app/")])
    assert r.status_code == 409
    body = r.json()
    assert body["Results"] is None
    assert [e["OpIndex"] for e in body["Errors"]] == [1, 2]
    assert "index is stale" in body["Errors"][0]["What"]
    assert "doesn't exist" in body["Errors"][1]["What"]
    assert (await client.get("/v1/kv/app/new")).status_code == 404
    [after] = (await client.get("/v1/kv/app/a")).json()
    assert after == before
    r = await txn(client, [kv("check-index", "app/a", Index=1)])
    assert r.status_code == 409 and "current modify index" in r.json()["Errors"][0]["What"]


async def test_txn_locks_and_request_errors(client: httpx.AsyncClient) -> None:
    sid = (await client.put("/v1/session/create", json={"LockDelay": "0s"})).json()["ID"]
    r = await txn(client, [kv("lock", "leader", Value=b64(b"me"), Session=sid),
                           kv("check-session", "leader", Session=sid)])
    assert r.status_code == 200, r.text
    assert r.json()["Results"][0]["KV"]["Session"] == sid
    r = await txn(client, [kv("unlock", "leader", Value=b64(b"bye"), Session="someone-else")])
    assert r.status_code == 409 and "failed to unlock" in r.json()["Errors"][0]["What"]
    r = await txn(client, [kv("unlock", "leader", Value=b64(b"bye"), Session=sid)])
    assert r.status_code == 200

    r = await txn(client, [kv("set", f"k{i}", Value=b64(b"v")) for i in range(65)])
    assert r.status_code == 413 and "too many operations" in r.text
    r = await txn(client, [kv("frobnicate", "k")])
    assert r.status_code == 409 and "unknown KV verb" in r.json()["Errors"][0]["What"]
    r = await client.put("/v1/txn", content=b"{not json")
    assert r.status_code == 400
    r = await txn(client, [kv("set", "k", Value="***not base64***")])
    assert r.status_code == 400
