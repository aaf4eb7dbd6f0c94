"""KV endpoints over real HTTP."""

from __future__ import annotations

import base64

import httpx


async def put(client: httpx.AsyncClient, key: str, value: bytes, **params: str) -> bool:
    r = await client.put(f"/v1/kv/{key}", content=value, params=params)
    assert r.status_code == 200, r.text
    result = r.json()
    assert isinstance(result, bool)
    return result


async def test_put_get_delete(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/kv/cfg/a")
    assert r.status_code == 404 and r.content == b""
    assert int(r.headers["X-Consul-Index"]) >= 1
    assert await put(client, "cfg/a", b"bar", flags="42")
    r = await client.get("/v1/kv/cfg/a")
    [entry] = r.json()
    assert entry == {"LockIndex": 0, "Key": "cfg/a", "Flags": 42, "Value": "YmFy",
                     "CreateIndex": entry["CreateIndex"], "ModifyIndex": entry["ModifyIndex"]}
    assert r.headers["X-Consul-Index"] == str(entry["ModifyIndex"])
    # a PUT without flags resets them; CreateIndex survives
    assert await put(client, "cfg/a", b"baz")
    [again] = (await client.get("/v1/kv/cfg/a")).json()
    assert again["Flags"] == 0 and again["CreateIndex"] == entry["CreateIndex"]
    assert again["ModifyIndex"] > entry["ModifyIndex"]
    assert base64.b64decode(again["Value"]) == b"baz"

    r = await client.get("/v1/kv/cfg/a?raw")
    assert r.content == b"baz" and r.headers["Content-Type"] == "text/plain"
    assert r.headers["X-Content-Type-Options"] == "nosniff"

    assert await put(client, "empty", b"")
    assert (await client.get("/v1/kv/empty")).json()[0]["Value"] is None

    r = await client.delete("/v1/kv/cfg/a")
    assert r.json() is True
    assert (await client.get("/v1/kv/cfg/a")).status_code == 404
    assert (await client.delete("/v1/kv/cfg/a")).json() is True


async def test_cas(client: httpx.AsyncClient) -> None:
    assert await put(client, "lock", b"1", cas="0")
    assert not await put(client, "lock", b"2", cas="0")
    [entry] = (await client.get("/v1/kv/lock")).json()
    index = entry["ModifyIndex"]
    assert not await put(client, "lock", b"3", cas=str(index + 100))
    assert await put(client, "lock", b"4", cas=str(index))
    assert not await put(client, "missing", b"x", cas="5")
    # delete with cas
    [entry] = (await client.get("/v1/kv/lock")).json()
    assert (await client.delete("/v1/kv/lock", params={"cas": "0"})).json() is False
    assert (await client.delete("/v1/kv/lock",
                                params={"cas": str(entry["ModifyIndex"])})).json() is True
    assert (await client.get("/v1/kv/lock")).status_code == 404


async def test_recurse_keys_separator(client: httpx.AsyncClient) -> None:
    for key in ("base/foo", "base/base/foo", "base/base/bar", "base", "other/x"):
        await put(client, key, key.encode())
    entries = (await client.get("/v1/kv/base?recurse")).json()
    assert [e["Key"] for e in entries] == ["base", "base/base/bar", "base/base/foo", "base/foo"]
    assert (await client.get("/v1/kv/base/?keys")).json() == [
        "base/base/bar", "base/base/foo", "base/foo"]
    assert (await client.get("/v1/kv/base/?keys&separator=/")).json() == ["base/base/",
                                                                         "base/foo"]
    assert (await client.get("/v1/kv/?keys&separator=/")).json() == ["base", "base/", "other/"]
    assert (await client.get("/v1/kv/nothing/?keys")).status_code == 404
    assert (await client.get("/v1/kv/nothing/?recurse")).status_code == 404

    r = await client.delete("/v1/kv/base/?recurse")
    assert r.json() is True
    assert (await client.get("/v1/kv/?keys")).json() == ["base", "other/x"]
    await client.delete("/v1/kv/?recurse")
    assert (await client.get("/v1/kv/?keys")).json() == []


async def test_kv_errors(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/kv/big", content=b"x" * (512 * 1024 + 1))
    assert r.status_code == 413
    assert r.text.startswith(f"Request body({512 * 1024 + 1} bytes) too large, max size: "
                             f"{512 * 1024} bytes.")
    assert (await client.put("/v1/kv/ok", content=b"x" * (512 * 1024))).status_code == 200
    r = await client.put("/v1/kv/k?cas=0&acquire=abc")
    assert (r.status_code, r.text) == (400, "Conflicting flags: cas=0&acquire=abc\n")
    r = await client.delete("/v1/kv/k?recurse&cas=1")
    assert r.status_code == 400 and r.text.startswith("Conflicting flags: ")
    r = await client.get("/v1/kv/")
    assert (r.status_code, r.text) == (400, "Missing key name")
    r = await client.put("/v1/kv/k?flags=x")
    assert r.status_code == 500


async def test_binary_values_and_flags(client: httpx.AsyncClient) -> None:
    blob = bytes(range(256)) * 3  # not UTF-8, NULs included
    assert await put(client, "bin/blob", blob, flags="18446744073709551615")
    [entry] = (await client.get("/v1/kv/bin/blob")).json()
    assert base64.b64decode(entry["Value"]) == blob
    assert entry["Flags"] == 2**64 - 1
    assert (await client.get("/v1/kv/bin/blob?raw")).content == blob
    [listed] = (await client.get("/v1/kv/bin/?recurse")).json()
    assert base64.b64decode(listed["Value"]) == blob
