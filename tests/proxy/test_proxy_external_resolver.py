"""The external resolver's shell: endpoints published from the route table (addresses at once,
names once looked up), names looked up again on schedule, the last addresses kept while a name
fails, and a destination that stops being external dropped. The system resolver is replaced by
a table of names (the one foreign boundary here); time is trio's autojump clock."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from meshd.config.routes import parse_routes
from meshd.proxy.core.router import no_endpoint_reason
from meshd.proxy.core.view import ViewCell
from meshd.proxy.external import ExternalResolver


class Names:
    """Answers lookups from ``table``; a name missing from it fails like an unknown host."""

    def __init__(self, table: dict[str, tuple[str, ...]]) -> None:
        self.table = table
        self.asked: list[tuple[str, float]] = []

    async def resolve(self, host: str, port: int) -> tuple[str, ...]:
        self.asked.append((host, trio.current_time()))
        await trio.lowlevel.checkpoint()
        if host not in self.table:
            raise OSError(-2, "Name or service not known")
        return self.table[host]


def routes(**external: Any) -> Any:
    return parse_routes({"destinations": {"bank": {"external": external}}})


def addresses(view: ViewCell) -> list[str]:
    found = view.current.endpoint_set("bank")
    return [e.address for e in found.endpoints] if found is not None else []


async def test_names_are_resolved_refreshed_and_kept_through_failures(
        autojump_clock: trio.testing.MockClock) -> None:
    names = Names({"api.bank.example": ("192.0.2.1",)})
    view = ViewCell()
    view.set_routes(routes(hosts=["api.bank.example"], port=443))
    resolver = ExternalResolver(view, resolve=names.resolve, refresh=30.0, retry=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run)
        await trio.sleep(1)
        assert addresses(view) == ["192.0.2.1"]
        names.table["api.bank.example"] = ("192.0.2.1", "192.0.2.2")
        await trio.sleep(30)
        assert addresses(view) == ["192.0.2.1", "192.0.2.2"]  # looked up again after 30 s
        del names.table["api.bank.example"]
        await trio.sleep(30)
        assert addresses(view) == ["192.0.2.1", "192.0.2.2"]  # kept while it fails
        status = resolver.status()["bank"]["lookups"]["api.bank.example"]  # type: ignore[index]
        assert status["error"] == "Name or service not known"
        failed_at = names.asked[-1][1]
        await trio.sleep(5.5)
        assert names.asked[-1][1] - failed_at == 5.0  # retried sooner after a failure
        # a table without it: the destination is no longer external
        view.set_routes(parse_routes({"destinations": {"payments": {}}}))
        assert view.current.endpoint_set("bank") is None
        nursery.cancel_scope.cancel()


async def test_addresses_are_published_with_the_table_and_a_name_not_yet_resolved_says_so(
        autojump_clock: trio.testing.MockClock) -> None:
    names = Names({})
    view = ViewCell()
    resolver = ExternalResolver(view, resolve=names.resolve)
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run)
        view.set_routes(routes(addresses=["10.0.0.5:9443"], sni="bank.example"))
        assert addresses(view) == ["10.0.0.5"]  # at once, no lookup
        assert names.asked == []
        view.set_routes(routes(hosts=["bank.invalid"], port=443))
        await trio.sleep(1)
        assert addresses(view) == []
        assert no_endpoint_reason(view.current, "bank", None) == \
            "external bank: bank.invalid not resolved (yet)"
        nursery.cancel_scope.cancel()
