"""The configuration tree: frozen dataclasses, nothing else.

``meshd.toml`` (one per host) becomes a ``HostConfig``; ``routes.toml`` (mesh-wide, stored in the
registry's KV) becomes a ``RouteTable``. Parsing and validation live in ``meshd.config.parse``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path

from meshd.config.gateway import Gateway
from meshd.patterns import Pattern, compile_pattern


class Protocol(StrEnum):
    """What a service's app speaks, and what an upstream's callers send: ``http`` (HTTP/1.1
    to the app), ``http2`` and ``grpc`` (h2c to the app), ``tcp`` (opaque bytes). The outbound
    listener of any HTTP kind takes HTTP/1.1 and h2c (prior knowledge) on the same port."""

    HTTP = "http"
    HTTP2 = "http2"
    GRPC = "grpc"
    TCP = "tcp"

    @property
    def is_http(self) -> bool:
        return self is not Protocol.TCP

    @property
    def app_h2(self) -> bool:
        """Whether meshd speaks h2c (prior knowledge) to an app declared so."""
        return self is Protocol.HTTP2 or self is Protocol.GRPC


@dataclass(frozen=True)
class HealthCheck:
    """How meshd checks its local app. ``kind`` is ``http`` (GET ``path``, 2xx passes; over
    h2c for an app declared ``http2``/``grpc``), ``grpc`` (the gRPC health protocol's
    ``Check`` for the service named in ``path``, "" for the whole server: SERVING passes),
    ``tcp`` (a connect passes) or ``none`` (always passing: for apps with nothing to check)."""

    kind: str = "tcp"
    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0


@dataclass(frozen=True)
class Upstream:
    """A destination this service calls, reached at ``outbound_address:local_port``.

    ``protocol`` is how the outbound listener treats it: ``http`` (parsed, routed per request)
    or ``tcp`` (an opaque byte stream, one endpoint chosen per connection)."""

    name: str
    local_port: int
    protocol: Protocol = Protocol.HTTP


class AccessLogFormat(StrEnum):
    """How access log lines are written (``[access_log] format``, ``MESHD_ACCESS_LOG``): ``text``
    (a readable line), ``json`` (one JSON object per line), ``envoy`` (Envoy's default access
    log format), ``off``."""

    TEXT = "text"
    JSON = "json"
    ENVOY = "envoy"
    OFF = "off"


class MTLSMode(StrEnum):
    """What the inbound listener accepts for a service: ``strict``, mutual TLS only (the
    default); ``permissive``, plaintext too (for migrating a service into the mesh)."""

    STRICT = "strict"
    PERMISSIVE = "permissive"


@dataclass(frozen=True)
class LocalService:
    name: str
    port: int
    protocol: Protocol = Protocol.HTTP
    version: str = "v1"
    address: str = "127.0.0.1"
    health: HealthCheck = field(default_factory=HealthCheck)
    upstreams: tuple[Upstream, ...] = ()
    mtls: MTLSMode = MTLSMode.STRICT

    @property
    def instance_id(self) -> str:
        return f"{self.name}-{self.version}"


@dataclass(frozen=True)
class ListenerLimits:
    """Connection caps of one listener, applied at accept, before any TLS or parsing: at most
    ``max_connections`` open at once, and at most ``max_per_source`` of them from one source
    address (None: no cap per source). A connection over a cap is closed at once."""

    max_connections: int
    max_per_source: int | None = None


# Defaults. Inbound: a peer meshd (or an Envoy, whose per-cluster circuit breaker allows 1024
# connections by default) never needs more than 1024 from one address. Outbound: one listener
# per local app and upstream, all from loopback, so the listener itself is the per-app cap.
# Admin: a few scrapers, the TUI and `meshd status`. Pre-handshake: 10 s from accept to the end
# of the TLS handshake.
DEFAULT_INBOUND_LIMITS = ListenerLimits(10_000, 1024)
DEFAULT_OUTBOUND_LIMITS = ListenerLimits(4096)
DEFAULT_ADMIN_LIMITS = ListenerLimits(256, 64)
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class CASettings:
    url: str
    fingerprint: str
    token_file: Path


# how long a stopping meshd lets requests in flight finish before it cuts them (``drain_timeout``)
DEFAULT_DRAIN_TIMEOUT = 10.0

# OTEL_TRACES_SAMPLER's values (the OpenTelemetry names), also [tracing] sampler's
TRACE_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
                  "parentbased_always_off", "parentbased_traceidratio")


@dataclass(frozen=True)
class TracingConfig:
    """``[tracing]``: spans of each proxied request, exported over OTLP/HTTP. The standard
    ``OTEL_*`` variables override the keys they stand for (``meshd.tracing.settings``)."""

    enabled: bool | None = None  # None: on once an endpoint is given (here or in the environment)
    endpoint: str = ""  # the traces URL as is (``http://collector:4318/v1/traces``)
    sampler: str = ""  # one of TRACE_SAMPLERS; "": parentbased_always_on
    ratio: float | None = None  # the *traceidratio samplers' argument (default 1.0)
    service_name: str = ""  # "": each span is named after its local service


@dataclass(frozen=True)
class HostConfig:
    node: str
    address: str
    trust_domain: str
    registry_url: str
    ca: CASettings
    inbound_port: int
    admin_host: str = "127.0.0.1"
    admin_port: int = 15000
    # names (besides IP addresses and localhost) the admin API accepts in Host: DNS rebinding
    admin_allowed_hosts: tuple[str, ...] = ()
    admin_tls: bool = False  # HTTPS with the node certificate; clients need an operator's
    outbound_address: str = "127.0.0.1"
    # why an outbound address beyond loopback is safe (required for one; logged at start)
    outbound_beyond_loopback: str = ""
    state_dir: Path = Path("/var/lib/meshd")
    services: tuple[LocalService, ...] = ()
    source: str = ""
    registry_token: str = ""  # ACL token for the registry; "" = $CONSUL_HTTP_TOKEN, if set
    # where registry_token was read from (``load_host_config`` reads it); None: not a file
    registry_token_file: Path | None = None
    # a stop (SIGTERM, or the end of a handover to a new process) lets requests and transfers in
    # flight run this long, then cuts them
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    # connection caps per listener (the outbound one applies to each outbound listener), and
    # how long a connection may take from accept to the end of its TLS handshake (inbound)
    inbound_limits: ListenerLimits = DEFAULT_INBOUND_LIMITS
    outbound_limits: ListenerLimits = DEFAULT_OUTBOUND_LIMITS
    admin_limits: ListenerLimits = DEFAULT_ADMIN_LIMITS
    inbound_handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    # the host's labels (``labels = { zone = "eu-1" }``), registered with its services: what
    # a destination's ``locality`` priority compares between caller and endpoint
    labels: tuple[tuple[str, str], ...] = ()
    gateways: tuple[Gateway, ...] = ()  # ingress gateways this meshd runs
    # ``[access_log] format``; ``MESHD_ACCESS_LOG``, when set, wins over it
    access_log: AccessLogFormat = AccessLogFormat.TEXT
    # data-plane processes: None is ``workers = "auto"`` (the usable cores, capped:
    # ``meshd.workers.plan.worker_count``); ``MESHD_WORKERS``, when set, wins over it
    workers: int | None = None
    tracing: TracingConfig = TracingConfig()
    # the egress proxy listener's port on ``outbound_address`` (None: no egress listener)
    egress_port: int | None = None

    def service(self, name: str) -> LocalService | None:
        return next((s for s in self.services if s.name == name), None)

    @property
    def destinations(self) -> tuple[str, ...]:
        """Every service this host calls: its upstreams and its gateways' routes."""
        names = {u.name for _, u in self.upstreams}
        names.update(r.service for g in self.gateways for r in g.routes)
        return tuple(sorted(names))

    @property
    def identities(self) -> tuple[str, ...]:
        """The service identities this host holds certificates for: its local services' and
        its gateways'."""
        return (*(s.name for s in self.services), *(g.name for g in self.gateways))

    @property
    def upstreams(self) -> tuple[tuple[LocalService, Upstream], ...]:
        return tuple((s, u) for s in self.services for u in s.upstreams)


@dataclass(frozen=True)
class Subset:
    """A named slice of a service's instances, selected by the instance's version.
    ``failover``: the subsets (in order) that take its requests while it has no healthy,
    admitted endpoint, and that a retry moves on to once every endpoint of it was tried. Not
    transitive: only the chosen subset's own list is followed."""

    name: str
    version: str
    failover: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplitLeg:
    subset: str
    weight: int


# -- request matching ---------------------------------------------------------------------------

class MatchKind(StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"  # the whole value must match (RE2, ``meshd.patterns``)
    PRESENT = "present"
    ABSENT = "absent"


@dataclass(frozen=True)
class StringMatch:
    """One test on a string: ``exact``/``prefix``/``regex`` on its value, or only whether it is
    ``present``/``absent``. A regex is compiled once, when the value is built (at parse time),
    by RE2: it matches in time linear in the value."""

    kind: MatchKind
    value: str = ""
    pattern: Pattern | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind is MatchKind.REGEX and self.pattern is None:
            object.__setattr__(self, "pattern", compile_pattern(self.value))


@dataclass(frozen=True)
class FieldMatch:
    """A test on a named header (lower-case name) or query parameter."""

    name: str
    match: StringMatch


@dataclass(frozen=True)
class RouteMatch:
    """All conditions must hold; no conditions at all matches every request. ``methods`` is a
    set of alternatives (any of them)."""

    path: StringMatch | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[FieldMatch, ...] = ()
    query: tuple[FieldMatch, ...] = ()

    @property
    def empty(self) -> bool:
        return self.path is None and not self.methods and not self.headers and not self.query


# -- what a route does ---------------------------------------------------------------------------

RETRY_CONDITIONS = ("connect-failure", "reset", "timeout", "5xx", "gateway-error")
# gRPC status codes a call may be retried on, by their kebab-case names (``grpc-status`` in the
# response's trailers; ``meshd.proxy.core.grpc`` maps them to the codes)
GRPC_RETRY_CONDITIONS = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted",
                         "unavailable")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` retries at most after the first try (Istio's meaning); ``retry_on`` holds
    condition names (``RETRY_CONDITIONS``), status codes as strings (``"503"``) and gRPC
    status names (``GRPC_RETRY_CONDITIONS``, for gRPC calls)."""

    attempts: int
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ("connect-failure", "gateway-error", "reset")


@dataclass(frozen=True)
class FaultPolicy:
    """Delay ``delay_percent`` % of requests by ``delay``, and answer ``abort_percent`` % of
    them with ``abort_status`` without calling the destination."""

    delay: float | None = None
    delay_percent: float = 0.0
    abort_status: int | None = None
    abort_percent: float = 0.0


@dataclass(frozen=True)
class MirrorPolicy:
    """Copy ``percent`` % of requests to ``subset``; the copies' responses are discarded."""

    subset: str
    percent: float = 100.0


# -- what a route does at the edge: rate limit, header edits, rewrite, redirect -----------------

RATE_LIMIT_SOURCE = "source"  # ``key = "source"``: a bucket per calling service
RATE_LIMIT_HEADER = "header:"  # ``key = "header:x-api-key"``: a bucket per value of that header


@dataclass(frozen=True)
class RateLimit:
    """A local token bucket per route per meshd: ``requests_per_second`` tokens come back per
    second, at most ``burst`` are held (a new bucket starts full); a request takes one, or is
    answered 429. ``key``: ``""`` one bucket for the route, ``"source"`` one per calling
    service, ``"header:NAME"`` one per value of header NAME (lower case; requests without it
    share one bucket)."""

    requests_per_second: float
    burst: int
    key: str = ""

    @property
    def header(self) -> str | None:
        """The header whose value keys the buckets, if any."""
        if self.key.startswith(RATE_LIMIT_HEADER):
            return self.key[len(RATE_LIMIT_HEADER):]
        return None


@dataclass(frozen=True)
class HeaderEdits:
    """Header edits on a request or a response, applied in this order: ``remove`` drops every
    header of those names, ``set`` replaces every header of its name with its value, ``add``
    appends one more. Names are lower case."""

    add: tuple[tuple[str, str], ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rewrite:
    """What a route changes before forwarding: ``prefix`` replaces the part of the path its
    ``match.path.prefix`` matched; ``host`` replaces ``Host``."""

    prefix: str | None = None
    host: str | None = None


REDIRECT_STATUSES = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class Redirect:
    """An answer meshd gives itself, with a ``location`` built from the request's URL with the
    given parts replaced: ``scheme``, ``host``, ``port``, the whole ``path`` or (a prefix
    route) the matched ``prefix``. The query string is kept."""

    status: int = 301
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    prefix: str | None = None


@dataclass(frozen=True)
class Route:
    """One HTTP route of a destination. ``split``, ``timeout`` and ``retries`` left out of a
    route come from the destination level (the default route); ``fault``, ``mirror`` and the
    edge features (``rate_limit``, ``request_headers``, ``response_headers``, ``rewrite``,
    ``redirect``) never do. ``name`` is what logs and ``meshd explain`` call it."""

    name: str
    match: RouteMatch = field(default_factory=RouteMatch)
    split: tuple[SplitLeg, ...] | None = None
    timeout: float | None = None
    retries: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    mirror: MirrorPolicy | None = None
    rate_limit: RateLimit | None = None
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None
    rewrite: Rewrite | None = None
    redirect: Redirect | None = None


# -- destination policy ---------------------------------------------------------------------------

DEFAULT_MAX_PENDING = 1024


class LoadBalancer(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"  # power of two choices on requests in flight
    RANDOM = "random"
    RING_HASH = "ring_hash"


@dataclass(frozen=True)
class HashOn:
    """What ring_hash hashes: a request header's value, or the client's address (``source``)."""

    header: str | None = None
    source: bool = False


@dataclass(frozen=True)
class OutlierDetection:
    """Eject an endpoint after ``consecutive_5xx`` failed answers (5xx, reset, per-try timeout)
    or ``consecutive_connect_failures`` failed connects in a row, for ``base_ejection_time``
    times the number of its ejections (at most ``max_ejection_time``); an endpoint back for a
    whole ``interval`` has that number lowered by one. Never more than
    ``max_ejection_percent`` % of the destination's healthy endpoints at once (rounded down:
    the default 50 lets one of two go, none of one)."""

    consecutive_5xx: int = 5
    consecutive_connect_failures: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class RetryBudget:
    """Retries allowed over a 10 s window: ``ratio`` per request plus
    ``min_retries_per_second``, so retries cannot multiply the load of an outage."""

    ratio: float = 0.2
    min_retries_per_second: float = 10.0


@dataclass(frozen=True)
class DestinationPolicy:
    """How a destination's endpoints are used. ``max_connections`` bounds the connections in
    use at once (one request each on HTTP/1.1); ``max_pending_requests`` how many requests may
    wait for one (``DEFAULT_MAX_PENDING`` when only ``max_connections`` is set); beyond both a
    request is answered 503 at once. ``max_connections = None``: no limit.
    ``idle_timeout`` is Istio's ``connectionPool.http.idleTimeout`` / ``tcp.idleTimeout``."""

    load_balancer: LoadBalancer = LoadBalancer.ROUND_ROBIN
    hash_on: HashOn | None = None
    connect_timeout: float | None = None
    max_connections: int | None = None
    max_pending_requests: int | None = None
    outlier_detection: OutlierDetection | None = None
    retry_budget: RetryBudget | None = None  # None: the defaults of ``RetryBudget``
    max_request_bytes: int | None = None  # a longer request body is answered 413; None: no limit
    # HTTP: how long a pooled connection to an endpoint may sit unused (None: the pool's 30 s);
    # TCP: how long a proxied connection may carry no byte either way (None: 1 h, as Envoy).
    idle_timeout: float | None = None
    # Locality priority: host label names, most significant first (``("region", "zone")``).
    # Endpoints whose host shares the caller's values on more leading labels are used first;
    # the others only while none of those is healthy and admitted. Empty: no preference.
    locality: tuple[str, ...] = ()


# -- inbound authorization -----------------------------------------------------------------------

class AuthzAction(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


ANY_SOURCE = "*"  # in ``sources``: any authenticated mesh service


@dataclass(frozen=True)
class AuthorizationRule:
    """One rule; it applies to a request when every condition given holds. ``sources`` are
    calling service names (``ANY_SOURCE``: any authenticated one; empty: any caller at all,
    plaintext ones on a permissive service included); ``paths`` are exact paths or prefixes
    written with a trailing ``*``; ``methods`` upper case. Empty lists: no condition."""

    name: str
    action: AuthzAction
    sources: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class Authorization:
    """Who may call a destination, checked by the destination's inbound side. The first rule
    that applies decides; when none does, the request is denied (default deny). A destination
    without rules follows the table's ``default_policy`` (``RouteTable.authorization_for``)."""

    rules: tuple[AuthorizationRule, ...] = ()


# -- external services (outside the mesh) --------------------------------------------------------

class ExternalTLS(StrEnum):
    """How meshd speaks to an external service: ``originate`` (TLS from meshd, the server's
    certificate verified) or ``none`` (plain TCP)."""

    ORIGINATE = "originate"
    NONE = "none"


@dataclass(frozen=True)
class ExternalService:
    """A destination outside the mesh (``meshd.config.external``): DNS ``hosts`` with
    ``port``, or ``addresses`` as given; TLS origination verified against ``ca_file`` (else
    the system roots) for the name ``sni`` (else the host's)."""

    hosts: tuple[str, ...] = ()
    addresses: tuple[tuple[str, int], ...] = ()
    port: int | None = None
    tls: ExternalTLS = ExternalTLS.ORIGINATE
    sni: str | None = None
    ca_file: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The host names it answers to (what an egress proxy request names)."""
        return self.hosts or ((self.sni,) if self.sni is not None else ())

    @property
    def ports(self) -> tuple[int, ...]:
        if self.port is not None:
            return (self.port,)
        return tuple(sorted({port for _, port in self.addresses}))

    @property
    def authority(self) -> str:
        """The ``Host`` its requests carry: its first name (the port when not the scheme's)."""
        name = self.names[0] if self.names else self.addresses[0][0]
        ports = self.ports
        default = 443 if self.tls is ExternalTLS.ORIGINATE else 80
        if len(ports) == 1 and ports[0] != default:
            return f"{name}:{ports[0]}"
        return name


class EgressMode(StrEnum):
    """What a host's egress proxy listener does with a destination no ``external`` declares:
    ``registered-only`` refuses it (the default: fail closed), ``allow-any`` passes it."""

    REGISTERED_ONLY = "registered-only"
    ALLOW_ANY = "allow-any"


DEFAULT_ROUTE = "default"


@dataclass(frozen=True)
class DestinationRoutes:
    """Routing for one destination service: ordered ``routes`` (first match wins), then the
    default route made of the destination-level ``split``, ``timeout``, ``retries``, ``fault``,
    ``mirror``, ``rate_limit``, ``request_headers`` and ``response_headers``; the
    destination's ``policy``; and its ``authorization`` (who may call it, checked by its
    inbound side).

    An empty ``split`` means "every healthy instance, no subset preference"."""

    service: str
    subsets: tuple[Subset, ...] = ()
    split: tuple[SplitLeg, ...] = ()
    timeout: float | None = None
    routes: tuple[Route, ...] = ()
    retries: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    mirror: MirrorPolicy | None = None
    policy: DestinationPolicy = field(default_factory=DestinationPolicy)
    authorization: Authorization | None = None
    # the default route's own edge features (never inherited by the routes)
    rate_limit: RateLimit | None = None
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None
    external: ExternalService | None = None  # outside the mesh: reached directly

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)

    @cached_property
    def default_route(self) -> Route:
        return Route(DEFAULT_ROUTE, RouteMatch(), self.split, self.timeout, self.retries,
                     self.fault, self.mirror, rate_limit=self.rate_limit,
                     request_headers=self.request_headers,
                     response_headers=self.response_headers)


class DefaultPolicy(StrEnum):
    """What the mesh does with a call to a service that has no authorization rules: ``deny``
    (the default, as Consul's intentions under ACL default deny) or ``allow``."""

    DENY = "deny"
    ALLOW = "allow"


NO_RULES = Authorization()  # no rule applies to anyone: every call is denied (default deny)


@dataclass(frozen=True)
class RouteTable:
    destinations: tuple[DestinationRoutes, ...] = ()
    default_policy: DefaultPolicy = DefaultPolicy.DENY
    # an operator emptied the table on purpose (`meshd routes clear`): without it, every meshd
    # refuses a table with no destinations and keeps the one in force
    cleared: bool = False
    egress: EgressMode = EgressMode.REGISTERED_ONLY

    def get(self, service: str) -> DestinationRoutes | None:
        return self._by_service.get(service)

    @cached_property
    def _by_service(self) -> dict[str, DestinationRoutes]:
        """Each destination by name (the first, as a search would find it), made on the first
        lookup: a request looks its destination up two or three times, in O(1) however many
        destinations the table has."""
        index: dict[str, DestinationRoutes] = {}
        for dest in self.destinations:
            index.setdefault(dest.service, dest)
        return index

    def authorization_for(self, service: str) -> Authorization | None:
        """The rules ``service``'s inbound side applies: its own, else none at all under
        ``default_policy = "deny"`` (every call denied), else ``None`` (every caller let in)."""
        dest = self.get(service)
        if dest is not None and dest.authorization is not None:
            return dest.authorization
        return NO_RULES if self.default_policy is DefaultPolicy.DENY else None

    def external_for(self, host: str) -> DestinationRoutes | None:
        """The external destination that declares the host name ``host``, if any."""
        return next((d for d in self.destinations
                     if d.external is not None and host in d.external.names), None)
