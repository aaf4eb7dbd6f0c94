"""ACLs of the embedded registry: the master-token model (docs/consul-api.md §1.5). No I/O.

With ``--acl-master-token T`` the registry behaves like Consul with ``default_policy = "deny"``
and exactly two tokens: the master token (``T``, a management token: everything allowed) and the
anonymous token (no token, or the secret ``anonymous``: nothing allowed). Any other secret is
unknown: 403 ``ACL not found`` on every endpoint that resolves a token. Writes and single-object
reads without permission answer Consul's 403 ``Permission denied: ...``; list endpoints drop what
may not be read and answer 200. Policies, roles and further tokens are not modelled: the ACL
management endpoints answer that plainly rather than pretend.

Without a master token ACLs are off: every request is allowed, supplied tokens are ignored, and the
ACL endpoints answer 401 ``ACL support disabled``.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass
from typing import Any

from meshd.httpd import Request
from meshd.registry.embedded.store.records import ApiError

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
ANONYMOUS_SECRET = "anonymous"
MANAGEMENT_POLICY = {"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"}


def request_token(request: Request) -> str:
    """``?token=``, then ``X-Consul-Token``, then ``Authorization: Bearer``."""
    token = request.param("token")
    if token:
        return token
    token = request.header("x-consul-token")
    if token:
        return token
    auth = request.header("authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return ""


def master_accessor(master: str) -> str:
    """A stable AccessorID for the master token that does not reveal its secret."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "meshd-registry-master:" + master))


@dataclass(frozen=True)
class Authorizer:
    enabled: bool
    allow_all: bool
    accessor: str = ""

    def allowed(self) -> bool:
        return not self.enabled or self.allow_all

    def require(self, resource: str, level: str, name: str | None = None) -> None:
        """Raise Consul's 403 unless this token may ``level`` the ``resource`` ``name``."""
        if self.allowed():
            return
        if self.accessor == ANONYMOUS_ACCESSOR:
            text = "Permission denied: anonymous token"
        else:
            text = f"Permission denied: token with AccessorID '{self.accessor}'"
        text += f" lacks permission '{resource}:{level}'"
        if name:
            text += f' on "{name}"'
        if self.accessor == ANONYMOUS_ACCESSOR:
            text += (". The anonymous token is used implicitly when a request does not specify "
                     "a token.")
        raise ApiError(403, text)


ACLS_OFF = Authorizer(enabled=False, allow_all=True)


class AclPolicy:
    """Token resolution for one registry (``master`` None: ACLs off)."""

    def __init__(self, master: str | None) -> None:
        self.master = master or None

    @property
    def enabled(self) -> bool:
        return self.master is not None

    @property
    def default_policy(self) -> str:
        return "deny" if self.enabled else "allow"

    def authorize(self, request: Request) -> Authorizer:
        if self.master is None:
            return ACLS_OFF
        token = request_token(request)
        if not token or token == ANONYMOUS_SECRET:
            return Authorizer(enabled=True, allow_all=False, accessor=ANONYMOUS_ACCESSOR)
        if hmac.compare_digest(token.encode(), self.master.encode()):
            return Authorizer(enabled=True, allow_all=True, accessor=master_accessor(token))
        raise ApiError(403, "ACL not found")

    def token_self(self, request: Request) -> dict[str, Any]:
        """``GET /v1/acl/token/self``."""
        authz = self.authorize(request)
        if authz.allow_all:
            return {"AccessorID": authz.accessor, "SecretID": self.master,
                    "Description": "Master Token (meshd registry --acl-master-token)",
                    "Policies": [MANAGEMENT_POLICY], "Local": False,
                    "CreateTime": "1970-01-01T00:00:00Z", "Hash": "", "CreateIndex": 1,
                    "ModifyIndex": 1}
        return {"AccessorID": ANONYMOUS_ACCESSOR, "SecretID": ANONYMOUS_SECRET,
                "Description": "Anonymous Token", "Local": False,
                "CreateTime": "1970-01-01T00:00:00Z", "Hash": "", "CreateIndex": 1,
                "ModifyIndex": 1}
