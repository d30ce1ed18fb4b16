"""A drawing of a scene graph for humans: objects as boxes, predicates as rounded nodes between them.

Each triple becomes its own predicate node (as in sg2im's drawings), so duplicate triples and
self-loops stay visible.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
from PIL import Image

from sg2img.graph import SceneGraph

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


def _layers(g: nx.DiGraph) -> list[list]:
    """Columns of a layered drawing, left to right: subjects, their predicates, their objects, ... (the
    topological generations; a cycle, such as a left of b and b right of a, shares one column)."""
    dag = nx.condensation(g)
    members = dag.graph["mapping"]
    groups: dict[int, list] = {}
    for node, comp in members.items():
        groups.setdefault(comp, []).append(node)
    columns = []
    for generation in nx.topological_generations(dag):
        nodes = [n for comp in generation for n in groups[comp]]
        columns.append(sorted(nodes, key=lambda n: (n[0] != "o", n[1])))
    return columns


def _fits(fig, texts) -> bool:
    """No two labels overlap and none leaves the figure (in the renderer's pixel extents)."""
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_bbox_patch() or t).get_window_extent(renderer) for t in texts]  # the label's box, drawn
    width, height = fig.canvas.get_width_height()
    for k, b in enumerate(boxes):
        if b.x0 < 0 or b.y0 < 0 or b.x1 > width or b.y1 > height:
            return False
        if any(b.overlaps(c) for c in boxes[k + 1 :]):
            return False
    return True


def scene_graph_figure(sg: SceneGraph, size: int = 384, title: str | None = None):
    """(figure, label texts) of a layered drawing: objects as boxes, each triple's predicate as its own
    rounded node between subject and object (so a repeated triple shows twice), columns left to right.
    The font shrinks, and then labels break at their spaces, until no label overlaps another or leaves the
    figure (the last try is kept if none fits)."""
    g = _layout_graph(sg)
    tries = [(8, False), (7, False), (7, True), (6, True), (5, True)]
    for font, wrap in tries:
        fig, ax = plt.subplots(figsize=(size / 96, size / 96), dpi=96)
        fig.subplots_adjust(0.02, 0.02, 0.98, 0.92 if title else 0.98)
        ax.set_axis_off()
        if title:
            ax.set_title(title, fontsize=8)
        texts = []
        if g.number_of_nodes():
            columns = _layers(g)
            pos = {}
            for x, column in enumerate(columns):
                for y, node in enumerate(column):
                    pos[node] = (x, -(y - (len(column) - 1) / 2))
            nx.draw_networkx_edges(
                g, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#777777", node_size=600
            )
            for kind, style in (
                ("object", {"boxstyle": "square,pad=0.25", "fc": "#dbe9ff", "ec": "#2255aa"}),
                ("predicate", {"boxstyle": "round,pad=0.25", "fc": "#fff1cc", "ec": "#aa7700"}),
            ):
                labels = {
                    n: d["label"].replace(" ", "\n") if wrap else d["label"]
                    for n, d in g.nodes(data=True)
                    if d["kind"] == kind
                }
                texts += list(
                    nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=font, bbox=style).values()
                )
            tallest = max(len(c) for c in columns)
            ax.set_xlim(-0.6, len(columns) - 0.4)
            ax.set_ylim(-(tallest - 1) / 2 - 0.6, (tallest - 1) / 2 + 0.6)
        else:
            texts.append(ax.text(0.5, 0.5, "(empty graph)", ha="center", va="center", fontsize=9))
        fig.canvas.draw()
        if _fits(fig, texts) or (font, wrap) == tries[-1]:
            return fig, texts
        plt.close(fig)
    raise AssertionError("unreachable")


def draw_scene_graph(sg: SceneGraph, size: int = 384, title: str | None = None) -> Image.Image:
    """Render to a ``size``×``size`` RGB image (a deterministic layered layout, ``scene_graph_figure``)."""
    fig, _ = scene_graph_figure(sg, size, title)
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
    pixels = [tuple(round(v * (size - 1)) for v in box) for box in boxes]
    for i, (o, (x0, y0, x1, y1)) in enumerate(zip(sg.objects, pixels)):
        colour = o.attributes[0] if o.attributes and is_color_like(o.attributes[0]) else cycle[i % len(cycle)]
        width = 3 if o.box is not None else 2
        draw.rectangle((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), outline=to_hex(colour), width=width)
    labels = [f"{i}: {o.label}" for i, o in enumerate(sg.objects)]
    for text, (x, y, *_) in zip(labels, layout_label_boxes(draw, labels, pixels, size)):
        draw.text((x, y), text, fill="black")
    draw.text((4, size - 14), title, fill="gray")
    return img


def layout_label_boxes(
    draw: Any, labels: list[str], boxes: list[tuple[int, ...]], size: int
) -> list[tuple[int, int, int, int]]:
    """Where each box's label goes, as its text's (x0, y0, x1, y1) in pixels: the first of inside the top
    left corner, inside the bottom left, above the box and below it that stays on the canvas and overlaps
    no label placed before it (else the first that stays on the canvas), so adjacent boxes keep readable
    labels."""

    def overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    placed: list[tuple[int, int, int, int]] = []
    for text, (x0, y0, _, y1) in zip(labels, boxes):
        left, top, right, bottom = draw.textbbox((0, 0), text)
        w, h = right - left, bottom - top + 2
        candidates = [(x0 + 4, y0 + 3), (x0 + 4, y1 - h - 3), (x0, y0 - h - 2), (x0, y1 + 3)]
        spans = [(x, y, x + w, y + h) for x, y in candidates]
        on_canvas = [p for p in spans if p[0] >= 0 and p[1] >= 0 and p[2] <= size and p[3] <= size - 16]
        free = [p for p in on_canvas if not any(overlap(p, q) for q in placed)]
        placed.append((free or on_canvas or spans)[0])
    return placed


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
    reference: Image.Image | None = None,
) -> Image.Image:
    """The reference image (if any: what the graph should look like), the graph drawing and its layout (if
    any), then its generated images, one row, with a caption strip below."""
    drawn = [t for t in (drawing, layout) if t is not None]
    if reference is not None:  # pixels, not a drawing: drawn at its own resolution, like the samples
        drawn = [reference, *drawn]
    tiles = drawn + list(images)
    sheet = Image.new("RGB", (panel * len(tiles), panel), "white")
    for i, tile in enumerate(tiles):
        pixels = i >= len(drawn) or (reference is not None and i == 0)
        resample = Image.Resampling.NEAREST if pixels else Image.Resampling.BILINEAR
        sheet.paste(tile.convert("RGB").resize((panel, panel), resample), (i * panel, 0))
    if not caption:
        return sheet
    out = Image.new("RGB", (sheet.width, panel + 22), "white")
    out.paste(sheet, (0, 0))
    out.paste(_caption_strip(caption, sheet.width), (0, panel))
    return out


def similar_maps(maps: dict[str, torch.Tensor], threshold: float = 0.95) -> list[tuple[str, str, float]]:
    """Pairs of nodes whose maps correlate above ``threshold`` (Pearson, over the pixels): maps that say
    the same thing about where each node acts, whatever their colours suggest."""
    import numpy as np

    names = list(maps)
    flat = {k: maps[k].float().cpu().numpy().ravel() for k in names}
    out = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            x, y = flat[names[a]], flat[names[b]]
            if x.std() == 0 or y.std() == 0:
                continue
            r = float(np.corrcoef(x, y)[0, 1])
            if r > threshold:
                out.append((names[a], names[b], r))
    return out


def attention_overlays(
    image: Image.Image,
    maps: dict[str, torch.Tensor],
    panel: int = 192,
    alpha: float = 0.55,
    similar: float = 0.95,
) -> Image.Image:
    """The image, then one heatmap per graph node over it, all on one colour scale (0 to the largest value
    of any node's map) with its colour bar, so that a weak map looks weak. When maps are nearly the same
    (correlation above ``similar``), the sheet says so above them."""
    import numpy as np

    arrays = {k: m.float().cpu().numpy() for k, m in maps.items()}
    vmax = max((float(a.max()) for a in arrays.values()), default=1.0) or 1.0
    base = np.asarray(image.convert("RGB"))
    n = len(arrays) + 1
    inch = panel / 100
    fig, axes = plt.subplots(1, n, figsize=(n * inch + 0.9, inch + 0.75), dpi=100, squeeze=False)
    axes = axes[0]
    axes[0].imshow(base, interpolation="nearest")
    axes[0].set_title("image", fontsize=8)
    shown = None
    for ax, (name, a) in zip(axes[1:], arrays.items(), strict=True):
        ax.imshow(base, interpolation="nearest")
        shown = ax.imshow(a, cmap="jet", vmin=0.0, vmax=vmax, alpha=alpha, interpolation="bilinear",
                          extent=(-0.5, base.shape[1] - 0.5, base.shape[0] - 0.5, -0.5))  # fmt: skip
        ax.set_title(name if len(name) <= 24 else name[:23] + "…", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if shown is not None:
        fig.colorbar(shown, ax=list(axes), fraction=0.02, pad=0.01).ax.tick_params(labelsize=7)
    pairs = similar_maps(maps, similar)
    if pairs:
        names = sorted({x for a, b, _ in pairs for x in (a, b)})
        fig.suptitle(
            f"maps nearly identical (correlation > {similar}) for {', '.join(names)}: they do not tell these nodes apart",
            fontsize=8, color="darkred",
        )  # fmt: skip
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
