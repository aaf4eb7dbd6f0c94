"""The endpoints of the embedded registry, assembled: request in, ``Read`` or ``Write`` out (no
I/O). Each group lives in its own module (agent, catalog + health, KV + sessions + txn); status
endpoints are here. Error texts follow docs/consul-api.md §13."""

from __future__ import annotations

from meshd.httpd import Request
from meshd.registry.embedded.api import KV_MAX_VALUE, ApiBase, ApiSettings, route
from meshd.registry.embedded.http import Read, Route, json_response
from meshd.registry.embedded.routes_acl import AclApi
from meshd.registry.embedded.routes_agent import AgentApi
from meshd.registry.embedded.routes_catalog import CatalogApi
from meshd.registry.embedded.routes_kv import KVApi
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.render import leader_address

__all__ = ["KV_MAX_VALUE", "Api", "ApiSettings"]

class Api(ApiBase):
    def __init__(self, state: RegistryState, settings: ApiSettings | str) -> None:
        if isinstance(settings, str):
            settings = ApiSettings(datacenter=settings)
        super().__init__(state, settings)
        self.groups = [AgentApi(state, settings), CatalogApi(state, settings),
                       KVApi(state, settings), AclApi(state, settings)]

    def routes(self) -> list[Route]:
        own = [
            route("/v1/status/leader", GET=self.status_leader),
            route("/v1/status/peers", GET=self.status_peers),
        ]
        return [r for group in self.groups for r in group.routes()] + own

    # --- status ----------------------------------------------------------------------------------

    def status_leader(self, request: Request, tail: str) -> Read:
        return Read(json_response(request, leader_address(self.node)))

    def status_peers(self, request: Request, tail: str) -> Read:
        return Read(json_response(request, [leader_address(self.node)]))
