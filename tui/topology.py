"""Drawing the service graph in a terminal: services as boxes in layers (callers left of what
they call), each call a line per subset leg labelled with rate, success and p99, entering the
destination's box at its own row. When the drawing does not fit the width (or lines would overlap
ambiguously) the same facts are shown as a list of edges. Pure: views in, rich ``Text`` out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.text import Text

from tui import fmt
from tui.fmt import STYLE, SYMBOL, Status
from tui.views import EdgeView, LegView, NodeView, endpoints_status

N, E, S, W = 1, 2, 4, 8
LINES = {0: " ", N: "│", S: "│", N | S: "│", E: "─", W: "─", E | W: "─", N | E: "└",
         N | W: "┘", S | E: "┌", S | W: "┐", N | S | E: "├", N | S | W: "┤", E | W | S: "┬",
         E | W | N: "┴", N | E | S | W: "┼"}
MIN_BOX = 14


@dataclass(frozen=True)
class Hit:
    service: str
    x0: int
    y0: int
    x1: int
    y1: int

    def contains(self, x: int, y: int) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1


@dataclass(frozen=True)
class Drawing:
    text: Text
    width: int
    hits: tuple[Hit, ...]
    graph: bool  # False: the edge-list fallback

    def service_at(self, x: int, y: int) -> str | None:
        return next((h.service for h in self.hits if h.contains(x, y)), None)


# -- labels ----------------------------------------------------------------------------------


def node_lines(node: NodeView) -> list[Text]:
    lines = [Text.assemble((SYMBOL[node.status], STYLE[node.status]), " ",
                           (node.service, "bold"))]
    if node.gateway or node.external:  # an edge: the entry node, or a service outside
        lines.append(Text.assemble(("gateway" if node.gateway else "external", "italic"), " ",
                                   _health(node.healthy, node.total, node.ejected, True,
                                           "" if node.gateway else " addr")))
        return lines
    named = [s for s in node.subsets if s.name or s.version]
    if not named:
        lines.append(_health(node.healthy, node.total, node.ejected, True, " inst"))
    for sub in named:
        weight = "   " + fmt.DASH if sub.weight is None else f"{sub.weight:3d}%"
        name = sub.name or f"({sub.version})"
        lines.append(Text.assemble(f"{name:<4}{weight} ", _health(
            sub.healthy, sub.total, sub.ejected, bool(sub.weight))))
    return lines


def _health(healthy: int, total: int, ejected: int, routed: bool, suffix: str = "") -> Text:
    """``● 2/2``, ``▲ 1/2``, ``✘ 0/2``; ``· 0/0`` for an empty set no traffic is routed to."""
    up = healthy - ejected
    status = endpoints_status(up, total, routed)
    dot = fmt.HEALTHY_DOT if status is Status.OK else SYMBOL[status]
    text = Text(f"{dot} {up}/{total}{suffix}", style=STYLE[status])
    if ejected:
        text.append(f" {fmt.EJECTED}{ejected}", style=STYLE[Status.FAIL])
    return text


def leg_parts(leg: LegView) -> tuple[str, str, str, str]:
    """(subset, rate, status symbol + success, p99) of an edge leg's label."""
    t = leg.traffic
    if t.requests <= 0:
        return (leg.subset, "idle", SYMBOL[leg.status], "")
    return (leg.subset, fmt.rate(t.rate), SYMBOL[leg.status] + fmt.percent(t.success),
            fmt.duration(t.p99))


def _label(parts: tuple[str, str, str, str], widths: Sequence[int]) -> str:
    subset, rate, success, p99 = parts
    head = f"{subset:<{widths[0]}} " if widths[0] else ""
    return f" {head}{rate:>{widths[1]}} {success:>{widths[2]}} {p99:>{widths[3]}} "


def _widths(parts: Sequence[tuple[str, str, str, str]]) -> list[int]:
    return [max((len(p[i]) for p in parts), default=0) for i in range(4)]


# -- layout ----------------------------------------------------------------------------------


def layers(nodes: Sequence[NodeView], edges: Sequence[EdgeView]) -> dict[str, int]:
    """Longest-path layering over the call graph, ignoring the edges that close a cycle."""
    names = [n.service for n in nodes]
    succ: dict[str, list[str]] = {n: [] for n in names}
    for e in edges:
        if e.source in succ and e.destination in succ and e.source != e.destination:
            succ[e.source].append(e.destination)
    kept: dict[str, list[str]] = {n: [] for n in names}
    state: dict[str, int] = {}

    def visit(n: str) -> None:  # graphs here are small: recursion is fine
        state[n] = 1
        for m in sorted(succ[n]):
            if state.get(m) == 1:
                continue  # back edge
            kept[n].append(m)
            if m not in state:
                visit(m)
        state[n] = 2

    for n in sorted(names):
        if n not in state:
            visit(n)
    layer = dict.fromkeys(names, 0)
    changed = True
    while changed:
        changed = False
        for n in names:
            for m in kept[n]:
                if layer[m] < layer[n] + 1:
                    layer[m] = layer[n] + 1
                    changed = True
    return layer


@dataclass
class _Box:
    node: NodeView
    lines: list[Text]
    x: int = 0
    y: int = 0
    w: int = 0
    h: int = 0
    legs_in: list[tuple[EdgeView, LegView]] = field(default_factory=list)


class _Canvas:
    def __init__(self) -> None:
        self.masks: dict[tuple[int, int], int] = {}
        self.chars: dict[tuple[int, int], tuple[str, str]] = {}
        self.styles: dict[tuple[int, int], str] = {}
        self.owner: dict[tuple[int, int], str] = {}  # source owning a horizontal line cell
        self.conflict = False

    def line(self, x: int, y: int, bits: int, style: str, owner: str) -> None:
        if bits & (E | W) and self.owner.setdefault((x, y), owner) != owner:
            self.conflict = True
        self.masks[(x, y)] = self.masks.get((x, y), 0) | bits
        self.styles[(x, y)] = style

    def hline(self, y: int, x0: int, x1: int, style: str, owner: str) -> None:
        lo, hi = min(x0, x1), max(x0, x1)
        for x in range(lo, hi + 1):
            self.line(x, y, (W if x > lo else 0) | (E if x < hi else 0) or E | W, style, owner)

    def vline(self, x: int, y0: int, y1: int, style: str) -> None:
        lo, hi = min(y0, y1), max(y0, y1)
        for y in range(lo, hi + 1):
            bits = (N if y > lo else 0) | (S if y < hi else 0)
            if bits:
                self.masks[(x, y)] = self.masks.get((x, y), 0) | bits
                self.styles.setdefault((x, y), style)

    def put(self, x: int, y: int, text: Text | str, style: str = "") -> None:
        rich = text if isinstance(text, Text) else Text(text, style=style)
        for i, (char, char_style) in enumerate(_chars(rich)):
            self.chars[(x + i, y)] = (char, char_style or style)

    def render(self, width: int, height: int) -> Text:
        out = Text()
        for y in range(height):
            for x in range(width):
                if (x, y) in self.chars:
                    char, style = self.chars[(x, y)]
                else:
                    char, style = LINES[self.masks.get((x, y), 0)], self.styles.get((x, y), "")
                out.append(char, style=style or None)
            out.rstrip()
            if y < height - 1:
                out.append("\n")
        return out


def _chars(text: Text) -> list[tuple[str, str]]:
    styles = [""] * len(text.plain)
    base = str(text.style) if text.style else ""
    for i in range(len(styles)):
        styles[i] = base
    for span in text.spans:
        for i in range(span.start, min(span.end, len(styles))):
            styles[i] = str(span.style)
    return list(zip(text.plain, styles, strict=True))


def draw(nodes: Sequence[NodeView], edges: Sequence[EdgeView], width: int,
         selected: str | None = None) -> Drawing:
    """The graph if it fits in ``width`` columns, else the edge list."""
    graph = draw_graph(nodes, edges, selected)
    if graph is not None and graph.width <= width:
        return graph
    return draw_list(nodes, edges, selected)


def draw_graph(nodes: Sequence[NodeView], edges: Sequence[EdgeView],
               selected: str | None = None) -> Drawing | None:
    """None when lines would overlap ambiguously (then the list says it better)."""
    if not nodes:
        return Drawing(Text("no services found yet", style="dim"), 0, (), True)
    layer = layers(nodes, edges)
    boxes = {n.service: _Box(n, node_lines(n)) for n in nodes}
    drawn = [e for e in edges if e.source in boxes and e.destination in boxes
             and layer[e.destination] == layer[e.source] + 1]
    others = [e for e in edges if e not in drawn]
    for e in drawn:
        boxes[e.destination].legs_in.extend((e, leg) for leg in e.legs)
    for box in boxes.values():
        inner = max(len(t.plain) for t in box.lines) + 2
        box.w = max(MIN_BOX, inner + 2)
        box.h = 2 + max(len(box.lines), 1 + len(box.legs_in))
    columns: list[list[_Box]] = [[] for _ in range(max(layer.values()) + 1)]
    for name in sorted(boxes, key=lambda n: (not any(n in (e.source, e.destination)
                                                     for e in edges), n)):
        columns[layer[name]].append(boxes[name])
    x = 0
    canvas = _Canvas()
    for i, column in enumerate(columns):
        if i > 0:
            column.sort(key=lambda b: (_barycenter(b, drawn, boxes), b.node.service))
        y = 0
        col_w = max((b.w for b in column), default=MIN_BOX)
        for box in column:
            box.x, box.y = x, y
            y += box.h + 1
        if i + 1 < len(columns):
            x += col_w + _gap(column, drawn, boxes)
        else:
            x += col_w
    total_w = x
    for e_index, column in enumerate(columns[:-1]):
        _draw_gap(canvas, column, drawn, boxes, e_index)
    if canvas.conflict:
        return None
    hits = []
    for box in boxes.values():
        _draw_box(canvas, box, selected)
        hits.append(Hit(box.node.service, box.x, box.y, box.x + box.w, box.y + box.h))
    height = max(b.y + b.h for b in boxes.values())
    text = canvas.render(total_w, height)
    if others:
        text.append("\n")
        text.append_text(_edge_lines(others, boxes_by_name(nodes), prefix="also: "))
    return Drawing(text, total_w, tuple(hits), True)


def boxes_by_name(nodes: Sequence[NodeView]) -> dict[str, NodeView]:
    return {n.service: n for n in nodes}


def _barycenter(box: _Box, edges: Sequence[EdgeView], boxes: dict[str, _Box]) -> float:
    ys = [boxes[e.source].y for e in edges if e.destination == box.node.service]
    return sum(ys) / len(ys) if ys else 1e9


def _sources(column: Sequence[_Box], edges: Sequence[EdgeView]) -> list[_Box]:
    names = {e.source for e in edges}
    return [b for b in column if b.node.service in names]


def _gap_legs(column: Sequence[_Box], edges: Sequence[EdgeView]) -> list[LegView]:
    names = {b.node.service for b in column}
    return [leg for e in edges if e.source in names for leg in e.legs]


def _gap(column: Sequence[_Box], edges: Sequence[EdgeView], boxes: dict[str, _Box]) -> int:
    legs = _gap_legs(column, edges)
    label = len(_label(leg_parts(legs[0]), _widths([leg_parts(g) for g in legs]))) if legs else 0
    return 2 * len(_sources(column, edges)) + 2 + label + 2


def _draw_gap(canvas: _Canvas, column: Sequence[_Box], edges: Sequence[EdgeView],
              boxes: dict[str, _Box], index: int) -> None:
    sources = _sources(column, edges)
    if not sources:
        return
    col_x = column[0].x
    col_w = max(b.w for b in column)
    gx = col_x + col_w
    widths = _widths([leg_parts(g) for g in _gap_legs(column, edges)])
    label_x = gx + 2 * len(sources) + 2
    names = {b.node.service for b in column}
    dests = {e.destination for e in edges if e.source in names}
    for dest_name in sorted(dests):
        dest = boxes[dest_name]
        incoming = [(e, leg) for e, leg in dest.legs_in if e.source in names]
        incoming.sort(key=lambda el: (boxes[el[0].source].y, el[0].source))
        for row, (edge, leg) in enumerate(incoming, start=dest.y + 2):
            src = boxes[edge.source]
            k = sources.index(src)
            cx = gx + 1 + 2 * k
            ys = src.y + 1
            style = STYLE[leg.status]
            canvas.hline(ys, src.x + src.w, cx, style, edge.source)
            canvas.vline(cx, ys, row, style)
            canvas.hline(row, cx, dest.x - 2, style, edge.source)
            canvas.put(dest.x - 1, row, "▶", style)
            canvas.put(label_x, row, _label(leg_parts(leg), widths), style)
            canvas.put(src.x + src.w - 1, ys, "├", STYLE[src.node.status])


def _draw_box(canvas: _Canvas, box: _Box, selected: str | None) -> None:
    style = STYLE[box.node.status]
    x0, y0, x1, y1 = box.x, box.y, box.x + box.w - 1, box.y + box.h - 1
    keep_right = (x1, y0 + 1) in canvas.chars  # the "├" a leaving line attached
    canvas.put(x0, y0, "┌" + "─" * (box.w - 2) + "┐", style)
    canvas.put(x0, y1, "└" + "─" * (box.w - 2) + "┘", style)
    for y in range(y0 + 1, y1):
        canvas.put(x0, y, "│", style)
        if not (keep_right and y == y0 + 1):
            canvas.put(x1, y, "│", style)
    for i, line in enumerate(box.lines):
        content = line.copy()
        if i == 0 and box.node.service == selected:
            content.stylize("reverse")
        canvas.put(x0 + 2, y0 + 1 + i, content)


# -- the list ------------------------------------------------------------------------------------


def _edge_lines(edges: Sequence[EdgeView], nodes: dict[str, NodeView],
                prefix: str = "") -> Text:
    out = Text()
    legs = [leg for e in edges for leg in e.legs]
    widths = _widths([leg_parts(g) for g in legs])
    for e in edges:
        if out:
            out.append("\n")
        out.append(prefix, style="dim")
        out.append(SYMBOL[e.status] + " ", style=STYLE[e.status])
        out.append(f"{e.source} → {e.destination}", style="bold")
        for leg in e.legs:
            subset, rate, success, p99 = leg_parts(leg)
            weight = "" if leg.weight is None else f"{leg.weight}%"
            out.append("\n")
            out.append(f"   {subset:<{widths[0]}} {weight:>4} ", style=None)
            latency = f" p99 {p99:>{widths[3]}}" if p99 else " " * (5 + widths[3])
            out.append(f"{rate:>{widths[1]}} {success:>{widths[2]}}{latency}",
                       style=STYLE[leg.status])
            out.append("  ")
            out.append_text(_health(leg.healthy, leg.total, 0, leg.weight != 0))
    return out


def draw_list(nodes: Sequence[NodeView], edges: Sequence[EdgeView],
              selected: str | None = None) -> Drawing:
    by_name = boxes_by_name(nodes)
    text = Text()
    hits = []
    text.append("services ", style="dim")
    for node in nodes:
        name = Text(node.service, style="bold reverse" if node.service == selected else "bold")
        text.append(SYMBOL[node.status], style=STYLE[node.status])
        text.append(" ")
        text.append_text(name)
        text.append(f" {node.healthy - node.ejected}/{node.total}  ")
    y = 1
    if edges:
        text.append("\n")
        body = _edge_lines(edges, by_name)
        for line in body.split("\n"):
            plain = line.plain
            if "→" in plain and not plain.startswith("   "):
                dest = plain.split("→", 1)[1].strip()
                hits.append(Hit(dest, 0, y, max(1, len(plain)), y + 1))
            y += 1
        text.append_text(body)
    else:
        text.append("\nno calls seen yet", style="dim")
    width = max((len(line) for line in text.plain.splitlines()), default=0)
    return Drawing(text, width, tuple(hits), False)
