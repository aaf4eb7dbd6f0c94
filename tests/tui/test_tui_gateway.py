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
