"""What the proxy reads on every request: the routes and endpoints in force.

The daemon builds a new immutable ``MeshView`` whenever routes or endpoints change and swaps it
into the ``ViewCell``; a request reads ``cell.current`` once and uses that snapshot to the end, so
a reload never changes the rules under a request in flight."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshd.config.schema import RouteTable
from meshd.registry.model import EndpointSet


@dataclass(frozen=True)
class MeshView:
    routes: RouteTable = field(default_factory=RouteTable)
    endpoints: Mapping[str, EndpointSet] = field(default_factory=lambda: MappingProxyType({}))
    generation: int = 0  # bumped on every route table change
    # external destinations' endpoints (resolved from their ``external`` declaration, never
    # from the registry): they take the place of the registry's for the same name
    external: Mapping[str, EndpointSet] = field(default_factory=lambda: MappingProxyType({}))

    def endpoint_set(self, service: str) -> EndpointSet | None:
        if self.external:
            found = self.external.get(service)
            if found is not None:
                return found
        return self.endpoints.get(service)

    def all_endpoints(self) -> dict[str, EndpointSet]:
        """Every destination's endpoints, external ones in place of the registry's."""
        return {**self.endpoints, **self.external}


RoutesListener = Callable[[MeshView], None]


class ViewCell:
    """The one mutable holder of the current ``MeshView``."""

    def __init__(self, view: MeshView | None = None) -> None:
        self.current = view or MeshView()
        self._listeners: list[RoutesListener] = []
        # called (synchronously, must not raise) after every change: routes, endpoints and
        # external endpoints alike (the worker processes follow the supervisor's view)
        self.changed: list[Callable[[], None]] = []

    def _routes_changed(self) -> None:
        """A new route table in force: its listeners, then every change hook."""
        for listener in list(self._listeners):
            listener(self.current)
        self._changed()

    def _changed(self) -> None:
        for hook in list(self.changed):
            hook()

    def set_routes(self, routes: RouteTable) -> MeshView:
        self.current = dataclasses.replace(
            self.current, routes=routes, generation=self.current.generation + 1
        )
        self._routes_changed()
        return self.current

    def put(self, view: MeshView) -> None:
        """Put ``view`` in force whole (a worker process following its supervisor's view);
        the route listeners hear of it when its route table is another generation."""
        routes_changed = view.generation != self.current.generation
        self.current = view
        if routes_changed:
            self._routes_changed()
        else:
            self._changed()

    def watch_routes(self, listener: RoutesListener) -> Callable[[], None]:
        """Call ``listener(view)`` (synchronously, after the swap; it must not raise) on every
        new route table; returns the function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def set_external(self, service: str, endpoints: EndpointSet | None) -> MeshView:
        """The resolved endpoints of the external destination ``service`` (None: it is no
        longer external)."""
        merged = dict(self.current.external)
        if endpoints is None:
            merged.pop(service, None)
        else:
            merged[service] = endpoints
        self.current = dataclasses.replace(self.current, external=MappingProxyType(merged))
        self._changed()
        return self.current

    def set_endpoints(self, endpoints: EndpointSet) -> MeshView:
        merged = dict(self.current.endpoints)
        merged[endpoints.service] = endpoints
        self.current = dataclasses.replace(self.current, endpoints=MappingProxyType(merged))
        self._changed()
        return self.current
