"""A drawing of a scene graph for humans: objects as boxes, predicates as rounded nodes between them.

Each triple becomes its own predicate node (as in sg2im's drawings), so duplicate triples and
self-loops stay visible.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
from PIL import Image

from .graph import SceneGraph

if TYPE_CHECKING:
    import torch


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


def draw_layout(
    sg: SceneGraph, boxes: list[tuple[float, float, float, float]], size: int = 256, title: str = "layout"
) -> Image.Image:
    """The layout the graph branch used: each object's box (x0, y0, x1, y1 in [0, 1]) outlined in its
    colour (the object's first attribute when matplotlib knows it as a colour, else a cycle), with its
    index and label; a given box is drawn solid, and the caption says where the boxes came from."""
    from matplotlib.colors import is_color_like, to_hex
    from PIL import ImageDraw

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for i, (o, box) in enumerate(zip(sg.objects, boxes)):
        colour = o.attributes[0] if o.attributes and is_color_like(o.attributes[0]) else cycle[i % len(cycle)]
        x0, y0, x1, y1 = (round(v * (size - 1)) for v in box)
        width = 3 if o.box is not None else 2
        draw.rectangle((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), outline=to_hex(colour), width=width)
        draw.text((x0 + 4, y0 + 3), f"{i}: {o.label}", fill="black")
    draw.text((4, size - 14), title, fill="gray")
    return img


def _caption_strip(text: str, width: int, height: int = 22) -> Image.Image:
    from PIL import ImageDraw

    strip = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(strip).text((4, 4), text, fill="black")
    return strip


def contact_sheet(
    drawing: Image.Image | None,
    images: list[Image.Image],
    caption: str = "",
    panel: int = 256,
    layout: Image.Image | None = None,
) -> Image.Image:
    """The graph drawing and its layout (if any) beside its generated images, one row, with a caption strip
    below."""
    drawn = [t for t in (drawing, layout) if t is not None]
    tiles = drawn + list(images)
    sheet = Image.new("RGB", (panel * len(tiles), panel), "white")
    for i, tile in enumerate(tiles):
        resample = Image.Resampling.BILINEAR if i < len(drawn) else Image.Resampling.NEAREST
        sheet.paste(tile.convert("RGB").resize((panel, panel), resample), (i * panel, 0))
    if not caption:
        return sheet
    out = Image.new("RGB", (sheet.width, panel + 22), "white")
    out.paste(sheet, (0, 0))
    out.paste(_caption_strip(caption, sheet.width), (0, panel))
    return out


def attention_overlays(
    image: Image.Image, maps: dict[str, torch.Tensor], panel: int = 192, alpha: float = 0.55
) -> Image.Image:
    """The image, then one heatmap per graph node over it (each map scaled to its own range)."""
    import numpy as np

    cmap = matplotlib.colormaps["jet"]
    base = image.convert("RGB").resize((panel, panel), Image.Resampling.NEAREST)
    tiles = [(base, "image")]
    for name, m in maps.items():
        a = m.float().cpu().numpy()
        span = a.max() - a.min()
        a = (a - a.min()) / span if span > 0 else a * 0
        heat = Image.fromarray((cmap(a)[..., :3] * 255).astype(np.uint8)).resize(
            (panel, panel), Image.Resampling.BILINEAR
        )
        tiles.append((Image.blend(base, heat, alpha), name))
    out = Image.new("RGB", (panel * len(tiles), panel + 22), "white")
    for i, (tile, name) in enumerate(tiles):
        out.paste(tile, (i * panel, 0))
        out.paste(_caption_strip(name, panel), (i * panel, panel))
    return out
