"""routes.toml's edge features (rate_limit, request_headers/response_headers, rewrite,
redirect): parsed into the tree, every defect named with its key path and reason (also by
`meshd validate`, exit 1), and the canonical form round-trips."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from meshd.config.routes import parse_routes, routes_to_data
from meshd.config.schema import HeaderEdits, RateLimit, Redirect, Rewrite
from meshd.errors import ConfigError

EDGE = """
[destinations.payments]
subsets = { v1 = { version = "v1" } }
split = { v1 = 100 }
rate_limit = { requests_per_second = 100, burst = 200 }
response_headers = { set = { x-served-by = "payments" } }

[[destinations.payments.routes]]
name = "api"
match = { path = { prefix = "/api/" } }
rate_limit = { requests_per_second = 0.5, key = "header:X-Api-Key" }
request_headers = { add = { X-Via = "mesh" }, set = { x-env = "prod" }, remove = ["x-debug"] }
response_headers = { remove = ["server"] }
rewrite = { prefix = "/v2/", host = "api.internal:8080" }

[[destinations.payments.routes]]
name = "old"
match = { path = { prefix = "/old/" } }
redirect = { status = 308, scheme = "https", host = "shop.example", port = 8443, prefix = "/new/" }

[[destinations.payments.routes]]
name = "per-caller"
match = { method = "POST" }
rate_limit = { requests_per_second = 10, burst = 5, key = "source" }
"""


def test_edge_features_parse_into_the_tree() -> None:
    dest = parse_routes(tomllib.loads(EDGE)).get("payments")
    assert dest is not None
    assert dest.rate_limit == RateLimit(100.0, 200)
    assert dest.default_route.rate_limit == RateLimit(100.0, 200)
    assert dest.default_route.response_headers == HeaderEdits(set=(("x-served-by", "payments"),))
    api, old, per_caller = dest.routes
    assert api.rate_limit == RateLimit(0.5, 1, "header:x-api-key")  # burst: the rate, rounded up
    assert api.request_headers == HeaderEdits(add=(("x-via", "mesh"),), set=(("x-env", "prod"),),
                                              remove=("x-debug",))
    assert api.response_headers == HeaderEdits(remove=("server",))
    assert api.rewrite == Rewrite("/v2/", "api.internal:8080")
    assert old.redirect == Redirect(308, "https", "shop.example", 8443, None, "/new/")
    assert per_caller.rate_limit == RateLimit(10.0, 5, "source")


def test_canonical_form_round_trips() -> None:
    table = parse_routes(tomllib.loads(EDGE))
    data = routes_to_data(table)
    assert parse_routes(data) == table
    assert parse_routes(json.loads(json.dumps(data))) == table  # as stored in the KV


BASE: dict[str, Any] = tomllib.loads(EDGE)
P = "destinations.payments"
R0 = f"{P}.routes[0]"
R1 = f"{P}.routes[1]"
R2 = f"{P}.routes[2]"


def _set(route: int | None, key: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    dest = data["destinations"]["payments"]
    (dest if route is None else dest["routes"][route])[key] = value
    return data


CASES = [
    (0, "rate_limit", {"burst": 5}, f"{R0}.rate_limit.requests_per_second",
     "required key is missing"),
    (0, "rate_limit", {"requests_per_second": 0}, f"{R0}.rate_limit.requests_per_second",
     "must be greater than zero"),
    (0, "rate_limit", {"requests_per_second": "fast"}, f"{R0}.rate_limit.requests_per_second",
     "expected an integer or a number, got str"),
    (0, "rate_limit", {"requests_per_second": 1, "burst": 0}, f"{R0}.rate_limit.burst",
     "0 out of range (1-1000000000)"),
    (0, "rate_limit", {"requests_per_second": 1, "key": "client"}, f"{R0}.rate_limit.key",
     "expected \"source\" or \"header:NAME\", got 'client'"),
    (0, "rate_limit", {"requests_per_second": 1, "key": "header:"}, f"{R0}.rate_limit.key",
     "expected \"source\" or \"header:NAME\", got 'header:'"),
    (0, "rate_limit", {"requests_per_second": 1, "per": "1m"}, f"{R0}.rate_limit.per",
     "unknown key (expected one of: burst, key, requests_per_second)"),
    (0, "request_headers", {"set": {"connection": "close"}},
     f"{R0}.request_headers.set.connection",
     "'connection' is hop-by-hop or framing: meshd writes it, it cannot be edited"),
    (0, "request_headers", {"remove": ["Transfer-Encoding"]}, f"{R0}.request_headers.remove",
     "'transfer-encoding' is hop-by-hop or framing: meshd writes it, it cannot be edited"),
    (0, "response_headers", {"add": {"content-length": "0"}},
     f"{R0}.response_headers.add.content-length",
     "'content-length' is hop-by-hop or framing: meshd writes it, it cannot be edited"),
    (0, "request_headers", {"remove": ["x-meshd-source"]}, f"{R0}.request_headers.remove",
     "'x-meshd-source' is meshd's own header: it cannot be edited"),
    (0, "response_headers", {"set": {"X-Meshd-Error": "none"}},
     f"{R0}.response_headers.set.X-Meshd-Error",
     "'x-meshd-error' is meshd's own header: it cannot be edited"),
    (0, "request_headers", {"set": {"host": "a"}}, f"{R0}.request_headers.set.host",
     "'host' cannot be edited here: use rewrite = { host = \"...\" }"),
    (0, "request_headers", {"set": {"x-request-id": "1"}},
     f"{R0}.request_headers.set.x-request-id",
     "'x-request-id' is set by meshd on every hop: it cannot be edited"),
    (0, "request_headers", {"set": {"x-a": "1\r\nx-b: 2"}}, f"{R0}.request_headers.set.x-a",
     "invalid value: printable ASCII only (no CR, LF, NUL or other control characters)"),
    (0, "request_headers", {"add": {"x-a": "nul\x00"}}, f"{R0}.request_headers.add.x-a",
     "invalid value: printable ASCII only (no CR, LF, NUL or other control characters)"),
    (0, "request_headers", {"add": {"x a": "1"}}, f"{R0}.request_headers.add.x a",
     "invalid header name 'x a'"),
    (0, "request_headers", {"add": {"x-a": 1}}, f"{R0}.request_headers.add.x-a",
     "expected a string, got int"),
    (0, "request_headers", {"add": {"x-a": "1"}, "remove": ["X-A"]},
     f"{R0}.request_headers.remove", "'x-a' is in both add and remove"),
    (0, "request_headers", {"add": {"x-a": "1", "X-A": "2"}}, f"{R0}.request_headers.add.X-A",
     "'x-a' appears twice"),
    (0, "request_headers", {}, f"{R0}.request_headers",
     "expected add, set or remove (or leave it out)"),
    (0, "rewrite", {"prefix": "v2/"}, f"{R0}.rewrite.prefix",
     "invalid path 'v2/': it starts with '/' and has no blanks or control characters"),
    (0, "rewrite", {"host": "bad host"}, f"{R0}.rewrite.host",
     "invalid host 'bad host' (expected a host name or address, with an optional :port)"),
    (0, "rewrite", {}, f"{R0}.rewrite", "expected prefix or host (or both)"),
    (2, "rewrite", {"prefix": "/v2/"}, f"{R2}.rewrite.prefix",
     "a prefix rewrite needs the route to match a path prefix "
     "(match = { path = { prefix = \"/...\" } })"),
    (1, "redirect", {"status": 200, "scheme": "https"}, f"{R1}.redirect.status",
     "must be one of 301, 302, 303, 307, 308, got 200"),
    (1, "redirect", {"scheme": "ftp"}, f"{R1}.redirect.scheme",
     "must be one of http, https, got 'ftp'"),
    (1, "redirect", {"port": 70000}, f"{R1}.redirect.port", "port 70000 out of range (1-65535)"),
    (1, "redirect", {"host": "shop:8443"}, f"{R1}.redirect.host",
     "invalid host 'shop:8443' (expected a host name or address (the port is port = N))"),
    (1, "redirect", {"status": 302}, f"{R1}.redirect",
     "expected scheme, host, port, path or prefix: a redirect to the same URL would loop"),
    (1, "redirect", {"path": "/a", "prefix": "/b/"}, f"{R1}.redirect",
     "path and prefix both given: path replaces the whole path, prefix only the matched "
     "prefix (choose one)"),
    (2, "redirect", {"prefix": "/b/"}, f"{R2}.redirect.prefix",
     "a prefix redirect needs the route to match a path prefix "
     "(match = { path = { prefix = \"/...\" } })"),
    (None, "rewrite", {"host": "a"}, f"{P}.rewrite",
     "unknown key (expected one of: authorization, external, fault, mirror, policy, "
     "rate_limit, "
     "request_headers, response_headers, retries, routes, split, subsets, timeout)"),
]


@pytest.mark.parametrize(("route", "key", "value", "where", "reason"), CASES)
def test_problem_names_key_path_and_reason(route: int | None, key: str, value: Any,
                                           where: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_routes(_set(route, key, value), "routes.toml")
    assert f"routes.toml: {where}: {reason}" in [str(p) for p in info.value.problems]


def test_a_redirect_excludes_what_only_a_forwarded_request_uses() -> None:
    data = copy.deepcopy(BASE)
    old = data["destinations"]["payments"]["routes"][1]
    old.update(split={"v1": 100}, timeout="1s", retries={"attempts": 1},
               request_headers={"add": {"x-a": "1"}})
    with pytest.raises(ConfigError) as info:
        parse_routes(data, "routes.toml")
    assert [str(p) for p in info.value.problems] == [
        f"routes.toml: {R1}.redirect: cannot be combined with split, timeout, retries, "
        "request_headers: a redirect is answered by meshd, nothing is forwarded (remove one "
        "or the other)"]


def test_validate_command_refuses_bad_values_with_key_paths(tmp_path: Path) -> None:
    bad = tmp_path / "routes.toml"
    bad.write_text(EDGE.replace('burst = 200', 'burst = -1')
                   .replace('remove = ["server"]', 'remove = ["connection"]')
                   .replace('status = 308', 'status = 200')
                   + '\n[[destinations.payments.routes]]\nname = "loop"\n'
                     'redirect = { path = "/x" }\ntimeout = "1s"\n')
    res = subprocess.run([sys.executable, "-m", "meshd", "validate", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert f"{bad}: {P}.rate_limit.burst: -1 out of range (1-1000000000)" in lines
    assert (f"{bad}: {R0}.response_headers.remove: 'connection' is hop-by-hop or framing: "
            "meshd writes it, it cannot be edited") in lines
    assert f"{bad}: {R1}.redirect.status: must be one of 301, 302, 303, 307, 308, got 200" \
        in lines
    assert (f"{bad}: {P}.routes[3].redirect: cannot be combined with timeout: a redirect is "
            "answered by meshd, nothing is forwarded (remove one or the other)") in lines
    good = tmp_path / "good.toml"
    good.write_text(EDGE)
    ok = subprocess.run([sys.executable, "-m", "meshd", "validate", str(good)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
