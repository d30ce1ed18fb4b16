"""A drawing of a scene graph for humans: objects as boxes, predicates as rounded nodes between them.

Each triple becomes its own predicate node (as in sg2im's drawings), so duplicate triples and
self-loops stay visible.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
from PIL import Image

from .graph import SceneGraph


def _layout_graph(sg: SceneGraph) -> nx.DiGraph:
    g = nx.DiGraph()
    for i, o in enumerate(sg.objects):
        g.add_node(("o", i), label=o.label, kind="object")
    for k, r in enumerate(sg.relationships):
        g.add_node(("p", k), label=r.predicate, kind="predicate")
        g.add_edge(("o", r.subject), ("p", k))
        g.add_edge(("p", k), ("o", r.object))
    return g


def draw_scene_graph(sg: SceneGraph, size: int = 384, title: str | None = None) -> Image.Image:
    """Render to a ``size``×``size`` RGB image (deterministic layout)."""
    g = _layout_graph(sg)
    fig, ax = plt.subplots(figsize=(size / 96, size / 96), dpi=96)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    if g.number_of_nodes():
        pos = nx.spring_layout(g, seed=0) if g.number_of_nodes() > 1 else {n: (0.0, 0.0) for n in g}
        nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=10, edge_color="#555555", node_size=900)
        for kind, style in (
            ("object", {"boxstyle": "square,pad=0.3", "fc": "#dbe9ff", "ec": "#2255aa"}),
            ("predicate", {"boxstyle": "round,pad=0.3", "fc": "#fff1cc", "ec": "#aa7700"}),
        ):
            labels = {n: d["label"] for n, d in g.nodes(data=True) if d["kind"] == kind}
            nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=8, bbox=style)
        ax.margins(0.2)
    else:
        ax.text(0.5, 0.5, "(empty graph)", ha="center", va="center", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def save_scene_graph_drawing(sg: SceneGraph, path: str | Path, **kwargs) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    draw_scene_graph(sg, **kwargs).save(p)
    return p
