"""The endpoints of the embedded registry, assembled: request in, ``Read`` or ``Write`` out (no
I/O). Each group lives in its own module (agent, catalog + health, KV + sessions + txn); status
and ACL endpoints are here. Error texts follow docs/consul-api.md §13."""

from __future__ import annotations

from meshd.httpd import Request, Response
from meshd.registry.embedded.api import KV_MAX_VALUE, ApiBase, ApiSettings, route
from meshd.registry.embedded.http import Read, Route, json_response
from meshd.registry.embedded.routes_agent import AgentApi
from meshd.registry.embedded.routes_catalog import CatalogApi
from meshd.registry.embedded.routes_kv import KVApi
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.render import leader_address

__all__ = ["KV_MAX_VALUE", "Api", "ApiSettings"]

ACL_MANAGEMENT_UNSUPPORTED = (
    "ACL management is not supported by the embedded registry: it knows the master token "
    "(--acl-master-token) and the anonymous token only")


class Api(ApiBase):
    def __init__(self, state: RegistryState, settings: ApiSettings | str) -> None:
        if isinstance(settings, str):
            settings = ApiSettings(datacenter=settings)
        super().__init__(state, settings)
        self.groups = [AgentApi(state, settings), CatalogApi(state, settings),
                       KVApi(state, settings)]

    def routes(self) -> list[Route]:
        acl_methods = {m: self.acl_endpoint for m in ("GET", "PUT", "POST", "DELETE")}
        own = [
            route("/v1/status/leader", GET=self.status_leader),
            route("/v1/status/peers", GET=self.status_peers),
            route("/v1/acl/*", **acl_methods),
            route("/v1/agent/token/*", PUT=self.agent_token),
        ]
        return [r for group in self.groups for r in group.routes()] + own

    # --- status ----------------------------------------------------------------------------------

    def status_leader(self, request: Request, tail: str) -> Read:
        return Read(json_response(request, leader_address(self.node)))

    def status_peers(self, request: Request, tail: str) -> Read:
        return Read(json_response(request, [leader_address(self.node)]))

    # --- ACL -------------------------------------------------------------------------------------

    def acl_endpoint(self, request: Request, tail: str) -> Read:
        if not self.acl.enabled:
            return Read(Response.text("ACL support disabled", 401))
        if tail == "token/self" and request.method == "GET":
            return Read(json_response(request, self.acl.token_self(request)))
        self.authz(request).require("acl", "read" if request.method == "GET" else "write")
        return Read(Response.text(ACL_MANAGEMENT_UNSUPPORTED, 400))

    def agent_token(self, request: Request, tail: str) -> Read:
        if not self.acl.enabled:
            return Read(Response.text("ACL support disabled", 401))
        self.authz(request).require("agent", "write", self.node.name)
        return Read(Response(200, b"", []))  # accepted; the registry uses no agent tokens
