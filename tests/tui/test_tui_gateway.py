"""The console draws an ingress gateway as the mesh's entry node, with an edge to every service
its routes reach."""

from __future__ import annotations

import dataclasses

from tui_data import observations

from tui.model import MeshModel
from tui.topology import layers, node_lines
from tui.views import build_graph

GATEWAY = {"name": "edge", "spiffe_id": "spiffe://shop.mesh/svc/edge",
           "listeners": [{"address": "127.0.0.1", "port": 8000, "protocol": "http",
                          "redirect_https": None, "hosts": []}],
           "routes": [{"hosts": ["*"], "path_prefix": "/", "service": "web"}],
           "health": "passing"}


def test_a_gateway_is_the_entry_node_of_the_topology() -> None:
    model = MeshModel()
    for obs in observations():
        hosts = tuple(dataclasses.replace(h, state={**h.state, "gateways": [GATEWAY]})
                      if h.state is not None and h.state.get("node") == "host-a" else h
                      for h in obs.hosts)
        model.ingest(dataclasses.replace(obs, hosts=hosts))
    nodes, edges = build_graph(model)
    edge = next(n for n in nodes if n.service == "edge")
    assert edge.gateway and not next(n for n in nodes if n.service == "web").gateway
    assert ("edge", "web") in {(e.source, e.destination) for e in edges}
    columns = layers(nodes, edges)
    assert columns["edge"] == 0 and columns["web"] > 0  # drawn first: where traffic enters
    assert "gateway" in node_lines(edge)[1].plain


def test_an_external_destination_is_drawn_as_outside_the_mesh_not_as_failing() -> None:
    model = MeshModel()
    bank = {"index": 0, "age_seconds": 0.0, "external": {"tls": "originate"},
            "endpoints": [{"node": "bank.example", "instance_id": "127.0.0.1:9443",
                           "address": "127.0.0.1", "port": 9443, "healthy": True}]}
    for obs in observations():
        hosts = tuple(dataclasses.replace(h, state={
            **h.state, "destinations": {**h.state.get("destinations", {}), "bank": bank},
            "upstreams": [*h.state.get("upstreams", []),
                          {"service": "web", "destination": "bank"}]})
            if h.state is not None and h.state.get("node") == "host-a" else h
            for h in obs.hosts)
        model.ingest(dataclasses.replace(obs, hosts=hosts))
    nodes, _ = build_graph(model)
    node = next(n for n in nodes if n.service == "bank")
    assert node.external and (node.healthy, node.total) == (1, 1)
    assert node.status.name != "FAIL"
    assert "external" in node_lines(node)[1].plain
